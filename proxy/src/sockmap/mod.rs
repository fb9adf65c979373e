//! The sockmap relay mode: once berth has accepted a client and connected to the container,
//! both sockets go into a SOCKHASH and the kernel's stream-verdict program moves every segment
//! from one to the other. berth only hands each stream over (forwarding what arrived before,
//! see `berth_common::sockmap`) and watches for the end of the connection.
//!
//! - [`Sockmap`]: the loaded programs and maps, shared by every connection of the process.
//! - `conn`: one connection's life in the kernel: hand-over, half-close, teardown.
//! - `watch`: an epoll instance that wakes on FIN and errors only, never on data.

mod conn;
mod watch;

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use berth_common::sockmap::{Counters, Peer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use conn::relay;

use crate::{
    ebpf::{LoaderError, SockmapRelay},
    sys::sockopt,
};

/// Sockets the maps hold unless configured otherwise (two per connection).
pub const DEFAULT_MAX_ENTRIES: u32 = berth_common::sockmap::DEFAULT_MAX_ENTRIES;

/// The sockmap programs and maps of this process. Dropping the last handle detaches and
/// unloads everything: nothing is pinned, because nothing needs to outlive the process (a new
/// berth starts with new connections).
#[derive(Debug)]
pub struct Sockmap {
    relay: Mutex<SockmapRelay>,
    /// One permit per connection the maps can hold, so that a full map is never found out by
    /// a failed insert halfway through a connection's setup.
    capacity: Arc<Semaphore>,
    watcher: Arc<watch::Watcher>,
    fallbacks: AtomicU64,
}

impl Sockmap {
    /// Loads and attaches the programs, with maps for `max_entries` sockets. Needs a tokio
    /// runtime (for the watcher) and CAP_BPF + CAP_NET_ADMIN (or root).
    pub fn load(max_entries: u32) -> Result<Arc<Self>, LoaderError> {
        let relay = SockmapRelay::load(max_entries)?;
        let watcher = watch::Watcher::start().map_err(LoaderError::Watcher)?;
        Ok(Arc::new(Self {
            relay: Mutex::new(relay),
            capacity: Arc::new(Semaphore::new(max_entries as usize / 2)),
            watcher,
            fallbacks: AtomicU64::new(0),
        }))
    }

    /// Connections that were relayed by splice instead because the maps were full or an
    /// insert failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Entries in the maps now (sockets, peers, counters): all zero when no connection is
    /// being relayed, which the tests check.
    pub fn entries(&self) -> Result<(usize, usize, usize), LoaderError> {
        let mut relay = self.lock();
        let socks = relay.socks()?.keys().count();
        let peers = relay.peers()?.keys().count();
        let counters = relay.counters()?.keys().count();
        Ok((socks, peers, counters))
    }

    fn lock(&self) -> MutexGuard<'_, SockmapRelay> {
        self.relay.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.capacity.clone().try_acquire_owned().ok()
    }

    fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters entry (zeroed) and a not-yet-ready peer entry for `cookie`.
    fn add_entries(&self, cookie: u64, peer: u64) -> io::Result<()> {
        self.lock()
            .counters()
            .map_err(io::Error::other)?
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
        self.lock()
            .socks()
            .map_err(io::Error::other)?
            .insert(cookie, fd.as_raw_fd(), 0)
            .map_err(io::Error::other)
    }

    /// Lets the program redirect `cookie`'s bytes once it has passed exactly `acked` bytes.
    fn set_ready(&self, cookie: u64, peer: u64, acked: u64) -> io::Result<()> {
        self.put_peer(
            cookie,
            Peer {
                cookie: peer,
                acked,
                ready: 1,
                _pad: 0,
            },
        )
    }

    fn put_peer(&self, cookie: u64, peer: Peer) -> io::Result<()> {
        self.lock()
            .peers()
            .map_err(io::Error::other)?
            .insert(cookie, peer, 0)
            .map_err(io::Error::other)
    }

    fn counters(&self, cookie: u64) -> io::Result<Counters> {
        self.lock()
            .counters()
            .map_err(io::Error::other)?
            .get(&cookie, 0)
            .map_err(io::Error::other)
    }

    /// Removes every entry of `cookie`; missing ones are fine.
    fn remove(&self, cookie: u64) {
        let mut relay = self.lock();
        if let Ok(mut m) = relay.socks() {
            let _ = m.remove(&cookie);
        }
        if let Ok(mut m) = relay.peers() {
            let _ = m.remove(&cookie);
        }
        if let Ok(mut m) = relay.counters() {
            let _ = m.remove(&cookie);
        }
    }
}

/// A socket's cookie (SO_COOKIE): unique per boot, the maps' key.
fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SO_COOKIE fills a u64, for which all-zero bytes are valid.
    unsafe { sockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE) }
}
