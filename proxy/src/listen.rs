//! Binding listeners (TCP and UDP) with the options a port mapping needs, and naming the
//! common failures plainly.
use std::{io, net::SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use crate::addr::ListenAddr;

/// Listen backlog; the kernel caps it at net.core.somaxconn.
pub const BACKLOG: i32 = 4096;

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
    let sock = bind_tcp_socket(addr)?;
    TcpListener::from_std(sock.into()).map_err(|e| ListenError::from_io(addr, e))
}

/// [`bind_tcp`] without a runtime: the listening socket (non-blocking).
pub fn bind_tcp_socket(addr: ListenAddr) -> Result<Socket, ListenError> {
    let map = |e| ListenError::from_io(addr, e);
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
    Ok(sock)
}

/// Binds a UDP socket for a mapping. Unlike TCP, no SO_REUSEADDR: on UDP it would let a second
/// process bind the same port and silently steal datagrams, instead of reporting "in use".
pub fn bind_udp(addr: ListenAddr) -> Result<UdpSocket, ListenError> {
    let sock = bind_udp_socket(addr)?;
    UdpSocket::from_std(sock.into()).map_err(|e| ListenError::from_io(addr, e))
}

/// [`bind_udp`] without a runtime: the bound socket (non-blocking).
pub fn bind_udp_socket(addr: ListenAddr) -> Result<Socket, ListenError> {
    let map = |e| ListenError::from_io(addr, e);
    let sock = Socket::new(
        Domain::for_address(addr.get()),
        Type::DGRAM.nonblocking().cloexec(),
        None,
    )
    .map_err(map)?;
    if let SocketAddr::V6(_) = addr.get() {
        sock.set_only_v6(true).map_err(map)?;
    }
    // Before bind: the kernel prepares a datagram's packet info only if the socket asked for
    // it when the datagram arrived, and one that came between bind and the request would
    // carry stale info (replies were seen leaving from the wrong address).
    crate::udp::enable_packet_info(&sock, addr.get()).map_err(map)?;
    sock.bind(&addr.get().into()).map_err(map)?;
    Ok(sock)
}

/// Binds `proto` on `addr` without a runtime.
pub fn bind_socket(proto: crate::addr::Proto, addr: ListenAddr) -> Result<Socket, ListenError> {
    match proto {
        crate::addr::Proto::Tcp => bind_tcp_socket(addr),
        crate::addr::Proto::Udp => bind_udp_socket(addr),
    }
}

impl ListenError {
    fn from_io(addr: ListenAddr, e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EADDRINUSE) => Self::InUse(addr),
            Some(libc::EADDRNOTAVAIL) => Self::NotLocal(addr),
            Some(libc::EACCES | libc::EPERM) => Self::Denied(addr),
            _ => Self::Other(addr, e),
        }
    }
}
