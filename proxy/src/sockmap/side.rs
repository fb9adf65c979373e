//! One socket of a connection in the maps, out of tokio's reactor: its FIN and errors come
//! from the process's epoll watcher, and writes wait for room the same way.
use std::{
    io::{self, Write as _},
    net::TcpStream as StdStream,
    os::fd::AsFd as _,
};

use nix::sys::epoll::EpollFlags;

use super::{Sockmap, watch::Watch};
use crate::relay::{Direction, RelayError, Transfer};

/// One socket: its watch first, so that it is unregistered before the socket closes (a
/// reused fd number must never be deregistered by mistake).
pub(super) struct Side {
    watch: Watch,
    pub(super) sock: StdStream,
    pub(super) cookie: u64,
}

/// The events that end a direction at its source: FIN, a reset or another error.
const ENDS: EpollFlags = EpollFlags::EPOLLRDHUP
    .union(EpollFlags::EPOLLHUP)
    .union(EpollFlags::EPOLLERR);

/// The events that let a blocked write go on, or fail.
const WRITABLE: EpollFlags = EpollFlags::EPOLLOUT
    .union(EpollFlags::EPOLLHUP)
    .union(EpollFlags::EPOLLERR);

impl Side {
    pub(super) fn new(sm: &Sockmap, sock: StdStream, cookie: u64) -> Result<Self, RelayError> {
        let watch = sm.watcher.watch(sock.as_fd()).map_err(|e| RelayError {
            direction: Direction::ToTarget,
            transfer: Transfer::default(),
            source: e,
        })?;
        Ok(Self {
            watch,
            sock,
            cookie,
        })
    }

    /// Waits for this socket's FIN or error (its role as a source).
    pub(super) async fn ended(&self) -> EpollFlags {
        self.watch.wait(ENDS, ENDS).await
    }

    /// Writes all of `buf`, waiting for room through the watcher (its role as a
    /// destination).
    pub(super) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match (&self.sock).write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.watch.want_writable(true)?;
                    // An error or hang-up wakes this too (and stays for the source role); the
                    // next write reports it. Not the peer's FIN: that says nothing about
                    // writing, and once the source role is done it would stay set for good.
                    self.watch.wait(WRITABLE, EpollFlags::EPOLLOUT).await;
                    self.watch.want_writable(false)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) fn error(&self) -> io::Error {
        match self.sock.take_error() {
            Ok(Some(e)) => e,
            Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
            Err(e) => e,
        }
    }
}
