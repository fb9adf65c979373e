//! `berth-docker-proxy` spoken to the way dockerd speaks to docker-proxy: a pipe on fd 3 for
//! status, and with `-use-listen-fd` the listening socket on fd 4.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    io::Read as _,
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    process::{Command, Stdio},
};

use common::{
    Guard, HANG, TestNet, assert_mirrored, daemon::shim_with_status, exchange,
    spawn_exchange_server,
};
use nix::{fcntl::OFlag, sys::signal::Signal, unistd::pipe2};
use tokio::{net::TcpStream, time::timeout};

/// An admin socket no daemon serves: these tests are about the shim on its own, whatever
/// runs on the host.
const STANDALONE: &str = "/nonexistent/berth-admin.sock";

fn spawn_with_status(args: &[&str], extra: Vec<(OwnedFd, RawFd)>) -> (Guard, String) {
    shim_with_status(args, std::path::Path::new(STANDALONE), extra)
}

fn stop(child: Guard) {
    stop_with(child, Signal::SIGTERM);
}

fn stop_with(mut child: Guard, signal: Signal) {
    child.signal(signal);
    let status = child.wait();
    assert!(status.success(), "{signal} should exit 0, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_ready_on_fd3_and_forwards_into_a_container() {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let target = listener.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(listener);
    // docker-proxy has no way to report an ephemeral port: one that was free a moment ago.
    let host = common::daemon::free_addr();
    let (child, status) = spawn_with_status(
        &[
            "-proto",
            "tcp",
            "-host-ip",
            &host.ip().to_string(),
            "-host-port",
            &host.port().to_string(),
            "-container-ip",
            &target.ip().to_string(),
            "-container-port",
            &target.port().to_string(),
        ],
        vec![],
    );
    assert_eq!(status, "0\n");
    for id in 0..4u64 {
        let c = TcpStream::connect(host).await.unwrap();
        let client = timeout(HANG, exchange(c, id, 3 << 20, 2 << 20))
            .await
            .unwrap()
            .unwrap();
        let (sid, server) = timeout(HANG, tallies.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(sid, id);
        assert_mirrored(id, &client, &server);
    }
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_listen_fd_serves_the_socket_passed_as_fd4() {
    common::require_root();
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_port = target.local_addr().unwrap().port();
    let mut tallies = spawn_exchange_server(target);
    let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = passed.local_addr().unwrap();
    // The host port on the command line is only informative with -use-listen-fd.
    let (child, status) = spawn_with_status(
        &[
            "-proto",
            "tcp",
            "-host-ip",
            "127.0.0.1",
            "-host-port",
            "1",
            "-container-ip",
            "127.0.0.1",
            "-container-port",
            &target_port.to_string(),
            "-use-listen-fd",
        ],
        vec![(OwnedFd::from(passed), 4)],
    );
    assert_eq!(status, "0\n");
    let c = TcpStream::connect(addr).await.unwrap();
    let client = timeout(HANG, exchange(c, 9, 1 << 20, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    let (_, server) = timeout(HANG, tallies.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_mirrored(9, &client, &server);
    stop_with(child, Signal::SIGINT);
}

#[test]
fn failures_are_reported_on_fd3_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let taken_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken_udp_port = taken_udp.local_addr().unwrap().port().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["-bogus"], "flag provided but not defined: -bogus"),
        (&["-host-port", "80"], "-container-port is required"),
        (
            &["-host-port", "x", "-container-port", "80"],
            "invalid value \"x\" for flag -host-port",
        ),
        (
            &[
                "-proto",
                "udp",
                "-host-ip",
                "127.0.0.1",
                "-host-port",
                &taken_udp_port,
                "-container-ip",
                "127.0.0.1",
                "-container-port",
                "9",
            ],
            "already in use",
        ),
        (
            &["-proto", "sctp", "-host-port", "1", "-container-port", "80"],
            "unsupported protocol sctp",
        ),
        (
            &[
                "-host-ip",
                "127.0.0.1",
                "-host-port",
                &taken_port,
                "-container-ip",
                "127.0.0.1",
                "-container-port",
                "9",
            ],
            "already in use",
        ),
        (
            &["-use-listen-fd", "-container-port", "80"],
            "fd 4 is not open",
        ),
    ];
    for (args, expected) in cases {
        let (mut child, status) = spawn_with_status(args, vec![]);
        let code = child.wait().code();
        assert!(
            status.starts_with("1\n") && status.contains(expected),
            "{args:?}: status {status:?}"
        );
        assert_eq!(code, Some(1), "{args:?}");
    }
}

#[test]
fn without_fd3_errors_go_to_stderr_and_version_works() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-docker-proxy"))
        .arg("-bogus")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("flag provided but not defined: -bogus") && err.contains("Usage"),
        "{err}"
    );
    let v = Command::new(env!("CARGO_BIN_EXE_berth-docker-proxy"))
        .arg("-v")
        .output()
        .unwrap();
    assert!(v.status.success() && String::from_utf8_lossy(&v.stdout).contains("version"));
}

#[test]
fn a_non_socket_on_fd4_is_refused() {
    let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let (mut child, status) = spawn_with_status(
        &["-use-listen-fd", "-container-port", "80"],
        vec![(file, 4)],
    );
    assert!(
        status.starts_with("1\n") && status.contains("not a TCP socket"),
        "{status:?}"
    );
    assert_eq!(child.wait().code(), Some(1));
}

#[test]
fn a_socket_of_the_wrong_protocol_on_fd4_is_refused() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut child, status) = spawn_with_status(
        &["-proto", "udp", "-use-listen-fd", "-container-port", "80"],
        vec![(OwnedFd::from(tcp), 4)],
    );
    assert!(
        status.starts_with("1\n") && status.contains("not a UDP socket"),
        "{status:?}"
    );
    assert_eq!(child.wait().code(), Some(1));
}

/// `-proto udp`, both as dockerd runs it (a bound socket on fd 4) and with an address to bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_over_fd4_and_by_address() {
    let (echo, _server) = common::spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let passed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let fd4_addr = passed.local_addr().unwrap();
    let free = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let free_port = free.port().to_string();
    let echo_port = echo.port().to_string();
    let common_args = [
        "-proto",
        "udp",
        "-host-ip",
        "127.0.0.1",
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        &echo_port,
    ];
    type Case<'a> = (SocketAddr, Vec<&'a str>, Vec<(OwnedFd, RawFd)>);
    let cases: [Case<'_>; 2] = [
        (
            fd4_addr,
            vec!["-host-port", "1", "-use-listen-fd"],
            vec![(OwnedFd::from(passed), 4)],
        ),
        (free, vec!["-host-port", &free_port], vec![]),
    ];
    for (addr, extra, fds) in cases {
        let args: Vec<&str> = common_args.iter().copied().chain(extra).collect();
        let (child, status) = spawn_with_status(&args, fds);
        assert_eq!(status, "0\n", "{args:?}");
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for len in [1usize, 1472, 65_507] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
            c.send_to(&payload, addr).await.unwrap();
            let mut buf = vec![0u8; 65_536];
            let (n, from) = timeout(HANG, c.recv_from(&mut buf)).await.unwrap().unwrap();
            assert_eq!(from, addr, "{args:?}");
            assert!(
                buf[..n] == payload[..],
                "{args:?}: {len}-byte datagram differs"
            );
        }
        stop(child);
    }
}

/// systemd's socket-activation variables in the environment must not make berth-docker-proxy
/// take fd 3 for a listening socket: for it, fd 3 is always dockerd's status pipe.
#[test]
fn listen_fds_in_the_environment_do_not_touch_the_status_pipe() {
    let host = common::daemon::free_addr();
    let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-docker-proxy"));
    cmd.args([
        "-host-ip",
        &host.ip().to_string(),
        "-host-port",
        &host.port().to_string(),
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "9",
    ])
    .env("BERTH_ADMIN_SOCKET", STANDALONE)
    .env("LISTEN_FDS", "1")
    .env("LISTEN_FDNAMES", "web")
    .env("LISTEN_PID", "1")
    .stdin(Stdio::null());
    let raw = w.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe and only touches the child's fd table.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Guard(cmd.spawn().unwrap());
    drop(w);
    let mut status = String::new();
    std::fs::File::from(r).read_to_string(&mut status).unwrap();
    assert_eq!(status, "0\n");
    stop(child);
}

/// Installed, `berth-docker-proxy` is a link to `berth`, which dispatches on its name.
#[test]
fn berth_called_berth_docker_proxy_is_the_shim() {
    let dir = std::env::temp_dir().join(common::unique("bl"));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("berth-docker-proxy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_berth"), &link).unwrap();
    let out = Command::new(&link).arg("-v").output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("berth-docker-proxy (berth) version"),
        "{out:?}"
    );
}
