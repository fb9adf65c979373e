//! Mode `auto`: every connection starts on splice and is handed to the kernel relay (sockmap)
//! once it passes the threshold. Bytes checksummed across the hand-over in both directions,
//! with a half-close and a reset landing before, at and after it; 128 concurrent connections
//! of mixed lengths; a full map that keeps connections on splice; promotion by age; and the
//! count in `berth status` and /metrics.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use berth::{
    addr::TargetAddr,
    forward::{self, Config, Phase, Stats},
    relay::{Pump, Threshold},
    sockmap::{self, Sockmap},
};
use common::{HANG, TestNet, random_sizes, recv_all, rng, send_random, spawn_exchange_server};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};

/// The tests' byte threshold: small, so that a few MiB cross it many times over.
const T: u64 = 256 << 10;

/// An `auto` relay in this process, with its own programs and maps and counters.
struct AutoProxy {
    addr: SocketAddr,
    sm: Arc<Sockmap>,
    stats: Arc<Stats>,
    phase: watch::Sender<Phase>,
    task: tokio::task::JoinHandle<()>,
}

impl AutoProxy {
    fn start(target: SocketAddr, max_entries: u32, promote: Threshold) -> Self {
        common::require_root();
        let sm = Sockmap::load(sockmap::Settings {
            max_entries,
            promote,
            ..sockmap::Settings::default()
        })
        .expect("load the sockmap programs");
        let mut config = Config::new(TargetAddr(target));
        config.pump = Pump::Auto(sm.clone(), sm.promote());
        let listener = berth::listen::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let (phase, rx) = watch::channel(Phase::Serve);
        let task = tokio::spawn({
            let stats = stats.clone();
            async move {
                forward::serve(listener, config, stats, rx, || ())
                    .await
                    .unwrap();
            }
        });
        Self {
            addr,
            sm,
            stats,
            phase,
            task,
        }
    }

    fn by_bytes(target: SocketAddr, max_entries: u32) -> Self {
        Self::start(
            target,
            max_entries,
            Threshold {
                bytes: T,
                age: Duration::from_secs(3600),
            },
        )
    }

    fn promoted(&self) -> u64 {
        self.stats.snapshot().promoted
    }

    /// Waits until every connection has left the maps, then stops serving.
    async fn stop(self) {
        let sm = self.sm.clone();
        common::wait_until("the maps to empty", move || sm.entries() == (0, 0, 0)).await;
        self.phase.send_replace(Phase::Drain);
        timeout(HANG, self.task).await.unwrap().unwrap();
    }
}

async fn pair(proxy: &AutoProxy, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let (c, s) = tokio::join!(TcpStream::connect(proxy.addr), listener.accept());
    (c.unwrap(), s.unwrap().0)
}

/// The first speaker sends `first` bytes and half-closes; then the other sends `second` bytes
/// and closes. Every byte must arrive, in order, each half-close after the last byte before it.
async fn turns(c: TcpStream, s: TcpStream, client_first: bool, first: u64, second: u64) {
    let what = format!("client_first={client_first} {first}/{second}");
    let (mut a, mut b) = if client_first { (c, s) } else { (s, c) };
    let (sent, got) = timeout(HANG * 4, async {
        let (mut br, _bw) = b.split();
        let (_ar, mut aw) = a.split();
        tokio::join!(send_random(&mut aw, first, 1), recv_all(&mut br))
    })
    .await
    .unwrap();
    assert_eq!(got.unwrap(), (first, sent.unwrap()), "{what}: first turn");
    let (sent, got) = timeout(HANG * 4, async {
        let (mut ar, _aw) = a.split();
        let (_br, mut bw) = b.split();
        tokio::join!(send_random(&mut bw, second, 2), recv_all(&mut ar))
    })
    .await
    .unwrap();
    assert_eq!(got.unwrap(), (second, sent.unwrap()), "{what}: second turn");
}

/// The hand-over in each direction (the client's bytes cross the threshold, or the server's),
/// with the first speaker's half-close landing before it (less than T), right at it (exactly
/// T, or nothing at all), or well after it (8 T): every byte arrives, and the connections
/// that crossed the threshold while both ways were open went to the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_keeps_every_byte_with_half_close_before_at_and_after() {
    // A container behind a bridge, not loopback: there, segments arrive coalesced, and a
    // hand-over with one of them half read delivered its read part twice.
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = AutoProxy::by_bytes(listener.local_addr().unwrap(), 64);
    let cases = [
        (0, 8 * T),
        (T / 2, 8 * T),
        (T, 8 * T),
        (8 * T, T / 2),
        (8 * T, 8 * T),
    ];
    for client_first in [true, false] {
        for (first, second) in cases {
            let (c, s) = pair(&proxy, &listener).await;
            turns(c, s, client_first, first, second).await;
        }
    }
    // A direction is handed over only once its socket is drained (no segment half read), so
    // a sender faster than splice may finish first; a FIN that lands between the stop and
    // the insert keeps the connection on splice (counted as a fallback).
    let (promoted, fell_back) = (proxy.promoted(), proxy.sm.fallbacks());
    eprintln!(
        "{promoted} of {} connections promoted, {fell_back} half-closed during the hand-over",
        2 * cases.len()
    );
    assert!(promoted + fell_back <= 2 * cases.len() as u64);
    // One hand-over for certain, with bytes flowing both ways right after it: the client
    // pauses once past the threshold until the connection is promoted.
    let (mut c, mut s) = pair(&proxy, &listener).await;
    tokio::join!(send_random_open(&mut c, 2 * T), async {
        let mut buf = vec![0u8; (2 * T) as usize];
        s.read_exact(&mut buf).await.unwrap();
    });
    let stats = proxy.stats.clone();
    common::wait_until("the promotion", move || {
        stats.snapshot().promoted > promoted
    })
    .await;
    turns(c, s, true, 8 * T, 8 * T).await;
    proxy.stop().await;
}

/// Streams handed over mid-flow, through a container's bridge: 8 uploads of 256 MiB, each
/// checksummed. Handing a stream over with a segment half read by splice delivered the read
/// part twice (the kernel gives the program whole segments); this caught it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_handed_over_mid_flow_arrive_intact() {
    const LEN: u64 = 256 << 20;
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = AutoProxy::by_bytes(listener.local_addr().unwrap(), 64);
    for i in 0..8 {
        let (mut c, mut s) = pair(&proxy, &listener).await;
        let (sent, got) = timeout(HANG * 4, async {
            tokio::join!(send_random(&mut c, LEN, i), recv_all(&mut s))
        })
        .await
        .unwrap();
        assert_eq!(got.unwrap(), (LEN, sent.unwrap()), "upload {i}");
    }
    eprintln!("{} of 8 promoted", proxy.promoted());
    proxy.stop().await;
}

/// A side that sends some bytes and then resets (before the threshold, at it, after it) has
/// its reset passed to the other side, which never mistakes it for a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_before_at_and_after_the_hand_over_reach_the_other_side() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = AutoProxy::by_bytes(listener.local_addr().unwrap(), 64);
    for client_resets in [true, false] {
        for len in [T / 2, T, 8 * T] {
            let (c, s) = pair(&proxy, &listener).await;
            let (mut dying, mut other, who) = if client_resets {
                (c, s, "server")
            } else {
                (s, c, "client")
            };
            // The other side reads as it comes, so that the bytes pass the proxy first.
            let reader = tokio::spawn(async move {
                common::expect_reset(&mut other, who).await;
            });
            let mut w = dying.split().1;
            let _ = send_random_open(&mut w, len).await;
            socket2::SockRef::from(&dying)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(dying);
            timeout(HANG, reader).await.unwrap().unwrap();
        }
    }
    proxy.stop().await;
}

/// Writes `len` bytes without closing.
async fn send_random_open(w: &mut (impl tokio::io::AsyncWrite + Unpin), len: u64) {
    let chunk = vec![0x5a_u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).await.unwrap();
        left -= n as u64;
    }
}

/// 128 connections at once, both directions at the same time, of lengths from nothing to
/// 8 MiB: every one mirrored, the long ones promoted, the short ones not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_lengths_128_at_once() {
    const N: usize = 128;
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let target = listener.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(listener);
    let proxy = AutoProxy::by_bytes(target, 1024);
    let mut rng = rng();
    let ups = random_sizes(N, 8 << 20, &mut rng);
    let mut downs = random_sizes(N, 8 << 20, &mut rng);
    downs.reverse();
    let short = ups.iter().zip(&downs).filter(|(u, d)| *u + *d < T).count() as u64;
    common::exchanges_at_once(
        proxy.addr,
        ups.into_iter().zip(downs).collect(),
        &mut tallies,
    )
    .await;
    let promoted = proxy.promoted();
    eprintln!("{promoted} of {N} promoted, {short} too short to be");
    assert!(
        promoted <= N as u64 - short,
        "{promoted} promoted, but {short} of {N} never reached the threshold"
    );
    proxy.stop().await;
}

/// Maps with room for one connection: the first long connection is promoted, the second
/// stays on splice (counted as a fallback), and both carry every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_keeps_the_connection_on_splice() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = AutoProxy::by_bytes(listener.local_addr().unwrap(), 2);
    let (mut c1, mut s1) = pair(&proxy, &listener).await;
    // The first crosses the threshold and stays open, holding the maps' only room.
    tokio::join!(send_random_open(&mut c1, 2 * T), async {
        let mut buf = vec![0u8; (2 * T) as usize];
        s1.read_exact(&mut buf).await.unwrap();
    });
    common::wait_until("the first connection's promotion", || {
        proxy.stats.snapshot().promoted == 1
    })
    .await;
    let (c2, s2) = pair(&proxy, &listener).await;
    turns(c2, s2, true, 8 * T, 8 * T).await;
    assert_eq!(proxy.sm.fallbacks(), 1, "the second found the maps full");
    assert_eq!(proxy.promoted(), 1);
    // The first still works, through the kernel.
    turns(c1, s1, false, 8 * T, 8 * T).await;
    proxy.stop().await;
}

/// A connection that moves only a few bytes but keeps doing so is promoted once it is older
/// than the age threshold, and its exchange goes on intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_connection_is_promoted_by_age() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = AutoProxy::start(
        listener.local_addr().unwrap(),
        64,
        Threshold {
            bytes: u64::MAX,
            age: Duration::from_millis(200),
        },
    );
    let (mut c, mut s) = pair(&proxy, &listener).await;
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await.unwrap() {
                0 => return,
                n => s.write_all(&buf[..n]).await.unwrap(),
            }
        }
    });
    let deadline = tokio::time::Instant::now() + HANG;
    let mut i = 0;
    while proxy.promoted() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never promoted");
        round(&mut c, i).await;
        i += 1;
    }
    for j in 0..200 {
        round(&mut c, i + j).await;
    }
    c.shutdown().await.unwrap();
    timeout(HANG, echo).await.unwrap().unwrap();
    drop(c);
    proxy.stop().await;
}

/// One 64-byte round trip with an echo server.
async fn round(c: &mut TcpStream, i: u64) {
    let msg = [(i % 251) as u8; 64];
    c.write_all(&msg).await.unwrap();
    let mut back = [0u8; 64];
    timeout(HANG, c.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, msg, "round {i}");
}

/// `berth run` with a mapping in the default mode: it says `auto`, and a long transfer shows
/// up as promoted in `berth status` and in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_count_promotions() {
    use common::daemon::{Berth, Dir, free_addr, mapping, sample, scrape};
    common::require_root();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (listen, metrics) = (free_addr(), free_addr());
    let dir = Dir::new();
    let config = format!(
        "[metrics]\nlisten = \"{metrics}\"\n[service]\nsockmap_promote_bytes = {T}\n{}",
        mapping("web", listen, listener.local_addr().unwrap(), "")
    );
    let berth = Berth::spawn(&dir, &config, None, Vec::new());
    berth.up().await;
    let (c, s) = tokio::join!(TcpStream::connect(listen), listener.accept());
    turns(c.unwrap(), s.unwrap().0, true, 8 * T, 8 * T).await;
    berth
        .wait_status(|r| r.name == "web" && r.active == 0)
        .await;
    let row = berth.row("web").await;
    assert_eq!((row.mode.as_str(), row.promoted), ("auto", 1), "{row:?}");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--admin-socket"])
        .arg(&berth.admin)
        .output()
        .unwrap();
    let table = String::from_utf8(status.stdout).unwrap();
    assert!(
        table.lines().next().unwrap().ends_with("PROMOTED"),
        "{table}"
    );
    let m = scrape(metrics).await;
    assert_eq!(
        sample(
            &m,
            "berth_connections_promoted_total{mapping=\"web\",proto=\"tcp\"}"
        ),
        1.0
    );
}
