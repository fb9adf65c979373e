//! Reports from the verdict program that a socket's redirect allowance runs low or ran out,
//! delivered to the connection that owns the socket.
//!
//! The program writes the socket's cookie to a ring buffer; one task reads the ring and wakes
//! the connection registered for that cookie. A report for a connection that has already
//! ended is dropped.
use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex, PoisonError, Weak},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::Notify};
use tracing::warn;

/// The connections waiting for reports, by socket cookie.
#[derive(Debug, Default)]
pub(crate) struct Credits {
    waiting: Mutex<HashMap<u64, Arc<Notify>>>,
}

impl Credits {
    /// Starts the task that reads `ring`. Needs a tokio runtime.
    pub(crate) fn start(ring: RingBuf<MapData>) -> io::Result<Arc<Self>> {
        // SAFETY: the AsyncFd owns the ring, so its descriptor stays open and the same for
        // the AsyncFd's whole life.
        let mut ring = unsafe { AsyncFd::register(ring) }?;
        let credits = Arc::new(Self::default());
        let weak = Arc::downgrade(&credits);
        tokio::spawn(async move {
            if let Err(e) = read(&mut ring, &weak).await {
                warn!(error = %e, "sockmap credit reader failed; allowances are raised every second only");
            }
        });
        Ok(credits)
    }

    /// Registers `cookie`'s connection; reports reach it until the returned guard drops.
    pub(crate) fn register(self: &Arc<Self>, cookie: u64) -> Credit {
        let notify = Arc::new(Notify::new());
        self.lock().insert(cookie, notify.clone());
        Credit {
            credits: self.clone(),
            cookie,
            notify,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deliver(&self, cookie: u64) {
        if let Some(n) = self.lock().get(&cookie) {
            // Stores a permit when nobody waits yet, so no report is lost.
            n.notify_one();
        }
    }
}

/// Reads reports until the ring fails or every `Credits` handle is gone.
async fn read(ring: &mut AsyncFd<RingBuf<MapData>>, credits: &Weak<Credits>) -> io::Result<()> {
    loop {
        let mut guard = ring.readable_mut().await?;
        let Some(credits) = credits.upgrade() else {
            return Ok(());
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&*item) {
                credits.deliver(u64::from_ne_bytes(bytes));
            }
        }
        guard.clear_ready();
    }
}

/// One socket's registration; removed on drop.
#[derive(Debug)]
pub(crate) struct Credit {
    credits: Arc<Credits>,
    cookie: u64,
    notify: Arc<Notify>,
}

impl Credit {
    /// Waits for the next report about this socket.
    pub(crate) async fn reported(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.credits.lock().remove(&self.cookie);
    }
}
