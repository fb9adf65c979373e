//! TCP port forwarding: accept clients on a listener, connect each to the target, relay.
//!
//! The entry point is [`run`]`(listener, config, shutdown)`: the caller binds (or inherits) the
//! listener, which keeps this testable with `127.0.0.1:0` and usable with sockets passed in by
//! docker or systemd.

mod accept;
mod connect;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tracing::{Instrument as _, debug, debug_span, info, warn};

pub use connect::{ConnectError, connect};

use crate::{
    addr::{ClientAddr, TargetAddr},
    relay::{self, Meter, Mode},
};

/// How one TCP mapping behaves.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: TargetAddr,
    pub mode: Mode,
    /// How long to wait for the target to accept before giving up on a client.
    pub connect_timeout: Duration,
    /// Connections relayed at once; clients beyond it are reset at once.
    pub max_connections: usize,
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
            mode: Mode::default(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Serves `listener` until `shutdown` completes, then drains.
///
/// After `shutdown`, no new client is accepted; established connections get
/// [`Config::drain_timeout`] to finish, and whatever is left is closed.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), accept::AcceptError> {
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let mut conns = JoinSet::new();
    let mut accept = accept::Acceptor::new(&listener);
    let mut shutdown = std::pin::pin!(shutdown);
    // Tells the relays to reset their sockets when the drain time is over.
    let (cut, cut_rx) = watch::channel(false);
    // Logged once per episode of being at the limit, not once per refused client.
    let mut at_limit = false;
    match listener.local_addr() {
        Ok(local) => {
            info!(listen = %local, target = %config.target, mode = %config.mode, "listening");
        }
        Err(e) => warn!(error = %e, "listener has no local address"),
    }

    loop {
        tokio::select! {
            () = async { (&mut shutdown).await; } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = accept.next() => {
                let (stream, client) = accepted?;
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    if !at_limit {
                        warn!(limit = config.max_connections, "connection limit reached, resetting new clients until a slot frees");
                        at_limit = true;
                    }
                    debug!(client.addr = %client, "refused: connection limit");
                    relay::abort_stream(stream);
                    continue;
                };
                if at_limit {
                    info!(limit = config.max_connections, "below the connection limit again");
                    at_limit = false;
                }
                let config = config.clone();
                let cut = cut_rx.clone();
                let span = debug_span!("conn", client.addr = %client);
                conns.spawn(
                    async move {
                        serve(stream, client, &config, cut).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
    }

    drop(listener);
    if !conns.is_empty() {
        info!(active = conns.len(), timeout = ?config.drain_timeout, "draining connections");
        let drained = tokio::time::timeout(config.drain_timeout, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = conns.len(),
                "drain timeout reached, closing remaining connections"
            );
            // Reset rather than drop: a FIN would pass a cut transfer off as a complete one.
            let _ = cut.send(true);
            while conns.join_next().await.is_some() {}
        }
    }
    Ok(())
}

/// Handles one accepted client from connect to close, or until `cut` says to reset it.
async fn serve(
    client: TcpStream,
    client_addr: ClientAddr,
    config: &Config,
    mut cut: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        c = connect::connect(config.target, config.connect_timeout) => c,
        _ = cut.wait_for(|cut| *cut) => {
            relay::abort_stream(client);
            return;
        }
    };
    let target = match connected {
        Ok(t) => t,
        Err(e) => {
            warn!(client.addr = %client_addr, target = %config.target, error = %e, "cannot reach target, closing client");
            relay::abort_stream(client);
            return;
        }
    };
    let meter = Meter::default();
    tokio::select! {
        r = relay::relay(&client, &target, config.mode, &meter) => match r {
            Ok(t) => debug!(to_target = t.to_target, to_client = t.to_client, "connection closed"),
            Err(e) => debug!(error = %e, "connection aborted"),
        },
        _ = cut.wait_for(|cut| *cut) => {
            let t = meter.transfer();
            debug!(to_target = t.to_target, to_client = t.to_client, "drain time over, resetting connection");
            relay::abort_stream(client);
            relay::abort_stream(target);
        }
    }
}
