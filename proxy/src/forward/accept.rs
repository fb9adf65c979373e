//! The accept side: classify accept(2) errors; out of descriptors, refuse clients at once.
use std::{
    fs::File,
    io,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::Stats;
use crate::{addr::ClientAddr, relay};

/// accept(2) failed in a way that retrying cannot fix (e.g. the socket is not listening).
#[derive(Debug, thiserror::Error)]
#[error("failed to accept connections: {0}")]
pub struct AcceptError(#[source] pub io::Error);

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A descriptor held in reserve, one per process. At EMFILE, closing it makes room to accept
/// the waiting client and reset it: clients are refused at once instead of hanging in the
/// backlog until descriptors free up (and a full backlog turns into SYN retries).
static SPARE: Mutex<Option<File>> = Mutex::new(None);

/// Whether [`SPARE`] may be empty (never taken yet, or not taken back after an episode): read
/// on every accept so that the common case takes no lock.
static SPARE_MISSING: AtomicBool = AtomicBool::new(true);

/// Whether the process is out of descriptors now: one warning per episode, not per client.
static EXHAUSTED: AtomicBool = AtomicBool::new(false);

/// Wraps a listener; `next()` yields clients and hides transient accept failures.
#[derive(Debug)]
pub(super) struct Acceptor<'a> {
    listener: &'a TcpListener,
    stats: &'a Stats,
    backoff: Duration,
}

impl<'a> Acceptor<'a> {
    pub(super) fn new(listener: &'a TcpListener, stats: &'a Stats) -> Self {
        restock_spare();
        Self {
            listener,
            stats,
            backoff: Duration::ZERO,
        }
    }

    /// The next client. Out of descriptors (EMFILE, ENFILE), pending clients are accepted
    /// with the spare descriptor's room and reset; when that cannot be done, and on ENOBUFS
    /// or ENOMEM, it sleeps with exponential backoff (5 ms up to 1 s) instead of spinning.
    pub(super) async fn next(&mut self) -> Result<(TcpStream, ClientAddr), AcceptError> {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    self.backoff = Duration::ZERO;
                    if SPARE_MISSING.load(Ordering::Relaxed) {
                        restock_spare();
                    }
                    return Ok((stream, ClientAddr(addr)));
                }
                Err(e) => match classify(&e) {
                    Class::PerConnection => debug!(error = %e, "client vanished during accept"),
                    Class::Descriptors => {
                        out_of_descriptors(&e);
                        if self.refuse_one() {
                            self.stats.out_of_descriptors();
                            continue;
                        }
                        self.back_off(&e).await;
                    }
                    Class::Memory => self.back_off(&e).await,
                    Class::Fatal => return Err(AcceptError(e)),
                },
            }
        }
    }

    /// Gives up the spare descriptor to accept one waiting client, resets it, and takes the
    /// spare back. False if there was no spare or no client (or another thread took the
    /// freed slot first).
    fn refuse_one(&self) -> bool {
        let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.take().is_none() {
            return false;
        }
        // One non-blocking try: the listener was readable a moment ago.
        let mut cx = Context::from_waker(Waker::noop());
        let refused = match self.listener.poll_accept(&mut cx) {
            Poll::Ready(Ok((stream, addr))) => {
                debug!(client.addr = %addr, "refused: out of file descriptors");
                relay::abort_stream(stream);
                true
            }
            _ => false,
        };
        *spare = File::open("/dev/null").ok();
        SPARE_MISSING.store(spare.is_none(), Ordering::Relaxed);
        refused
    }

    async fn back_off(&mut self, e: &io::Error) {
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        debug!(error = %e, backoff = ?self.backoff, "accept failed, backing off");
        // Boxed: the timer is rare, and a thousand idle listeners would each carry its room
        // otherwise.
        Box::pin(tokio::time::sleep(self.backoff)).await;
    }
}

/// Logs the start of an episode without descriptors (accept or connect failed with EMFILE
/// or ENFILE), once.
pub(super) fn out_of_descriptors(e: &io::Error) {
    if !EXHAUSTED.swap(true, Ordering::Relaxed) {
        warn!(error = %e, "out of file descriptors: resetting new clients until some are free");
    }
}

/// Logs the end of the episode, once: a client was accepted and connected to its target.
pub(super) fn served() {
    if EXHAUSTED.load(Ordering::Relaxed) && EXHAUSTED.swap(false, Ordering::Relaxed) {
        info!("file descriptors available again, serving new clients");
    }
}

/// Takes the spare descriptor if the process has none (at start, or after an episode in
/// which it could not be taken back).
fn restock_spare() {
    let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
    if spare.is_none() {
        *spare = File::open("/dev/null").ok();
    }
    SPARE_MISSING.store(spare.is_none(), Ordering::Relaxed);
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The pending connection died; the listener is fine.
    PerConnection,
    /// Out of descriptors: refuse what waits, retry later.
    Descriptors,
    /// Out of memory: retry later.
    Memory,
    Fatal,
}

fn classify(e: &io::Error) -> Class {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => Class::Descriptors,
        Some(libc::ENOBUFS | libc::ENOMEM) => Class::Memory,
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EPROTO
            | libc::EPERM
            | libc::EINTR
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH,
        ) => Class::PerConnection,
        _ => Class::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_accept_errors() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::EMFILE)), Class::Descriptors);
        assert_eq!(classify(&e(libc::ENOMEM)), Class::Memory);
        assert_eq!(classify(&e(libc::ECONNABORTED)), Class::PerConnection);
        assert_eq!(classify(&e(libc::EBADF)), Class::Fatal);
    }

    /// Set in the child process that runs the EMFILE test on its own.
    const EMFILE_CHILD: &str = "BERTH_TEST_EMFILE_CHILD";

    /// Exhausting descriptors starves every other test running in the same process (one
    /// failed to build its runtime with EMFILE): the test runs in a child process of its own,
    /// this test binary run with only it selected.
    #[test]
    fn resets_clients_at_once_out_of_descriptors_and_recovers() {
        if std::env::var_os(EMFILE_CHILD).is_some() {
            return emfile_in_this_process();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "forward::accept::tests::resets_clients_at_once_out_of_descriptors_and_recovers",
                "--test-threads=1",
            ])
            .env(EMFILE_CHILD, "1")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{log}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(log.contains("1 passed"), "the child ran no test: {log}");
    }

    fn emfile_in_this_process() {
        // A low limit makes exhausting the table quick.
        let (_, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            256.min(hard),
            hard,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Exhaust the descriptors so that accept() fails with EMFILE: the waiting client
            // is reset at once (not left in the backlog), and once descriptors are free
            // again the next client is served.
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stats = Stats::default();
            let mut acceptor = Acceptor::new(&listener, &stats);
            let mut refused = std::net::TcpStream::connect(addr).unwrap();

            let mut hog = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
            let pending = tokio::time::timeout(Duration::from_millis(200), acceptor.next()).await;
            assert!(pending.is_err(), "accepted without descriptors");
            assert_eq!(stats.snapshot().errors_total(), 1, "the refusal is counted");
            refused
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let e = std::io::Read::read(&mut refused, &mut [0; 1]).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
            drop(hog);
            let _served = std::net::TcpStream::connect(addr).unwrap();
            let (_stream, client) = acceptor.next().await.unwrap();
            assert!(client.get().ip().is_loopback());
            assert!(EXHAUSTED.load(Ordering::Relaxed), "not served yet");
            served();
            assert!(!EXHAUSTED.load(Ordering::Relaxed), "the episode ended");
        });
    }
}
