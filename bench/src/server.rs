//! The load server inside the container namespace. The first byte of a connection picks
//! what it does:
//! - `U` upload: read until EOF, then answer the byte count (u64) and close;
//! - `D` + u64 millis, download: write until that deadline, then close;
//! - `E` echo: 64-byte frames back and forth until EOF (request/response latency);
//! - `C` + 63 bytes, connect/request/response: answer 64 bytes and close;
//! - `I` idle: answer one byte (so the client knows the path is complete), then wait for EOF.
//!
//! On the same port numbers, UDP echo: every datagram goes back to its sender.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use berth::net::NetNs;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

pub(crate) const FRAME: usize = 64;
const CHUNK: usize = 256 * 1024;

/// Starts the server, listening on `ip` at each of `ports`, on a thread that lives in `ns` for
/// the rest of the process.
pub(crate) fn spawn(ns: &NetNs, ip: IpAddr, ports: &[u16]) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::new(ip, *p)).collect();
    let fd = ns.open()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            let run = || -> anyhow::Result<()> {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
                // Worker threads are spawned from this thread, so they share its namespace.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    for &addr in &addrs {
                        spawn_udp_echo(addr)?;
                    }
                    for addr in addrs {
                        let sock = socket2::Socket::new(
                            socket2::Domain::for_address(addr),
                            socket2::Type::STREAM,
                            None,
                        )?;
                        sock.set_reuse_address(true)?;
                        sock.bind(&addr.into())?;
                        sock.listen(65535)?;
                        sock.set_nonblocking(true)?;
                        let listener = TcpListener::from_std(sock.into())?;
                        tokio::spawn(async move {
                            while let Ok((stream, _)) = listener.accept().await {
                                tokio::spawn(async move {
                                    let _ = serve(stream).await;
                                });
                            }
                        });
                    }
                    let _ = ready_tx.send(Ok(()));
                    std::future::pending::<anyhow::Result<()>>().await
                })
            };
            if let Err(e) = run() {
                let _ = ready_tx.send(Err(e));
            }
        })?;
    ready_rx.recv().context("server thread died")?
}

/// A UDP echo on a thread of its own (spawned from the server thread, so in its namespace):
/// blocking recv/send is the cheapest echo there is, and it is the same for every contender.
fn spawn_udp_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let sock = std::net::UdpSocket::bind(addr)?;
    // Room for bursts of 4 clients x 64 datagrams in flight.
    socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20)?;
    std::thread::Builder::new()
        .name(format!("udp-echo-{}", addr.port()))
        .spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        })?;
    Ok(())
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    match mode[0] {
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        b'D' => {
            let mut ms = [0u8; 8];
            s.read_exact(&mut ms).await?;
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(u64::from_be_bytes(ms));
            let buf = vec![0x5au8; CHUNK];
            while tokio::time::Instant::now() < deadline {
                s.write_all(&buf).await?;
            }
            s.shutdown().await
        }
        b'E' => {
            let mut frame = [0u8; FRAME];
            loop {
                match s.read_exact(&mut frame).await {
                    Ok(_) => s.write_all(&frame).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        b'C' => {
            let mut rest = [0u8; FRAME - 1];
            s.read_exact(&mut rest).await?;
            s.write_all(&[b'c'; FRAME]).await?;
            s.shutdown().await
        }
        b'I' => {
            s.write_all(b"i").await?;
            let mut sink = [0u8; 16];
            while s.read(&mut sink).await? > 0 {}
            Ok(())
        }
        _ => Ok(()),
    }
}
