//! Load generators. Each is bounded in time (and where it loops, in count), and returns raw
//! measurements; turning them into metrics is the caller's job.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
};

use crate::server::FRAME;

const CHUNK: usize = 256 * 1024;
/// Upper bound on any single operation; hitting it fails the sample instead of hanging.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(addr)).await??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Which way a bulk transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client to container.
    Up,
    /// Container to client.
    Down,
}

/// Bytes moved by `streams` parallel connections in about `dur`, and the wall time taken.
pub(crate) async fn bulk(
    addr: SocketAddr,
    streams: usize,
    dir: Dir,
    dur: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..streams {
        set.spawn(async move {
            match dir {
                Dir::Up => upload(addr, dur).await,
                Dir::Down => download(addr, dur).await,
            }
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok((total, start.elapsed()))
}

async fn upload(addr: SocketAddr, dur: Duration) -> anyhow::Result<u64> {
    let mut s = connect(addr).await?;
    s.write_all(b"U").await?;
    let buf = vec![0xa5u8; CHUNK];
    let deadline = Instant::now() + dur;
    while Instant::now() < deadline {
        tokio::time::timeout(OP_TIMEOUT, s.write_all(&buf)).await??;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(OP_TIMEOUT, s.read_exact(&mut count)).await??;
    // What the container received, not what was written into the local buffer.
    Ok(u64::from_be_bytes(count))
}

async fn download(addr: SocketAddr, dur: Duration) -> anyhow::Result<u64> {
    let mut s = connect(addr).await?;
    let mut req = [0u8; 9];
    req[0] = b'D';
    req[1..].copy_from_slice(&u64::try_from(dur.as_millis())?.to_be_bytes());
    s.write_all(&req).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = tokio::time::timeout(OP_TIMEOUT, s.read(&mut buf)).await??;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Round-trip latencies (ns) of 64-byte ping-pong over one connection, for `dur` or
/// `max_rounds`, whichever ends first.
pub(crate) async fn rr(
    addr: SocketAddr,
    dur: Duration,
    max_rounds: u64,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut s = connect(addr).await?;
    s.write_all(b"E").await?;
    let mut frame = [0x42u8; FRAME];
    let deadline = Instant::now() + dur;
    let mut rounds = 0;
    while Instant::now() < deadline && rounds < max_rounds {
        let t = Instant::now();
        s.write_all(&frame).await?;
        tokio::time::timeout(OP_TIMEOUT, s.read_exact(&mut frame)).await??;
        hist.record(u64::try_from(t.elapsed().as_nanos())?.max(1))?;
        rounds += 1;
    }
    Ok(hist)
}

/// Connect / 64 B request / 64 B response / close, from `clients` concurrent loops for `dur`.
/// Returns completed connections, elapsed time and the latency histogram (ns).
pub(crate) async fn crr(
    addr: SocketAddr,
    clients: usize,
    dur: Duration,
) -> anyhow::Result<(u64, Duration, Histogram<u64>)> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = JoinSet::new();
    for _ in 0..clients {
        set.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            let mut req = [b'r'; FRAME];
            req[0] = b'C';
            let mut resp = [0u8; FRAME];
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut s = connect(addr).await?;
                s.write_all(&req).await?;
                tokio::time::timeout(OP_TIMEOUT, s.read_exact(&mut resp)).await??;
                hist.record(u64::try_from(t.elapsed().as_nanos())?.max(1))?;
                // The server closes first, so TIME_WAIT stays on its side, not on our ports.
                let mut eof = [0u8; 1];
                let _ = tokio::time::timeout(OP_TIMEOUT, s.read(&mut eof)).await;
            }
            anyhow::Ok(hist)
        });
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    while let Some(h) = set.join_next().await {
        all.add(h??)?;
    }
    Ok((all.len(), start.elapsed(), all))
}

/// What a run of sequential connections measured.
#[derive(Debug, Clone)]
pub(crate) struct SeqRun {
    /// Connections that completed their round trip.
    pub(crate) done: u64,
    /// Connections reset, refused or cut short.
    pub(crate) failed: u64,
    pub(crate) elapsed: Duration,
    /// Connection rate (attempts, failed ones included) in each tenth of the run (fewer if
    /// the time ran out; the last one then partial).
    pub(crate) tenths: Vec<f64>,
}

/// `n` connections one after another, each: connect, a 64 B echo, and the client closes
/// first (so the proxy's leg to the server closes first too, and its local port waits in
/// TIME_WAIT). Stops after `n` or `max`. The client binds its own ports, cycling through
/// the ephemeral range with SO_REUSEADDR, so that its own TIME_WAIT (it closes first) never
/// limits the run: only the proxy's ports are measured.
pub(crate) async fn sequential(addr: SocketAddr, n: u64, max: Duration) -> anyhow::Result<SeqRun> {
    let range = berth::forward::ports::Range::read()?;
    let cursor = berth::forward::ports::Cursor::new();
    let start = Instant::now();
    let deadline = start + max;
    let tenth = (n / 10).max(1);
    let (mut done, mut failed, mut tenths) = (0u64, 0u64, Vec::new());
    let (mut window, mut in_window) = (Instant::now(), 0u64);
    for _ in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        match tokio::time::timeout(OP_TIMEOUT, one_closing_first(addr, &range, &cursor)).await {
            Ok(Ok(())) => done += 1,
            Ok(Err(_)) | Err(_) => failed += 1,
        }
        in_window += 1;
        // A window cut short by the deadline counts what it held, not a whole tenth.
        if in_window == tenth || Instant::now() >= deadline {
            tenths.push(in_window as f64 / window.elapsed().as_secs_f64());
            (window, in_window) = (Instant::now(), 0);
        }
    }
    Ok(SeqRun {
        done,
        failed,
        elapsed: start.elapsed(),
        tenths,
    })
}

/// One connection of [`sequential`]: the echo command and a frame, the frame back.
async fn one_closing_first(
    addr: SocketAddr,
    range: &berth::forward::ports::Range,
    cursor: &berth::forward::ports::Cursor,
) -> anyhow::Result<()> {
    let mut last = None;
    for port in cursor.candidates(range) {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        if let Err(e) = sock.bind(berth::forward::ports::unspecified(&addr, port)) {
            last = Some(e);
            continue;
        }
        match sock.connect(addr).await {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                let mut sent = [0x42u8; FRAME + 1];
                sent[0] = b'E';
                s.write_all(&sent).await?;
                let mut got = [0u8; FRAME];
                s.read_exact(&mut got).await?;
                anyhow::ensure!(got[..] == sent[1..], "the echo differs");
                // The client's end first; then the server's.
                s.shutdown().await?;
                anyhow::ensure!(s.read(&mut [0; 1]).await? == 0, "data after the echo");
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no client port"), anyhow::Error::from))
}

/// Opens `n` connections that each completed a round trip to the container, and keeps them.
pub(crate) async fn open_idle(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    // Open in batches so the proxy's accept backlog is never the bottleneck.
    for batch in (0..n).collect::<Vec<_>>().chunks(256) {
        let mut set = JoinSet::new();
        for _ in batch {
            set.spawn(async move {
                let mut s = connect(addr).await?;
                s.write_all(b"I").await?;
                let mut ack = [0u8; 1];
                tokio::time::timeout(OP_TIMEOUT, s.read_exact(&mut ack)).await??;
                anyhow::Ok(s)
            });
        }
        while let Some(s) = set.join_next().await {
            conns.push(s??);
        }
    }
    Ok(conns)
}

/// What a UDP echo run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpRun {
    /// Datagrams that came back (each crossed the proxy twice).
    pub(crate) replies: u64,
    /// Datagrams presumed lost: sent, and not back within the loss timeout.
    pub(crate) lost: u64,
    pub(crate) elapsed: Duration,
}

/// How long a window may stay silent before its datagrams count as lost and it is refilled.
const UDP_LOSS_TIMEOUT: Duration = Duration::from_millis(50);

/// `flows` client sockets, each keeping `window` datagrams of `size` bytes in flight through
/// the echo server for `dur`: a reply sends the next datagram. Bounded in time; loss only
/// costs a timeout and is counted.
pub(crate) async fn udp_echo(
    addr: SocketAddr,
    flows: usize,
    window: usize,
    size: usize,
    dur: Duration,
) -> anyhow::Result<UdpRun> {
    anyhow::ensure!(size >= 8, "datagrams carry an 8-byte epoch");
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = JoinSet::new();
    for _ in 0..flows {
        set.spawn(async move {
            let sock = tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await?;
            sock.connect(addr).await?;
            let mut out = vec![0x5au8; size];
            let mut buf = vec![0u8; 65_536];
            // Each refill starts an epoch; a late reply from an older one is not answered, so
            // the window never grows past `window`.
            let (mut epoch, mut replies, mut lost) = (0u64, 0u64, 0u64);
            'refill: while Instant::now() < deadline {
                epoch += 1;
                out[..8].copy_from_slice(&epoch.to_be_bytes());
                let mut in_flight = 0;
                for _ in 0..window {
                    sock.send(&out).await?;
                    in_flight += 1;
                }
                while Instant::now() < deadline {
                    match tokio::time::timeout(UDP_LOSS_TIMEOUT, sock.recv(&mut buf)).await {
                        Ok(Ok(n)) => {
                            if n < 8 || buf[..8] != epoch.to_be_bytes() {
                                continue;
                            }
                            replies += 1;
                            sock.send(&out).await?;
                        }
                        Ok(Err(e)) => return Err(anyhow::Error::from(e)),
                        Err(_) => {
                            lost += in_flight;
                            continue 'refill;
                        }
                    }
                }
            }
            anyhow::Ok((replies, lost))
        });
    }
    let (mut replies, mut lost) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (r, l) = r??;
        replies += r;
        lost += l;
    }
    Ok(UdpRun {
        replies,
        lost,
        elapsed: start.elapsed(),
    })
}

/// What clients saw across a restart or an upgrade of the contender.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    /// Held connections (echoing a frame every 50 ms) that failed: reset, closed, a wrong
    /// answer, or no answer within 3 s.
    pub(crate) held_lost: u64,
    /// New connections (connect, 64 B request, 64 B response) that failed.
    pub(crate) new_failed: u64,
    pub(crate) new_ok: u64,
    /// The longest stretch without a new connection completing.
    pub(crate) longest_gap: Duration,
}

/// `held` echo connections kept busy, and one client connecting in a loop, for `dur`; once
/// every held connection is open, `ready` is told, and the caller restarts or upgrades the
/// contender.
pub(crate) async fn outage(
    addr: SocketAddr,
    held: usize,
    dur: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<Outage> {
    const ROUND: Duration = Duration::from_millis(50);
    const ANSWER: Duration = Duration::from_secs(3);
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = JoinSet::new();
    for i in 0..held {
        let mut s = connect(addr).await?;
        s.write_all(b"E").await?;
        set.spawn(async move {
            let mut frame = [0u8; FRAME];
            let mut seq = 0u64;
            while Instant::now() < deadline {
                frame[..8].copy_from_slice(&(i as u64).to_le_bytes());
                frame[8..16].copy_from_slice(&seq.to_le_bytes());
                let sent = frame;
                let round = async {
                    s.write_all(&frame).await?;
                    s.read_exact(&mut frame).await
                };
                match tokio::time::timeout(ANSWER, round).await {
                    Ok(Ok(_)) if frame == sent => {}
                    _ => return true,
                }
                seq += 1;
                tokio::time::sleep(ROUND).await;
            }
            false
        });
    }
    let _ = ready.send(());
    let prober = tokio::spawn(async move {
        let mut out = Outage::default();
        let mut req = [b'r'; FRAME];
        req[0] = b'C';
        let mut last = Instant::now();
        while Instant::now() < deadline {
            let one = async {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&req).await?;
                let mut resp = [0u8; FRAME];
                s.read_exact(&mut resp).await?;
                anyhow::Ok(())
            };
            if let Ok(Ok(())) = tokio::time::timeout(ANSWER, one).await {
                out.new_ok += 1;
                out.longest_gap = out.longest_gap.max(last.elapsed());
                last = Instant::now();
            } else {
                out.new_failed += 1;
                // A refused connect returns at once: pace the retries.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        out.longest_gap = out.longest_gap.max(last.elapsed());
        out
    });
    let mut lost = 0;
    while let Some(l) = set.join_next().await {
        lost += u64::from(l?);
    }
    let mut out = prober.await?;
    out.held_lost = lost;
    Ok(out)
}
