//! Process-wide setup that every berth binary does once at start.
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit, as Go programs (docker-proxy among them)
/// do at start: a relay holds 2 sockets and, with splice, 4 pipe fds per connection, and the
/// usual soft limit of 1024 would cap berth at a few hundred connections.
pub fn raise_nofile_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// Completes on the first SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is first polled:
/// a caller that reports "ready" after calling it can no longer be killed by a SIGTERM sent
/// the moment it is ready (dockerd does exactly that). Needs a tokio runtime.
pub fn stop_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without signal handlers the default action (exit) still stops us.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

/// Logs to stderr with the tracing filter `filter` (e.g. "info"); `RUST_LOG` overrides it.
pub fn init_logging(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// The kernel's TCP_INFO of a TCP socket: its state, segment and byte counters.
pub fn tcp_info(s: impl std::os::fd::AsFd) -> std::io::Result<libc::tcp_info> {
    // SAFETY: TCP_INFO fills a tcp_info, plain integers for which all-zero is valid.
    unsafe { sockopt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO) }
}

/// Reads the socket option `level`/`name` into a `T`.
///
/// # Safety
/// `T` must be the plain C type the option fills, and all-zero bytes must be a valid `T`.
pub(crate) unsafe fn sockopt<T>(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<T> {
    // SAFETY: the caller guarantees that all-zero is a valid T.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
