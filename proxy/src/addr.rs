//! Typed socket addresses, so that a listen address, a target and a client are never mixed up;
//! and the transport protocol a port is published for.
use std::{fmt, net::SocketAddr, str::FromStr};

/// The transport protocol of a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(format!("unknown protocol {s:?}: expected tcp or udp")),
        }
    }
}

/// Parse failure for any of the address types.
#[derive(Debug, thiserror::Error)]
#[error("invalid address {input:?}: expected IP:PORT, such as 0.0.0.0:9090 or [::1]:9090")]
pub struct AddrParseError {
    input: String,
}

macro_rules! socket_addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

        impl $name {
            pub fn get(self) -> SocketAddr {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = AddrParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self).map_err(|_| AddrParseError { input: s.to_owned() })
            }
        }

        impl From<SocketAddr> for $name {
            fn from(a: SocketAddr) -> Self {
                Self(a)
            }
        }
    };
}

socket_addr_newtype!(
    /// Where berth accepts connections (the host side of a mapping).
    ListenAddr
);
socket_addr_newtype!(
    /// Where berth connects to (the container side of a mapping).
    TargetAddr
);
socket_addr_newtype!(
    /// The peer address of an accepted client.
    ClientAddr
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_and_rejects_garbage() {
        assert_eq!(
            "0.0.0.0:9090".parse::<ListenAddr>().unwrap().to_string(),
            "0.0.0.0:9090"
        );
        assert_eq!("[::1]:80".parse::<TargetAddr>().unwrap().get().port(), 80);
        for bad in ["", "9090", "1.2.3.4", "::1:80", "host:80", "1.2.3.4:70000"] {
            let err = bad.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(err.contains("expected IP:PORT"), "{bad}: {err}");
        }
    }
}
