//! `berth run` as a process: systemd's notify protocol on a real unixgram socket, reload with a
//! transfer in flight, metrics scraped over HTTP, a graceful SIGTERM under load, socket
//! activation with real inherited descriptors, and config errors that start nothing.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use berth::service::admin;
use common::{HANG, Tally, assert_mirrored, exchange, spawn_exchange_server};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// A scratch directory for config, admin socket and notify socket; removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(common::unique("bs"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An address that was free a moment ago, on a loopback address of this test's own
/// (127.N.M.1): config files need fixed ports, and other tests binding 127.0.0.1:0 at the same
/// time can then never take the port from under it.
fn free_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 1 + (std::process::id() % 250) as u8, n, 1);
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn mapping(name: &str, listen: SocketAddr, target: SocketAddr, extra: &str) -> String {
    format!(
        "[[mapping]]\nname = \"{name}\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\n{extra}\n"
    )
}

/// `berth run` with its log piped, optionally with a notify socket and systemd's fds.
struct Berth {
    child: Child,
    admin: PathBuf,
}

impl Berth {
    fn spawn(dir: &Dir, config: &str, notify: Option<&Path>, fds: Vec<OwnedFd>) -> Self {
        let file = dir.path("berth.toml");
        std::fs::write(&file, config).unwrap();
        let admin = dir.path("admin.sock");
        // LISTEN_PID must be berth's own pid: let a shell set it to $$ and exec berth.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(if fds.is_empty() {
                "exec \"$0\" \"$@\""
            } else {
                "LISTEN_PID=$$ exec \"$0\" \"$@\""
            })
            .arg(env!("CARGO_BIN_EXE_berth"))
            .args(["run", "--config"])
            .arg(&file)
            .arg("--admin-socket")
            .arg(&admin)
            .env("BERTH_LOG", "warn")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        if !fds.is_empty() {
            let names: Vec<String> = (0..fds.len()).map(|i| format!("m{i}")).collect();
            cmd.env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            common::place_fds(
                &mut cmd,
                (3..).zip(&fds).map(|(to, f)| (f.as_raw_fd(), to)).collect(),
            );
        }
        let child = cmd.spawn().unwrap();
        drop(fds);
        Self { child, admin }
    }

    async fn request(&self, command: &str) -> admin::Reply {
        timeout(HANG, admin::request(&self.admin, command))
            .await
            .unwrap()
            .unwrap()
    }

    /// Waits until the admin socket answers (berth is up, everything bound).
    async fn up(&self) {
        common::wait_until("berth to answer on its admin socket", || {
            std::os::unix::net::UnixStream::connect(&self.admin).is_ok()
        })
        .await;
    }

    /// Polls `berth status` until a mapping row satisfies `pred` (state another process
    /// updates; there is no event to await).
    async fn wait_status(&self, pred: impl Fn(&berth::service::status::Row) -> bool) {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            if let Ok(r) = admin::request(&self.admin, "status").await
                && r.mappings.iter().any(&pred)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "status never matched"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), s).unwrap();
    }

    async fn exit_code(mut self) -> Option<i32> {
        tokio::task::spawn_blocking(move || self.child.wait().unwrap().code())
            .await
            .unwrap()
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next message on the notify socket.
async fn notified(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = timeout(HANG, sock.recv(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Scrapes `/metrics` with a plain HTTP/1.1 request.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    timeout(HANG, s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the sample `name{labels}` (labels in the encoder's sorted order).
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{metrics}"))
}

async fn transfer(addr: SocketAddr, id: u64, up: u64, down: u64) -> Tally {
    let c = TcpStream::connect(addr).await.unwrap();
    timeout(HANG, exchange(c, id, up, down))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_live_transfers_and_metrics_count_every_byte() {
    const BIG: u64 = 256 << 20;
    let dir = Dir::new();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(backend);
    let notify_path = dir.path("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let (web, old, new, metrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let head = format!("[metrics]\nlisten = \"{metrics}\"\n[service]\ndrain_timeout = 60\n");
    let first = format!(
        "{head}{}{}",
        mapping("web", web, target, ""),
        mapping("old", old, target, "")
    );
    let berth = Berth::spawn(&dir, &first, Some(&notify_path), vec![]);
    let ready = notified(&notify).await;
    assert!(ready.starts_with("READY=1\nSTATUS=2 mappings"), "{ready:?}");
    let web_addr = web;

    // A transfer that is still running when the reload happens.
    let live = tokio::spawn(transfer(web_addr, 1, BIG, BIG));
    berth
        .wait_status(|m| m.name == "web" && m.bytes_to_target > 0)
        .await;

    // web changes (its socket is handed over), old goes, new comes.
    let second = format!(
        "{head}{}{}",
        mapping("web", web, target, "connect_timeout = 3"),
        mapping("new", new, target, "")
    );
    std::fs::write(dir.path("berth.toml"), &second).unwrap();
    let reply = berth.request("reload").await;
    assert!(reply.ok, "{}", reply.message);
    assert_eq!(reply.message, "0 unchanged, 1 added, 1 changed, 1 removed");
    let reloading = notified(&notify).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let usec: u64 = reloading.rsplit('=').next().unwrap().parse().unwrap();
    assert!(usec > 0);
    assert!(notified(&notify).await.starts_with("READY=1"));

    // The live transfer finishes intact across the reload.
    let client = timeout(HANG, live).await.unwrap().unwrap();
    let (_, server) = timeout(HANG, tallies.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_mirrored(1, &client, &server);
    // The added mapping works, the changed one still does, the removed one is closed.
    for (id, addr) in [(2u64, new), (3, web)] {
        let c = transfer(addr, id, 1 << 20, 1 << 20).await;
        let (_, s) = timeout(HANG, tallies.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_mirrored(id, &c, &s);
    }
    assert!(
        TcpStream::connect(old).await.is_err(),
        "the removed mapping still accepts"
    );

    // An invalid file is refused, and the running mappings stay.
    std::fs::write(dir.path("berth.toml"), "[[mapping]]\nname = 5\n").unwrap();
    let refused = berth.request("reload").await;
    assert!(
        !refused.ok && refused.message.contains("berth.toml"),
        "{}",
        refused.message
    );
    assert_eq!(
        refused
            .mappings
            .iter()
            .filter(|m| m.state == "active")
            .count(),
        2
    );
    assert!(notified(&notify).await.starts_with("RELOADING=1"));
    assert!(notified(&notify).await.starts_with("READY=1"));

    // The metrics count exactly what moved through web: 16-byte headers plus payloads.
    let m = scrape(metrics).await;
    let up = BIG + 16 + (1 << 20) + 16;
    let down = BIG + (1 << 20);
    assert_eq!(
        sample(
            &m,
            r#"berth_bytes_total{direction="to_target",mapping="web",proto="tcp"}"#
        ),
        up as f64
    );
    assert_eq!(
        sample(
            &m,
            r#"berth_bytes_total{direction="to_client",mapping="web",proto="tcp"}"#
        ),
        down as f64
    );
    assert_eq!(
        sample(&m, r#"berth_connections_total{mapping="web",proto="tcp"}"#),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            r#"berth_connection_duration_seconds_count{mapping="web",proto="tcp"}"#
        ),
        2.0
    );
    assert!(m.contains("berth_build_info{version=\""), "{m}");
    assert!(m.contains("process_resident_memory_bytes"), "{m}");
    assert!(!m.contains("127.0.0.1:0"), "no client address as a label");

    // SIGTERM under load: the open transfer finishes intact, then berth exits 0.
    let live = tokio::spawn(transfer(web_addr, 4, 64 << 20, 64 << 20));
    berth.wait_status(|m| m.name == "web" && m.active > 0).await;
    berth.signal(Signal::SIGTERM);
    assert!(notified(&notify).await.starts_with("STOPPING=1"));
    let c = timeout(HANG, live).await.unwrap().unwrap();
    let (id, server) = timeout(HANG, tallies.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(id, 4);
    assert_mirrored(4, &c, &server);
    assert_eq!(berth.exit_code().await, Some(0));
    assert!(
        TcpStream::connect(web_addr).await.is_err(),
        "still accepting after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_the_passed_socket_across_a_restart() {
    let dir = Dir::new();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(backend);
    // systemd's part: it owns the listening socket and passes it on every start.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let config = format!(
        "[metrics]\nenabled = false\n{}",
        mapping("m0", addr, target, "")
    );
    let pass = || OwnedFd::from(held.try_clone().unwrap());
    let berth = Berth::spawn(&dir, &config, None, vec![pass()]);
    berth.up().await;
    let c = transfer(addr, 1, 1 << 20, 1 << 20).await;
    let (_, s) = timeout(HANG, tallies.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_mirrored(1, &c, &s);
    berth.signal(Signal::SIGTERM);
    assert_eq!(berth.exit_code().await, Some(0));
    // No berth is running, yet the port accepts: the kernel queues the client on the socket
    // that "systemd" still holds, and the next berth serves it.
    let waiting = tokio::spawn(transfer(addr, 2, 1 << 20, 1 << 20));
    let berth = Berth::spawn(&dir, &config, None, vec![pass()]);
    let c = timeout(HANG, waiting).await.unwrap().unwrap();
    let (_, s) = timeout(HANG, tallies.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_mirrored(2, &c, &s);
    drop(berth);
}

#[tokio::test]
async fn config_errors_start_nothing() {
    let dir = Dir::new();
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (free_addr(), free_addr());
    let cases = [
        (
            format!(
                "{}{}",
                mapping("a", a, target, ""),
                mapping("b", a, target, "")
            ),
            "mapping \"b\": listen: tcp 127.",
        ),
        (
            format!(
                "[metrics]\nenabled = false\n{}{}",
                mapping("a", a, target, ""),
                mapping("b", taken.local_addr().unwrap(), target, "")
            ),
            "mapping \"b\": cannot listen on",
        ),
        (
            mapping("a", b, target, "mode = \"fast\""),
            "mode: unknown mode \"fast\"",
        ),
    ];
    for (config, want) in cases {
        let file = dir.path("bad.toml");
        std::fs::write(&file, &config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["run", "--admin-socket"])
            .arg(dir.path("admin.sock"))
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{config}\n{err}");
        assert!(err.contains(want), "{err}");
        // Nothing was left bound: the first mapping's port is free again.
        std::net::TcpListener::bind(a).unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("check")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        if want.contains("cannot listen") {
            assert!(check.status.success(), "check binds nothing, so it passes");
        } else {
            assert_eq!(check.status.code(), Some(1));
            assert!(String::from_utf8_lossy(&check.stderr).contains(want));
        }
    }
}

#[test]
fn the_shipped_units_pass_systemd_analyze_verify() {
    let dir = Dir::new();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist");
    let bindir = Path::new(env!("CARGO_BIN_EXE_berth")).parent().unwrap();
    let service = std::fs::read_to_string(dist.join("berth.service"))
        .unwrap()
        .replace("@BINDIR@", &bindir.to_string_lossy());
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n",
        "RestrictAddressFamilies=",
        "LimitNOFILE=",
    ] {
        assert!(service.contains(key), "berth.service lacks {key:?}");
    }
    std::fs::write(dir.path("berth.service"), service).unwrap();
    std::fs::copy(dist.join("berth.socket"), dir.path("berth.socket")).unwrap();
    // The eBPF drop-in, beside the unit as systemd would find it.
    let ebpf = std::fs::read_to_string(dist.join("ebpf.conf")).unwrap();
    for key in [
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_BPF CAP_PERFMON\n",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_BPF CAP_PERFMON\n",
        "SystemCallFilter=bpf\n",
    ] {
        assert!(ebpf.contains(key), "ebpf.conf lacks {key:?}");
    }
    std::fs::create_dir_all(dir.path("berth.service.d")).unwrap();
    std::fs::write(dir.path("berth.service.d/ebpf.conf"), ebpf).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path("berth.service"))
        .arg(dir.path("berth.socket"))
        .output()
        .expect(
            "systemd-analyze is missing: run the tests with `cargo xtask test`, which installs it",
        );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The example config is valid as shipped.
    berth::service::check(&dist.join("berth.toml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_and_status_of_tcp_and_udp_mappings() {
    let dir = Dir::new();
    let (echo, _server) = common::spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let notify_path = dir.path("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let (tcp, udp) = (free_addr(), free_addr());
    let config = format!(
        "[metrics]\nenabled = false\n{}{}",
        mapping("web", tcp, "127.0.0.1:9".parse().unwrap(), ""),
        mapping("dns", udp, echo, "proto = \"udp\"")
    );
    let file = dir.path("berth.toml");
    std::fs::write(&file, &config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["run", "--config"])
        .arg(&file)
        .arg("--admin-socket")
        .arg(dir.path("admin.sock"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .spawn()
        .unwrap();
    let berth = Berth {
        child,
        admin: dir.path("admin.sock"),
    };
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m == "WATCHDOG=1") {
        seen.push(notified(&notify).await);
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&berth.admin)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is for root only");
    assert!(seen[0].starts_with("READY=1"), "{seen:?}");
    // One UDP exchange, so that the udp row has a flow and bytes.
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.send_to(b"ping", udp).await.unwrap();
    let mut buf = [0u8; 16];
    timeout(HANG, c.recv_from(&mut buf)).await.unwrap().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--json", "--admin-socket"])
        .arg(&berth.admin)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: Vec<berth::service::status::Row> = serde_json::from_slice(&out.stdout).unwrap();
    let dns = rows.iter().find(|r| r.name == "dns").unwrap();
    assert_eq!((dns.proto.as_str(), dns.active), ("udp", 1));
    assert_eq!((dns.bytes_to_target, dns.bytes_to_client), (4, 4));
    let table = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--admin-socket"])
        .arg(&berth.admin)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with("NAME") && table.contains("dns") && table.contains("web"),
        "{table}"
    );
    berth.signal(Signal::SIGTERM);
    assert_eq!(berth.exit_code().await, Some(0));
    let gone = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--admin-socket"])
        .arg(dir.path("admin.sock"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is `berth run` running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mappings_in_one_process() {
    const N: usize = 1000;
    let dir = Dir::new();
    let notify_path = dir.path("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    // A target that completes connections (in its backlog), so that berth never resets.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = sink.local_addr().unwrap();
    let mut config = String::from("[metrics]\nenabled = false\n");
    for i in 0..N {
        config.push_str(&format!(
            "[[mapping]]\nname = \"m{i}\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n"
        ));
    }
    let started = std::time::Instant::now();
    let berth = Berth::spawn(&dir, &config, Some(&notify_path), vec![]);
    let ready = notified(&notify).await;
    let took = started.elapsed();
    assert!(ready.contains(&format!("{N} mappings")), "{ready}");
    let reply = berth.request("status").await;
    assert_eq!(reply.mappings.len(), N);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", berth.child.id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap()
        .to_owned();
    eprintln!("{N} mappings ready in {took:?}; {rss}");
    // Every one of them really listens, on the port the kernel gave it.
    for row in reply.mappings.iter().step_by(97) {
        let addr: SocketAddr = row.listen.parse().unwrap();
        assert_ne!(addr.port(), 0);
        TcpStream::connect(addr).await.unwrap();
    }
}
