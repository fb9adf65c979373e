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

use super::{Direction, Meter, copy};

/// Requested pipe capacity. Bigger than the 64 KiB default to move more per wake-up; the
/// kernel caps it at /proc/sys/fs/pipe-max-size (1 MiB by default) and we keep what we get.
const PIPE_SIZE: i32 = 1 << 20;

/// A pipe owned by one direction of one connection; both ends close on drop.
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

/// Moves bytes from `src` to `dst` until EOF on `src`. Does not shut `dst` down.
///
/// The pipe is drained completely after every fill, so an EAGAIN while filling always means
/// "socket empty", never "pipe full". If the kernel refuses to splice these sockets (EINVAL)
/// before any byte moved, or no pipe can be had, the direction falls back to [`copy`].
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    meter: &Meter,
) -> io::Result<()> {
    let pipe = match Pipe::new() {
        Ok(pipe) => pipe,
        Err(e) => {
            debug!(error = %e, "no pipe for splice, falling back to copy");
            return copy::pump(src, dst, dir, meter).await;
        }
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved_any = false;
    loop {
        let filled = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, &pipe.write, None, pipe.capacity, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) && !moved_any => {
                    debug!("splice refused, falling back to copy");
                    return copy::pump(src, dst, dir, meter).await;
                }
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            return Ok(());
        }
        moved_any = true;
        let mut left = filled;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst.as_fd(), None, left, flags).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    left -= n;
                    meter.add(dir, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
