//! The relay state machine: two one-way pumps, half-close propagation, abort on failure.
//! [`drive`] is the ending that every pump shares, the sockmap relay's included.
use std::{
    future::Future,
    io,
    net::Shutdown,
    os::fd::{AsFd, BorrowedFd},
    pin::pin,
    time::Duration,
};

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
pub async fn relay(
    client: &TcpStream,
    target: &TcpStream,
    mode: Mode,
    meter: &Meter,
) -> Result<Transfer, RelayError> {
    cut_or(client, target, mode, meter, std::future::pending::<()>()).await
}

/// [`relay`], unless `cut` completes first: then both sides are set to reset.
pub(crate) async fn cut_or(
    client: &TcpStream,
    target: &TcpStream,
    mode: Mode,
    meter: &Meter,
    cut: impl Future,
) -> Result<Transfer, RelayError> {
    let up = one_way(client, target, Direction::ToTarget, mode, meter, None);
    let down = one_way(target, client, Direction::ToClient, mode, meter, None);
    let r = drive([client.as_fd(), target.as_fd()], up, down, cut).await;
    meter.outcome(r.map(|_| ()))
}

/// Splices both directions until both have ended, or until `promo` decides that the
/// connection goes to the kernel relay and both have stopped with their socket drained. Which way
/// each direction ended is returned; a failure or the cut resets both, as [`cut_or`] does.
pub(crate) async fn splice_promotable(
    client: &TcpStream,
    target: &TcpStream,
    meter: &Meter,
    promo: &Promotion,
    cut: impl Future,
) -> Result<[Ended; 2], RelayError> {
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
    let r = drive([client.as_fd(), target.as_fd()], up, down, cut).await;
    match r {
        Ok(ended) => Ok(ended),
        Err((direction, source)) => Err(RelayError {
            direction,
            transfer: meter.transfer(),
            source,
        }),
    }
}

/// Runs both directions until both have ended, unless one fails or `cut` completes first.
/// Then both `sockets` are set to reset when they close, so that a failed or cut transfer
/// never passes for a complete one at either peer.
pub(crate) async fn drive<T>(
    sockets: [BorrowedFd<'_>; 2],
    up: impl Future<Output = io::Result<T>>,
    down: impl Future<Output = io::Result<T>>,
    cut: impl Future,
) -> Result<[T; 2], Failure> {
    let r = tokio::select! {
        r = both(up, down) => r,
        _ = cut => Err((Direction::ToTarget, io::Error::other("drain time over"))),
    };
    if r.is_err() {
        for s in sockets {
            abort(&s);
        }
    }
    r
}

/// Both directions at once until both have ended; the first failure ends both (the other is
/// dropped mid-flight on purpose).
async fn both<T>(
    up: impl Future<Output = io::Result<T>>,
    down: impl Future<Output = io::Result<T>>,
) -> Result<[T; 2], Failure> {
    let up = pin!(async { up.await.map_err(|e| (Direction::ToTarget, e)) });
    let down = pin!(async { down.await.map_err(|e| (Direction::ToClient, e)) });
    match futures::future::select(up, down).await {
        futures::future::Either::Left((first, other)) => {
            let up = first?;
            Ok([up, other.await?])
        }
        futures::future::Either::Right((first, other)) => {
            let down = first?;
            Ok([other.await?, down])
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
