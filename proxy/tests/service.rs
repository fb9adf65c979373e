//! `berth run` as a process: systemd's notify protocol on a real unixgram socket, reload with a
//! transfer in flight, metrics scraped over HTTP, a graceful SIGTERM under load, socket
//! activation with real inherited descriptors, and config errors that start nothing.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{net::SocketAddr, os::fd::OwnedFd, path::Path, process::Command};

use common::{
    HANG, Tally, assert_served,
    daemon::{Berth, Dir, free_addr, mapping, sample, scrape, successor_pid, upgrade},
    exchange, spawn_exchange_server, spawn_gated_exchange_server,
};
use nix::sys::signal::Signal;
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// The next message on the notify socket.
async fn notified(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = timeout(HANG, sock.recv(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
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
    // Closed while a live transfer must still run when the reload or the signal comes.
    let (mut tallies, gate) = spawn_gated_exchange_server(backend);
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

    // The live transfer was held open across the reload; released, it finishes intact.
    assert!(!live.is_finished(), "the transfer ended before the reload");
    gate.send_replace(true);
    let client = timeout(HANG, live).await.unwrap().unwrap();
    assert_served(&mut tallies, 1, &client).await;
    // The added mapping works, the changed one still does, the removed one is closed.
    for (id, addr) in [(2u64, new), (3, web)] {
        let c = transfer(addr, id, 1 << 20, 1 << 20).await;
        assert_served(&mut tallies, id, &c).await;
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
    // No client address or port becomes a label (one series per client would grow without
    // bound): a client of a known address makes one connection, then the scrape is searched.
    let client = tokio::net::TcpSocket::new_v4().unwrap();
    client.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let client_addr = client.local_addr().unwrap();
    let s = timeout(HANG, client.connect(web_addr))
        .await
        .unwrap()
        .unwrap();
    berth.wait_status(|m| m.name == "web" && m.active > 0).await;
    let m = scrape(metrics).await;
    assert!(
        !m.contains(&client_addr.to_string())
            && !m.contains(&format!("\"{}\"", client_addr.port())),
        "a client address as a label: {m}"
    );
    let c = timeout(HANG, exchange(s, 3, 1024, 1024))
        .await
        .unwrap()
        .unwrap();
    assert_served(&mut tallies, 3, &c).await;

    // SIGTERM under load: the transfer, held open until then, finishes intact, no new client
    // gets in meanwhile, then berth exits 0.
    gate.send_replace(false);
    let live = tokio::spawn(transfer(web_addr, 4, 64 << 20, 64 << 20));
    berth
        .wait_status(|m| m.name == "web" && m.bytes_to_target > 0)
        .await;
    berth.signal(Signal::SIGTERM);
    assert!(notified(&notify).await.starts_with("STOPPING=1"));
    common::wait_closed(web_addr).await;
    assert!(
        TcpStream::connect(web_addr).await.is_err(),
        "still accepting during the drain"
    );
    assert!(!live.is_finished(), "the transfer ended before the signal");
    gate.send_replace(true);
    let c = timeout(HANG, live).await.unwrap().unwrap();
    assert_served(&mut tallies, 4, &c).await;
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
    assert_served(&mut tallies, 1, &c).await;
    berth.signal(Signal::SIGTERM);
    assert_eq!(berth.exit_code().await, Some(0));
    // No berth is running, yet the port accepts: the kernel queues the client on the socket
    // that "systemd" still holds, and the next berth serves it.
    let waiting = tokio::spawn(transfer(addr, 2, 1 << 20, 1 << 20));
    let berth = Berth::spawn(&dir, &config, None, vec![pass()]);
    let c = timeout(HANG, waiting).await.unwrap().unwrap();
    assert_served(&mut tallies, 2, &c).await;
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
        "SystemCallErrorNumber=EPERM\n",
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
    // --man=no: Documentation= names berth's own pages, which exist once installed (the
    // package tests check them), not on the machine running the tests.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
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
        file,
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

/// `berth status --watch`: samples keep coming with per-second rates beside the totals; the
/// first has no rates, and the sample in which five new connections first show carries
/// them as a rate. The table form refreshes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_shows_rates_of_what_happens_between_samples() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(backend);
    let web = free_addr();
    let dir = Dir::new();
    let berth = Berth::spawn(
        &dir,
        &format!(
            "[metrics]\nenabled = false\n{}",
            mapping("web", web, target, "")
        ),
        None,
        vec![],
    );
    berth.up().await;
    let mut watch = Command::new(env!("CARGO_BIN_EXE_berth"));
    watch
        .args(["status", "--json", "--watch", "0.2", "--admin-socket"])
        .arg(&berth.admin)
        .stdout(std::process::Stdio::piped());
    let mut child = watch.spawn().unwrap();
    let lines = common::lines_of(child.stdout.take().unwrap());
    let _watch = common::Guard(child);
    let next = move || -> serde_json::Value {
        let line = lines
            .recv_timeout(HANG)
            .expect("no sample from berth status --watch");
        serde_json::from_str(&line).unwrap()
    };
    let first = next();
    assert_eq!(first["mappings"][0]["name"], "web");
    assert!(
        first["rates"][0].is_null(),
        "no rates in the first sample: {first}"
    );
    for id in 0..5 {
        let c = transfer(web, id, 1024, 1024).await;
        assert_served(&mut tallies, id, &c).await;
    }
    let sample = tokio::task::spawn_blocking(move || {
        loop {
            let s = next();
            if s["mappings"][0]["connections"] == 5 {
                return s;
            }
        }
    })
    .await
    .unwrap();
    let rate = &sample["rates"][0];
    assert!(rate["connections"].as_f64().unwrap() > 0.0, "{sample}");
    assert!(rate["bytes_to_target"].as_f64().unwrap() > 0.0, "{sample}");
    let table = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--watch", "0.1", "--count", "2", "--admin-socket"])
        .arg(&berth.admin)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.matches("CONN/S").count(), 2, "{table}");
    let refused = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--watch", "0", "--admin-socket"])
        .arg(&berth.admin)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not a number of seconds from 0.1"),
        "{refused:?}"
    );
    berth.stop().await;
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

/// The daemon in-process, as mini-redis's `run(listener, shutdown)`: [`berth::service::serve`]
/// takes its configuration, a reload channel and a shutdown future; a reload adds a mapping,
/// and the shutdown drains and frees every port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_in_process_with_reload_and_shutdown_as_arguments() {
    use berth::service::{Start, config::Config, serve};
    let dir = Dir::new();
    let (a, b) = (free_addr(), free_addr());
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let mut seen = spawn_exchange_server(server);
    let file = dir.path("berth.toml");
    let write = |mappings: &str| {
        std::fs::write(&file, format!("[metrics]\nenabled = false\n{mappings}")).unwrap();
    };
    write(&mapping("a", a, target, ""));
    let admin = dir.path("admin.sock");
    let start = Start::new(file.clone(), Config::load(&file).unwrap(), admin.clone());
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(serve(start, reloads, async {
        let _ = stopped.await;
    }));
    // The socket exists before the mappings start; it answers once they run.
    common::wait_until("the daemon's admin socket", || {
        std::os::unix::net::UnixStream::connect(&admin).is_ok()
    })
    .await;
    timeout(HANG, berth::service::admin::request(&admin, "status"))
        .await
        .unwrap()
        .unwrap();
    let through = |addr, id| transfer(addr, id, 1 << 20, 1 << 20);
    let t = through(a, 1).await;
    assert_served(&mut seen, 1, &t).await;

    write(&format!(
        "{}{}",
        mapping("a", a, target, ""),
        mapping("b", b, target, "")
    ));
    reload.send(()).await.unwrap();
    let rows = || async {
        timeout(HANG, berth::service::admin::request(&admin, "status"))
            .await
            .unwrap()
            .unwrap()
            .mappings
    };
    let deadline = tokio::time::Instant::now() + HANG;
    while !rows().await.iter().any(|r| r.name == "b") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload never added b"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let t = through(b, 2).await;
    assert_served(&mut seen, 2, &t).await;

    stop.send(()).unwrap();
    timeout(HANG, daemon).await.unwrap().unwrap().unwrap();
    for addr in [a, b] {
        std::net::TcpListener::bind(addr).expect("a stopped daemon's port is free");
    }
    assert!(!admin.exists(), "the admin socket is removed at stop");
}

/// SIGHUP reloads as `berth reload` does; `berth reload` exits 1 with the reason on a bad
/// file (and the running mappings stay); a mapping removed while a connection is open stays
/// `draining` until that connection ends, then goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_berth_reload_and_draining_until_the_last_connection() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let (a, b) = (free_addr(), free_addr());
    let dir = Dir::new();
    let base = "[metrics]\nenabled = false\n";
    let berth = Berth::spawn(
        &dir,
        &format!("{base}{}", mapping("a", a, target, "")),
        None,
        vec![],
    );
    berth.up().await;

    // An open connection through "a", held by the backend.
    let client = timeout(HANG, TcpStream::connect(a.to_string()))
        .await
        .unwrap()
        .unwrap();
    let (held, _) = timeout(HANG, backend.accept()).await.unwrap().unwrap();
    berth
        .wait_row("a", "its connection", |r| r.active == 1)
        .await;

    // SIGHUP with "a" replaced by "b": "b" serves, "a" drains while its connection lives.
    std::fs::write(
        &berth.file,
        format!("{base}{}", mapping("b", b, target, "")),
    )
    .unwrap();
    berth.signal(Signal::SIGHUP);
    berth
        .wait_row("b", "to serve", |r| r.state == "active")
        .await;
    let rows = berth.rows().await;
    let a_row = rows
        .iter()
        .find(|r| r.name == "a")
        .expect("a drains, still listed");
    assert_eq!(
        (a_row.state.as_str(), a_row.active),
        ("draining", 1),
        "{rows:?}"
    );
    assert!(
        TcpStream::connect(a.to_string()).await.is_err(),
        "a still accepts"
    );

    // `berth reload` on a bad file: exit 1, the reason, and nothing changes.
    std::fs::write(&berth.file, "[[mapping]]\nname = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["reload", "--admin-socket"])
        .arg(&berth.admin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("berth.toml"), "{err}");
    berth
        .wait_row("b", "to keep serving", |r| r.state == "active")
        .await;

    // The last connection of "a" ends: "a" is gone.
    drop(held);
    drop(client);
    let deadline = tokio::time::Instant::now() + HANG;
    while berth.rows().await.iter().any(|r| r.name == "a") {
        assert!(tokio::time::Instant::now() < deadline, "a never went");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    berth.stop().await;
}

/// Every metric family of the relays counts what happened: connect errors by reason, open
/// connections, the mapping's info, and the UDP families (flows opened, expired, evicted,
/// datagrams each way, ICMP unreachable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_metric_family_counts_what_happened() {
    use common::daemon::find_sample;
    // A target that refuses: a port that was free a moment ago.
    let refused = free_addr();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let (echo, _echo) = common::spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let dead_udp = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (metrics, t, live, u, dead) = (
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    let config = format!(
        "[metrics]\nlisten = \"{metrics}\"\n{}{}{}{}",
        mapping("t", t, refused, ""),
        mapping("live", live, target, ""),
        mapping(
            "u",
            u,
            echo,
            "proto = \"udp\"\nmax_flows = 1\nudp_idle_timeout = 1\n"
        ),
        mapping("dead", dead, dead_udp, "proto = \"udp\"\n"),
    );
    let dir = Dir::new();
    let berth = Berth::spawn(&dir, &config, None, vec![]);
    berth.up().await;
    let value = |m: &str, name: &str, labels: &[&str]| {
        find_sample(m, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{m}"))
    };
    // Counters move just after the packets do: wait (bounded) until one reaches `want`, and
    // fail if it ever goes past it.
    let settles = |name: &'static str, labels: &'static [&'static str], want: f64| async move {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let m = scrape(metrics).await;
            let got = find_sample(&m, name, labels).unwrap_or(0.0);
            assert!(got <= want, "{name}{labels:?} is {got}, more than {want}");
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{labels:?} stays at {got}, not {want}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };

    // TCP: a refused connect is counted by reason; an open connection is active.
    // berth resets the client once its own connect is refused: on loopback the reset can
    // beat the client's connect() to its result, or come as the first read.
    if let Ok(mut c) = TcpStream::connect(t).await {
        let mut buf = [0u8; 1];
        let _ = timeout(HANG, tokio::io::AsyncReadExt::read(&mut c, &mut buf))
            .await
            .unwrap();
    }
    let held = TcpStream::connect(live).await.unwrap();
    let (server_side, _) = timeout(HANG, backend.accept()).await.unwrap().unwrap();
    berth
        .wait_row("live", "its connection", |r| r.active == 1)
        .await;
    let m = scrape(metrics).await;
    assert_eq!(
        value(
            &m,
            "berth_connect_errors_total",
            &[r#"mapping="t""#, r#"reason="refused""#]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "berth_connections_active", &[r#"mapping="live""#]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "berth_mapping_info",
            &[
                r#"mapping="live""#,
                r#"mode="auto""#,
                r#"owner="config""#,
                r#"state="active""#
            ]
        ),
        1.0
    );
    drop((held, server_side));

    // UDP: two clients in a table for one: the second evicts the first; each datagram is
    // counted both ways; the survivor expires after its idle second.
    for n in 0..2 {
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(b"hi", u).await.unwrap();
        let mut buf = [0u8; 8];
        timeout(HANG, c.recv_from(&mut buf)).await.unwrap().unwrap();
        settles(
            "berth_udp_flows_total",
            &[r#"mapping="u""#],
            f64::from(n + 1),
        )
        .await;
    }
    settles("berth_udp_flows_evicted_total", &[r#"mapping="u""#], 1.0).await;
    settles(
        "berth_udp_datagrams_total",
        &[r#"mapping="u""#, r#"direction="to_target""#],
        2.0,
    )
    .await;
    settles(
        "berth_udp_datagrams_total",
        &[r#"mapping="u""#, r#"direction="to_client""#],
        2.0,
    )
    .await;
    settles("berth_udp_flows_expired_total", &[r#"mapping="u""#], 1.0).await;
    let m = scrape(metrics).await;
    assert_eq!(
        value(&m, "berth_udp_flows_active", &[r#"mapping="u""#]),
        0.0
    );

    // UDP to a closed port: the ICMP error is counted (it may take a datagram or two).
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        c.send_to(b"anyone?", dead).await.unwrap();
        let m = scrape(metrics).await;
        if find_sample(
            &m,
            "berth_udp_target_unreachable_total",
            &[r#"mapping="dead""#],
        )
        .unwrap_or(0.0)
            >= 1.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no unreachable counted:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    berth.stop().await;
}

/// A client connecting in a loop while its mapping is changed by reload after reload is
/// never refused: the replacement serves the very socket of the mapping it replaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_loop_across_reloads_is_never_refused() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // An echo backend for one byte per connection.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            });
        }
    });
    let web = free_addr();
    let dir = Dir::new();
    let config = |max: u32| {
        format!(
            "[metrics]\nenabled = false\n{}",
            mapping("web", web, target, &format!("max_connections = {max}\n"))
        )
    };
    let berth = Berth::spawn(&dir, &config(100), None, vec![]);
    berth.up().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let looping = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let round = async {
                    let mut s = TcpStream::connect(web).await?;
                    s.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    std::io::Result::Ok(())
                };
                match timeout(HANG, round).await {
                    Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    for round in 0..6u32 {
        // Let some connections through before each change.
        let before = ok.load(Ordering::Relaxed);
        while ok.load(Ordering::Relaxed) < before + 20 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let reply = berth.reload(&config(100 + round + 1)).await;
        assert!(
            reply.ok && reply.message.contains("1 changed"),
            "{}",
            reply.message
        );
    }
    stop.store(true, Ordering::Relaxed);
    timeout(HANG, looping).await.unwrap().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "a client was refused or cut across a reload"
    );
    assert!(ok.load(Ordering::Relaxed) >= 120);
    berth.stop().await;
}

/// Processes a test started indirectly (successors): killed if it fails before they end.
struct Strays(Vec<i32>);

impl Drop for Strays {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// /proc/PID/stat's parent pid and /proc/PID/comm, or None once the process is gone.
fn parent_and_name(pid: i32) -> Option<(i32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some((ppid, comm.trim().to_owned()))
}

/// What [`upgrading_with_a_held_transfer`] leaves: the daemon, its notify socket, the
/// successor, the mapped address, the server's reports, its gate and the held transfer.
struct Upgrading {
    berth: Berth,
    notify: tokio::net::UnixDatagram,
    strays: Strays,
    web: SocketAddr,
    seen: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>,
    gate: tokio::sync::watch::Sender<bool>,
    held: tokio::task::JoinHandle<Tally>,
}

/// `berth run` with a notify socket, as systemd starts it, relaying `web` to a gated server;
/// then `berth upgrade` while a transfer is held (the gate closed): the first process
/// drains it.
async fn upgrading_with_a_held_transfer(dir: &Dir) -> Upgrading {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let (seen, gate) = spawn_gated_exchange_server(backend);
    let notify_path = dir.path("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let web = free_addr();
    let config = format!(
        "[metrics]\nenabled = false\n{}",
        mapping("web", web, target, "mode = \"splice\"")
    );
    let berth = Berth::spawn(dir, &config, Some(&notify_path), Vec::new());
    berth.up().await;
    let first = i32::try_from(berth.child.id()).unwrap();
    let held = tokio::spawn(transfer(web, 1, 4 << 20, 4 << 20));
    berth
        .wait_status(|r| r.name == "web" && r.active == 1)
        .await;
    let (ok, out) = upgrade(&berth.admin).await;
    assert!(ok, "{out}");
    let successor = successor_pid(&out);
    let strays = Strays(vec![successor]);
    assert_eq!(parent_and_name(successor).unwrap().0, first);
    // The held transfer finishes in the first process, which only then becomes the keeper.
    assert_eq!(parent_and_name(first).unwrap().1, "berth");
    Upgrading {
        berth,
        notify,
        strays,
        web,
        seen,
        gate,
        held,
    }
}

/// [`upgrading_with_a_held_transfer`], then the held transfer completes and the first process
/// becomes berth-keeper. Returns the daemon, the notify socket, the successor and the server.
async fn upgraded_under_systemd(
    dir: &Dir,
) -> (
    Berth,
    tokio::net::UnixDatagram,
    Strays,
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>,
) {
    let Upgrading {
        berth,
        notify,
        strays,
        web,
        mut seen,
        gate,
        held,
    } = upgrading_with_a_held_transfer(dir).await;
    let first = i32::try_from(berth.child.id()).unwrap();
    gate.send(true).unwrap();
    let t = held.await.unwrap();
    assert_served(&mut seen, 1, &t).await;
    common::wait_until("the first berth to become berth-keeper", || {
        parent_and_name(first).is_some_and(|(_, name)| name == "berth-keeper")
    })
    .await;
    (berth, notify, strays, web, seen)
}

/// A successor that stops while the process it replaced still drains (a `systemctl stop`
/// that lands in the drain signals both) is left unreaped for the keeper: the keeper reports
/// its status (0) rather than finding no child and failing the unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_ends_during_the_drain_is_left_for_the_keeper() {
    let dir = Dir::new();
    let Upgrading {
        berth,
        strays,
        mut seen,
        gate,
        held,
        ..
    } = upgrading_with_a_held_transfer(&dir).await;
    let successor = strays.0[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(successor), Signal::SIGTERM).unwrap();
    // It has exited, and nobody collected it: a zombie of the draining process.
    common::wait_until("the successor to exit and stay unreaped", || {
        std::fs::read_to_string(format!("/proc/{successor}/stat"))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(')')?.1.trim_start().starts_with('Z')))
            .unwrap_or(false)
    })
    .await;
    gate.send(true).unwrap();
    let t = held.await.unwrap();
    assert_served(&mut seen, 1, &t).await;
    assert_eq!(berth.exit_code().await, Some(0));
}

/// Under systemd (`$NOTIFY_SOCKET`), the process systemd started stays the unit's main
/// process after `berth upgrade` (systemd does not wait for a main process it did not start):
/// drained, it becomes berth-keeper, says nothing to systemd (no STOPPING=1, no MAINPID=),
/// takes a second upgrade's successor as its child when the first successor exits, passes
/// SIGTERM on, and exits with the last successor's status once that one has drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_under_systemd_the_started_process_keeps_the_unit() {
    let dir = Dir::new();
    let (berth, notify, mut strays, web, mut seen) = upgraded_under_systemd(&dir).await;
    let keeper = i32::try_from(berth.child.id()).unwrap();
    let first = strays.0[0];
    let (ok, out) = upgrade(&berth.admin).await;
    assert!(ok, "{out}");
    let second = successor_pid(&out);
    strays.0.push(second);
    common::wait_until("the second successor to come to the keeper", || {
        parent_and_name(first).is_none()
            && parent_and_name(second).is_some_and(|(ppid, _)| ppid == keeper)
    })
    .await;
    let t = transfer(web, 2, 1 << 20, 1 << 20).await;
    assert_served(&mut seen, 2, &t).await;
    let mut said = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = notify.try_recv(&mut buf) {
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !said
            .iter()
            .any(|m| m.contains("STOPPING=1") || m.contains("MAINPID=")),
        "{said:?}"
    );
    // systemctl stop: SIGTERM to the main process, which passes it on.
    berth.signal(Signal::SIGTERM);
    while !notified(&notify).await.contains("STOPPING=1") {}
    assert_eq!(berth.exit_code().await, Some(0));
    assert!(parent_and_name(second).is_none(), "the successor is gone");
}

/// A successor that crashes under the keeper fails the unit: the keeper exits with 128 + the
/// signal, so that `Restart=on-failure` applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_fails_when_its_successor_is_killed() {
    let dir = Dir::new();
    let (berth, _notify, strays, _web, _seen) = upgraded_under_systemd(&dir).await;
    let successor = strays.0[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(successor), Signal::SIGKILL).unwrap();
    assert_eq!(berth.exit_code().await, Some(137));
}
