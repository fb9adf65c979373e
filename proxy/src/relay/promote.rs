//! When `auto` hands a spliced connection to the kernel relay (sockmap): once it has moved
//! enough bytes, or has lived long enough and still moves some. Short connections never pay
//! the kernel relay's set-up; long ones get its lower CPU per byte. The decision is shared by
//! both directions, which stop once their socket is drained and their pipe empty.
use std::{
    pin::pin,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// When a connection is promoted (`[service] sockmap_promote_bytes` and
/// `sockmap_promote_after`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    /// Bytes moved, both directions together.
    pub bytes: u64,
    /// Age at which any byte moved promotes it, however few came before.
    pub age: Duration,
}

impl Threshold {
    /// 1 MiB or 1 s. Promotion costs about 40 µs of set-up per connection (six map entries,
    /// two psocks: the crr rates of splice and sockmap) and saves about 0.2 ms of machine CPU
    /// per MB moved (their CPU per GB), so it pays from about 0.2 MB on; 1 MiB keeps typical
    /// request-response exchanges on splice with a margin. A connection alive for a second
    /// is a keep-alive or streaming one, where the kernel relay's lower latency pays too.
    pub const DEFAULT: Self = Self {
        bytes: 1 << 20,
        age: Duration::from_secs(1),
    };
}

impl Default for Threshold {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One connection's progress towards promotion. Made for every connection of an `auto`
/// mapping, so it allocates nothing: a flag, and a `Notify` for a direction that waits.
#[derive(Debug)]
pub(crate) struct Promotion {
    threshold: Threshold,
    born: Instant,
    moved: AtomicU64,
    taken: AtomicBool,
    told: Notify,
}

impl Promotion {
    pub(crate) fn new(threshold: Threshold) -> Self {
        Self {
            threshold,
            born: Instant::now(),
            moved: AtomicU64::new(0),
            taken: AtomicBool::new(false),
            told: Notify::new(),
        }
    }

    /// Counts `n` bytes moved; true once the connection is to be promoted (from now on).
    pub(crate) fn account(&self, n: usize) -> bool {
        if self.requested() {
            return true;
        }
        let moved = self.moved.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if moved >= self.threshold.bytes || self.born.elapsed() >= self.threshold.age {
            self.taken.store(true, Ordering::Release);
            self.told.notify_waiters();
            return true;
        }
        false
    }

    pub(crate) fn requested(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Completes once promotion is decided (by the other direction, typically).
    pub(crate) async fn decided(&self) {
        let mut told = pin!(self.told.notified());
        // Registered before the flag is read, so a decision in between still wakes it.
        told.as_mut().enable();
        if !self.requested() {
            told.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threshold(bytes: u64, secs: u64) -> Threshold {
        Threshold {
            bytes,
            age: Duration::from_secs(secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_from_both_directions_add_up() {
        let p = Promotion::new(threshold(1000, 60));
        assert!(!p.account(400));
        assert!(!p.account(599));
        assert!(!p.requested());
        assert!(p.account(1));
        assert!(p.requested() && p.account(0), "a decision stays taken");
    }

    #[tokio::test(start_paused = true)]
    async fn age_promotes_at_the_next_byte_only() {
        let p = Promotion::new(threshold(u64::MAX, 1));
        assert!(!p.account(10));
        tokio::time::advance(Duration::from_millis(1500)).await;
        // An idle connection is not promoted by time alone: nothing was moved.
        assert!(!p.requested());
        assert!(p.account(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_direction_learns_of_the_decision() {
        let p = std::sync::Arc::new(Promotion::new(threshold(10, 60)));
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.decided().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.account(10);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiting direction was not told")
            .unwrap();
        // Decided before anyone waits: completes at once.
        tokio::time::timeout(Duration::from_millis(1), p.decided())
            .await
            .unwrap();
    }
}
