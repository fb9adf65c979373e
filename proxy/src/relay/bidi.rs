//! The relay state machine: two one-way pumps, half-close propagation, abort on failure.
use std::{io, net::Shutdown, pin::pin, time::Duration};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::{Direction, Meter, Mode, RelayError, Transfer, copy, splice};

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
    let up = pin!(one_way(client, target, Direction::ToTarget, mode, meter));
    let down = pin!(one_way(target, client, Direction::ToClient, mode, meter));
    // Whichever direction fails first decides; the other is dropped mid-flight on purpose.
    let result = match futures::future::select(up, down).await {
        futures::future::Either::Left((first, other))
        | futures::future::Either::Right((first, other)) => match first {
            Ok(()) => other.await,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => Ok(meter.transfer()),
        Err((direction, source)) => {
            abort(client);
            abort(target);
            Err(RelayError {
                direction,
                transfer: meter.transfer(),
                source,
            })
        }
    }
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    mode: Mode,
    meter: &Meter,
) -> Result<(), (Direction, io::Error)> {
    let pumped = match mode {
        Mode::Copy => copy::pump(src, dst, dir, meter).await,
        Mode::Splice => splice::pump(src, dst, dir, meter).await,
    };
    pumped
        .and_then(|()| match SockRef::from(dst).shutdown(Shutdown::Write) {
            // The peer may already be fully gone; the other direction will report that.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
        .map_err(|e| (dir, e))
}

/// Makes the next close of `s` send RST instead of FIN.
pub(crate) fn abort(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}
