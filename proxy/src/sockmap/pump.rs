//! One direction of a connection in the maps: hand the stream over without reordering it,
//! keep the program's redirecting within its allowance, and turn the source's FIN into the
//! destination's shutdown once every byte has been handed over.
use std::{
    io::{self, Read as _},
    net::Shutdown,
    time::Duration,
};

use berth_common::sockmap::{Counters, SEQ_BROKEN};
use nix::sys::epoll::EpollFlags;
use tracing::debug;

use super::{
    Sockmap,
    allowance::Allowance,
    credit::Credit,
    side::Side,
    tcp::{acked_by_peer, received_payload, written},
};
use crate::relay::{Direction, Meter};

/// How often an open connection's byte counters are published to its meter (and a stalled
/// hand-over retried).
const TICK: Duration = Duration::from_secs(1);

/// The longest pause between two looks at a socket's counters while waiting for the kernel.
const MAX_POLL: Duration = Duration::from_millis(20);

/// One direction: `src`'s bytes go to `dst`. Each direction waits on its own (for room in
/// `dst`, for the kernel to hand bytes over), so a receiver that stops reading in one
/// direction never holds up the other: an echo server that writes before it reads again
/// would otherwise wait for a direction that waits for it.
pub(super) struct OneWay<'a> {
    dir: Direction,
    sm: &'a Sockmap,
    meter: &'a Meter,
    src: &'a Side,
    dst: &'a Side,
    credit: &'a Credit,
    /// The allowance last given: bytes on their way to `dst` that its peer has not yet
    /// acknowledged may not exceed it (see [`OneWay::allowance`]).
    allowance: Allowance,
    /// Bytes berth itself read and forwarded (before and around the hand-over).
    pub(super) forwarded: u64,
    /// What the program has been told was forwarded of what it passed.
    acked: u64,
    /// Redirected bytes already published to the meter.
    published: u64,
    /// The redirect limit last given to the program.
    limit: u64,
    /// For the bytes berth forwards itself; allocated at the first use (most connections
    /// need it once, to forward what arrived before the hand-over, and never again).
    buf: Vec<u8>,
}

impl<'a> OneWay<'a> {
    /// `meter` holds what was already moved this way before the sockets went into the maps
    /// (by splice, when `auto` promotes a connection): TCP's byte counts, which the hand-over
    /// and the half-close compare against, include it.
    pub(super) fn new(
        dir: Direction,
        sm: &'a Sockmap,
        meter: &'a Meter,
        (src, dst): (&'a Side, &'a Side),
        credit: &'a Credit,
    ) -> Self {
        let moved = meter.transfer();
        let forwarded = match dir {
            Direction::ToTarget => moved.to_target,
            Direction::ToClient => moved.to_client,
        };
        Self {
            dir,
            sm,
            meter,
            src,
            dst,
            credit,
            allowance: Allowance::of_send_buffer(0),
            forwarded,
            acked: 0,
            published: 0,
            limit: 0,
            buf: Vec::new(),
        }
    }

    /// Hands the stream over, then serves it until `src`'s FIN has become `dst`'s shutdown.
    pub(super) async fn run(&mut self) -> io::Result<()> {
        self.hand_over().await?;
        // Not `interval(TICK)` plus its immediate first tick: tokio rounds that deadline up to
        // its next millisecond, which held every connection up to 1 ms before its first FIN
        // could be handled (the crr benchmark's whole difference to splice).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
        loop {
            tokio::select! {
                ev = self.src.ended() => return self.on_end(ev).await,
                () = self.credit.reported() => self.refill().await?,
                // Publishes the meter, and covers a report lost to a full ring.
                _ = tick.tick() => self.refill().await?,
            }
        }
    }

    /// `src` sent FIN, was reset or failed.
    async fn on_end(&mut self, ev: EpollFlags) -> io::Result<()> {
        debug!(direction = %self.dir, events = ?ev, "socket events");
        if ev.contains(EpollFlags::EPOLLERR) {
            let e = self.src.error();
            return Err(io::Error::new(e.kind(), format!("socket error event: {e}")));
        }
        if ev.contains(EpollFlags::EPOLLHUP)
            && let Ok(Some(e)) = self.src.sock.take_error()
        {
            return Err(e);
        }
        self.finish().await
    }

    /// Gives `src`'s redirecting a new allowance. If it ran out, the program has been passing
    /// bytes to berth (as it does for a segment that raced the hand-over): once everything
    /// redirected has reached `dst` and half the allowance is free again, berth forwards them
    /// and hands the stream over again. Otherwise the limit moves on by what `dst`'s peer has
    /// acknowledged.
    async fn refill(&mut self) -> io::Result<()> {
        let counters = self.checked_counters()?;
        self.publish_from(counters);
        if counters.passed != self.acked {
            debug!(direction = %self.dir, "redirect allowance used up or raced; catching up");
            let queued = self.forwarded + counters.redirected;
            until_written(self.dir, self.src, self.dst, queued).await?;
            self.until_room(queued).await?;
            return self.hand_over().await;
        }
        if self.allowance.untouched(self.limit, counters.redirected) {
            // The whole allowance is still free: nothing was redirected since it was given.
            return Ok(());
        }
        self.grant(self.acked, counters.redirected)
    }

    /// Waits until no more than half the allowance of the `queued` bytes is unacknowledged.
    /// A receiver slower than the sender runs the allowance out again and again; handing
    /// the stream back at once would let the program redirect a sliver and pass the rest,
    /// and berth would end up copying most of the stream. Meanwhile `src` keeps what the
    /// program passes, charged to it, so TCP slows the sender down, as it should.
    async fn until_room(&mut self, queued: u64) -> io::Result<()> {
        let mut backoff = Backoff::new();
        let allowance = self.allowance()?;
        loop {
            if allowance.has_room(queued, acked_by_peer(&self.dst.sock)?) {
                return Ok(());
            }
            check_errors(self.src, self.dst)?;
            backoff.pause().await;
        }
    }

    /// The counters of `src`, checked: the program may never have handled more bytes than
    /// TCP received (a retransmission it failed to trim would reach `dst` twice). Such a
    /// connection is corrupt, and fails rather than carry on.
    fn checked_counters(&self) -> io::Result<Counters> {
        let counters = self.sm.counters(self.src.cookie)?;
        self.sm.note_seq_flags(counters.flags);
        // Read after the counters: TCP's count only grows, so it cannot look short.
        let received = received_payload(&self.src.sock)?;
        if counters.flags & SEQ_BROKEN != 0 || counters.passed + counters.redirected > received {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the kernel handled {} bytes of a stream of {received}: a retransmitted \
                     overlap was not cut off; resetting rather than delivering bytes twice",
                    counters.passed + counters.redirected
                ),
            ));
        }
        Ok(counters)
    }

    /// How many bytes may be on their way to `dst` without its peer's acknowledgement: half
    /// of `dst`'s send buffer. The send buffer then never fills with what berth
    /// let through, so the kernel's writer into `dst` never waits, so `dst`'s own psock
    /// queue stays empty. That matters because bytes the program passes on `dst` (the other
    /// direction running out of allowance) queue behind that queue when it is not empty,
    /// and there they are not charged to the socket: TCP would keep the window open, and a
    /// client that sends without reading could make the kernel hold any amount. Half
    /// leaves room for the kernel's per-buffer overhead (it counts the send buffer in
    /// memory used, not bytes).
    fn allowance(&self) -> io::Result<Allowance> {
        let sndbuf: usize =
            nix::sys::socket::getsockopt(&self.dst.sock, nix::sys::socket::sockopt::SndBuf)
                .map_err(io::Error::from)?;
        Ok(Allowance::of_send_buffer(sndbuf))
    }

    /// Lets the program redirect once it has passed exactly `acked` bytes, as far past
    /// `redirected` as the allowance leaves room for, with a report when half of that is
    /// used.
    fn grant(&mut self, acked: u64, redirected: u64) -> io::Result<()> {
        self.allowance = self.allowance()?;
        let grant =
            self.allowance
                .grant(self.forwarded, redirected, acked_by_peer(&self.dst.sock)?);
        self.sm.set_ready(
            self.src.cookie,
            self.dst.cookie,
            acked,
            grant.limit,
            grant.report,
        )?;
        self.acked = acked;
        self.limit = grant.limit;
        Ok(())
    }

    /// Forwards what the program passed to berth, then lets it redirect: the loop ends when
    /// the program has passed nothing new while berth caught up.
    async fn hand_over(&mut self) -> io::Result<()> {
        loop {
            let counters = self.checked_counters()?;
            let passed = counters.passed;
            self.forward_all(counters.redirected).await?;
            self.grant(passed, counters.redirected)?;
            if self.sm.counters(self.src.cookie)?.passed == passed {
                return Ok(());
            }
        }
    }

    /// Forwards until berth has read every byte TCP received on `src` that the program did
    /// not redirect (`redirected` must not change meanwhile: the program is passing). Reading
    /// until "would block" is not enough: a passed segment can wait in the socket's psock
    /// queue behind the other direction's bytes, and counting it as forwarded before it was
    /// would let later, redirected bytes overtake it.
    async fn forward_all(&mut self, redirected: u64) -> io::Result<()> {
        let mut backoff = Backoff::new();
        loop {
            self.forward_queued().await?;
            let received = received_payload(&self.src.sock)?;
            if self.forwarded + redirected >= received {
                return Ok(());
            }
            if backoff.is_long() {
                debug!(direction = %self.dir, received, forwarded = self.forwarded, redirected, "waiting for passed bytes to become readable");
            }
            backoff.pause().await;
        }
    }

    /// Reads whatever waits in `src`'s queues (pre-insertion or passed bytes) and writes it to
    /// `dst`. Returns at WouldBlock or EOF.
    async fn forward_queued(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; 64 * 1024];
        }
        loop {
            match (&self.src.sock).read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    self.dst
                        .write_all(&self.buf[..n])
                        .await
                        .map_err(|e| io::Error::new(e.kind(), format!("forwarding write: {e}")))?;
                    self.forwarded += n as u64;
                    self.meter.add(self.dir, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `src` sent FIN: once every byte it received has been handed to `dst` (the kernel may
    /// still be pushing redirected bytes when the FIN shows), shut `dst`'s write side.
    async fn finish(&mut self) -> io::Result<()> {
        // The FIN came after every byte the program handled, so whatever it passed to berth
        // is queued already. If that followed redirected bytes (the allowance ran out), those
        // must reach `dst` first. A read need not return 0 here: once the FIN went through
        // the program, the socket may just report "would block" at the end.
        let counters = self.checked_counters()?;
        if counters.passed != self.acked {
            let queued = self.forwarded + counters.redirected;
            until_written(self.dir, self.src, self.dst, queued).await?;
        }
        self.forward_all(counters.redirected).await?;
        let received = received_payload(&self.src.sock)?;
        until_written(self.dir, self.src, self.dst, received).await?;
        match self.dst.sock.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
            _ => {}
        }
        debug!(direction = %self.dir, "half-closed after every byte was handed over");
        Ok(())
    }

    /// At the end: adds the last redirected bytes to the meter, and the overlaps the program
    /// cut off to the process's count.
    pub(super) fn publish(&mut self) {
        if let Ok(counters) = self.sm.counters(self.src.cookie) {
            self.publish_from(counters);
            self.sm.add_trimmed(counters.trimmed);
        }
    }

    fn publish_from(&mut self, counters: Counters) {
        let delta = counters.redirected.saturating_sub(self.published);
        self.published = counters.redirected;
        self.meter
            .add(self.dir, usize::try_from(delta).unwrap_or(usize::MAX));
    }
}

/// Waits until `total` bytes have been written into `dst` in all (by berth or by the
/// kernel's redirect), polling: nothing signals when the kernel's psock work writes. A
/// receiver that stopped reading can make this last; an error on either socket ends it.
async fn until_written(dir: Direction, src: &Side, dst: &Side, total: u64) -> io::Result<()> {
    let mut backoff = Backoff::new();
    loop {
        let handed = written(&dst.sock)?;
        if handed >= total {
            return Ok(());
        }
        check_errors(src, dst)?;
        if backoff.is_long() {
            debug!(direction = %dir, total, handed, "waiting for the kernel to hand bytes over");
        }
        backoff.pause().await;
    }
}

/// Fails with the error pending on either socket, if any (a wait for the kernel must not
/// outlast the connection).
fn check_errors(src: &Side, dst: &Side) -> io::Result<()> {
    for s in [dst, src] {
        if let Ok(Some(e)) = s.sock.take_error() {
            return Err(e);
        }
    }
    Ok(())
}

/// Pauses between looks at a socket while waiting for the kernel's psock work, which
/// signals nothing: 100 µs at first, doubling up to [`MAX_POLL`].
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_micros(100))
    }

    /// The wait has grown to its longest: worth a debug line.
    fn is_long(&self) -> bool {
        self.0 >= MAX_POLL
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_POLL);
    }
}
