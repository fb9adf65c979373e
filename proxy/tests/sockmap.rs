//! The sockmap relay: bytes moved by the kernel between client and container sockets.
//! Gigabytes checksummed with half-close in each order, 128 concurrent connections, bytes
//! sent before the backend connection exists, a container that stops reading (the client is
//! held back), a client that sends without reading to an echo server (held back too), an
//! echo server that writes before it reads again, resets both ways, no map entry left
//! behind, the splice fallback of a full map, and loading with and without the privileges.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use berth::{
    addr::TargetAddr,
    forward::Config,
    relay::Pump,
    sockmap::{self, Sockmap},
};
use common::{HANG, Proxy, TestNet, random_sizes, rng, spawn_exchange_server};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// A sockmap-mode proxy in this process, with its own programs and maps.
struct SmProxy {
    proxy: Proxy,
    sm: Arc<Sockmap>,
}

impl SmProxy {
    fn start(target: SocketAddr, max_entries: u32) -> Self {
        Self::start_with(
            target,
            sockmap::Settings {
                max_entries,
                ..sockmap::Settings::default()
            },
        )
    }

    fn start_with(target: SocketAddr, settings: sockmap::Settings) -> Self {
        common::require_root();
        let sm = Sockmap::load(settings).expect("load the sockmap programs");
        let mut config = Config::new(TargetAddr(target));
        config.pump = Pump::Sockmap(sm.clone());
        let proxy = Proxy::start("127.0.0.1:0", config);
        Self { proxy, sm }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    /// Waits until every connection has been torn down, then checks the maps are empty.
    async fn assert_no_entries_left(&self) {
        let sm = self.sm.clone();
        common::wait_until("the maps to empty", move || sm.entries() == (0, 0, 0)).await;
    }

    async fn stop(self) {
        self.proxy.stop().await;
    }

    /// Checks that every connection left the maps and none fell back to splice, then stops.
    async fn stop_clean(self) {
        self.assert_no_entries_left().await;
        assert_eq!(self.sm.fallbacks(), 0);
        self.stop().await;
    }
}

const CHUNK: usize = 1 << 20;

/// Writes `len` seeded random bytes and half-closes; returns their SHA-256.
async fn send(w: &mut (impl AsyncWrite + Unpin), len: u64, seed: u64) -> [u8; 32] {
    common::send_random(w, len, seed).await.unwrap()
}

/// Reads to EOF; returns the byte count and SHA-256.
async fn receive(r: &mut (impl AsyncRead + Unpin)) -> (u64, [u8; 32]) {
    common::recv_all(r).await.unwrap()
}

/// One side speaks until it half-closes, then the other: each half-close must arrive only
/// after every byte before it, with the other direction still open.
async fn turn_taking(proxy: &SmProxy, listener: &TcpListener, len: u64, client_first: bool) {
    let (mut c, (mut s, _)) = tokio::join!(
        async { TcpStream::connect(proxy.addr()).await.unwrap() },
        async { listener.accept().await.unwrap() }
    );
    let what = if client_first {
        "client first"
    } else {
        "server first"
    };
    let (first_w, second_w): (&mut TcpStream, &mut TcpStream) = if client_first {
        (&mut c, &mut s)
    } else {
        (&mut s, &mut c)
    };
    let (sent, (got, got_sha)) = timeout(HANG * 10, async {
        // Both sockets are used from one task: split into halves by reference.
        let (mut r2, _) = second_w.split();
        let (_, mut w1) = first_w.split();
        tokio::join!(send(&mut w1, len, 1), receive(&mut r2))
    })
    .await
    .unwrap();
    assert_eq!(got, len, "{what}: first half lost bytes");
    assert_eq!(got_sha, sent, "{what}: first half corrupted");
    let (sent, (got, got_sha)) = timeout(HANG * 10, async {
        let (mut r1, _) = first_w.split();
        let (_, mut w2) = second_w.split();
        tokio::join!(send(&mut w2, len, 2), receive(&mut r1))
    })
    .await
    .unwrap();
    assert_eq!(got, len, "{what}: second half lost bytes");
    assert_eq!(got_sha, sent, "{what}: second half corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_four_gib_each_way_with_half_close_in_both_orders() {
    const LEN: u64 = 4 << 30;
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = SmProxy::start(listener.local_addr().unwrap(), 1024);
    for client_first in [true, false] {
        turn_taking(&proxy, &listener, LEN, client_first).await;
    }
    proxy.stop_clean().await;
}

/// A container that stops reading must hold the client back. Redirected bytes leave the
/// socket's receive queue at once, so TCP alone would keep taking them: before the redirect
/// allowance, the kernel queued 3 GB in under 2 s here for a reader of 6 MB/s. Then the
/// container reads again and every byte arrives, in order, across the switch from the kernel
/// to berth and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_stops_reading_holds_the_client_back() {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = SmProxy::start_with(listener.local_addr().unwrap(), held_back_settings());
    let (c, (mut s, _)) = tokio::join!(
        async { TcpStream::connect(proxy.addr()).await.unwrap() },
        async { listener.accept().await.unwrap() }
    );
    held_back_then_delivered(c, &mut s, 3, "a container that reads nothing").await;
    drop(s);
    proxy.stop_clean().await;
}

/// The bound tests' buffers: every buffer on the way (two send buffers, two receive buffers,
/// the allowance) is a few MiB, so [`HELD_BACK_BOUND`] is far above what a working bound
/// lets in and far below [`HELD_BACK_LEN`].
fn held_back_settings() -> sockmap::Settings {
    sockmap::Settings {
        max_entries: 64,
        send_buffer: 4 << 20,
        ..sockmap::Settings::default()
    }
}

const HELD_BACK_LEN: u64 = 1 << 30;
const HELD_BACK_BOUND: u64 = 128 << 20;

/// Writes [`HELD_BACK_LEN`] seeded bytes into `w` while nobody reads them at the far end:
/// within 5 s the writer must stall below [`HELD_BACK_BOUND`]. Then reads `r` to its end
/// and checks that every byte arrived exactly once.
async fn held_back_then_delivered(
    mut w: impl AsyncWrite + Unpin + Send + 'static,
    r: &mut (impl AsyncRead + Unpin),
    seed: u64,
    who: &str,
) {
    // How long the writer is given to push the whole GiB through although nothing reads.
    const STALL: Duration = Duration::from_secs(5);
    let sent = Arc::new(AtomicU64::new(0));
    let mut writer = tokio::spawn({
        let sent = sent.clone();
        async move {
            common::send_random_counted(&mut w, HELD_BACK_LEN, seed, &sent)
                .await
                .unwrap()
        }
    });
    assert!(
        timeout(STALL, &mut writer).await.is_err(),
        "the kernel took all {HELD_BACK_LEN} bytes for {who}"
    );
    let held = sent.load(Ordering::Relaxed);
    assert!(held < HELD_BACK_BOUND, "{held} bytes went in for {who}");
    let (got, got_sha) = timeout(HANG * 10, receive(r)).await.unwrap();
    let sent_sha = timeout(HANG, writer).await.unwrap().unwrap();
    assert_eq!(got, HELD_BACK_LEN, "bytes lost or doubled");
    assert_eq!(got_sha, sent_sha, "bytes corrupted");
}

/// An echo server that writes each chunk back before it reads the next, and a client that
/// sends and receives at once. With small buffers both directions keep running out of
/// allowance; a direction waiting for its receiver must never hold up the other one, which
/// is what that receiver is waiting for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_server_that_writes_before_it_reads_again_is_served() {
    const LEN: u64 = 256 << 20;
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = SmProxy::start_with(
        listener.local_addr().unwrap(),
        sockmap::Settings {
            max_entries: 64,
            send_buffer: 1 << 20,
            ..sockmap::Settings::default()
        },
    );
    let server = tokio::spawn(echo(listener));
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut r, mut w) = c.split();
    let (sent, (got, got_sha)) = timeout(HANG * 5, async {
        tokio::join!(send(&mut w, LEN, 4), receive(&mut r))
    })
    .await
    .expect("the echo stalled");
    assert_eq!(got, LEN, "bytes lost or doubled");
    assert_eq!(got_sha, sent, "bytes corrupted");
    timeout(HANG, server).await.unwrap().unwrap();
    drop(c);
    proxy.stop_clean().await;
}

/// A client that sends without reading, to a server that answers everything: the client's
/// socket is then the destination of one direction and the source of the other. Once the
/// answers filled its send buffer, the bytes the program passed on it queued behind them in
/// its psock queue, uncharged, and TCP kept taking more: the whole GiB went in within 4 s.
/// Now the answers never fill that buffer, so the client is held back; then it reads, and
/// every byte is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_without_reading_to_an_echo_server_is_held_back() {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = SmProxy::start_with(listener.local_addr().unwrap(), held_back_settings());
    let server = tokio::spawn(echo(listener));
    let (mut r, w) = TcpStream::connect(proxy.addr()).await.unwrap().into_split();
    held_back_then_delivered(w, &mut r, 5, "a client that reads nothing").await;
    timeout(HANG, server).await.unwrap().unwrap();
    drop(r);
    proxy.stop_clean().await;
}

/// Accepts one connection and writes back each chunk before reading the next, until EOF.
async fn echo(listener: TcpListener) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await.unwrap();
    }
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_128_connections() {
    const N: usize = 128;
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let target = listener.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(listener);
    let proxy = SmProxy::start(target, 1024);
    let mut rng = rng();
    let ups = random_sizes(N, 64 << 20, &mut rng);
    // Only a client that can send all it has and its FIN before berth inserts the
    // connection may fall back: what fits in the proxy's receive buffer at once.
    let may_fall_back = ups.iter().filter(|u| **u <= 256 << 10).count() as u64;
    let mut downs = random_sizes(N, 64 << 20, &mut rng);
    downs.reverse();
    common::exchanges_at_once(
        proxy.addr(),
        ups.into_iter().zip(downs).collect(),
        &mut tallies,
    )
    .await;
    proxy.assert_no_entries_left().await;
    // A connection with a side that had sent everything and its FIN before berth inserted
    // it (the tiny transfers) cannot join a SOCKHASH (only established sockets can) and is
    // relayed by splice; the others go through the kernel.
    let fell_back = proxy.sm.fallbacks();
    eprintln!("{fell_back} of {N} connections were already half-closed and went by splice");
    assert!(
        fell_back <= may_fall_back,
        "{fell_back} fell back, but only {may_fall_back} sent at most 256 KiB"
    );
    proxy.stop().await;
}

/// The client's request is in its socket before berth has even connected to the backend:
/// the backend's accept queue is full, so berth's SYN is dropped and retried a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_backend_connection_exists_arrive() {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    sock.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(sock.into()).unwrap();
    let target = listener.local_addr().unwrap();
    // Fill the accept queue.
    let filler = TcpStream::connect(target).await.unwrap();
    let proxy = SmProxy::start(target, 64);
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    // 64 KiB: it all waits in berth's socket, and the client stays open (a client that had
    // also sent its FIN could not join the map and would go by splice).
    let request: Vec<u8> = (0..(64 << 10)).map(|i| (i % 251) as u8).collect();
    c.write_all(&request).await.unwrap();
    // Now make room: the filler is accepted and dropped, berth's retried SYN gets through.
    let (f, _) = listener.accept().await.unwrap();
    drop((f, filler));
    let (mut s, _) = timeout(HANG, listener.accept()).await.unwrap().unwrap();
    let mut got = vec![0u8; request.len()];
    timeout(HANG, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == request, "pre-insertion bytes lost or reordered");
    // And the stream goes on through the kernel, both ways, to a clean end.
    c.write_all(b"more").await.unwrap();
    c.shutdown().await.unwrap();
    let mut tail = Vec::new();
    timeout(HANG, s.read_to_end(&mut tail))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tail, b"more");
    s.write_all(b"done").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    timeout(HANG, c.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"done");
    proxy.stop_clean().await;
}

/// A reset on either side (a client that aborts, a backend that dies mid-stream) aborts the
/// other side too, and the entries go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_cross_in_both_directions() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = SmProxy::start(listener.local_addr().unwrap(), 64);
    for client_resets in [true, false] {
        let (mut c, (mut s, _)) = tokio::join!(
            async { TcpStream::connect(proxy.addr()).await.unwrap() },
            async { listener.accept().await.unwrap() }
        );
        // Some traffic first, so that the reset hits a relayed connection.
        c.write_all(&[7u8; 100_000]).await.unwrap();
        let mut buf = vec![0u8; 100_000];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&[9u8; 100_000]).await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        let (dying, mut other, who) = if client_resets {
            (c, s, "backend")
        } else {
            (s, c, "client")
        };
        socket2::SockRef::from(&dying)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(dying);
        common::expect_reset(&mut other, who).await;
    }
    proxy.stop_clean().await;
}

/// More connections than the maps hold: the extra ones are relayed by splice, and every one
/// of them still carries its bytes intact. Each connection takes turns (the server echoes
/// everything back after the client's EOF), the pattern the sockmap mode handles reliably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_falls_back_to_splice() {
    const N: u64 = 16;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                s.write_all(&all).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    // Room for 2 connections.
    let proxy = SmProxy::start(target, 4);
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..N {
        let addr = proxy.addr();
        clients.spawn(async move {
            let c = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = c.into_split();
            let sent = send(&mut w, 8 << 20, id).await;
            let (n, got) = receive(&mut r).await;
            assert_eq!((n, got), (8 << 20, sent), "connection {id} corrupted");
        });
    }
    while let Some(r) = timeout(HANG, clients.join_next()).await.unwrap() {
        r.unwrap();
    }
    assert!(
        proxy.sm.fallbacks() > 0,
        "16 connections at once in a map for 2"
    );
    proxy.assert_no_entries_left().await;
    proxy.stop().await;
}

/// `berth forward --mode sockmap` loads the programs here, and without the privileges to
/// load BPF (a bounding set without CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_PERFMON)
/// it refuses to start with the reason; `auto` then still serves, by splice.
#[test]
fn sockmap_mode_loads_here_and_fails_clearly_without_the_privileges() {
    common::require_root();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = target.local_addr().unwrap().to_string();
    let berth = env!("CARGO_BIN_EXE_berth");
    let drop_caps = [
        "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon",
        "--inh-caps=-bpf,-sys_admin,-net_admin,-perfmon",
        "--",
    ];
    // Returns the mode of the `listening` line, or the whole log if berth exited first.
    let run = |pre: &[&str], mode: &str| -> Result<String, String> {
        let mut cmd = if pre.is_empty() {
            Command::new(berth)
        } else {
            let mut c = Command::new("setpriv");
            c.args(pre).arg(berth);
            c
        };
        let mut child = cmd
            .args(["forward", "--mode", mode, "127.0.0.1:0", &target])
            .env("BERTH_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut log = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap();
            if let Some(rest) = line.split("mode=").nth(1)
                && line.contains("listening")
            {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
            log.push_str(&line);
            log.push('\n');
        }
        let status = child.wait().unwrap();
        Err(format!("{status}: {log}"))
    };
    assert_eq!(run(&[], "sockmap"), Ok("sockmap".into()));
    let denied = run(&drop_caps, "sockmap").unwrap_err();
    assert!(
        denied.contains("exit status: 1") && denied.contains("--mode sockmap:"),
        "{denied}"
    );
    // auto uses the programs where they load, and splices alone where they cannot.
    assert_eq!(run(&[], "auto"), Ok("auto".into()));
    assert_eq!(run(&drop_caps, "auto"), Ok("splice".into()));
}
