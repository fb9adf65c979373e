//! systemd's wire protocols, spoken directly: `sd_notify` datagrams to `$NOTIFY_SOCKET`, the
//! watchdog keep-alive, and socket activation (`$LISTEN_PID`, `$LISTEN_FDS`,
//! `$LISTEN_FDNAMES`, descriptors from 3 on).
//!
//! Only `berth run` reads these. `berth-docker-proxy` never does: its fd 3 is dockerd's status
//! pipe, whatever the environment says.
use std::{
    collections::HashMap,
    os::{
        fd::{FromRawFd as _, OwnedFd, RawFd},
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram},
    },
    time::Duration,
};

use tracing::{debug, warn};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// A connection to systemd's notification socket; all methods do nothing without one.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: Option<(UnixDatagram, UnixAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), if set.
    pub(crate) fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                UnixAddr::from_abstract_name(name.as_bytes())
            } else {
                UnixAddr::from_pathname(&path)
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(s), Ok(a)) => Some((s, a)),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(socket = %path, error = %e, "NOTIFY_SOCKET is unusable; not notifying systemd");
                    None
                }
            }
        });
        Self { socket }
    }

    /// One that says nothing.
    pub(crate) fn none() -> Self {
        Self { socket: None }
    }

    /// Sends one notification (newline-separated `KEY=VALUE` assignments).
    pub(crate) fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                warn!(error = %e, "cannot notify systemd");
            } else {
                debug!(state, "notified systemd");
            }
        }
    }

    pub(crate) fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the CLOCK_MONOTONIC timestamp that `Type=notify-reload` expects.
    pub(crate) fn reloading(&self) {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub(crate) fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={status}"));
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

/// The watchdog interval from `$WATCHDOG_USEC` (for this process, per `$WATCHDOG_PID`).
pub(crate) fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sockets passed by systemd, by name (`FileDescriptorName=`, or `unknown` when unnamed).
/// Empty unless `$LISTEN_PID` is this process.
pub(crate) fn listen_fds() -> HashMap<String, OwnedFd> {
    let mut out = HashMap::new();
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    if !ours {
        return out;
    }
    let n: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    for i in 0..n.max(0) {
        let fd = LISTEN_FDS_START + i;
        // SAFETY: F_GETFD only checks that the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            warn!(fd, "LISTEN_FDS names a descriptor that is not open");
            continue;
        }
        // SAFETY: systemd passed this open descriptor to us alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not to be inherited by anything we might start.
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let name = names
            .get(usize::try_from(i).unwrap_or(usize::MAX))
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        if out.insert(name.clone(), owned).is_some() {
            warn!(
                name,
                "two sockets passed with the same name; using the last"
            );
        }
    }
    out
}
