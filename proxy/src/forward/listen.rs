//! Binding listeners with the options a port mapping needs.
use std::{io, net::SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::addr::ListenAddr;

/// Listen backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 4096;

/// Binding the listen address failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {0}: the address is already in use (is another proxy mapping this port?)"
    )]
    InUse(ListenAddr),
    #[error("cannot listen on {0}: the address is not assigned to any interface of this host")]
    NotLocal(ListenAddr),
    #[error("cannot listen on {0}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)")]
    Denied(ListenAddr),
    #[error("cannot listen on {0}: {1}")]
    Other(ListenAddr, #[source] io::Error),
}

/// Binds a TCP listener like docker-proxy does: SO_REUSEADDR (so a restart does not wait for
/// TIME_WAIT), and IPV6_V6ONLY on IPv6 so that `0.0.0.0:P` and `[::]:P` can be mapped separately.
pub fn bind_tcp(addr: ListenAddr) -> Result<TcpListener, ListenError> {
    let map = |e: io::Error| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => ListenError::InUse(addr),
        Some(libc::EADDRNOTAVAIL) => ListenError::NotLocal(addr),
        Some(libc::EACCES | libc::EPERM) => ListenError::Denied(addr),
        _ => ListenError::Other(addr, e),
    };
    let sock = Socket::new(
        Domain::for_address(addr.get()),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(map)?;
    sock.set_reuse_address(true).map_err(map)?;
    if let SocketAddr::V6(_) = addr.get() {
        sock.set_only_v6(true).map_err(map)?;
    }
    sock.bind(&addr.get().into()).map_err(map)?;
    sock.listen(BACKLOG).map_err(map)?;
    TcpListener::from_std(sock.into()).map_err(map)
}
