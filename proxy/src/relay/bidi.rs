//! The relay state machine: two one-way pumps, half-close propagation, abort on failure.
//! [`drive`] is the ending that every pump shares, the sockmap relay's included.
use std::{
    future::Future,
    io,
    net::Shutdown,
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt as _, TryFutureExt as _, future};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::{
    Direction, Ended, Meter, Mode, RelayError, Transfer, copy, promote::Promotion, splice,
};

/// Which direction failed first, and how.
pub(crate) type Failure = (Direction, io::Error);

/// Relays between `client` and `target` until both directions have seen EOF, or until either
/// fails. Bytes are counted into `meter` as they move.
///
/// - EOF from one side becomes `shutdown(SHUT_WR)` on the other; the other direction goes on.
/// - A read or write error on either side (a reset, a dead peer) sets `SO_LINGER 0` on both
///   sockets, so that dropping them sends a reset to whichever peer is still there.
pub fn relay<'a>(
    client: &'a TcpStream,
    target: &'a TcpStream,
    mode: Mode,
    meter: &'a Meter,
) -> impl Future<Output = Result<Transfer, RelayError>> + 'a {
    cut_or(client, target, mode, meter, std::future::pending::<()>())
}

// The functions below build their futures from combinators rather than as `async fn`s: an
// async fn keeps its future arguments in its own state besides the future it moves them
// into, so every layer doubled the relay's state (a connection's task was 8.7 KB, and each
// spawn and completion copied it; 4 µs a connection in crr, the biggest user-space cost).

/// [`relay`], unless `cut` completes first: then both sides are set to reset.
pub(crate) fn cut_or<'a>(
    client: &'a TcpStream,
    target: &'a TcpStream,
    mode: Mode,
    meter: &'a Meter,
    cut: impl Future + 'a,
) -> impl Future<Output = Result<Transfer, RelayError>> + 'a {
    let up = one_way(client, target, Direction::ToTarget, mode, meter, None);
    let down = one_way(target, client, Direction::ToClient, mode, meter, None);
    drive([client.as_fd(), target.as_fd()], up, down, cut).map(|r| meter.outcome(r.map(|_| ())))
}

/// Splices both directions until both have ended, or until `promo` decides that the
/// connection goes to the kernel relay and both have stopped with their socket drained. Which way
/// each direction ended is returned; a failure or the cut resets both, as [`cut_or`] does.
pub(crate) fn splice_promotable<'a>(
    client: &'a TcpStream,
    target: &'a TcpStream,
    meter: &'a Meter,
    promo: &'a Promotion,
    cut: impl Future + 'a,
) -> impl Future<Output = Result<[Ended; 2], RelayError>> + 'a {
    let up = one_way(
        client,
        target,
        Direction::ToTarget,
        Mode::Splice,
        meter,
        Some(promo),
    );
    let down = one_way(
        target,
        client,
        Direction::ToClient,
        Mode::Splice,
        meter,
        Some(promo),
    );
    drive([client.as_fd(), target.as_fd()], up, down, cut).map(|r| {
        r.map_err(|(direction, source)| RelayError {
            direction,
            transfer: meter.transfer(),
            source,
        })
    })
}

/// Runs both directions until both have ended, unless one fails or `cut` completes first.
/// Then both `sockets` are set to reset when they close, so that a failed or cut transfer
/// never passes for a complete one at either peer.
pub(crate) fn drive<'a, T: 'a>(
    sockets: [BorrowedFd<'a>; 2],
    up: impl Future<Output = io::Result<T>> + 'a,
    down: impl Future<Output = io::Result<T>> + 'a,
    cut: impl Future + 'a,
) -> impl Future<Output = Result<[T; 2], Failure>> + 'a {
    // Both directions at once until both have ended; the first failure ends both (the
    // other is dropped mid-flight on purpose).
    let both = future::try_join(
        up.map_err(|e| (Direction::ToTarget, e)),
        down.map_err(|e| (Direction::ToClient, e)),
    )
    .map_ok(|(up, down)| [up, down]);
    Race { relay: both, cut }.map(move |r| {
        if r.is_err() {
            for s in sockets {
                abort(&s);
            }
        }
        r
    })
}

pin_project_lite::pin_project! {
    /// The relay, or the cut if it completes first (then the relay is dropped).
    struct Race<R, C> {
        #[pin]
        relay: R,
        #[pin]
        cut: C,
    }
}

impl<T, R: Future<Output = Result<T, Failure>>, C: Future> Future for Race<R, C> {
    type Output = R::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.relay.poll(cx) {
            return Poll::Ready(r);
        }
        match this.cut.poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err((
                Direction::ToTarget,
                io::Error::other("drain time over"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    mode: Mode,
    meter: &Meter,
    promo: Option<&Promotion>,
) -> io::Result<Ended> {
    let ended = match mode {
        Mode::Copy => copy::pump(src, dst, dir, meter).await.map(|()| Ended::Eof),
        Mode::Splice => splice::pump(src, dst, dir, meter, promo).await,
    }?;
    if ended == Ended::Promoted {
        return Ok(ended);
    }
    match SockRef::from(dst).shutdown(Shutdown::Write) {
        // The peer may already be fully gone; the other direction will report that.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(ended),
        r => r.map(|()| ended),
    }
}

/// Makes the next close of `s` send RST instead of FIN.
pub(crate) fn abort(s: &impl AsFd) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}
