//! The `berth forward` binary end to end: it reports where it listens, forwards with
//! integrity, lets an established connection finish on SIGTERM (drain), and exits 0; the same
//! for UDP; and it refuses options that do not fit the protocol.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
};

use common::{HANG, TestNet};
use nix::sys::signal::Signal;
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

/// Starts `berth forward` on an address picked for it; returns it, once it listens, the
/// address, and its log, line by line.
async fn start(
    options: &[&str],
    target: SocketAddr,
) -> (common::Guard, SocketAddr, std::sync::mpsc::Receiver<String>) {
    // UDP picks its port from UDP's own port space.
    let udp = options.contains(&"udp");
    let addr = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    } else {
        common::daemon::free_addr()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("forward")
        .args(options)
        .args([&addr.to_string(), &target.to_string()])
        .env("BERTH_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = common::lines_of(child.stderr.take().unwrap());
    if udp {
        common::wait_udp_bound(addr).await;
    } else {
        common::wait_listening(addr).await;
    }
    (common::Guard(child), addr, rx)
}

/// Waits for a log line containing `needle`.
async fn wait_for_log(
    log: std::sync::mpsc::Receiver<String>,
    needle: &'static str,
) -> std::sync::mpsc::Receiver<String> {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + HANG;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match log.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return log,
                Ok(_) => {}
                Err(e) => panic!("no {needle:?} in berth's log: {e}"),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_and_drains_on_sigterm() {
    const FIRST: usize = 1 << 20;
    const REST: usize = 16 << 20;
    let net = TestNet::up(1).await;
    for mode in ["copy", "splice"] {
        let listener = net.listen(0);
        let (child, addr, log) = start(
            &["--mode", mode, "--drain-timeout", "30"],
            listener.local_addr().unwrap(),
        )
        .await;
        // The backend says when the first MiB has arrived, then counts and hashes the rest
        // until EOF and answers with what it got.
        let (got_first, got_first_rx) = tokio::sync::oneshot::channel();
        let backend = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut first = vec![0u8; FIRST];
            s.read_exact(&mut first).await.unwrap();
            got_first.send(()).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            s.write_all(&(rest.len() as u64).to_be_bytes())
                .await
                .unwrap();
            s.write_all(&Sha256::digest(&rest)).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&vec![1u8; FIRST]).await.unwrap();
        timeout(HANG, got_first_rx).await.unwrap().unwrap();
        // SIGTERM while the connection is open and most of its data is still to come; send
        // the rest only once berth says it is draining (it has stopped accepting by then).
        child.signal(Signal::SIGTERM);
        let _log = wait_for_log(log, "draining connections").await;
        // During the drain, with the transfer still open: the listener closes (the log line
        // comes just before it does), and then no new client gets in.
        common::wait_closed(addr).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{mode}: still accepting during the drain"
        );
        let rest: Vec<u8> = (0..REST).map(|i| (i % 253) as u8).collect();
        c.write_all(&rest).await.unwrap();
        c.shutdown().await.unwrap();
        let mut answer = Vec::new();
        timeout(HANG, c.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            answer.len(),
            40,
            "{mode}: the drain cut the connection short"
        );
        assert_eq!(
            u64::from_be_bytes(answer[..8].try_into().unwrap()),
            REST as u64,
            "{mode}"
        );
        assert_eq!(
            &answer[8..],
            Sha256::digest(&rest).as_slice(),
            "{mode}: data corrupted"
        );
        timeout(HANG, backend).await.unwrap().unwrap();
        let status = child.exited().await;
        assert!(status.success(), "{mode}: exit {status}");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{mode}: still accepting after SIGTERM"
        );
    }
}

#[tokio::test]
async fn forwards_udp_and_exits_0_on_sigterm() {
    let (echo, _server) = common::spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let (child, addr, _log) = start(&["--proto", "udp", "--udp-idle-timeout", "5"], echo).await;
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for len in [1usize, 1472, 65_507] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 239) as u8).collect();
        c.send_to(&payload, addr).await.unwrap();
        let mut buf = vec![0u8; 65_536];
        let (n, from) = timeout(HANG, c.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(from, addr);
        assert!(buf[..n] == payload[..], "{len}-byte datagram differs");
    }
    child.signal(Signal::SIGTERM);
    let status = child.exited().await;
    assert!(status.success(), "exit {status}");
}

#[test]
fn options_that_do_not_fit_the_protocol_are_refused() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--proto", "udp", "--mode", "splice"],
            "--mode: \"splice\" applies to tcp",
        ),
        (&["--proto", "sctp"], "unknown protocol \"sctp\""),
        // The file's rules hold on the command line too: one validator.
        (
            &["--max-connections", "5", "--proto", "udp"],
            "--max-connections: applies to tcp mappings only",
        ),
        (
            &["--proto", "tcp", "--udp-idle-timeout", "3"],
            "--udp-idle-timeout: applies to udp mappings only",
        ),
        (
            &["--proto", "udp", "--udp-batch", "0"],
            "--udp-batch: 0 is not a number from 1 to 32",
        ),
        (
            &["--proto", "udp", "--max-flows", "0"],
            "--max-flows: 0 is not a number from 1 to 10000000",
        ),
    ];
    for (options, expected) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("forward")
            .args(*options)
            .args(["127.0.0.1:0", "127.0.0.1:9"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{options:?} was accepted");
        assert!(err.contains(expected), "{options:?}: {err}");
    }
}
