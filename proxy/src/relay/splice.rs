//! The splice pump: socket → pipe → socket inside the kernel, driven by tokio readiness.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

use super::{Direction, Ended, Meter, copy, promote::Promotion};
use crate::pool::Pool;

/// Requested pipe capacity. Bigger than the 64 KiB default to move more per wake-up; the
/// kernel caps it at /proc/sys/fs/pipe-max-size (1 MiB by default) and we keep what we get.
const PIPE_SIZE: i32 = 1 << 20;

/// Empty pipes ready for reuse by any connection.
static PIPES: Pool<Pipe> = Pool::new(256);

/// A pipe; both ends close on drop.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Self {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(64 * 1024),
        })
    }
}

/// Moves bytes from `src` to `dst` until EOF on `src`, or until `promo` decides that the
/// connection goes to the kernel relay: then it stops with the pipe empty, every byte read
/// from `src` written to `dst`. Does not shut `dst` down.
///
/// A pipe is borrowed from the pool while the socket has data and returned, empty, when it
/// runs dry. The pipe is drained completely after every fill, so an EAGAIN while filling
/// always means "socket empty", never "pipe full". If the kernel refuses to splice these
/// sockets (EINVAL) before any byte moved, or no pipe can be had, the direction falls back to
/// [`copy`].
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    meter: &Meter,
    promo: Option<&Promotion>,
) -> io::Result<Ended> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved_any = false;
    loop {
        let ready = match promo {
            Some(p) if p.requested() => return Ok(Ended::Promoted),
            Some(p) => tokio::select! {
                r = src.ready(Interest::READABLE) => r?,
                () = p.decided() => return Ok(Ended::Promoted),
            },
            None => src.ready(Interest::READABLE).await?,
        };
        // The peer's FIN is in (EPOLLRDHUP): what is left to read is all there is, and the
        // shutdown follows it. Writing it with MSG_MORE lets that FIN leave with the last
        // bytes, one segment instead of two (a request or an answer followed by a close: a
        // segment, its softirq and its ACK less per connection).
        let last = if ready.is_read_closed() {
            SpliceFFlags::SPLICE_F_MORE
        } else {
            SpliceFFlags::empty()
        };
        let pipe = match PIPES.take(Pipe::new) {
            Ok(pipe) => pipe,
            Err(e) => {
                debug!(error = %e, "no pipe for splice, falling back to copy");
                return copy::pump(src, dst, dir, meter).await.map(|()| Ended::Eof);
            }
        };
        let eof = loop {
            let filled = match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, &pipe.write, None, pipe.capacity, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(0) => break true,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) && !moved_any => {
                    debug!("splice refused, falling back to copy");
                    PIPES.give(pipe);
                    return copy::pump(src, dst, dir, meter).await.map(|()| Ended::Eof);
                }
                Err(e) => return Err(e),
            };
            moved_any = true;
            // Drain before filling again; a pipe that still holds data is never pooled (an
            // error here drops it, and its bytes belong to a connection that is being reset).
            let mut left = filled;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, dst.as_fd(), None, left, flags | last)
                        .map_err(io::Error::from)
                }) {
                    Ok(n) => {
                        left -= n;
                        meter.add(dir, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Counted here; the stream changes hands only once `src` is drained (below).
            if let Some(p) = promo {
                p.account(filled);
            }
        };
        PIPES.give(pipe);
        if eof {
            return Ok(Ended::Eof);
        }
        // The pipe is empty and so is `src`'s receive queue: no segment is half read. The
        // kernel relay's program is handed whole segments (`tcp_read_skb`), so one that
        // splice had read part of would reach `dst` a second time.
        if promo.is_some_and(Promotion::requested) {
            return Ok(Ended::Promoted);
        }
    }
}
