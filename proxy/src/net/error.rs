//! Errors of the container-network module.
use std::{io, net::Ipv4Addr, path::PathBuf};

use super::link;

/// A failure to build, inspect or tear down the container network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("berth net needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run it as root)")]
    NotPermitted,
    #[error("invalid interface name {name:?}: {why}")]
    InvalidIfName { name: String, why: &'static str },
    #[error("invalid subnet {0:?}: expected an IPv4 CIDR such as 172.16.0.0/16")]
    InvalidSubnet(String),
    #[error("invalid container {spec:?}: {why}")]
    InvalidContainer { spec: String, why: String },
    #[error("address {addr} is not inside subnet {subnet}")]
    OutsideSubnet {
        addr: Ipv4Addr,
        subnet: ipnet::Ipv4Net,
    },
    #[error("address {0} is used twice in the topology")]
    DuplicateAddress(Ipv4Addr),
    #[error("container {0:?} is listed twice")]
    DuplicateContainer(String),
    #[error("subnet {0} has no free address left for another container")]
    SubnetFull(ipnet::Ipv4Net),
    #[error("{what} {name:?} already exists (run `berth net down` first, or pick another name)")]
    AlreadyExists { what: &'static str, name: String },
    #[error("{name:?} exists but is not a bridge")]
    NotABridge { name: String },
    #[error("no network namespace named {0:?} (see `ip netns list`)")]
    NoSuchNamespace(String),
    #[error("failed to read topology file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid topology file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("failed to {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("failed to {op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
}

impl NetError {
    pub(crate) fn io(op: impl Into<String>, source: impl Into<io::Error>) -> Self {
        let source = source.into();
        if source.kind() == io::ErrorKind::PermissionDenied {
            return Self::NotPermitted;
        }
        Self::Io {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        if link::errno(&source) == Some(libc::EPERM) {
            return Self::NotPermitted;
        }
        Self::Netlink {
            op: op.into(),
            source,
        }
    }
}
