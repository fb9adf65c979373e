//! Real dockerd (Debian's docker.io 20.10, with containerd and runc) publishing ports through
//! `berth-docker-proxy` as its `userland-proxy-path`, in three setups one after the other: the
//! shim on its own, the shim delegating to a relay-mode `berth run`, and the shim delegating to
//! a kernel-mode one (`[defaults] mode = "dnat"`). Each is checked through loopback, `[::1]`,
//! UDP and hairpin (a container fetching its own published port through the bridge's
//! address), across `docker stop`, `docker start`, `docker rm -f` and a busy port.
//!
//! Isolation: dockerd runs in a network namespace of the test's own (its bridge, its iptables
//! chains and its containers' veths live and die there), with its own data root, exec root,
//! API socket and config file; the image is imported from a rootfs of `busybox-static`.
//! Kernel mode's cgroup programs attach to a child cgroup the test creates.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use berth::service::status::Row;
use common::{
    HANG, TestCgroup, TestNs, assert_mirrored,
    daemon::{Berth, Dir},
    exchange, spawn_exchange_server,
};
use tokio::time::timeout;

/// The Debian docker CLI (a newer one in /usr/local/bin may not speak to dockerd 20.10).
const DOCKER: &str = "/usr/bin/docker";
/// The bridge's subnet, inside the test's own namespace (TEST-NET-2).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const IMAGE: &str = "berth-test:busybox";

/// dockerd in a namespace of its own; stopped, and everything it made removed, on drop.
struct Dockerd {
    ns: TestNs,
    dir: Dir,
    child: Option<Child>,
}

impl Dockerd {
    async fn start() -> Self {
        for tool in [
            "/usr/sbin/dockerd",
            DOCKER,
            "/usr/bin/busybox",
            "/usr/sbin/iptables",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: `cargo xtask test` installs docker.io, busybox-static and iptables"
            );
        }
        let ns = TestNs::create();
        let dir = Dir::new();
        std::fs::write(dir.path("daemon.json"), "{}").unwrap();
        let log = std::fs::File::create(dir.path("dockerd.log")).unwrap();
        let child = ns
            .ns
            .command("/usr/sbin/dockerd")
            .unwrap()
            .arg("--config-file")
            .arg(dir.path("daemon.json"))
            .arg("--data-root")
            .arg(dir.path("data"))
            .arg("--exec-root")
            .arg(dir.path("exec"))
            .arg("--pidfile")
            .arg(dir.path("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.path("docker.sock").display()))
            .arg(format!("--bip={GATEWAY}/24"))
            .args(["--storage-driver", "vfs"])
            .arg("--userland-proxy-path")
            .arg(env!("CARGO_BIN_EXE_berth-docker-proxy"))
            // dockerd passes its environment to the proxies it starts.
            .env("BERTH_ADMIN_SOCKET", dir.path("admin.sock")) // where Berth::spawn_in puts it
            .env("BERTH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Self {
            ns,
            dir,
            child: Some(child),
        };
        let sock = d.dir.path("docker.sock");
        common::wait_until("dockerd to answer", || {
            sock.exists()
                && Command::new(DOCKER)
                    .arg("-H")
                    .arg(format!("unix://{}", sock.display()))
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        })
        .await;
        d.import_image();
        d
    }

    /// Runs the docker CLI against this dockerd; returns (success, stdout + stderr).
    fn docker(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", self.dir.path("docker.sock").display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        common::outcome(&out)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.docker(args);
        assert!(
            ok,
            "docker {args:?} failed: {text}\n(dockerd log: {})",
            self.log_tail()
        );
        text.trim().to_owned()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `docker import` of a rootfs made from busybox-static: sh, sleep and nc are enough.
    fn import_image(&self) {
        let root = self.dir.path("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/usr/bin/busybox", root.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "nc", "cat"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .output()
            .unwrap();
        assert!(tar.status.success());
        let mut import = Command::new(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", self.dir.path("docker.sock").display()))
            .args(["import", "-", IMAGE])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
        assert!(import.wait().unwrap().success(), "docker import failed");
    }

    /// A client socket in dockerd's namespace (the host side of its ports).
    fn tcp(&self, v6: bool) -> tokio::net::TcpSocket {
        self.ns
            .ns
            .run(|| {
                if v6 {
                    tokio::net::TcpSocket::new_v6().unwrap()
                } else {
                    tokio::net::TcpSocket::new_v4().unwrap()
                }
            })
            .unwrap()
    }

    /// `berth run` in dockerd's namespace, on the admin socket the shims look at.
    fn berth(&self, config: &str) -> Berth {
        Berth::spawn_in(&self.ns.ns, &self.dir, config)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let (_, ids) = self.docker(&["ps", "-aq"]);
        for id in ids.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // What dockerd mounted under its roots must go before the directory can.
        self.dir.unmount_all();
    }
}

/// Polls status until `pred` holds for the Docker mappings (another process's state).
async fn wait_docker(berth: &Berth, what: &str, pred: impl Fn(&[Row]) -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        let rows: Vec<Row> = berth
            .rows()
            .await
            .into_iter()
            .filter(|r| r.owner == "docker")
            .collect();
        if pred(&rows) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The container's published ports, as the host side sees them.
#[derive(Clone, Copy, Debug)]
struct Ports {
    /// `-p 127.0.0.1:P:80`: the "who" server.
    who_local: u16,
    /// `-p P:80` (0.0.0.0): the "who" server, for hairpin.
    who_any: u16,
    /// `-p [::]:P:80`: the "who" server over IPv6.
    who_v6: u16,
    /// `-p P:81`: the checksummed exchange server.
    bulk: u16,
    /// `-p P:53/udp`: a UDP echo.
    udp: u16,
}

impl Ports {
    fn pick(d: &Dockerd) -> Self {
        Self {
            who_local: d.ns.free_port(),
            who_any: d.ns.free_port(),
            who_v6: d.ns.free_port(),
            bulk: d.ns.free_port(),
            udp: d.ns.free_port(),
        }
    }

    fn flags(&self) -> Vec<String> {
        [
            format!("127.0.0.1:{}:80", self.who_local),
            format!("{}:80", self.who_any),
            format!("[::]:{}:80", self.who_v6),
            format!("{}:81", self.bulk),
            format!("{}:53/udp", self.udp),
        ]
        .into_iter()
        .flat_map(|p| ["-p".to_owned(), p])
        .collect()
    }
}

/// The servers inside a running container's namespace, made by the test (busybox has no UDP
/// server): who (port 80) answers with the peer address it sees; exchange (81) mirrors
/// checksummed data; echo (53/udp) returns each datagram.
struct Servers {
    tallies: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, common::Tally)>>,
    _tasks: common::Tasks,
}

fn serve_in(d: &Dockerd, container: &str) -> Servers {
    let pid: u32 = d
        .ok(&["inspect", "-f", "{{.State.Pid}}", container])
        .parse()
        .unwrap();
    let (who, bulk, udp) = common::in_netns(pid, || {
        (
            std::net::TcpListener::bind("0.0.0.0:80").unwrap(),
            std::net::TcpListener::bind("0.0.0.0:81").unwrap(),
            std::net::UdpSocket::bind("0.0.0.0:53").unwrap(),
        )
    });
    for s in [&who, &bulk] {
        s.set_nonblocking(true).unwrap();
    }
    udp.set_nonblocking(true).unwrap();
    let who = tokio::net::TcpListener::from_std(who).unwrap();
    let bulk = tokio::net::TcpListener::from_std(bulk).unwrap();
    let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
    let who_task = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        while let Ok((mut s, peer)) = who.accept().await {
            let _ = s.write_all(format!("you are {peer}\n").as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    let echo_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    Servers {
        tallies: spawn_exchange_server(bulk),
        _tasks: common::Tasks(vec![who_task, echo_task]),
    }
}

/// What the "who" server says to a client of `addr`.
async fn who(sock: tokio::net::TcpSocket, addr: SocketAddr) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut s = timeout(HANG, sock.connect(addr))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut out = String::new();
    timeout(HANG, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The checks every setup must pass: loopback, `[::1]`, bulk integrity, UDP and hairpin.
async fn check_ports(
    d: &Dockerd,
    servers: &mut Servers,
    p: Ports,
    cgroup: Option<&TestCgroup>,
    id: u64,
) {
    let sock = |v6: bool| match cgroup {
        Some(cg) => cg.run(|| d.tcp(v6)),
        None => d.tcp(v6),
    };
    // The container sees the bridge's address: the relay's, or the host's own after a
    // connect rewrite; never the client's loopback address.
    let who4 = who(sock(false), SocketAddr::from(([127, 0, 0, 1], p.who_local))).await;
    assert!(who4.starts_with(&format!("you are {GATEWAY}:")), "{who4:?}");
    let who6 = who(
        sock(true),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p.who_v6)),
    )
    .await;
    assert!(who6.starts_with(&format!("you are {GATEWAY}:")), "{who6:?}");
    let c = timeout(
        HANG,
        sock(false).connect(SocketAddr::from(([127, 0, 0, 1], p.bulk))),
    )
    .await
    .unwrap()
    .unwrap();
    let t = timeout(HANG, exchange(c, id, 4 << 20, 4 << 20))
        .await
        .unwrap()
        .unwrap();
    let (sid, srv) = timeout(HANG, servers.tallies.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(sid, id);
    assert_mirrored(id, &t, &srv);
    let udp =
        d.ns.ns
            .run(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let target = SocketAddr::from(([127, 0, 0, 1], p.udp));
    let mut buf = [0u8; 64];
    let mut answered = None;
    // UDP may lose a datagram: a few tries, each waiting for its answer.
    for _ in 0..10 {
        udp.send_to(b"ping", target).unwrap();
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            answered = Some((buf[..n].to_vec(), from));
            break;
        }
    }
    assert_eq!(
        answered,
        Some((b"ping".to_vec(), target)),
        "udp through {target}"
    );
    // Hairpin: the container reaches its own published port through the bridge's address.
    let hairpin = d.ok(&[
        "exec",
        "web",
        "nc",
        &GATEWAY.to_string(),
        &p.who_any.to_string(),
    ]);
    assert!(hairpin.starts_with("you are "), "{hairpin:?}");
}

fn port_free(d: &Dockerd, port: u16) -> bool {
    d.ns.ns
        .run(|| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .is_ok()
        })
        .unwrap()
}

/// A busy host port fails `docker run`, with the reason, and leaves nothing behind.
fn busy_port_is_refused(d: &Dockerd) {
    let port = d.ns.free_port();
    let _held =
        d.ns.ns
            .run(|| std::net::TcpListener::bind(("0.0.0.0", port)).unwrap())
            .unwrap();
    let (ok, text) = d.docker(&[
        "run",
        "-d",
        "--name",
        "busy",
        "-p",
        &format!("{port}:80"),
        IMAGE,
        "sleep",
        "1000",
    ]);
    assert!(!ok, "docker run on a busy port succeeded");
    assert!(text.contains("already in use"), "{text}");
    d.ok(&["rm", "-f", "busy"]);
}

fn run_web(d: &Dockerd, p: Ports) {
    let mut args: Vec<String> = ["run", "-d", "--init", "--name", "web"]
        .map(str::to_owned)
        .to_vec();
    args.extend(p.flags());
    args.extend([IMAGE, "sleep", "100000"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.ok(&args);
}

const DOCKER_PORTS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_publishes_through_berth_standalone_relay_and_kernel_mode() {
    let d = Dockerd::start().await;
    let p = Ports::pick(&d);

    // 1. Standalone: no daemon answers; each shim relays its port itself.
    run_web(&d, p);
    let mut servers = serve_in(&d, "web");
    check_ports(&d, &mut servers, p, None, 1).await;
    busy_port_is_refused(&d);
    d.ok(&["stop", "-t", "1", "web"]);
    drop(servers);
    assert!(
        port_free(&d, p.bulk),
        "a stopped container's port stays bound"
    );

    // 2. A relay-mode daemon: the shims of a restarted container hand their ports to it.
    let relay = d.berth("[metrics]\nenabled = false\n");
    relay.up().await;
    d.ok(&["start", "web"]);
    let mut servers = serve_in(&d, "web");
    wait_docker(&relay, "all ports delegated", |r| r.len() >= DOCKER_PORTS).await;
    check_ports(&d, &mut servers, p, None, 2).await;
    let rows = relay.rows().await;
    let bulk = rows
        .iter()
        .find(|r| r.listen == format!("0.0.0.0:{}", p.bulk))
        .unwrap_or_else(|| panic!("no row for the bulk port: {rows:?}"));
    assert!(
        bulk.bytes_to_target >= 4 << 20,
        "the daemon did not relay: {bulk:?}"
    );
    busy_port_is_refused(&d);

    // The daemon stops: the shims cover for it at once.
    relay.stop().await;
    check_ports(&d, &mut servers, p, None, 3).await;

    // 3. A kernel-mode daemon: the shims hand their ports back; kernel mode maps them and
    //    the relay serves what its programs pass through (hairpin, [::1]).
    let cgroup = TestCgroup::create();
    let kernel = d.berth(&format!(
        "[metrics]\nenabled = false\n[defaults]\nmode = \"dnat\"\n[dnat]\ncgroup = \"{}\"\n",
        cgroup.0.display()
    ));
    kernel.up().await;
    wait_docker(&kernel, "all ports delegated in kernel mode", |r| {
        r.len() >= DOCKER_PORTS && r.iter().all(|m| m.mode == "dnat")
    })
    .await;
    check_ports(&d, &mut servers, p, Some(&cgroup), 4).await;
    // The cgroup's clients went through the kernel: the relay moved none of the bulk bytes.
    let rows = kernel.rows().await;
    let bulk = rows
        .iter()
        .find(|r| r.listen == format!("0.0.0.0:{}", p.bulk))
        .unwrap();
    assert!(
        bulk.bytes_to_target < 4 << 20,
        "kernel mode did not map it: {bulk:?}"
    );
    // A client outside the cgroup is served too (by the relay).
    let outside = who(
        d.tcp(false),
        SocketAddr::from(([127, 0, 0, 1], p.who_local)),
    )
    .await;
    assert!(outside.starts_with("you are "), "{outside:?}");

    // docker stop removes the mappings; docker start brings them back; rm -f removes them.
    d.ok(&["stop", "-t", "1", "web"]);
    drop(servers);
    wait_docker(&kernel, "the mappings removed", <[Row]>::is_empty).await;
    assert!(port_free(&d, p.bulk));
    d.ok(&["start", "web"]);
    let mut servers = serve_in(&d, "web");
    wait_docker(&kernel, "the mappings back", |r| r.len() >= DOCKER_PORTS).await;
    check_ports(&d, &mut servers, p, Some(&cgroup), 5).await;
    busy_port_is_refused(&d);
    d.ok(&["rm", "-f", "web"]);
    wait_docker(&kernel, "the mappings removed", <[Row]>::is_empty).await;
    assert!(port_free(&d, p.bulk));
    kernel.stop().await;

    // No shim outlives its container.
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let mut s = String::new();
            let _ = (&c[..]).read_to_string(&mut s);
            s.contains("berth-docker-proxy") && s.contains(&p.bulk.to_string())
        })
        .count();
    assert_eq!(left, 0, "berth-docker-proxy processes left behind");
}
