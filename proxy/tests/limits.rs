//! Clients that cannot starve the others: the per-client connection cap, the TCP idle
//! timeout (relay and sockmap), and a process out of file descriptors that refuses new
//! clients at once, keeps its connections and recovers by itself.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    HANG,
    daemon::{Berth, Dir, find_sample, free_addr, mapping, scrape},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    time::{Instant, timeout},
};

/// An echo server on loopback; it runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A client of `to` from source address `from` (any if `None`): `Some` once a round trip went
/// through the relay, `None` if berth reset the connection instead (at connect already, or
/// at the first bytes). Anything else fails the test.
async fn served(from: Option<&str>, to: SocketAddr) -> Option<TcpStream> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{}:0", from.unwrap_or("0.0.0.0")).parse().unwrap())
        .unwrap();
    let mut s = match timeout(HANG, sock.connect(to)).await.unwrap() {
        Ok(s) => s,
        Err(e) => return refusal(e),
    };
    let sent: [u8; 16] = rand::random();
    if let Err(e) = s.write_all(&sent).await {
        return refusal(e);
    }
    let mut got = [0; 16];
    match timeout(HANG, s.read_exact(&mut got)).await {
        Err(_) => panic!("neither an answer nor a refusal within {HANG:?}"),
        Ok(Err(e)) => refusal(e),
        Ok(Ok(_)) => {
            assert_eq!(got, sent);
            Some(s)
        }
    }
}

/// berth refuses with a reset: a FIN would look like a served, finished connection.
fn refusal(e: std::io::Error) -> Option<TcpStream> {
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    None
}

/// Whether an open connection still answers.
async fn echoes(s: &mut TcpStream) -> bool {
    let sent: [u8; 16] = rand::random();
    if s.write_all(&sent).await.is_err() {
        return false;
    }
    let mut got = [0; 16];
    matches!(timeout(HANG, s.read_exact(&mut got)).await, Ok(Ok(_))) && got == sent
}

/// Waits for berth to end `s` with a reset.
async fn reset(s: &mut TcpStream) {
    let r = timeout(HANG, s.read(&mut [0; 1])).await.unwrap();
    match r {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

#[tokio::test]
async fn a_client_beyond_its_cap_is_reset_and_other_clients_are_served() {
    common::require_root();
    let target = echo_server().await;
    let (metrics, listen) = (free_addr(), free_addr());
    let dir = Dir::new();
    let berth = Berth::spawn(
        &dir,
        &format!(
            "[metrics]\nlisten = \"{metrics}\"\n{}",
            mapping("capped", listen, target, "max_connections_per_client = 2")
        ),
        None,
        vec![],
    );
    berth.up().await;

    let a = Some("127.0.0.2");
    let a1 = served(a, listen).await.expect("first connection");
    let mut a2 = served(a, listen).await.expect("second connection");
    assert!(served(a, listen).await.is_none(), "a third connection");
    // Another client is not affected by the first one's cap.
    served(Some("127.0.0.3"), listen)
        .await
        .expect("another client");
    // A slot comes back when a connection ends (berth sees the close a moment later).
    drop(a1);
    let mut refused = 1;
    let deadline = Instant::now() + HANG;
    loop {
        if served(a, listen).await.is_some() {
            break;
        }
        refused += 1;
        assert!(Instant::now() < deadline, "the freed slot never came back");
    }
    assert!(echoes(&mut a2).await, "the held connection still works");
    let m = scrape(metrics).await;
    let refusals = find_sample(
        &m,
        "berth_connect_errors_total",
        &["mapping=\"capped\"", "reason=\"client_limit\""],
    );
    assert_eq!(refusals, Some(f64::from(refused)));
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_reset_and_a_busy_one_is_not() {
    common::require_root();
    let target = echo_server().await;
    let metrics = free_addr();
    let modes = ["splice", "sockmap"];
    let listens: Vec<SocketAddr> = modes.iter().map(|_| free_addr()).collect();
    let mut config = format!("[metrics]\nlisten = \"{metrics}\"\n");
    for (mode, listen) in modes.iter().zip(&listens) {
        config += &mapping(
            mode,
            *listen,
            target,
            &format!("mode = \"{mode}\"\ntcp_idle_timeout = 2"),
        );
    }
    let dir = Dir::new();
    let berth = Berth::spawn(&dir, &config, None, vec![]);
    berth.up().await;

    let timeout_secs = Duration::from_secs(2);
    for (mode, listen) in modes.iter().zip(&listens) {
        let mut idle = served(None, *listen).await.unwrap();
        let mut busy = served(None, *listen).await.unwrap();
        let quiet_since = Instant::now();
        // The busy one talks every 300 ms for twice the timeout and is never cut.
        let busy_task = tokio::spawn(async move {
            let until = Instant::now() + 2 * timeout_secs;
            while Instant::now() < until {
                assert!(echoes(&mut busy).await, "a busy connection was cut");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        reset(&mut idle).await;
        let silent = quiet_since.elapsed();
        assert!(
            silent >= timeout_secs,
            "{mode}: reset after only {silent:?} of silence"
        );
        busy_task.await.unwrap();
    }
    let m = scrape(metrics).await;
    for mode in modes {
        let label = format!("mapping=\"{mode}\"");
        let closed = find_sample(&m, "berth_connections_idle_closed_total", &[&label]);
        assert_eq!(closed, Some(1.0), "{mode}");
    }
    berth.stop().await;
}

/// `berth forward` with a hard descriptor limit too low for the clients that come: the
/// clients beyond it are reset at once (none hangs), the connections it has keep working, the
/// episode is logged once, and new clients are served once descriptors free up. Here the
/// descriptors run out when berth connects to the target (a client takes one descriptor to
/// accept and more to relay); the accept side's reserve descriptor, for a process with none
/// left at all, is covered by `forward::accept`'s unit test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_new_clients_are_reset_at_once_and_service_recovers() {
    common::require_root();
    let target = echo_server().await;
    let listen = free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(["forward", &listen.to_string(), &target.to_string()])
        .env("BERTH_LOG", "info")
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 48, 48)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().unwrap();
    let lines = common::lines_of(child.stderr.take().unwrap());
    let berth = common::Guard(child);
    common::wait_listening(listen).await;

    // Fill the table: connect until berth refuses.
    let mut held = Vec::new();
    while let Some(s) = served(None, listen).await {
        held.push(s);
        assert!(
            held.len() < 48,
            "berth served more connections than it has descriptors"
        );
    }
    assert!(!held.is_empty(), "no connection fit");
    // Every further client is refused at once; none is left waiting in the backlog.
    let started = Instant::now();
    for _ in 0..30 {
        assert!(
            served(None, listen).await.is_none(),
            "served without descriptors"
        );
    }
    let storm = started.elapsed();
    assert!(storm < HANG / 2, "refusing 30 clients took {storm:?}");
    for s in &mut held {
        assert!(echoes(s).await, "a held connection stopped working");
    }
    // Recovery: half the connections end, and a new client is served.
    held.truncate(held.len() / 2);
    let deadline = Instant::now() + HANG;
    while served(None, listen).await.is_none() {
        assert!(Instant::now() < deadline, "berth never served again");
    }
    berth.signal(nix::sys::signal::Signal::SIGTERM);
    let status = berth.exited().await;
    assert!(status.success(), "{status}");
    let log: Vec<String> = lines.try_iter().collect();
    let count = |needle: &str| log.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("out of file descriptors"), 1, "{log:#?}");
    assert_eq!(count("file descriptors available again"), 1, "{log:#?}");
}

/// What became of clients that close first through `berth forward`, in a namespace whose
/// ephemeral range is 4 ports (so berth's legs to the target, which close first too, hold
/// those 4 in TIME_WAIT), with TCP timestamps on or off.
struct CloseFirst {
    served: usize,
    reset: usize,
    log: Vec<String>,
}

impl CloseFirst {
    fn run(clients: u8, timestamps: bool) -> Self {
        let ns = common::TestNs::create();
        let listen: SocketAddr = ([127, 0, 0, 1], ns.free_port()).into();
        let ns2 = ns.ns.clone();
        ns.ns
            .run_async(|| async move {
                let sys = |name: &str, value: &str| {
                    std::fs::write(format!("/proc/sys/net/ipv4/{name}"), value).unwrap();
                };
                // Loopback's default (2) lets the kernel's own pick reuse TIME_WAIT after 1 s:
                // off, so that only berth's choice can.
                sys("tcp_tw_reuse", "0");
                sys("tcp_timestamps", if timestamps { "1" } else { "0" });
                // The target: reads until the client's end, then closes (after berth's FIN,
                // so berth's side of this connection is the one in TIME_WAIT).
                let target_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let target = target_listener.local_addr().unwrap();
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = target_listener.accept().await {
                        tokio::spawn(async move {
                            let _ = s.read_to_end(&mut Vec::new()).await;
                        });
                    }
                });
                // Another peer, which the test connects to at the end.
                let elsewhere_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let elsewhere = elsewhere_listener.local_addr().unwrap();
                let mut cmd = ns2.command(env!("CARGO_BIN_EXE_berth")).unwrap();
                cmd.args(["forward", &listen.to_string(), &target.to_string()])
                    .env("BERTH_LOG", "info")
                    .stderr(Stdio::piped());
                let mut child = cmd.spawn().unwrap();
                let lines = common::lines_of(child.stderr.take().unwrap());
                let berth = common::Guard(child);
                common::wait_listening(listen).await;
                // Bound already: only connections made from now on draw from 4 ports.
                sys("ip_local_port_range", "40000 40003");
                let (mut served, mut reset) = (0, 0);
                for i in 0..clients {
                    // Each client from its own address and a port outside the 4, so that the
                    // clients' own sockets (they close first too) never hold a port berth
                    // needs. The namespace is the test's own: nothing else binds there.
                    let sock = TcpSocket::new_v4().unwrap();
                    sock.bind(([127, 0, 1, 10 + i], 50_000 + u16::from(i)).into())
                        .unwrap();
                    // The reset may come before the connect is seen through, before the
                    // shutdown is sent, or after.
                    let ended = async {
                        let mut s = sock.connect(listen).await?;
                        s.shutdown().await?;
                        s.read(&mut [0; 1]).await
                    };
                    match timeout(HANG, ended).await.unwrap() {
                        Ok(0) => served += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
                        other => panic!("client {i}: expected an end or a reset, got {other:?}"),
                    }
                }
                // The ports berth took over are still there for connects to other peers.
                let other = timeout(HANG, TcpStream::connect(elsewhere)).await.unwrap();
                assert!(other.is_ok(), "a connect elsewhere got no port: {other:?}");
                berth.signal(nix::sys::signal::Signal::SIGTERM);
                let status = berth.exited().await;
                assert!(status.success(), "{status}");
                Self {
                    served,
                    reset,
                    log: lines.try_iter().collect(),
                }
            })
            .unwrap()
    }

    fn count(&self, needle: &str) -> usize {
        self.log.iter().filter(|l| l.contains(needle)).count()
    }
}

/// With every local port towards the target held in TIME_WAIT, berth connects from those
/// ports anyway (the connections carried TCP timestamps, so the kernel lets a socket bound
/// to one take it): clients that close first are all served, four times as many as there
/// are ports, the switch is logged once, and connects to other peers still find ports.
#[test]
fn clients_closing_first_are_served_from_ports_in_time_wait() {
    let run = CloseFirst::run(16, true);
    assert_eq!((run.served, run.reset), (16, 0), "{:#?}", run.log);
    assert_eq!(
        run.count("choosing ports held in TIME_WAIT"),
        1,
        "{:#?}",
        run.log
    );
    assert_eq!(run.count("no local port left"), 0, "{:#?}", run.log);
}

/// Without TCP timestamps no port in TIME_WAIT can be taken: a new client is reset at once
/// rather than left hanging, and the episode is logged once with what to change.
#[test]
fn no_local_port_left_towards_the_target_resets_new_clients_and_says_why() {
    let run = CloseFirst::run(16, false);
    assert!(run.served >= 1, "nothing was served while ports were free");
    assert!(
        run.reset >= 2,
        "served {} clients through 4 ports: none was reset",
        run.served
    );
    assert_eq!(run.count("no local port left"), 1, "{:#?}", run.log);
    assert_eq!(run.count("net.ipv4.tcp_tw_reuse=1"), 1, "{:#?}", run.log);
}
