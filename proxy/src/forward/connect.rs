//! Connecting to the target, with a timeout and an error that says which failure it was.
use std::{io, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

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
                _ => ConnectError::Other(target, e),
            });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
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
