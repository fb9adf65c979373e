//! The copy pump: read into a userspace buffer, write it out.
use std::io;

use tokio::net::TcpStream;

use super::{Direction, Meter};

/// Per-direction buffer. 64 KiB matches the default pipe size that splice uses.
const BUF_SIZE: usize = 64 * 1024;

/// Moves bytes from `src` to `dst` until EOF on `src`. Does not shut `dst` down.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    meter: &Meter,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        meter.add(dir, n);
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
