//! Connecting to the target, with a timeout and an error that says which failure it was.
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, LazyLock, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::ports::{self, Change, Pick, Range};
use crate::addr::TargetAddr;

/// Why the target could not be reached. `reason()` is a stable label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused by {0}")]
    Refused(TargetAddr),
    #[error("no answer from {0} within {1:?}")]
    Timeout(TargetAddr, Duration),
    #[error("{0} is unreachable: {1}")]
    Unreachable(TargetAddr, #[source] io::Error),
    /// berth is out of file descriptors (or the host is): the client is refused like one
    /// beyond the connection limit.
    #[error("no descriptor left to connect to {0}: {1}")]
    Descriptors(TargetAddr, #[source] io::Error),
    /// Every local port towards the target is taken (EADDRNOTAVAIL): connections that berth
    /// closed first wait out TIME_WAIT (60 s) on them, and berth could take none of those
    /// either (the target does not use TCP timestamps, or live connections hold the ports).
    #[error(
        "no local port left to connect to {0} (connections to it that berth closed first hold theirs for 60 s in TIME_WAIT, and without TCP timestamps none can be reused: widen net.ipv4.ip_local_port_range or set net.ipv4.tcp_tw_reuse=1): {1}"
    )]
    Ports(TargetAddr, #[source] io::Error),
    #[error("failed to connect to {0}: {1}")]
    Other(TargetAddr, #[source] io::Error),
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused(_) => "refused",
            Self::Timeout(..) => "timeout",
            Self::Unreachable(..) => "unreachable",
            Self::Descriptors(..) => "descriptors",
            Self::Ports(..) => "ports",
            Self::Other(..) => "other",
        }
    }
}

/// A connection to the target.
#[derive(Debug)]
pub struct Connected {
    pub stream: TcpStream,
    /// Made from a port berth chose because the kernel had none left (see [`ports`]).
    pub chosen_port: bool,
    /// Its local port, known while berth keeps the ports of ended connections (the range
    /// has been crowded lately).
    pub local_port: Option<u16>,
}

impl Connected {
    /// `chosen`: the port berth bound, if it chose one; `now`: [`now_ms`] of this connect.
    fn new(stream: TcpStream, chosen: Option<u16>, now: u64) -> Self {
        let local_port = chosen.or_else(|| {
            CROWDING
                .remember(now)
                .then(|| stream.local_addr().ok().map(|a| a.port()))
                .flatten()
        });
        Self {
            stream,
            chosen_port: chosen.is_some(),
            local_port,
        }
    }
}

/// Connects to `target` within `timeout` (TCP_NODELAY set), classifying any failure.
pub async fn connect(target: TargetAddr, timeout: Duration) -> Result<Connected, ConnectError> {
    let connected = match tokio::time::timeout(timeout, dial(target)).await {
        Err(_) => return Err(ConnectError::Timeout(target, timeout)),
        Ok(Err(e)) => {
            return Err(match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => ConnectError::Refused(target),
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ETIMEDOUT) => {
                    ConnectError::Unreachable(target, e)
                }
                Some(libc::EMFILE | libc::ENFILE) => ConnectError::Descriptors(target, e),
                Some(libc::EADDRNOTAVAIL) => ConnectError::Ports(target, e),
                _ => ConnectError::Other(target, e),
            });
        }
        Ok(Ok(c)) => c,
    };
    let _ = connected.stream.set_nodelay(true);
    Ok(connected)
}

/// Whether connects are failing for want of a local port (an episode is logged once).
static NO_PORTS: AtomicBool = AtomicBool::new(false);

/// Logs the start of an episode without local ports, once.
pub(super) fn out_of_ports(e: &ConnectError) {
    if !NO_PORTS.swap(true, Ordering::Relaxed) {
        warn!(error = %e, "resetting new clients until local ports free up");
    }
}

/// Logs the end of the episode, once: a connect succeeded.
pub(super) fn ports_again() {
    if NO_PORTS.load(Ordering::Relaxed) && NO_PORTS.swap(false, Ordering::Relaxed) {
        info!("local ports available again, serving new clients");
    }
}

/// Ports for connects once the kernel's pick is crowded out (one cursor per process, from a
/// random place in the range).
static CURSOR: LazyLock<ports::Cursor> = LazyLock::new(|| {
    // std's hasher keys are random per process: enough to spread processes apart.
    let random = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0u8);
    ports::Cursor::starting_at(random as u32)
});
/// Whether the kernel picks the ports of connects, or berth chooses them.
static CROWDING: ports::Crowding = ports::Crowding::new();
/// The ephemeral range, read again whenever the kernel's pick is found crowded.
static RANGE: Mutex<Option<Arc<Range>>> = Mutex::new(None);
/// Ports of connections to targets that ended lately (see [`ended`]).
static RECENT: Mutex<ports::Recent> = Mutex::new(ports::Recent::new());

/// Milliseconds on a monotonic clock that starts with the first connect.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Locks one of the statics above: a poisoned lock only means a panic elsewhere, and what
/// it guards is whole.
fn lock<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection to a target from local port `port` ended: if berth closed first, its
/// TIME_WAIT holds the port for 60 s, and a connect choosing its own port tries it first.
/// Only ports of [`Connected::local_port`] come here: while the range has never been
/// crowded, a connection's end costs nothing.
pub(super) fn ended(port: u16) {
    lock(&RECENT).push(port, now_ms());
}

/// The connect: the kernel picks the local port, unless its picks have been failing or slow
/// (TIME_WAIT crowding the range, see [`ports::Crowding`]): then berth picks the ports
/// itself, which may take ports in TIME_WAIT (see [`ports`]).
async fn dial(target: TargetAddr) -> io::Result<Connected> {
    let addr = target.get();
    // One clock read for the common path (ms: a connect's own time does not matter here).
    let now = now_ms();
    if CROWDING.autobind(now)
        && let Some(stream) = kernel_pick(target).await?
    {
        return Ok(Connected::new(stream, None, now));
    }
    let range = lock(&RANGE).clone();
    let recent = std::iter::from_fn(|| lock(&RECENT).pop(now_ms())).take(ports::ATTEMPTS);
    let walked = range.iter().flat_map(|r| CURSOR.candidates(r));
    let (stream, chosen) = dial_choosing(addr, recent.chain(walked)).await?;
    Ok(Connected::new(stream, chosen, now_ms()))
}

/// A connect from the first of `ports` that can be bound; the port, if one could.
async fn dial_choosing(
    addr: SocketAddr,
    ports: impl Iterator<Item = u16>,
) -> io::Result<(TcpStream, Option<u16>)> {
    for port in ports {
        match dial_from(addr, Some(port)).await {
            Ok((stream, _)) => return Ok((stream, Some(port))),
            // Held by a listener, or by a live connection to the same peer (or a TIME_WAIT
            // without timestamps): the next.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    // None of those would do (ports held by other programs' sockets without SO_REUSEADDR,
    // their TIME_WAIT included, refuse the bind): the kernel's pick, slow or not, so that
    // choosing never serves fewer clients than not choosing.
    let (stream, _) = dial_from(addr, None).await?;
    Ok((stream, None))
}

/// A connect whose port the kernel picks, its speed recorded in [`CROWDING`]; `None` if the
/// kernel had no port left.
async fn kernel_pick(target: TargetAddr) -> io::Result<Option<TcpStream>> {
    let (pick, stream) = match dial_from(target.get(), None).await {
        Ok((stream, took)) if took < Duration::from_micros(ports::SLOW_CONNECT_US) => {
            (Pick::Quick, Some(stream))
        }
        Ok((stream, _)) => (Pick::Slow, Some(stream)),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => (Pick::Failed, None),
        Err(e) => return Err(e),
    };
    let now = now_ms();
    match CROWDING.record(pick, now) {
        Some(Change::Started) => {
            info!(target = %target, "the ephemeral ports are crowded, choosing ports held in TIME_WAIT (reusable where the connection had TCP timestamps)");
        }
        Some(Change::Ended) => info!("ephemeral ports free again, the kernel picks them"),
        None => {}
    }
    if !CROWDING.autobind(now) {
        // Choosing from now on: from the range as it is now.
        match Range::read() {
            Ok(r) => *lock(&RANGE) = Some(Arc::new(r)),
            Err(e) => debug!(error = %e, "cannot read the ephemeral port range"),
        }
    }
    Ok(stream)
}

/// One connect, from a socket with SO_REUSEADDR, bound to `port` on the unspecified address
/// if given; also how long the connect() call itself took (the kernel's port search is
/// part of it). The kernel gives an unbound socket a port from the ephemeral range, where
/// runtimes also pick host ports (`docker run -P`): without the option, a mapping added on
/// a port that one of berth's own connections happens to use would fail to bind
/// (EADDRINUSE) until that connection ends. With it on both sockets the kernel lets a
/// listener bind beside connected sockets (never beside another listener), and an explicit
/// port may be one whose earlier connection is in TIME_WAIT.
async fn dial_from(addr: SocketAddr, port: Option<u16>) -> io::Result<(TcpStream, Duration)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if let Some(port) = port {
        socket.bind(&ports::unspecified(&addr, port).into())?;
    }
    let started = Instant::now();
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let took = started.elapsed();
    // Towards a target on this host (a container behind a bridge or veth, loopback) the
    // handshake has run inside connect() itself, in the softirq of the SYN's delivery: a
    // poll that does not wait says so, and spares the round through the reactor (a wake-up
    // of the task, an epoll event and SO_ERROR) that tokio's own connect makes.
    let done = ready_now(&socket)?;
    let stream = TcpStream::from_std(socket.into())?;
    if !done {
        // Writable once the handshake ended, one way or the other.
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok((stream, took))
}

/// Whether the connect on `socket` has already succeeded; its error if it has failed.
fn ready_now(socket: &Socket) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO)?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    let failed = revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP);
    if revents.contains(PollFlags::POLLOUT) && !failed {
        // Writable and no error: established (a server that speaks first adds POLLIN).
        return Ok(true);
    }
    if failed && let Some(e) = socket.take_error()? {
        return Err(e);
    }
    // Still under way (or an odd state): tokio's reactor will tell.
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_of(l: &std::net::TcpListener) -> u16 {
        l.local_addr().unwrap().port()
    }

    /// The order of attempts when berth chooses: each given port in turn, past those that
    /// cannot be bound, and the kernel's pick when none can (choosing never serves fewer
    /// clients than not choosing); any other failure ends it at once.
    #[tokio::test]
    async fn chosen_ports_in_order_then_the_kernels_pick() {
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = target.local_addr().unwrap();
        // Listeners hold these: no socket binds beside a listener.
        let held = [
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        ];
        let held_ports = held.each_ref().map(port_of);

        let (stream, chosen) = dial_choosing(addr, held_ports.into_iter()).await.unwrap();
        assert_eq!(chosen, None, "no given port could be bound");
        let local = stream.local_addr().unwrap().port();
        assert!(!held_ports.contains(&local), "{local} is held");
        let (_, peer) = target.accept().unwrap();
        assert_eq!(peer.port(), local, "the kernel's pick reached the target");

        let free = port_of(&std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let (stream, chosen) = dial_choosing(addr, [held_ports[0], free].into_iter())
            .await
            .unwrap();
        assert_eq!(chosen, Some(free), "the first port that binds");
        assert_eq!(stream.local_addr().unwrap().port(), free);
        assert_eq!(target.accept().unwrap().1.port(), free);

        drop(target);
        let unused = port_of(&std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let mut tried = 0;
        let ports = [unused, held_ports[1]].into_iter().inspect(|_| tried += 1);
        let e = dial_choosing(addr, ports).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
        assert_eq!(tried, 1, "a refusal is the target's answer, not the port's");
    }
}
