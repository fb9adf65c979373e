//! Live counters of one TCP mapping, read by metrics and `berth status` while it runs.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::relay::Totals;

/// Upper bounds (seconds) of the connection-duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// Counters of a TCP mapping. Byte counts grow while connections are open.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    bytes: Arc<Totals>,
    refused: AtomicU64,
    timeout: AtomicU64,
    unreachable: AtomicU64,
    other: AtomicU64,
    limit: AtomicU64,
    client_limit: AtomicU64,
    descriptors: AtomicU64,
    ports: AtomicU64,
    chosen_ports: AtomicU64,
    idle: AtomicU64,
    /// One count per bucket of [`DURATION_BUCKETS`] plus one for longer ones (not cumulative).
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_micros: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Clients accepted (including those then refused for the limit or an unreachable target).
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
    /// Clients that could not be served, by reason (the `reason` label of the metric).
    pub errors: [(&'static str, u64); 8],
    /// Connections reset by the idle timeout.
    pub idle_closed: u64,
    /// Connects to the target from a port berth chose, the kernel having none left.
    pub chosen_ports: u64,
    /// Connections `auto` handed from splice to the kernel relay.
    pub promoted: u64,
    /// Cumulative counts for each of [`DURATION_BUCKETS`], the total count and sum (seconds).
    pub duration_buckets: Vec<(f64, u64)>,
    pub duration_count: u64,
    pub duration_sum: f64,
}

impl Snapshot {
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        let mut cumulative = 0;
        let duration_buckets = DURATION_BUCKETS
            .iter()
            .zip(&self.durations)
            .map(|(&le, n)| {
                cumulative += n.load(Relaxed);
                (le, cumulative)
            })
            .collect();
        let duration_count = self.durations.iter().map(|n| n.load(Relaxed)).sum();
        Snapshot {
            accepted: self.accepted.load(Relaxed),
            active: self.active.load(Relaxed),
            bytes_to_target: self.bytes.to_target(),
            bytes_to_client: self.bytes.to_client(),
            errors: [
                ("refused", self.refused.load(Relaxed)),
                ("timeout", self.timeout.load(Relaxed)),
                ("unreachable", self.unreachable.load(Relaxed)),
                ("limit", self.limit.load(Relaxed)),
                ("client_limit", self.client_limit.load(Relaxed)),
                ("descriptors", self.descriptors.load(Relaxed)),
                ("ports", self.ports.load(Relaxed)),
                ("other", self.other.load(Relaxed)),
            ],
            idle_closed: self.idle.load(Relaxed),
            chosen_ports: self.chosen_ports.load(Relaxed),
            promoted: self.bytes.promoted(),
            duration_buckets,
            duration_count,
            duration_sum: self.duration_micros.load(Relaxed) as f64 / 1e6,
        }
    }

    pub(super) fn totals(&self) -> Arc<Totals> {
        self.bytes.clone()
    }

    pub(super) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub(super) fn opened(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    pub(super) fn closed(&self, lasted: std::time::Duration) {
        self.active.fetch_sub(1, Relaxed);
        let secs = lasted.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.durations[bucket].fetch_add(1, Relaxed);
        let micros = u64::try_from(lasted.as_micros()).unwrap_or(u64::MAX);
        self.duration_micros.fetch_add(micros, Relaxed);
    }

    pub(super) fn limit_reached(&self) {
        self.limit.fetch_add(1, Relaxed);
    }

    pub(super) fn client_limit_reached(&self) {
        self.client_limit.fetch_add(1, Relaxed);
    }

    pub(super) fn out_of_descriptors(&self) {
        self.descriptors.fetch_add(1, Relaxed);
    }

    pub(super) fn idle_closed(&self) {
        self.idle.fetch_add(1, Relaxed);
    }

    pub(super) fn chosen_port(&self) {
        self.chosen_ports.fetch_add(1, Relaxed);
    }

    pub(super) fn connect_failed(&self, reason: &str) {
        let counter = match reason {
            "refused" => &self.refused,
            "timeout" => &self.timeout,
            "unreachable" => &self.unreachable,
            "descriptors" => &self.descriptors,
            "ports" => &self.ports,
            _ => &self.other,
        };
        counter.fetch_add(1, Relaxed);
    }
}
