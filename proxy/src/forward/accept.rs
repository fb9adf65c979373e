//! The accept side: classify accept(2) errors and back off on resource exhaustion.
use std::{io, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::addr::ClientAddr;

/// accept(2) failed in a way that retrying cannot fix (e.g. the socket is not listening).
#[derive(Debug, thiserror::Error)]
#[error("failed to accept connections: {0}")]
pub struct AcceptError(#[source] pub io::Error);

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Wraps a listener; `next()` yields clients and hides transient accept failures.
#[derive(Debug)]
pub(super) struct Acceptor<'a> {
    listener: &'a TcpListener,
    backoff: Duration,
}

impl<'a> Acceptor<'a> {
    pub(super) fn new(listener: &'a TcpListener) -> Self {
        Self {
            listener,
            backoff: Duration::ZERO,
        }
    }

    /// The next client. On EMFILE/ENFILE/ENOBUFS/ENOMEM it sleeps with exponential backoff
    /// (5 ms up to 1 s) instead of spinning: the pending client stays in the backlog.
    pub(super) async fn next(&mut self) -> Result<(TcpStream, ClientAddr), AcceptError> {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    self.backoff = Duration::ZERO;
                    return Ok((stream, ClientAddr(addr)));
                }
                Err(e) => match classify(&e) {
                    Class::PerConnection => debug!(error = %e, "client vanished during accept"),
                    Class::Exhausted => {
                        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                        warn!(error = %e, backoff = ?self.backoff, "accept failed, backing off");
                        // Boxed: the timer is rare, and a thousand idle listeners would
                        // each carry its room otherwise.
                        Box::pin(tokio::time::sleep(self.backoff)).await;
                    }
                    Class::Fatal => return Err(AcceptError(e)),
                },
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The pending connection died; the listener is fine.
    PerConnection,
    /// Out of descriptors or memory: retry later.
    Exhausted,
    Fatal,
}

fn classify(e: &io::Error) -> Class {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Class::Exhausted,
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
        assert_eq!(classify(&e(libc::EMFILE)), Class::Exhausted);
        assert_eq!(classify(&e(libc::ECONNABORTED)), Class::PerConnection);
        assert_eq!(classify(&e(libc::EBADF)), Class::Fatal);
    }

    /// Set in the child process that runs the EMFILE test on its own.
    const EMFILE_CHILD: &str = "BERTH_TEST_EMFILE_CHILD";

    /// Exhausting descriptors starves every other test running in the same process (one
    /// failed to build its runtime with EMFILE): the test runs in a child process of its own,
    /// this test binary run with only it selected.
    #[test]
    fn backs_off_on_emfile_instead_of_spinning() {
        if std::env::var_os(EMFILE_CHILD).is_some() {
            return emfile_in_this_process();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "forward::accept::tests::backs_off_on_emfile_instead_of_spinning",
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
            // Exhaust the descriptors so accept() fails with EMFILE, and check that the
            // acceptor keeps the client pending, then serves it once descriptors are free.
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut acceptor = Acceptor::new(&listener);
            let _client = std::net::TcpStream::connect(addr).unwrap();

            let mut hog = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
            let pending = tokio::time::timeout(Duration::from_millis(50), acceptor.next()).await;
            assert!(
                pending.is_err(),
                "accept should not succeed without descriptors"
            );
            assert!(acceptor.backoff >= BACKOFF_MIN, "backoff should have grown");
            drop(hog);
            let (_stream, client) = acceptor.next().await.unwrap();
            assert!(client.get().ip().is_loopback());
        });
    }
}
