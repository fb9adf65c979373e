//! Watching relayed sockets for the end of their connection only.
//!
//! While the kernel relays a connection, every arriving segment still calls the socket's
//! data-ready callback, which wakes any epoll instance interested in EPOLLIN. This watcher
//! has its own epoll instance, interested only in EPOLLRDHUP (plus the implicit EPOLLERR and
//! EPOLLHUP), and EPOLLOUT only while a write is waiting: data wakes nobody, a FIN or a reset
//! does. The epoll fd itself sits in tokio's reactor.
//!
//! Each socket plays two roles at once: the source of one direction (it waits for FIN and
//! errors) and the destination of the other (it waits for room to write). So a waiter takes
//! only the events that are its own and leaves the rest for the other role.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    pin::pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{io::unix::AsyncFd, sync::Notify};
use tracing::warn;

/// Events a connection waits for.
const BASE: EpollFlags = EpollFlags::EPOLLRDHUP.union(EpollFlags::EPOLLET);

/// What has happened on a watched socket since it was last looked at.
#[derive(Debug, Default)]
struct Slot {
    events: AtomicU32,
    notify: Notify,
}

/// The process-wide watcher (one epoll instance, one task).
#[derive(Debug)]
pub(crate) struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    next: AtomicU64,
}

impl Watcher {
    /// Creates the epoll instance and starts its task. Needs a tokio runtime.
    pub(crate) fn start() -> io::Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which alone owns it until dropped,
        // so the descriptor stays open and the same for the AsyncFd's whole life.
        let epoll = unsafe { AsyncFd::register(epoll.0) }?;
        let watcher = Arc::new(Self {
            epoll,
            slots: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        });
        let w = Arc::downgrade(&watcher);
        tokio::spawn(async move {
            loop {
                let Some(w) = w.upgrade() else { return };
                if let Err(e) = w.dispatch().await {
                    warn!(error = %e, "sockmap watcher failed");
                    return;
                }
            }
        });
        Ok(watcher)
    }

    /// Waits for epoll to have events, then hands them to their slots.
    async fn dispatch(&self) -> io::Result<()> {
        let mut guard = self.epoll.readable().await?;
        let mut events = [EpollEvent::empty(); 64];
        let ep = ManuallyEpoll(self.epoll.get_ref().as_fd());
        loop {
            let n = ep.wait(&mut events)?;
            if n == 0 {
                break;
            }
            let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            for ev in &events[..n] {
                if let Some(slot) = slots.get(&ev.data()) {
                    slot.events
                        .fetch_or(ev.events().bits() as u32, Ordering::AcqRel);
                    slot.notify.notify_waiters();
                }
            }
        }
        guard.clear_ready();
        Ok(())
    }

    /// Starts watching `fd` for the end of its connection.
    pub(crate) fn watch(self: &Arc<Self>, fd: BorrowedFd<'_>) -> io::Result<Watch> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token, slot.clone());
        let ep = ManuallyEpoll(self.epoll.get_ref().as_fd());
        if let Err(e) = ep.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), BASE, token) {
            self.slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&token);
            return Err(e);
        }
        Ok(Watch {
            watcher: self.clone(),
            token,
            fd: fd.as_raw_fd(),
            slot,
        })
    }
}

/// epoll calls on a borrowed epoll fd.
struct ManuallyEpoll<'a>(BorrowedFd<'a>);

impl ManuallyEpoll<'_> {
    fn wait(&self, events: &mut [EpollEvent]) -> io::Result<usize> {
        // SAFETY: EpollEvent is repr(transparent) over epoll_event; the buffer is ours.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr().cast(),
                i32::try_from(events.len()).unwrap_or(i32::MAX),
                i32::from(EpollTimeout::ZERO),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn ctl(&self, op: i32, fd: RawFd, flags: EpollFlags, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: flags.bits() as u32,
            u64: token,
        };
        // SAFETY: a valid epoll fd, a live socket fd and an event we own.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &raw mut ev) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// One watched socket; unwatched on drop (before the socket closes).
#[derive(Debug)]
pub(crate) struct Watch {
    watcher: Arc<Watcher>,
    token: u64,
    fd: RawFd,
    slot: Arc<Slot>,
}

impl Watch {
    /// Waits until any of `wake` has happened and returns those events; of them, clears
    /// only `take` (a subset of `wake`), which belong to the caller. The rest stay for the
    /// socket's other role.
    pub(crate) async fn wait(&self, wake: EpollFlags, take: EpollFlags) -> EpollFlags {
        let (wake, take) = (wake.bits() as u32, take.bits() as u32);
        loop {
            // Registered before looking, so an event in between still wakes us.
            let mut notified = pin!(self.slot.notify.notified());
            notified.as_mut().enable();
            let seen = self.slot.events.fetch_and(!take, Ordering::AcqRel) & wake;
            if seen != 0 {
                return EpollFlags::from_bits_retain(seen as i32);
            }
            notified.await;
        }
    }

    /// Adds or removes interest in EPOLLOUT (only while a write waits for room).
    pub(crate) fn want_writable(&self, yes: bool) -> io::Result<()> {
        let flags = if yes {
            BASE | EpollFlags::EPOLLOUT
        } else {
            BASE
        };
        let ep = ManuallyEpoll(self.watcher.epoll.get_ref().as_fd());
        ep.ctl(libc::EPOLL_CTL_MOD, self.fd, flags, self.token)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let ep = ManuallyEpoll(self.watcher.epoll.get_ref().as_fd());
        // The socket may already be closed (then the kernel dropped it from the set).
        let _ = ep.ctl(libc::EPOLL_CTL_DEL, self.fd, EpollFlags::empty(), 0);
        self.watcher
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.token);
    }
}
