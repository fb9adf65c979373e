//! TCP port forwarding: accept clients on a listener, connect each to the target, relay.
//!
//! The entry point is [`run`]`(listener, config, shutdown)`: the caller binds (or inherits) the
//! listener, which keeps this testable with `127.0.0.1:0` and usable with sockets passed in by
//! docker or systemd.

mod accept;
mod connect;
mod idle;
mod per_client;
pub mod ports;
mod stats;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tracing::{Instrument as _, debug, debug_span, info, warn};

pub use connect::{ConnectError, Connected, connect};
pub use stats::{DURATION_BUCKETS, Snapshot, Stats};

use self::per_client::PerClient;
use crate::{
    addr::{ClientAddr, TargetAddr},
    relay::{self, Meter, Pump},
};

/// How one TCP mapping behaves.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: TargetAddr,
    /// How bytes move (copy, splice, or the kernel with its maps).
    pub pump: Pump,
    /// How long to wait for the target to accept before giving up on a client.
    pub connect_timeout: Duration,
    /// Connections relayed at once; clients beyond it are reset at once.
    pub max_connections: usize,
    /// Connections one client address may hold at once; clients beyond it are reset at once.
    pub max_connections_per_client: Option<usize>,
    /// A connection that moves no byte either way for this long is reset.
    pub idle_timeout: Option<Duration>,
    /// After shutdown, how long established connections may run before they are closed.
    pub drain_timeout: Duration,
}

impl Config {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

    pub fn new(target: TargetAddr) -> Self {
        Self {
            target,
            pump: Pump::Splice,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: None,
            idle_timeout: None,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// What a running mapping is told to do, through a `watch` channel (see [`serve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accept and relay.
    Serve,
    /// Stop accepting (the listener closes); established connections run on.
    Drain,
    /// Reset whatever is still open, and return.
    Cut,
}

/// Serves `listener` until `shutdown` completes, then drains.
///
/// After `shutdown`, no new client is accepted; established connections get
/// [`Config::drain_timeout`] to finish, and whatever is left is reset.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), accept::AcceptError> {
    let (phase, rx) = watch::channel(Phase::Serve);
    let drain = config.drain_timeout;
    let mut serving = std::pin::pin!(serve(listener, config, Arc::default(), rx, || ()));
    tokio::select! {
        r = &mut serving => return r,
        _ = shutdown => {}
    }
    phase.send_replace(Phase::Drain);
    tokio::select! {
        r = &mut serving => return r,
        () = tokio::time::sleep(drain) => {}
    }
    phase.send_replace(Phase::Cut);
    serving.await
}

/// Serves `listener`, counting into `stats`, until `phase` says to drain; then lets the
/// established connections finish until they are done or `phase` says to cut them.
///
/// A dropped `phase` sender counts as [`Phase::Cut`]. `released` runs once the listener is
/// closed (whoever removes a mapping may wait for its port to be free).
pub async fn serve(
    listener: TcpListener,
    config: Config,
    stats: Arc<Stats>,
    mut phase: watch::Receiver<Phase>,
    released: impl FnOnce(),
) -> Result<(), accept::AcceptError> {
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let per_client = config.max_connections_per_client.map(PerClient::new);
    let mut conns = JoinSet::new();
    let mut accept = accept::Acceptor::new(&listener, &stats);
    // Logged once per episode of being at the limit, not once per refused client.
    let mut at_limit = false;
    // For the connections; `phase` itself is borrowed by the loop's select.
    let conn_phase = phase.clone();
    match listener.local_addr() {
        Ok(local) => {
            info!(listen = %local, target = %config.target, mode = %config.pump.name(), "listening");
        }
        Err(e) => warn!(error = %e, "listener has no local address"),
    }

    loop {
        tokio::select! {
            () = until(&mut phase, |p| p != Phase::Serve) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = accept.next() => {
                let (stream, client) = accepted?;
                stats.accepted();
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    if !at_limit {
                        warn!(limit = config.max_connections, "connection limit reached, resetting new clients until a slot frees");
                        at_limit = true;
                    }
                    debug!(client.addr = %client, "refused: connection limit");
                    stats.limit_reached();
                    relay::abort_stream(stream);
                    continue;
                };
                if at_limit {
                    info!(limit = config.max_connections, "below the connection limit again");
                    at_limit = false;
                }
                let slot = match &per_client {
                    None => None,
                    Some(table) => {
                        let Some(slot) = table.admit(client.get().ip()) else {
                            // Debug only: one client over its own cap is not an event of
                            // the mapping's; the metric counts each refusal.
                            debug!(client.addr = %client, "refused: connections per client limit");
                            stats.client_limit_reached();
                            relay::abort_stream(stream);
                            continue;
                        };
                        Some(slot)
                    }
                };
                let config = config.clone();
                let stats = stats.clone();
                let phase = conn_phase.clone();
                let span = debug_span!("conn", client.addr = %client);
                conns.spawn(
                    async move {
                        let opened = tokio::time::Instant::now();
                        stats.opened();
                        handle(stream, client, &config, &stats, phase).await;
                        stats.closed(opened.elapsed());
                        drop((permit, slot));
                    }
                    .instrument(span),
                );
            }
        }
    }

    drop(listener);
    released();
    if !conns.is_empty() {
        info!(active = conns.len(), "draining connections");
        tokio::select! {
            () = async { while conns.join_next().await.is_some() {} } => {}
            () = until(&mut phase, |p| p == Phase::Cut) => {
                // The connections see the same phase and reset themselves: a FIN would pass
                // a cut transfer off as a complete one.
                warn!(left = conns.len(), "drain time over, resetting the remaining connections");
                while conns.join_next().await.is_some() {}
            }
        }
    }
    Ok(())
}

/// Handles one accepted client from connect to close, or until `phase` says to cut.
async fn handle(
    client: TcpStream,
    client_addr: ClientAddr,
    config: &Config,
    stats: &Stats,
    mut phase: watch::Receiver<Phase>,
) {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        c = connect::connect(config.target, config.connect_timeout) => c,
        () = until(&mut phase, |p| p == Phase::Cut) => {
            relay::abort_stream(client);
            return;
        }
    };
    let connect::Connected {
        stream: target,
        local_port,
        ..
    } = match connected {
        Ok(c) => {
            accept::served();
            connect::ports_again();
            if c.chosen_port {
                stats.chosen_port();
            }
            c
        }
        Err(ConnectError::Descriptors(_, e)) => {
            // One warning per episode, not one per client.
            accept::out_of_descriptors(&e);
            debug!(client.addr = %client_addr, error = %e, "refused: out of file descriptors");
            stats.connect_failed("descriptors");
            relay::abort_stream(client);
            return;
        }
        Err(e @ ConnectError::Ports(..)) => {
            // One warning per episode: at a high connection rate this lasts up to 60 s.
            connect::out_of_ports(&e);
            debug!(client.addr = %client_addr, error = %e, "refused: no local port");
            stats.connect_failed(e.reason());
            relay::abort_stream(client);
            return;
        }
        Err(e) => {
            warn!(client.addr = %client_addr, target = %config.target, error = %e, "cannot reach target, closing client");
            stats.connect_failed(e.reason());
            relay::abort_stream(client);
            return;
        }
    };
    let meter = Meter::with_totals(stats.totals());
    let cut = async {
        let idle = async {
            match config.idle_timeout {
                Some(timeout) => {
                    idle::silent_for(&meter, timeout).await;
                    debug!(?timeout, "idle, resetting");
                    stats.idle_closed();
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = until(&mut phase, |p| p == Phase::Cut) => {}
            () = idle => {}
        }
    };
    let relayed = relay::run(client, target, &config.pump, &meter, cut).await;
    if let Some(port) = local_port {
        connect::ended(port);
    }
    match relayed {
        Ok(t) => debug!(
            to_target = t.to_target,
            to_client = t.to_client,
            "connection closed"
        ),
        // A reset client, a failed target, or the drain time over: the relay reset both.
        Err(e) => debug!(error = %e, "connection aborted"),
    }
}

/// Waits until `phase` satisfies `cond` (or its sender is gone), holding no borrow after.
async fn until(phase: &mut watch::Receiver<Phase>, cond: impl Fn(Phase) -> bool) {
    let _ = phase.wait_for(|p| cond(*p)).await;
}
