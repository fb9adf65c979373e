//! A mapping's socket before it is served: bound here, or adopted from whoever bound it
//! (systemd, a running mapping being replaced, a runtime API client, dockerd's fd 4).
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
};

use socket2::Socket;
use tokio::net::{TcpListener, UdpSocket};

use super::Spec;
use crate::{
    addr::{ListenAddr, Proto},
    listen::{self, ListenError},
};

/// A socket that was handed over cannot serve the mapping.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("the passed socket is not a {0} socket")]
    WrongType(Proto),
    #[error("the passed socket is bound to {bound}, the mapping says {want}")]
    WrongAddress { bound: String, want: ListenAddr },
    #[error("the passed socket cannot be used: {0}")]
    Io(#[from] io::Error),
    #[error("the mapping has no relay (relay = false), so it takes no socket")]
    NoRelay,
}

/// A mapping's socket, bound (or adopted) but not yet served. Every mode serves one (in
/// kernel mode the relay takes whatever the programs pass through) unless a kernel-mode
/// mapping asks for no relay.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
    /// Kernel mode with `relay = false`: no socket; the programs alone map the port.
    KernelOnly,
}

impl Bound {
    /// Binds `spec`'s listen address (nothing, for a mapping without a relay).
    pub fn bind(spec: &Spec) -> Result<Self, ListenError> {
        if !spec.relay {
            return Ok(Self::KernelOnly);
        }
        Ok(match spec.proto {
            Proto::Tcp => Self::Tcp(listen::bind_tcp(spec.listen)?),
            Proto::Udp => Self::Udp(listen::bind_udp(spec.listen)?),
        })
    }

    /// Adopts `fd` after checking that it is a socket of `spec`'s protocol bound where `spec`
    /// says (any port, when the spec asks for port 0). A TCP socket that only is bound is
    /// made to listen.
    pub fn adopt(fd: OwnedFd, spec: &Spec) -> Result<Self, AdoptError> {
        if !spec.relay {
            return Err(AdoptError::NoRelay);
        }
        let sock = Socket::from(fd);
        let want = match spec.proto {
            Proto::Tcp => socket2::Type::STREAM,
            Proto::Udp => socket2::Type::DGRAM,
        };
        if sock.r#type().ok() != Some(want) {
            return Err(AdoptError::WrongType(spec.proto));
        }
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        if !fits(local, spec.listen.get()) {
            return Err(AdoptError::WrongAddress {
                bound: local.map_or_else(|| "nothing".into(), |a| a.to_string()),
                want: spec.listen,
            });
        }
        if spec.proto == Proto::Tcp && !sock.is_listener().unwrap_or(false) {
            sock.listen(listen::BACKLOG)?;
        }
        sock.set_nonblocking(true)?;
        sock.set_cloexec(true)?;
        Ok(match spec.proto {
            Proto::Tcp => Self::Tcp(TcpListener::from_std(sock.into())?),
            Proto::Udp => Self::Udp(UdpSocket::from_std(sock.into())?),
        })
    }

    /// Where the socket is bound (the port the kernel picked, for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Udp(s) => s.local_addr().ok(),
            Self::KernelOnly => None,
        }
    }

    /// Another descriptor of the same socket, if there is one.
    pub fn dup(&self) -> io::Result<Option<OwnedFd>> {
        match self {
            Self::Tcp(l) => l.as_fd().try_clone_to_owned().map(Some),
            Self::Udp(s) => s.as_fd().try_clone_to_owned().map(Some),
            Self::KernelOnly => Ok(None),
        }
    }
}

/// Whether a socket bound to `local` serves a mapping that asks for `want`.
fn fits(local: Option<SocketAddr>, want: SocketAddr) -> bool {
    match local {
        Some(l) if want.port() == 0 => l.ip() == want.ip(),
        Some(l) => l == want,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Defaults, Draft};

    fn spec(proto: Proto, listen: &str) -> Spec {
        let mut d = Draft::new(
            proto,
            listen.parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        d.name = Some("t".into());
        d.resolve(&Defaults::default()).unwrap()
    }

    #[tokio::test]
    async fn adopt_checks_type_and_address() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = udp.local_addr().unwrap();
        let e = Bound::adopt(udp.into(), &spec(Proto::Tcp, &at.to_string())).unwrap_err();
        assert_eq!(e.to_string(), "the passed socket is not a tcp socket");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = tcp.local_addr().unwrap();
        let e = Bound::adopt(tcp.into(), &spec(Proto::Tcp, "127.0.0.1:1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the passed socket is bound to {other}, the mapping says 127.0.0.1:1")
        );
        // Port 0 takes whatever port, on the address asked for.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = Bound::adopt(tcp.into(), &spec(Proto::Tcp, "127.0.0.1:0")).unwrap();
        assert!(matches!(b, Bound::Tcp(_)));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(Bound::adopt(tcp.into(), &spec(Proto::Tcp, "127.0.0.2:0")).is_err());
    }
}
