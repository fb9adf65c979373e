//! The copy pump: read into a userspace buffer, write it out.
use std::io;

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

use super::{Direction, Meter};
use crate::pool::Pool;

/// Per-direction buffer while data flows; 64 KiB matches the default pipe size.
const BUF_SIZE: usize = 64 * 1024;

static BUFFERS: Pool<Box<[u8]>> = Pool::new(256);

/// Moves bytes from `src` to `dst` until EOF on `src`. Does not shut `dst` down.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    meter: &Meter,
) -> io::Result<()> {
    loop {
        // As in the splice pump: with the peer's FIN in, the last bytes go with MSG_MORE so
        // that the shutdown's FIN leaves with them.
        let more = src.ready(Interest::READABLE).await?.is_read_closed();
        let mut buf = BUFFERS.take(|| Ok(vec![0u8; BUF_SIZE].into_boxed_slice()))?;
        // Move data until the socket is drained; the buffer goes back to the pool in between.
        let eof = loop {
            match src.try_read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    write_all(dst, &buf[..n], more).await?;
                    meter.add(dir, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) => return Err(e),
            }
        };
        BUFFERS.give(buf);
        if eof {
            return Ok(());
        }
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8], more: bool) -> io::Result<()> {
    // MSG_NOSIGNAL as tokio's own writes: a reset peer is an error, not a SIGPIPE.
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            SockRef::from(dst).send_with_flags(data, flags)
        }) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
