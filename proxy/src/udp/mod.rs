//! UDP port forwarding: one flow per client address, each with its own socket connected to
//! the target, so that every reply goes back to the client it belongs to.
//!
//! - [`flows`]: the flow table (lookup, idle expiry, LRU eviction), free of I/O.
//! - `flow`: one flow's socket and the task that carries replies back.
//! - `batch`: recvmmsg/sendmmsg with packet info, so that replies leave from the local
//!   address the client sent to (what matters on multi-homed hosts and `0.0.0.0` listeners).
//! - [`Stats`]: live counters.
//!
//! The entry point is [`run`]`(socket, config, stats, shutdown)`; the caller binds (or
//! inherits) the socket, as for TCP.

mod batch;
mod flow;
pub mod flows;
mod offload;
mod stats;

use std::{future::Future, io, net::SocketAddr, os::fd::AsFd as _, sync::Arc, time::Duration};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::{io::Interest, net::UdpSocket, time::Instant};
use tracing::{debug, info, warn};

pub use flows::DEFAULT_IDLE_TIMEOUT;
pub use stats::{Snapshot, Stats};

use self::{
    batch::Meta,
    flow::{Flow, Mapping, send_all},
    flows::FlowTable,
    offload::Offload,
};
use crate::addr::{ClientAddr, TargetAddr};

/// How one UDP mapping behaves.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: TargetAddr,
    /// A flow with no datagram in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Flows open at once. A new client beyond it evicts the least recently used flow.
    pub max_flows: usize,
    /// Datagrams moved per system call (recvmmsg/sendmmsg), 1 to [`Config::MAX_BATCH`].
    pub batch: usize,
    /// UDP segmentation offload: receive bursts coalesced (UDP_GRO) and send runs of equal
    /// datagrams as one segmented send (UDP_SEGMENT), where the kernel and the path take it.
    pub offload: bool,
}

impl Config {
    pub const DEFAULT_MAX_FLOWS: usize = 10_000;
    pub const DEFAULT_BATCH: usize = batch::MAX_BATCH;
    pub const MAX_BATCH: usize = batch::MAX_BATCH;

    pub fn new(target: TargetAddr) -> Self {
        Self {
            target,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_flows: Self::DEFAULT_MAX_FLOWS,
            batch: Self::DEFAULT_BATCH,
            offload: true,
        }
    }
}

/// The socket cannot serve as a UDP listener.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("cannot enable packet info on the UDP socket: {0}")]
    PacketInfo(#[source] io::Error),
    #[error("the UDP socket has no local address: {0}")]
    NoLocalAddr(#[source] io::Error),
    #[error("the UDP socket failed: {0}")]
    Socket(#[source] io::Error),
}

/// Serves `socket` until `shutdown` completes; then every flow is closed (UDP has no
/// connection to drain: a client simply retries, and a new flow picks it up).
pub async fn run(
    socket: UdpSocket,
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future,
) -> Result<(), UdpError> {
    let local = socket.local_addr().map_err(UdpError::NoLocalAddr)?;
    enable_packet_info(&socket, local).map_err(UdpError::PacketInfo)?;
    let gro = config.offload
        && batch::enable_gro(socket.as_fd())
            .inspect_err(|e| info!(listen = %local, error = %e, "UDP GRO unavailable; datagrams are received one by one"))
            .is_ok();
    info!(listen = %local, target = %config.target, proto = "udp", idle_timeout = ?config.idle_timeout, max_flows = config.max_flows, "listening");
    let mapping = Arc::new(Mapping {
        wildcard: local.ip().is_unspecified(),
        listener: Arc::new(socket),
        stats,
        batch: config.batch,
        gro,
        to_target: Offload::new(config.offload),
        to_clients: Offload::new(config.offload),
        epoch: Instant::now(),
    });
    let mut table: FlowTable<Flow> = FlowTable::new(config.max_flows, config.idle_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut alerts = Alerts::default();
    loop {
        let expiry = table.next_expiry();
        tokio::select! {
            biased;
            () = async { (&mut shutdown).await; } => break,
            () = sleep_until(expiry) => expire(&mut table, &mapping, &config),
            ready = mapping.listener.readable() => {
                ready.map_err(UdpError::Socket)?;
                forward_batch(&mut table, &mapping, &config, &mut alerts).await;
            }
        }
        mapping.stats.set_active(table.len());
    }
    let open = table.len();
    drop(table);
    mapping.stats.set_active(0);
    // The flows' reply tasks are aborted and drop their handles on the socket at their next
    // poll: wait for that, so that the port is free when this returns (whoever removed the
    // mapping may bind it again at once).
    let deadline = Instant::now() + Duration::from_secs(1);
    while Arc::strong_count(&mapping) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    info!(listen = %local, flows = open, "stopped; flows closed");
    Ok(())
}

/// Conditions logged once per episode, not once per datagram.
#[derive(Debug, Default)]
struct Alerts {
    full: bool,
    open_failing: bool,
}

/// Asks the kernel to report each datagram's destination address. [`crate::listen`] does it
/// before binding; this covers sockets bound elsewhere (systemd, dockerd, the runtime API).
pub(crate) fn enable_packet_info(
    socket: impl std::os::fd::AsFd,
    local: SocketAddr,
) -> io::Result<()> {
    match local {
        SocketAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?,
        SocketAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?,
    }
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Closes the flows that have been idle for the timeout. The table only sees client → target
/// traffic; a flow whose target replied since is put back with the reply's time instead.
fn expire(table: &mut FlowTable<Flow>, mapping: &Mapping, config: &Config) {
    let now = Instant::now();
    for (client, flow) in table.expire(now) {
        match flow.last_reply(mapping) {
            Some(at) if now.saturating_duration_since(at) < config.idle_timeout => {
                table.insert(client, flow, at);
            }
            _ => {
                debug!(client.addr = %client, "flow idle, closed");
                mapping.stats.flow_expired();
            }
        }
    }
}

/// Receives one batch from the listener and sends each client's datagrams on its flow.
async fn forward_batch(
    table: &mut FlowTable<Flow>,
    mapping: &Arc<Mapping>,
    config: &Config,
    alerts: &mut Alerts,
) {
    let listener = &mapping.listener;
    let mut batch = mapping.take_batch();
    let received = listener.try_io(Interest::READABLE, || {
        batch::recv(listener.as_fd(), &mut batch)
    });
    let n = match received {
        Ok(n) => n,
        Err(e) => {
            if e.kind() != io::ErrorKind::WouldBlock {
                warn!(error = %e, "UDP receive failed");
            }
            Mapping::give_batch(batch);
            return;
        }
    };
    let now = Instant::now();
    let meta = batch.meta();
    let mut i = 0;
    while i < n {
        let first = meta[i];
        if first.truncated {
            mapping.stats.dropped(first.datagrams());
            i += 1;
            continue;
        }
        // A run of datagrams from one client goes out in one sendmmsg on its flow socket.
        let end = (i + 1..n)
            .find(|&j| meta[j].peer != first.peer || meta[j].truncated)
            .unwrap_or(n);
        // Only a wildcard listener needs the datagram's destination to answer from; a socket
        // bound to one address answers from it anyway, whatever packet info said (a datagram
        // queued before packet info was enabled, on an adopted socket, carries none valid).
        let local = meta[end - 1].local.filter(|_| mapping.wildcard);
        let Some(sock) = flow_socket(table, mapping, config, first.peer, local, now, alerts) else {
            mapping
                .stats
                .dropped(meta[i..end].iter().map(Meta::datagrams).sum());
            i = end;
            continue;
        };
        let (sent, bytes) = send_all(
            &sock,
            &batch,
            i..end,
            (None, None),
            &mapping.to_target,
            &mapping.stats,
        )
        .await;
        mapping.stats.to_target(sent, bytes);
        i = end;
    }
    Mapping::give_batch(batch);
}

/// The socket of `client`'s flow, opening the flow if it has none.
fn flow_socket(
    table: &mut FlowTable<Flow>,
    mapping: &Arc<Mapping>,
    config: &Config,
    client: SocketAddr,
    local: Option<std::net::IpAddr>,
    now: Instant,
    alerts: &mut Alerts,
) -> Option<Arc<UdpSocket>> {
    let key = ClientAddr(client);
    if let Some(flow) = table.touch(key, now) {
        flow.set_local(local);
        return Some(flow.socket().clone());
    }
    let flow = match Flow::open(mapping, config.target.get(), client, local) {
        Ok(f) => {
            alerts.open_failing = false;
            f
        }
        Err(e) => {
            if !alerts.open_failing {
                warn!(target = %config.target, error = %e, "cannot open flows to the target; dropping new clients' datagrams until one opens");
                alerts.open_failing = true;
            }
            debug!(client.addr = %client, error = %e, "cannot open a flow; datagram dropped");
            return None;
        }
    };
    let sock = flow.socket().clone();
    mapping.stats.flow_created();
    debug!(client.addr = %client, "flow opened");
    match table.insert(key, flow, now) {
        Some((lru, _closed)) => {
            mapping.stats.flow_evicted();
            if !alerts.full {
                warn!(
                    max_flows = config.max_flows,
                    "UDP flow table full: new flows evict old ones (an address holding half the table replaces its own)"
                );
                alerts.full = true;
            }
            debug!(client.addr = %lru, "flow evicted");
        }
        None => alerts.full = false,
    }
    Some(sock)
}
