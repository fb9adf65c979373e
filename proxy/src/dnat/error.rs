//! Why kernel mode could not start or map a port.
use std::path::PathBuf;

use aya::{maps::MapError, programs::ProgramError};
use berth_common::dnat as shared;

use crate::ebpf::LoaderError;

/// Kernel mode could not start, or could not map one mapping.
#[derive(Debug, thiserror::Error)]
pub enum DnatError {
    #[error(transparent)]
    Load(#[from] LoaderError),
    #[error("cannot load or attach {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interface {name}: {why}")]
    Interface { name: String, why: String },
    #[error("cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted (kernel mode's local clients need one)")]
    NoCgroup2,
    #[error("cannot read this network namespace's cookie (needs Linux 5.14): {0}")]
    Netns(#[source] std::io::Error),
    #[error("target: {0}")]
    Target(String),
    #[error("listen: {0}")]
    Listen(String),
    #[error(transparent)]
    Pin(#[from] super::pin::PinError),
    #[error("the kernel-mode service table is full ({0} mappings)")]
    Full(u32),
    #[error("{0} (kernel mode needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root)")]
    Denied(Box<Self>),
}

impl DnatError {
    pub(super) fn netlink(
        what: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Netlink {
            what,
            source: Box::new(e),
        }
    }

    /// Wraps a failure that the kernel refused for lack of privileges in [`Self::Denied`],
    /// which says what is missing.
    pub(super) fn explain(self) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
            {
                return Self::Denied(Box::new(self));
            }
            cause = e.source();
        }
        self
    }
}

pub(super) fn stats_err(call: &'static str, io_error: std::io::Error) -> DnatError {
    DnatError::Map {
        name: shared::STATS_MAP,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> DnatError {
    move |source| DnatError::Map { name, source }
}

pub(super) fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> DnatError {
    move |source| DnatError::Program { name, source }
}
