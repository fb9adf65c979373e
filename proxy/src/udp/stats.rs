//! Counters for one UDP mapping, updated as datagrams move so that metrics and tests can read
//! them live.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of a UDP mapping; see [`Snapshot`] for their meaning.
#[derive(Debug, Default)]
pub struct Stats {
    datagrams_to_target: AtomicU64,
    bytes_to_target: AtomicU64,
    datagrams_to_client: AtomicU64,
    bytes_to_client: AtomicU64,
    flows_created: AtomicU64,
    flows_active: AtomicU64,
    flows_expired: AtomicU64,
    flows_evicted: AtomicU64,
    unreachable: AtomicU64,
    dropped: AtomicU64,
    offload_refused: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Datagrams (and their payload bytes) forwarded from clients to the target.
    pub datagrams_to_target: u64,
    pub bytes_to_target: u64,
    /// Datagrams (and payload bytes) forwarded from the target back to clients.
    pub datagrams_to_client: u64,
    pub bytes_to_client: u64,
    /// Flows opened since start, and open now.
    pub flows_created: u64,
    pub flows_active: u64,
    /// Flows closed after the idle timeout.
    pub flows_expired: u64,
    /// Flows closed to make room when the table was full (least recently used first).
    pub flows_evicted: u64,
    /// ICMP errors (port, host or network unreachable) the target's side reported on a flow.
    /// The flow and the listener carry on.
    pub unreachable: u64,
    /// Datagrams that could not be forwarded: no socket for a new flow, a send error, or an
    /// IPv6 jumbogram too large for the buffer.
    pub dropped: u64,
    /// Segmented sends a path refused (segment larger than its MTU, or no offload on the
    /// route): their datagrams went again one by one, none lost.
    pub offload_refused: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            datagrams_to_target: self.datagrams_to_target.load(Relaxed),
            bytes_to_target: self.bytes_to_target.load(Relaxed),
            datagrams_to_client: self.datagrams_to_client.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            flows_created: self.flows_created.load(Relaxed),
            flows_active: self.flows_active.load(Relaxed),
            flows_expired: self.flows_expired.load(Relaxed),
            flows_evicted: self.flows_evicted.load(Relaxed),
            unreachable: self.unreachable.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            offload_refused: self.offload_refused.load(Relaxed),
        }
    }

    pub(super) fn to_target(&self, datagrams: usize, bytes: usize) {
        self.datagrams_to_target
            .fetch_add(datagrams as u64, Relaxed);
        self.bytes_to_target.fetch_add(bytes as u64, Relaxed);
    }

    pub(super) fn to_client(&self, datagrams: usize, bytes: usize) {
        self.datagrams_to_client
            .fetch_add(datagrams as u64, Relaxed);
        self.bytes_to_client.fetch_add(bytes as u64, Relaxed);
    }

    pub(super) fn flow_created(&self) {
        self.flows_created.fetch_add(1, Relaxed);
    }

    pub(super) fn set_active(&self, n: usize) {
        self.flows_active.store(n as u64, Relaxed);
    }

    pub(super) fn flow_expired(&self) {
        self.flows_expired.fetch_add(1, Relaxed);
    }

    pub(super) fn flow_evicted(&self) {
        self.flows_evicted.fetch_add(1, Relaxed);
    }

    pub(super) fn unreachable(&self) {
        self.unreachable.fetch_add(1, Relaxed);
    }

    pub(super) fn dropped(&self, datagrams: usize) {
        self.dropped.fetch_add(datagrams as u64, Relaxed);
    }

    pub(super) fn offload_refused(&self) {
        self.offload_refused.fetch_add(1, Relaxed);
    }
}
