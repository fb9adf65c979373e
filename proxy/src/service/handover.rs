//! The hand-over from a running daemon to its successor (an upgrade), over the admin socket:
//! the successor asks, the running daemon passes every listening socket it serves, and once
//! the successor serves them all the old daemon stops accepting, lets its connections finish
//! and exits, leaving kernel mode's pinned state to the successor. No port is ever closed: a
//! client that connects meanwhile waits in the shared backlog.
//!
//! ```text
//! successor > handover
//! daemon    < {"ok":true,"message":"...","mappings":[],"sockets":["web","@admin","@metrics"]}
//!             then the descriptors, in that order, on one-byte messages (SCM_RIGHTS, at most
//!             CHUNK per message)
//! successor > ready            (it serves every mapping; anything else, or closing, aborts)
//! daemon    < {"ok":true,"message":"handed over","mappings":[]}
//! ```
use std::{
    collections::HashMap,
    io::{self, IoSlice, Write as _},
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::admin::{AdminError, Reply};

/// The name under which the admin socket's listener is passed.
pub const ADMIN: &str = "@admin";
/// The name under which the metrics listener is passed.
pub const METRICS: &str = "@metrics";
/// Descriptors per message (the kernel takes at most 253).
const CHUNK: usize = 64;
/// How long the successor waits for each step of the running daemon's answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The running daemon's side: what it passes, and where the successor's verdict goes.
#[derive(Debug)]
pub(crate) struct Offer {
    pub sockets: Vec<(String, OwnedFd)>,
    pub verdict: tokio::sync::oneshot::Sender<Verdict>,
}

/// How a hand-over ended, for the running daemon.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The successor, process `pid`, serves every socket. The daemon sends on `ack` once it
    /// has made way (told systemd the new main process, left its pinned state); the
    /// successor hears "handed over" only then.
    Ready {
        pid: Option<u32>,
        ack: tokio::sync::oneshot::Sender<()>,
    },
    /// It gave up or went away: the daemon serves on.
    Aborted(String),
}

/// Writes the answer line naming `sockets`, then the descriptors themselves.
pub(crate) async fn send_sockets(
    stream: &tokio::net::UnixStream,
    sockets: &[(String, OwnedFd)],
) -> io::Result<()> {
    use tokio::io::Interest;
    let reply = Reply {
        sockets: sockets.iter().map(|(n, _)| n.clone()).collect(),
        ..Reply::ok(
            format!("handing over {} sockets", sockets.len()),
            Vec::new(),
        )
    };
    super::admin::write_reply(stream, &reply).await?;
    for chunk in sockets.chunks(CHUNK) {
        let raw: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        loop {
            stream.writable().await?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(&[0])],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The successor's side, between taking the sockets and saying it serves them.
#[derive(Debug)]
pub struct TakeOver {
    path: PathBuf,
    stream: std::os::unix::net::UnixStream,
    /// What is left of the stream after the answer line and the descriptors' bytes.
    pending: Vec<u8>,
}

impl TakeOver {
    /// Asks the daemon at `path` for its sockets, by name.
    pub fn request(path: &Path) -> Result<(Self, HashMap<String, OwnedFd>), AdminError> {
        let stream =
            std::os::unix::net::UnixStream::connect(path).map_err(AdminError::connecting(path))?;
        let bad = AdminError::answering(path);
        let _ = stream.set_read_timeout(Some(STEP_TIMEOUT));
        (&stream)
            .write_all(b"handover\n")
            .map_err(|e| bad(format!("cannot ask: {e}")))?;
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        let line = loop {
            if let Some(end) = bytes.iter().position(|&b| b == b'\n') {
                break bytes.drain(..=end).collect::<Vec<u8>>();
            }
            if receive(&stream, &mut bytes, &mut fds).map_err(|e| bad(e.to_string()))? == 0 {
                return Err(bad("the connection closed without an answer".into()));
            }
        };
        let reply: Reply = serde_json::from_slice(&line).map_err(|e| bad(e.to_string()))?;
        if !reply.ok {
            return Err(bad(reply.message));
        }
        let want = reply.sockets.len();
        // One byte came with each message of descriptors.
        let messages = want.div_ceil(CHUNK);
        while fds.len() < want || bytes.len() < messages {
            if receive(&stream, &mut bytes, &mut fds).map_err(|e| bad(e.to_string()))? == 0 {
                return Err(bad(format!(
                    "the connection closed after {} of {want} sockets",
                    fds.len()
                )));
            }
        }
        if fds.len() != want {
            return Err(bad(format!(
                "{} sockets came, {want} were named",
                fds.len()
            )));
        }
        let pending = bytes.split_off(messages);
        let sockets = reply.sockets.into_iter().zip(fds).collect();
        Ok((
            Self {
                path: path.to_owned(),
                stream,
                pending,
            },
            sockets,
        ))
    }

    /// Tells the old daemon that this process serves everything, and waits for its answer:
    /// from then on it stops accepting and goes.
    pub fn ready(mut self) -> Result<(), AdminError> {
        let bad = AdminError::answering(&self.path);
        (&self.stream)
            .write_all(b"ready\n")
            .map_err(|e| bad(format!("cannot say ready: {e}")))?;
        let mut fds = Vec::new();
        let line = loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                break self.pending.drain(..=end).collect::<Vec<u8>>();
            }
            let n = receive(&self.stream, &mut self.pending, &mut fds)
                .map_err(|e| bad(e.to_string()))?;
            if n == 0 {
                return Err(bad("the connection closed without an answer".into()));
            }
        };
        let reply: Reply = serde_json::from_slice(&line).map_err(|e| bad(e.to_string()))?;
        if reply.ok {
            Ok(())
        } else {
            Err(bad(reply.message))
        }
    }
}

/// One `recvmsg` on the hand-over's connection.
fn receive(
    stream: &std::os::unix::net::UnixStream,
    bytes: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    super::admin::receive(stream.as_raw_fd(), bytes, fds)
}

/// How the running daemon starts its successor for `berth upgrade`: the binary at the path
/// this process was started from (which a package upgrade has replaced), with the same
/// configuration and admin socket, told to take over.
#[derive(Debug, Clone)]
pub struct Successor {
    pub exe: PathBuf,
    pub config: PathBuf,
    pub admin_socket: PathBuf,
}

impl Successor {
    fn spawn(&self) -> io::Result<Spawned> {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--take-over")
            .stdin(std::process::Stdio::null())
            // systemd's sockets were this process's; the watchdog is the successor's once it
            // serves (the unit's NotifyAccess=all lets it notify: the main process stays
            // this one, as the keeper).
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("WATCHDOG_PID");
        Spawned::new(cmd.spawn()?)
    }
}

/// A started successor, watched through a pidfd and never reaped once it took over.
///
/// tokio reaps the children it spawned even after their handle is dropped; a successor
/// that exits while this process still drains would then be gone before the keeper (which
/// this process becomes under systemd) could report its status, and the unit would fail.
/// A std child is only reaped when waited for, which happens only if it exits before it
/// took over; after that its exit stays for the keeper to collect.
#[derive(Debug)]
struct Spawned {
    child: std::process::Child,
    /// Readable once the child has exited (it is not reaped by that).
    exited: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl Spawned {
    fn new(mut child: std::process::Child) -> io::Result<Self> {
        match Self::watch(&child) {
            Ok(exited) => Ok(Self { child, exited }),
            Err(e) => {
                // Unwatched, it could not be told from a successor that serves: stop it.
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// A pidfd of `child`, registered with the runtime.
    fn watch(child: &std::process::Child) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
        let pid = child.id() as libc::pid_t;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor that pidfd_open just returned, owned by nobody else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) };
        // SAFETY: the AsyncFd owns the pidfd, so its descriptor stays open and the same.
        Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the successor to exit before taking over, and reaps it.
    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        loop {
            let mut ready = self.exited.readable().await?;
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ready.clear_ready();
        }
    }
}

/// What the running daemon's hand-over brought.
#[derive(Debug)]
pub(crate) enum Event {
    /// The successor serves everything: make way, then send on `ack`.
    Ready {
        pid: Option<u32>,
        ack: tokio::sync::oneshot::Sender<()>,
    },
    /// No hand-over after all; serving on.
    Aborted(String),
}

/// A `berth upgrade` waiting for its answer, and the successor it started.
#[derive(Debug)]
struct Upgrade {
    reply: tokio::sync::oneshot::Sender<Reply>,
    conn: u64,
    child: Spawned,
}

/// The running daemon's side of hand-overs: at most one at a time.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    verdict: Option<tokio::sync::oneshot::Receiver<Verdict>>,
    upgrade: Option<Upgrade>,
}

impl Outgoing {
    /// True while a hand-over or an upgrade is under way.
    pub(crate) fn busy(&self) -> bool {
        self.verdict.is_some() || self.upgrade.is_some()
    }

    /// An offer of `sockets` to a successor that asked.
    pub(crate) fn offer(&mut self, sockets: Vec<(String, OwnedFd)>) -> Result<Offer, String> {
        if self.verdict.is_some() {
            return Err("a hand-over is already under way".into());
        }
        let (verdict, rx) = tokio::sync::oneshot::channel();
        self.verdict = Some(rx);
        Ok(Offer { sockets, verdict })
    }

    /// `berth upgrade` on admin connection `conn`: starts the successor; `reply` is answered
    /// when the hand-over ends.
    pub(crate) fn upgrade(
        &mut self,
        successor: &Successor,
        reply: tokio::sync::oneshot::Sender<Reply>,
        conn: u64,
    ) {
        if self.busy() {
            let _ = reply.send(Reply::error("a hand-over is already under way"));
            return;
        }
        match successor.spawn() {
            Ok(child) => {
                tracing::info!(pid = child.id(), exe = %successor.exe.display(), "upgrade: successor started");
                self.upgrade = Some(Upgrade { reply, conn, child });
            }
            Err(e) => {
                let _ = reply.send(Reply::error(format!(
                    "cannot start {}: {e}",
                    successor.exe.display()
                )));
            }
        }
    }

    /// The next turn of the hand-over under way (pending forever when none is).
    pub(crate) async fn next(&mut self) -> Event {
        let Self { verdict, upgrade } = self;
        let child_exit = async {
            match upgrade.as_mut() {
                Some(u) => u.child.wait().await,
                None => std::future::pending().await,
            }
        };
        let waiting = async {
            match verdict.as_mut() {
                Some(v) => v.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            v = waiting => {
                *verdict = None;
                match v {
                    Ok(Verdict::Ready { pid, ack }) => Event::Ready { pid, ack },
                    Ok(Verdict::Aborted(why)) => Event::Aborted(why),
                    Err(_) => Event::Aborted("the hand-over's connection ended".into()),
                }
            }
            status = child_exit => {
                let why = match status {
                    Ok(s) => format!("the successor exited ({s}) before it took over; see its log"),
                    Err(e) => format!("cannot wait for the successor: {e}"),
                };
                Event::Aborted(why)
            }
        }
    }

    /// Answers the `berth upgrade` waiting, if any; returns its connection.
    pub(crate) fn answer(&mut self, reply: Reply) -> Option<u64> {
        let u = self.upgrade.take()?;
        let _ = u.reply.send(reply);
        Some(u.conn)
    }
}
