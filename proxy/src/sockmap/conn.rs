//! One connection relayed inside the kernel: reserve room in the maps, insert both sockets
//! (or fall back to a userspace relay, counted), run the two directions side by side
//! (`pump`), and remove every map entry at the end. The ending (first failure ends both, the
//! drain cut, the reset) is the relay's own [`relay::drive`].
use std::{future::Future, os::fd::AsFd as _, pin::pin, sync::Arc};

use tokio::net::TcpStream;
use tracing::debug;

use super::{Sockmap, cookie, pump::OneWay, set_send_buffer, side::Side, tcp::established};
use crate::relay::{
    self, Direction, Ended, Meter, Mode, RelayError, Threshold, Transfer, promote::Promotion,
};

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
    kernel(client, target, sm, meter, cut, false).await
}

/// `auto`: splices `client` ⇄ `target` until the connection passes `threshold`, then hands
/// it to the kernel relay with both sockets drained and both pipes empty (the hand-over of
/// [`relay()`] delivers what waits in the sockets in order). A connection that ends first,
/// or whose one direction has ended when the other stops, stays on splice; one the maps
/// cannot take falls back to splice as in [`relay()`].
pub async fn relay_auto(
    client: TcpStream,
    target: TcpStream,
    sm: &Arc<Sockmap>,
    threshold: Threshold,
    meter: &Meter,
    cut: impl Future,
) -> Result<Transfer, RelayError> {
    let mut cut = pin!(cut);
    let promo = Promotion::new(threshold);
    match relay::splice_promotable(&client, &target, meter, &promo, cut.as_mut()).await? {
        // Boxed: only connections that proved long-lived pay for the kernel relay's state.
        [Ended::Promoted, Ended::Promoted] => {
            Box::pin(kernel(client, target, sm, meter, cut, true)).await
        }
        [Ended::Eof, Ended::Eof] => Ok(meter.transfer()),
        // One way is over (its shutdown passed on): splice the rest. The ended direction
        // reads its EOF again and repeats the shutdown, which changes nothing.
        _ => relay::cut_or(&client, &target, Mode::Splice, meter, cut).await,
    }
}

async fn kernel(
    client: TcpStream,
    target: TcpStream,
    sm: &Arc<Sockmap>,
    meter: &Meter,
    cut: impl Future,
    promoted: bool,
) -> Result<Transfer, RelayError> {
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
    if promoted {
        meter.promoted();
        debug!(moved = ?meter.transfer(), "promoted to the kernel relay");
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
    let c = Side::new(sm, client, cc)?;
    let t = Side::new(sm, target, tc)?;
    let credits = [sm.credits.register(cc), sm.credits.register(tc)];
    let mut up = OneWay::new(Direction::ToTarget, sm, meter, (&c, &t), &credits[0]);
    let mut down = OneWay::new(Direction::ToClient, sm, meter, (&t, &c), &credits[1]);
    let result = relay::drive([c.sock.as_fd(), t.sock.as_fd()], up.run(), down.run(), cut).await;
    up.publish();
    down.publish();
    if let Err((_, e)) = &result {
        debug!(up_fwd = up.forwarded, down_fwd = down.forwarded, error = %e, "sockmap relay failed");
    }
    drop(entries);
    meter.outcome(result.map(|_| ()))
}

/// The userspace relay, for connections the maps cannot take.
async fn userspace(
    client: TcpStream,
    target: TcpStream,
    mode: Mode,
    meter: &Meter,
    cut: impl Future,
) -> Result<Transfer, RelayError> {
    relay::cut_or(&client, &target, mode, meter, cut).await
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
