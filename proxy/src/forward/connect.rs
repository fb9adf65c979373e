//! Connecting to the target, with a timeout and an error that says which failure it was.
use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};
use tracing::{info, warn};

use crate::addr::TargetAddr;

/// Why the target could not be reached. `reason()` is a stable label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused by {0}")]
    Refused(TargetAddr),
    #[error("no answer from {0} within {1:?}")]
    Timeout(TargetAddr, Duration),
    #[error("{0} is unreachable: {1}")]
    Unreachable(TargetAddr, #[source] io::Error),
    /// berth is out of file descriptors (or the host is): the client is refused like one
    /// beyond the connection limit.
    #[error("no descriptor left to connect to {0}: {1}")]
    Descriptors(TargetAddr, #[source] io::Error),
    /// Every local port towards the target is taken (EADDRNOTAVAIL): connections that berth
    /// closed first wait out TIME_WAIT (60 s) on them, and Linux reuses such a port for a
    /// new connection only with `net.ipv4.tcp_tw_reuse=1`.
    #[error(
        "no local port left to connect to {0} (connections to it that berth closed first hold theirs for 60 s in TIME_WAIT: widen net.ipv4.ip_local_port_range or set net.ipv4.tcp_tw_reuse=1): {1}"
    )]
    Ports(TargetAddr, #[source] io::Error),
    #[error("failed to connect to {0}: {1}")]
    Other(TargetAddr, #[source] io::Error),
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused(_) => "refused",
            Self::Timeout(..) => "timeout",
            Self::Unreachable(..) => "unreachable",
            Self::Descriptors(..) => "descriptors",
            Self::Ports(..) => "ports",
            Self::Other(..) => "other",
        }
    }
}

/// Connects to `target` within `timeout` (TCP_NODELAY set), classifying any failure.
pub async fn connect(target: TargetAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, dial(target)).await {
        Err(_) => return Err(ConnectError::Timeout(target, timeout)),
        Ok(Err(e)) => {
            return Err(match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => ConnectError::Refused(target),
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ETIMEDOUT) => {
                    ConnectError::Unreachable(target, e)
                }
                Some(libc::EMFILE | libc::ENFILE) => ConnectError::Descriptors(target, e),
                Some(libc::EADDRNOTAVAIL) => ConnectError::Ports(target, e),
                _ => ConnectError::Other(target, e),
            });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Whether connects are failing for want of a local port (an episode is logged once).
static NO_PORTS: AtomicBool = AtomicBool::new(false);

/// Logs the start of an episode without local ports, once.
pub(super) fn out_of_ports(e: &ConnectError) {
    if !NO_PORTS.swap(true, Ordering::Relaxed) {
        warn!(error = %e, "resetting new clients until local ports free up");
    }
}

/// Logs the end of the episode, once: a connect succeeded.
pub(super) fn ports_again() {
    if NO_PORTS.load(Ordering::Relaxed) && NO_PORTS.swap(false, Ordering::Relaxed) {
        info!("local ports available again, serving new clients");
    }
}

/// The connect itself, from a socket with SO_REUSEADDR. The kernel gives it a port from the
/// ephemeral range, where runtimes also pick host ports (`docker run -P`): without the
/// option, a mapping added on a port that one of berth's own connections happens to use
/// would fail to bind (EADDRINUSE) until that connection ends. With it on both sockets the
/// kernel lets a listener bind beside connected sockets (never beside another listener).
async fn dial(target: TargetAddr) -> std::io::Result<TcpStream> {
    let addr = target.get();
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.connect(addr).await
}
