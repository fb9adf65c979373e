//! One connection relayed inside the kernel: reserve room in the maps, hand each stream over
//! without reordering it, watch for FIN and errors, propagate half-close without losing the
//! bytes still in flight, and remove every map entry at the end.
use std::{
    future::Future,
    io::{self, Read as _, Write as _},
    net::{Shutdown, TcpStream as StdStream},
    os::fd::AsFd as _,
    pin::pin,
    sync::Arc,
    time::Duration,
};

use nix::sys::epoll::EpollFlags;
use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::debug;

use super::{Sockmap, cookie, credit::Credit, set_send_buffer, watch::Watch};
use crate::relay::{self, Direction, Meter, Mode, RelayError, Transfer};
use crate::sys::sockopt;

/// How often an open connection's byte counters are published to its meter (and a stalled
/// hand-over retried).
const TICK: Duration = Duration::from_secs(1);

/// Relays `client` ⇄ `target` in the kernel until both directions have ended, one side
/// fails, or `cut` completes (then both are reset). Falls back to splice when the maps are
/// full or the sockets cannot be inserted; that is counted in [`Sockmap::fallbacks`].
pub async fn relay(
    client: TcpStream,
    target: TcpStream,
    sm: &Arc<Sockmap>,
    meter: &Meter,
    cut: impl Future,
) -> Result<Transfer, RelayError> {
    let mut cut = pin!(cut);
    let Some(_permit) = sm.reserve() else {
        debug!("sockmap full, relaying this connection by splice");
        sm.fell_back();
        return userspace(client, target, Mode::Splice, meter, cut).await;
    };
    let (Ok(cc), Ok(tc)) = (cookie(client.as_fd()), cookie(target.as_fd())) else {
        sm.fell_back();
        return userspace(client, target, Mode::Splice, meter, cut).await;
    };
    // Only established sockets can join a SOCKHASH. A side that has already sent its FIN
    // (a tiny request, a server that answered and closed) would fail the insert after the
    // other side is in, and a half-inserted connection can only be relayed by copy.
    if !established(&client) || !established(&target) {
        debug!("a side already half-closed, relaying this connection by splice");
        sm.fell_back();
        return userspace(client, target, Mode::Splice, meter, cut).await;
    }
    if sm.send_buffer > 0 {
        for s in [&client, &target] {
            if let Err(e) = set_send_buffer(s.as_fd(), sm.send_buffer) {
                debug!(error = %e, "send buffer not set; the stream may stall when it fills");
            }
        }
    }
    let entries = Entries {
        sm,
        cookies: [cc, tc],
    };
    if let Err(e) = sm
        .add_entries(cc, tc)
        .and_then(|()| sm.add_entries(tc, cc))
        .and_then(|()| sm.add_socket(tc, target.as_fd()))
    {
        debug!(error = %e, "sockmap insert failed, relaying this connection by splice");
        drop(entries);
        sm.fell_back();
        return userspace(client, target, Mode::Splice, meter, cut).await;
    }
    if let Err(e) = sm.add_socket(cc, client.as_fd()) {
        // The target is in the map: bytes it received may wait in its psock queue, which
        // splice would not see. Copy reads both queues.
        debug!(error = %e, "sockmap insert failed, relaying this connection by copy");
        sm.fell_back();
        let r = userspace(client, target, Mode::Copy, meter, cut).await;
        drop(entries);
        return r;
    }
    // Out of tokio's reactor: its epoll wants EPOLLIN and would wake on every segment.
    let (client, target) = match (client.into_std(), target.into_std()) {
        (Ok(c), Ok(t)) => (c, t),
        (Err(e), _) | (_, Err(e)) => {
            return Err(RelayError {
                direction: Direction::ToTarget,
                transfer: meter.transfer(),
                source: e,
            });
        }
    };
    let mut c = Side::new(sm, client, cc)?;
    let mut t = Side::new(sm, target, tc)?;
    let credits = [sm.credits.register(cc), sm.credits.register(tc)];
    let mut conn = Conn {
        sm,
        meter,
        allowance: sm.allowance(),
        up: Way::new(),
        down: Way::new(),
        buf: Vec::new(),
    };
    let result = tokio::select! {
        r = conn.run(&mut c, &mut t, &credits) => r,
        _ = &mut cut => Err((Direction::ToTarget, io::Error::other("drain time over"))),
    };
    conn.publish(&c, &t);
    if let Err((_, e)) = &result {
        debug!(up_done = conn.up.done, down_done = conn.down.done, up_fwd = conn.up.forwarded, down_fwd = conn.down.forwarded, error = %e, "sockmap relay failed");
    }
    match result {
        Ok(()) => {
            drop(entries);
            Ok(meter.transfer())
        }
        Err((direction, source)) => {
            for s in [&c.sock, &t.sock] {
                let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            drop(entries);
            Err(RelayError {
                direction,
                transfer: meter.transfer(),
                source,
            })
        }
    }
}

/// The userspace relay, for connections the maps cannot take.
async fn userspace(
    client: TcpStream,
    target: TcpStream,
    mode: Mode,
    meter: &Meter,
    cut: impl Future,
) -> Result<Transfer, RelayError> {
    tokio::select! {
        r = relay::relay(&client, &target, mode, meter) => r,
        _ = cut => {
            relay::abort_stream(client);
            relay::abort_stream(target);
            Err(RelayError {
                direction: Direction::ToTarget,
                transfer: meter.transfer(),
                source: io::Error::other("drain time over"),
            })
        }
    }
}

/// Removes both sockets' entries when the connection ends, however it ends.
struct Entries<'a> {
    sm: &'a Sockmap,
    cookies: [u64; 2],
}

impl Drop for Entries<'_> {
    fn drop(&mut self) {
        for c in self.cookies {
            self.sm.remove(c);
        }
    }
}

/// One socket: its watch first, so that it is unregistered before the socket closes (a
/// reused fd number must never be deregistered by mistake).
struct Side {
    watch: Watch,
    sock: StdStream,
    cookie: u64,
    /// Events seen while waiting for something else (a write waiting for room).
    pending: EpollFlags,
}

impl Side {
    fn new(sm: &Sockmap, sock: StdStream, cookie: u64) -> Result<Self, RelayError> {
        let watch = sm.watcher.watch(sock.as_fd()).map_err(|e| RelayError {
            direction: Direction::ToTarget,
            transfer: Transfer::default(),
            source: e,
        })?;
        Ok(Self {
            watch,
            sock,
            cookie,
            pending: EpollFlags::empty(),
        })
    }

    async fn events(&mut self) -> EpollFlags {
        if !self.pending.is_empty() {
            return std::mem::replace(&mut self.pending, EpollFlags::empty());
        }
        self.watch.next().await
    }

    /// Writes all of `buf`, waiting for room through the watcher.
    async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match (&self.sock).write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.watch.want_writable(true)?;
                    let ev = self.watch.next().await;
                    self.watch.want_writable(false)?;
                    if ev.contains(EpollFlags::EPOLLERR) {
                        return Err(self.error());
                    }
                    self.pending |= ev & !EpollFlags::EPOLLOUT;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn error(&self) -> io::Error {
        match self.sock.take_error() {
            Ok(Some(e)) => e,
            Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
            Err(e) => e,
        }
    }
}

/// One direction's progress.
struct Way {
    /// Bytes berth itself read and forwarded (before and around the hand-over).
    forwarded: u64,
    /// What the program has been told was forwarded of what it passed.
    acked: u64,
    /// Redirected bytes already published to the meter.
    published: u64,
    /// The redirect limit last given to the program.
    limit: u64,
    /// The source's FIN was seen and the destination shut down.
    done: bool,
}

impl Way {
    fn new() -> Self {
        Self {
            forwarded: 0,
            acked: 0,
            published: 0,
            limit: 0,
            done: false,
        }
    }
}

struct Conn<'a> {
    sm: &'a Sockmap,
    meter: &'a Meter,
    up: Way,
    down: Way,
    /// How far redirected bytes may run ahead of what the peer socket has taken.
    allowance: u64,
    /// For the bytes berth forwards itself; allocated at the first use (most connections
    /// need it once, to forward what arrived before the hand-over, and never again).
    buf: Vec<u8>,
}

type Failure = (Direction, io::Error);

impl Conn<'_> {
    async fn run(
        &mut self,
        c: &mut Side,
        t: &mut Side,
        [c_credit, t_credit]: &[Credit; 2],
    ) -> Result<(), Failure> {
        let (up, down) = (Direction::ToTarget, Direction::ToClient);
        self.hand_over(up, c, t).await.map_err(|e| (up, e))?;
        self.hand_over(down, t, c).await.map_err(|e| (down, e))?;
        // Not `interval(TICK)` plus its immediate first tick: tokio rounds that deadline up to
        // its next millisecond, which held every connection up to 1 ms before its first FIN
        // could be handled (the crr benchmark's whole difference to splice).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
        while !(self.up.done && self.down.done) {
            tokio::select! {
                ev = c.events() => self.on_events(ev, up, c, t).await?,
                ev = t.events() => self.on_events(ev, down, t, c).await?,
                () = c_credit.reported() => self.refill(up, c, t).await.map_err(|e| (up, e))?,
                () = t_credit.reported() => self.refill(down, t, c).await.map_err(|e| (down, e))?,
                _ = tick.tick() => {
                    self.publish(c, t);
                    // Also covers a report lost to a full ring.
                    self.refill(up, c, t).await.map_err(|e| (up, e))?;
                    self.refill(down, t, c).await.map_err(|e| (down, e))?;
                }
            }
        }
        Ok(())
    }

    fn way(&mut self, dir: Direction) -> &mut Way {
        match dir {
            Direction::ToTarget => &mut self.up,
            Direction::ToClient => &mut self.down,
        }
    }

    /// Events on `src` (whose bytes go to `dst`).
    async fn on_events(
        &mut self,
        ev: EpollFlags,
        dir: Direction,
        src: &mut Side,
        dst: &mut Side,
    ) -> Result<(), Failure> {
        debug!(direction = %dir, events = ?ev, "socket events");
        if ev.contains(EpollFlags::EPOLLERR) {
            let e = src.error();
            return Err((
                dir,
                io::Error::new(e.kind(), format!("socket error event: {e}")),
            ));
        }
        if ev.contains(EpollFlags::EPOLLHUP)
            && let Ok(Some(e)) = src.sock.take_error()
        {
            return Err((dir, e));
        }
        if ev.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) && !self.way(dir).done {
            self.finish(dir, src, dst).await.map_err(|e| (dir, e))?;
        }
        Ok(())
    }

    /// Gives `src`'s redirecting a new allowance. If it ran out, the program has been passing
    /// bytes to berth (as it does for a segment that raced the hand-over): once everything
    /// redirected has reached `dst`, berth forwards them and hands the stream over again.
    /// Otherwise the limit moves on by what `dst` has taken.
    async fn refill(&mut self, dir: Direction, src: &mut Side, dst: &mut Side) -> io::Result<()> {
        if self.way(dir).done {
            return Ok(());
        }
        let counters = self.sm.counters(src.cookie)?;
        let allowance = self.allowance;
        let way = self.way(dir);
        let queued = way.forwarded + counters.redirected;
        if counters.passed != way.acked {
            debug!(direction = %dir, "redirect allowance used up or raced; catching up");
            until_written(dir, src, dst, queued).await?;
            return self.hand_over(dir, src, dst).await;
        }
        if way.limit == counters.redirected + allowance {
            // The whole allowance is still free: nothing was redirected since it was given.
            return Ok(());
        }
        // Bytes redirected but not yet taken by `dst` (they wait in its psock queue).
        let waiting = queued.saturating_sub(written(&dst.sock)?);
        let room = allowance.saturating_sub(waiting);
        let limit = counters.redirected + room;
        if limit != way.limit {
            way.limit = limit;
            let acked = way.acked;
            self.sm.set_ready(
                src.cookie,
                dst.cookie,
                acked,
                limit,
                counters.redirected + room / 2,
            )?;
        }
        Ok(())
    }

    /// Forwards what the program passed to berth, then lets it redirect: the loop ends when
    /// the program has passed nothing new while berth caught up.
    async fn hand_over(
        &mut self,
        dir: Direction,
        src: &mut Side,
        dst: &mut Side,
    ) -> io::Result<()> {
        loop {
            let counters = self.sm.counters(src.cookie)?;
            let passed = counters.passed;
            self.forward_queued(dir, src, dst).await?;
            // Everything redirected so far has reached `dst` (the caller waited for that),
            // so the whole allowance is free.
            let limit = counters.redirected + self.allowance;
            let notify_at = counters.redirected + self.allowance / 2;
            self.sm
                .set_ready(src.cookie, dst.cookie, passed, limit, notify_at)?;
            let way = self.way(dir);
            way.acked = passed;
            way.limit = limit;
            if self.sm.counters(src.cookie)?.passed == passed {
                return Ok(());
            }
        }
    }

    /// Reads whatever waits in `src`'s queues (pre-insertion or passed bytes) and writes it to
    /// `dst`. Returns at WouldBlock or EOF.
    async fn forward_queued(
        &mut self,
        dir: Direction,
        src: &mut Side,
        dst: &mut Side,
    ) -> io::Result<bool> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; 64 * 1024];
        }
        loop {
            match (&src.sock).read(&mut self.buf) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    dst.write_all(&self.buf[..n])
                        .await
                        .map_err(|e| io::Error::new(e.kind(), format!("forwarding write: {e}")))?;
                    self.way(dir).forwarded += n as u64;
                    self.meter.add(dir, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `src` sent FIN: once every byte it received has been handed to `dst` (the kernel may
    /// still be pushing redirected bytes when the FIN shows), shut `dst`'s write side.
    async fn finish(&mut self, dir: Direction, src: &mut Side, dst: &mut Side) -> io::Result<()> {
        // The FIN came after every byte the program handled, so whatever it passed to berth
        // is queued already. If that followed redirected bytes (the allowance ran out), those
        // must reach `dst` first. A read need not return 0 here: once the FIN went through
        // the program, the socket may just report "would block" at the end.
        let counters = self.sm.counters(src.cookie)?;
        let way = self.way(dir);
        if counters.passed != way.acked {
            until_written(dir, src, dst, way.forwarded + counters.redirected).await?;
        }
        self.forward_queued(dir, src, dst).await?;
        // The FIN (seen: we are here because of it) advanced the count by one.
        let received = tcp_info(&src.sock)?.tcpi_bytes_received.saturating_sub(1);
        until_written(dir, src, dst, received).await?;
        match dst.sock.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
            _ => {}
        }
        debug!(direction = %dir, "half-closed after every byte was handed over");
        self.way(dir).done = true;
        Ok(())
    }

    /// Adds the bytes the kernel redirected since last time to the meter.
    fn publish(&mut self, c: &Side, t: &Side) {
        for (dir, src) in [(Direction::ToTarget, c), (Direction::ToClient, t)] {
            if let Ok(counters) = self.sm.counters(src.cookie) {
                let way = self.way(dir);
                let delta = counters.redirected.saturating_sub(way.published);
                way.published = counters.redirected;
                self.meter
                    .add(dir, usize::try_from(delta).unwrap_or(usize::MAX));
            }
        }
    }
}

/// Waits until `total` bytes have been written into `dst` in all (by berth or by the
/// kernel's redirect), polling: nothing signals when the kernel's psock work writes. A
/// receiver that stopped reading can make this last; an error on either socket ends it.
async fn until_written(dir: Direction, src: &Side, dst: &Side, total: u64) -> io::Result<()> {
    let mut wait = Duration::from_micros(100);
    loop {
        let handed = written(&dst.sock)?;
        if handed >= total {
            return Ok(());
        }
        for s in [dst, src] {
            if let Ok(Some(e)) = s.sock.take_error() {
                return Err(e);
            }
        }
        if wait >= Duration::from_millis(20) {
            debug!(direction = %dir, total, handed, "waiting for the kernel to hand bytes over");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(20));
    }
}

fn tcp_info(s: impl std::os::fd::AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: TCP_INFO fills a tcp_info, plain integers for which all-zero is valid.
    unsafe { sockopt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO) }
}

/// Bytes ever written into `s`: acknowledged by its peer, plus still in its send queue.
/// TCP_INFO is read before SIOCOUTQ, so an ACK in between can only make this an undercount.
fn written(s: &StdStream) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let acked = tcp_info(s.as_fd())?.tcpi_bytes_acked;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(outq).unwrap_or(0))
}

/// Linux's TCP_ESTABLISHED state number (`tcpi_state`).
const TCP_ESTABLISHED: u8 = 1;

fn established(s: &TcpStream) -> bool {
    tcp_info(s.as_fd()).is_ok_and(|i| i.tcpi_state == TCP_ESTABLISHED)
}
