//! The sockmap relay mode: once berth has accepted a client and connected to the container,
//! both sockets go into a SOCKHASH and the kernel's stream-verdict program moves every segment
//! from one to the other. berth only hands each stream over (forwarding what arrived before,
//! see `berth_common::sockmap`) and watches for the end of the connection.
//!
//! - [`Sockmap`]: the loaded programs and maps, shared by every connection of the process.
//! - `conn`: one connection's life in the maps: insert or fall back, run, remove.
//! - `pump`: one direction's protocol with the program: hand-over, allowance, half-close.
//! - `side`: one socket out of tokio's reactor, woken by `watch`.
//! - `tcp`: TCP_INFO and SIOCOUTQ, the counts the program's counters are checked against.
//! - `watch`: an epoll instance that wakes on FIN and errors only, never on data.
//! - `credit`: the program's reports that a socket's redirect allowance runs low.
//! - `allowance`: how far the program may redirect, as arithmetic free of I/O.

pub(crate) mod allowance;
mod conn;
mod credit;
mod pump;
mod side;
mod tcp;
mod watch;

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use berth_common::sockmap::{Counters, Peer, SEQ_UNCHECKED};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

pub use conn::{relay, relay_auto};

use crate::{
    ebpf::{LoaderError, SockmapRelay},
    sys::sockopt,
};

/// Sockets the maps hold unless configured otherwise (two per connection).
pub const DEFAULT_MAX_ENTRIES: u32 = berth_common::sockmap::DEFAULT_MAX_ENTRIES;

/// Send-buffer limit of a relayed socket unless configured otherwise: 64 MiB.
///
/// The kernel's psock backlog, which writes redirected bytes into the peer socket, waits one
/// jiffy (4 ms at HZ=250, 10 ms at HZ=100) whenever that socket's send buffer is full, and
/// the socket's write-space wake-up cannot cut the wait short (the work item is already
/// pending). So the buffer must hold what the link moves in a jiffy, or the stream stalls in
/// bursts: with the usual autotuned 4 MiB, one stream here ran at 0.34× direct; with 32 MiB,
/// 0.64×. Half of it is the redirect allowance (see `conn`), which the program runs out of
/// whenever the receiver is slower than the sender; berth then copies what arrives until
/// TCP closes the window. With 32 MiB berth copied so much of a receiver-bound stream that
/// its CPU per GB was 0.16-0.21 s; with 64 MiB, 0.08-0.13 s. It costs memory only while the
/// receiver is slower than the sender (at most half of it per direction), and the kernel's
/// global TCP memory limits (`net.ipv4.tcp_mem`) still apply.
pub const DEFAULT_SEND_BUFFER: u32 = 64 << 20;

/// The largest send buffer accepted: 1 GiB (the kernel's own limit is 2 GiB, half of which
/// is bookkeeping).
pub const MAX_SEND_BUFFER: u32 = 1 << 30;

/// Checks a configured send buffer (CLI and config file alike).
pub fn check_send_buffer(n: i64) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_SEND_BUFFER)
        .ok_or_else(|| {
            format!("{n} is not a number of bytes from 0 (kernel autotuning) to {MAX_SEND_BUFFER}")
        })
}

/// Sizes of the sockmap relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Sockets the maps hold (two per connection); connections beyond fall back to splice.
    pub max_entries: u32,
    /// Send-buffer limit (bytes, as `ss -m` shows it as `tb`) set on both sockets of a
    /// relayed connection; 0 keeps the kernel's autotuning. Half of it is the redirect
    /// allowance: how many bytes one direction may have on their way to a receiver that has
    /// not acknowledged them.
    pub send_buffer: u32,
    /// When `auto` hands a spliced connection to this relay.
    pub promote: crate::relay::Threshold,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            send_buffer: DEFAULT_SEND_BUFFER,
            promote: crate::relay::Threshold::DEFAULT,
        }
    }
}

/// The sockmap programs and maps of this process. Dropping the last handle detaches and
/// unloads everything: nothing is pinned, because nothing needs to outlive the process (a new
/// berth starts with new connections).
#[derive(Debug)]
pub struct Sockmap {
    relay: SockmapRelay,
    /// One permit per connection the maps can hold, so that a full map is never found out by
    /// a failed insert halfway through a connection's setup.
    capacity: Arc<Semaphore>,
    watcher: Arc<watch::Watcher>,
    credits: Arc<credit::Credits>,
    fallbacks: AtomicU64,
    /// Bytes of retransmitted overlap the program cut off, over finished connections.
    trimmed: AtomicU64,
    /// Whether the kernel's segment layout was found unexpected (logged once).
    unchecked: AtomicBool,
    send_buffer: u32,
    promote: crate::relay::Threshold,
}

impl Sockmap {
    /// Loads and attaches the programs, with maps for `settings.max_entries` sockets. Needs a
    /// tokio runtime (for the watcher) and CAP_BPF + CAP_NET_ADMIN (or root).
    pub fn load(settings: Settings) -> Result<Arc<Self>, LoaderError> {
        let Settings {
            max_entries,
            send_buffer,
            promote,
        } = settings;
        let mut relay = SockmapRelay::load(max_entries)?;
        let ring = relay
            .take_credits()
            .ok_or(LoaderError::Missing(berth_common::sockmap::CREDITS_MAP))?;
        let credits = credit::Credits::start(ring).map_err(LoaderError::Watcher)?;
        let watcher = watch::Watcher::start().map_err(LoaderError::Watcher)?;
        Ok(Arc::new(Self {
            relay,
            capacity: Arc::new(Semaphore::new(max_entries as usize / 2)),
            watcher,
            credits,
            fallbacks: AtomicU64::new(0),
            trimmed: AtomicU64::new(0),
            unchecked: AtomicBool::new(false),
            send_buffer,
            promote,
        }))
    }

    /// When `auto` promotes a connection to this relay.
    pub fn promote(&self) -> crate::relay::Threshold {
        self.promote
    }

    /// Connections that were relayed by splice instead because the maps were full or an
    /// insert failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Bytes the program cut off the front of retransmitted segments that overlapped bytes
    /// it had already handled, over finished connections. Non-zero only after losses.
    pub fn trimmed(&self) -> u64 {
        self.trimmed.load(Ordering::Relaxed)
    }

    fn add_trimmed(&self, bytes: u64) {
        self.trimmed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Logs, once per process, that the program could not read a segment's sequence numbers.
    fn note_seq_flags(&self, flags: u32) {
        if flags & SEQ_UNCHECKED != 0 && !self.unchecked.swap(true, Ordering::Relaxed) {
            warn!(
                "sockmap: this kernel's segments do not carry their TCP sequence numbers where \
                 expected, so retransmitted overlaps cannot be cut off; berth resets any \
                 connection where one got through (use --mode splice to avoid that)"
            );
        }
    }

    /// Entries in the maps now (sockets, peers, counters): all zero when no connection is
    /// being relayed, which the tests check.
    pub fn entries(&self) -> (usize, usize, usize) {
        let socks = lock(&self.relay.socks).keys().count();
        let peers = lock(&self.relay.peers).keys().count();
        let counters = read(&self.relay.counters).keys().count();
        (socks, peers, counters)
    }

    fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.capacity.clone().try_acquire_owned().ok()
    }

    fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters entry (zeroed) and a not-yet-ready peer entry for `cookie`.
    fn add_entries(&self, cookie: u64, peer: u64) -> io::Result<()> {
        write(&self.relay.counters)
            .insert(cookie, Counters::default(), 0)
            .map_err(io::Error::other)?;
        self.put_peer(
            cookie,
            Peer {
                cookie: peer,
                ..Peer::default()
            },
        )
    }

    fn add_socket(&self, cookie: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
        lock(&self.relay.socks)
            .insert(cookie, fd.as_raw_fd(), 0)
            .map_err(io::Error::other)
    }

    /// Lets the program redirect `cookie`'s bytes once it has passed exactly `acked` bytes,
    /// up to `limit` redirected bytes in all, and report when the count reaches `notify_at`.
    fn set_ready(
        &self,
        cookie: u64,
        peer: u64,
        acked: u64,
        limit: u64,
        notify_at: u64,
    ) -> io::Result<()> {
        self.put_peer(
            cookie,
            Peer {
                cookie: peer,
                acked,
                limit,
                notify_at,
                ready: 1,
                _pad: 0,
            },
        )
    }

    fn put_peer(&self, cookie: u64, peer: Peer) -> io::Result<()> {
        lock(&self.relay.peers)
            .insert(cookie, peer, 0)
            .map_err(io::Error::other)
    }

    fn counters(&self, cookie: u64) -> io::Result<Counters> {
        read(&self.relay.counters)
            .get(&cookie, 0)
            .map_err(io::Error::other)
    }

    /// Removes every entry of `cookie`; missing ones are fine.
    fn remove(&self, cookie: u64) {
        let _ = lock(&self.relay.socks).remove(&cookie);
        let _ = lock(&self.relay.peers).remove(&cookie);
        let _ = write(&self.relay.counters).remove(&cookie);
    }
}

// A panic while a map's lock is held leaves the map as the kernel has it: consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

/// Sets `fd`'s send-buffer limit to `bytes` (see [`DEFAULT_SEND_BUFFER`] for why).
/// SO_SNDBUFFORCE passes `net.core.wmem_max`, with CAP_NET_ADMIN, which sockmap mode needs
/// anyway; without it SO_SNDBUF gets what the sysctl allows. The kernel doubles the value it
/// is given (bookkeeping overhead), so half is asked for.
fn set_send_buffer(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let half = usize::try_from(bytes / 2).unwrap_or(usize::MAX);
    setsockopt(&fd, sockopt::SndBufForce, &half)
        .or_else(|_| setsockopt(&fd, sockopt::SndBuf, &half))
        .map_err(io::Error::from)
}

/// A socket's cookie (SO_COOKIE): unique per boot, the maps' key.
fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SO_COOKIE fills a u64, for which all-zero bytes are valid.
    unsafe { sockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE) }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::fd::AsFd as _,
    };

    use super::*;

    fn send_buffer(s: &TcpStream) -> usize {
        nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::SndBuf).unwrap()
    }

    /// The limit lands as asked, above `net.core.wmem_max` too (SO_SNDBUFFORCE), and the
    /// kernel's doubling is accounted for.
    #[test]
    fn the_send_buffer_is_set_beyond_wmem_max() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (CAP_NET_ADMIN for SO_SNDBUFFORCE): run `cargo xtask test`"
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let want = u32::try_from(wmem_max * 4).unwrap().min(MAX_SEND_BUFFER);
        set_send_buffer(s.as_fd(), want).unwrap();
        assert_eq!(send_buffer(&s), want as usize);
    }
}
