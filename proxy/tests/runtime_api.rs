//! The runtime mapping API of `berth run`, and `berth-docker-proxy` delegating to it: mappings
//! added, listed and removed at run time (with a passed socket or without), leases that end
//! with their client, every kind of bad request refused without harm, reloads that leave
//! runtime mappings alone, dockerd 28's fd 4 contract, and a daemon killed and restarted under
//! load without a single refused connection on 50 Docker-published ports.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use berth::{
    addr::Proto,
    mapping::Draft,
    service::{
        admin::{Call, Client, Reply},
        status::Row,
    },
};
use common::{
    Guard, HANG,
    daemon::{Berth, Dir, free_addr, mapping, sample, scrape, shim_with_status},
    exchange, spawn_exchange_server, wait_until,
};
use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// Tests run side by side: none may take the default metrics port.
const NO_METRICS: &str = "[metrics]\nenabled = false\n";

fn add(listen: SocketAddr, target: SocketAddr, lease: bool) -> Call {
    Call::Add {
        mapping: Box::new(Draft::new(Proto::Tcp, listen.into(), target.into())),
        owner: Some("test".into()),
        lease,
        persist: false,
    }
}

/// One call on a connection of its own (which closes after: no lease survives it).
fn once(admin: &Path, call: &Call, socket: Option<&OwnedFd>) -> Reply {
    Client::connect(admin)
        .unwrap()
        .call(call, socket.map(|s| s.as_fd()))
        .unwrap()
}

fn rows(admin: &Path) -> Vec<Row> {
    once(admin, &Call::List, None).mappings
}

/// A transfer through `addr` to the exchange server, checked end to end.
async fn through(
    addr: SocketAddr,
    id: u64,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, common::Tally)>>,
) {
    let c = timeout(HANG, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let t = timeout(HANG, exchange(c, id, 1 << 20, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    common::assert_served(seen, id, &t).await;
}

/// A raw admin connection: what a careless or hostile client can send. Returns the first
/// answer and the connection, to go on with.
fn raw_reply(admin: &Path, bytes: &[u8]) -> (String, std::io::BufReader<UnixStream>) {
    let mut s = UnixStream::connect(admin).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    s.write_all(bytes).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    (line, r)
}

/// Whether the daemon closed `r` (end of stream, not a timeout).
fn closed(mut r: std::io::BufReader<UnixStream>) -> bool {
    let mut rest = String::new();
    match r.read_line(&mut rest) {
        Ok(n) => n == 0,
        // It closed with our unread bytes in its buffer.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn bind_free(ip: std::net::IpAddr) -> std::net::TcpListener {
    std::net::TcpListener::bind((ip, 0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_mappings_are_added_listed_removed_and_bad_requests_change_nothing() {
    let dir = Dir::new();
    let (filed, metrics, a_listen, c_listen) = (free_addr(), free_addr(), free_addr(), free_addr());
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let mut seen = spawn_exchange_server(server);
    let file = |extra: &str| {
        format!(
            "[metrics]\nlisten = \"{metrics}\"\n[admin]\nmax_runtime_mappings = 3\n{}{extra}",
            mapping("file", filed, target, "")
        )
    };
    let berth = Berth::spawn(&dir, &file(""), None, vec![]);
    berth.up().await;
    let admin = berth.admin.clone();

    // Added without a socket: the daemon binds; the name is generated and readable.
    let r = once(&admin, &add(a_listen, target, false), None);
    assert!(r.ok, "{}", r.message);
    let a = r.mappings[0].clone();
    assert_eq!(
        a.name,
        format!("test-tcp-{}-{}", a_listen.port(), a_listen.ip())
    );
    assert_eq!((a.owner.as_str(), a.state.as_str()), ("test", "active"));
    through(a_listen, 1, &mut seen).await;

    // Added with its socket passed along (SCM_RIGHTS); our copy closes at once.
    let held = bind_free(a_listen.ip());
    let b_listen = held.local_addr().unwrap();
    let held = OwnedFd::from(held);
    let r = once(&admin, &add(b_listen, target, false), Some(&held));
    assert!(r.ok, "{}", r.message);
    drop(held);
    through(b_listen, 2, &mut seen).await;

    // A passed socket of the wrong type, or bound elsewhere, is refused.
    let udp = OwnedFd::from(std::net::UdpSocket::bind(free_addr()).unwrap());
    let r = once(&admin, &add(free_addr(), target, false), Some(&udp));
    assert!(
        !r.ok && r.message.contains("not a tcp socket"),
        "{}",
        r.message
    );
    let elsewhere = OwnedFd::from(bind_free(a_listen.ip()));
    let r = once(&admin, &add(free_addr(), target, false), Some(&elsewhere));
    assert!(
        !r.ok && r.message.contains("the passed socket is bound to"),
        "{}",
        r.message
    );
    // A socket with a request that takes none.
    let r = Client::connect(&admin)
        .unwrap()
        .call(&Call::Status, Some(elsewhere.as_fd()))
        .unwrap();
    assert!(!r.ok && r.message.contains("takes none"), "{}", r.message);

    // Overlap with the file's mapping, a taken name, an occupied port, a bad target.
    let r = once(&admin, &add(filed, target, false), None);
    assert!(
        !r.ok && r.message.contains("overlaps mapping \"file\""),
        "{}",
        r.message
    );
    let mut named = Draft::new(Proto::Tcp, free_addr().into(), target.into());
    named.name = Some("file".into());
    let r = once(
        &admin,
        &Call::Add {
            mapping: Box::new(named),
            owner: None,
            lease: false,
            persist: false,
        },
        None,
    );
    assert!(
        !r.ok && r.message.contains("a mapping named \"file\" exists"),
        "{}",
        r.message
    );
    // A persistent mapping is bound by the daemon, now and after a restart: no socket.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    let r = once(
        &admin,
        &Call::Add {
            mapping: Box::new(Draft::new(Proto::Tcp, at.into(), target.into())),
            owner: None,
            lease: false,
            persist: true,
        },
        Some(&OwnedFd::from(listener)),
    );
    assert!(
        !r.ok && r.message.contains("a persistent mapping takes no socket"),
        "{}",
        r.message
    );
    let busy = bind_free(a_listen.ip());
    let r = once(
        &admin,
        &add(busy.local_addr().unwrap(), target, false),
        None,
    );
    assert!(
        !r.ok && r.message.contains("already in use"),
        "{}",
        r.message
    );
    drop(busy);
    let r = once(
        &admin,
        &add(free_addr(), "10.0.0.1:0".parse().unwrap(), false),
        None,
    );
    assert!(
        !r.ok && r.message.contains("mapping: target:"),
        "{}",
        r.message
    );

    // A lease lives as long as its connection.
    let mut holder = Client::connect(&admin).unwrap();
    let r = holder.call(&add(c_listen, target, true), None).unwrap();
    assert!(r.ok, "{}", r.message);
    let c = r.mappings[0].name.clone();
    // The cap: a, b and c are three.
    let r = once(&admin, &add(free_addr(), target, false), None);
    assert!(
        !r.ok && r.message.contains("max_runtime_mappings"),
        "{}",
        r.message
    );
    drop(holder);
    wait_until("the lease to end", || {
        rows(&admin).iter().all(|m| m.name != c)
    })
    .await;
    assert!(
        std::net::TcpListener::bind(c_listen).is_ok(),
        "the lease's port stays bound"
    );

    // Runtime mappings show in status and metrics like file mappings, with their owner.
    let m = scrape(metrics).await;
    let info = format!(
        "berth_mapping_info{{listen=\"{a_listen}\",mapping=\"{}\",mode=\"auto\",owner=\"test\",proto=\"tcp\",state=\"active\",target=\"{target}\"}}",
        a.name
    );
    assert_eq!(sample(&m, &info), 1.0, "{m}");

    // A reload leaves runtime mappings alone, and refuses a file mapping that would clash.
    let reply = berth.request("reload").await;
    assert!(reply.ok, "{}", reply.message);
    assert!(rows(&admin).iter().any(|m| m.name == a.name));
    std::fs::write(
        dir.path("berth.toml"),
        file(&mapping("late", a_listen, target, "")),
    )
    .unwrap();
    let reply = berth.request("reload").await;
    assert!(
        !reply.ok && reply.message.contains("added at run time"),
        "{}",
        reply.message
    );
    through(a_listen, 3, &mut seen).await;

    // A file mapping cannot be removed at run time; a runtime one can, and its port is free
    // the moment the answer comes.
    let r = once(
        &admin,
        &Call::Remove {
            name: Some("file".into()),
            owner: None,
        },
        None,
    );
    assert!(
        !r.ok && r.message.contains("configuration file"),
        "{}",
        r.message
    );
    let r = once(
        &admin,
        &Call::Remove {
            name: Some(a.name.clone()),
            owner: None,
        },
        None,
    );
    assert!(r.ok, "{}", r.message);
    std::net::TcpListener::bind(a_listen).expect("a removed mapping's port is free at once");
    let r = once(
        &admin,
        &Call::Remove {
            name: Some(a.name.clone()),
            owner: None,
        },
        None,
    );
    assert!(
        !r.ok && r.message.contains("no mapping named"),
        "{}",
        r.message
    );

    // Garbage gets an error line; an endless line or a stalled one closes the connection.
    let (line, mut conn) = raw_reply(&admin, b"hello\n");
    assert!(line.contains("unknown command"), "{line}");
    // The connection still serves.
    conn.get_mut().write_all(b"status\n").unwrap();
    let mut next = String::new();
    conn.read_line(&mut next).unwrap();
    assert!(next.starts_with("{\"ok\":true"), "{next}");
    let (line, _) = raw_reply(&admin, b"{\"op\":\"add\"}\n");
    assert!(line.contains("missing field `mapping`"), "{line}");
    let (line, _) = raw_reply(&admin, b"\xff\xfe\n");
    assert!(line.contains("not UTF-8"), "{line}");
    let (line, conn) = raw_reply(&admin, &vec![b'x'; 70_000]);
    assert!(line.contains("longer than"), "{line}");
    assert!(closed(conn));
    // Still answering, and nothing changed.
    let names: Vec<String> = rows(&admin).into_iter().map(|m| m.name).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"file".to_owned()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_line_left_unfinished_is_timed_out() {
    let dir = Dir::new();
    let berth = Berth::spawn(&dir, NO_METRICS, None, vec![]);
    berth.up().await;
    let started = std::time::Instant::now();
    let (line, conn) = raw_reply(&berth.admin, b"{\"op\":");
    assert!(line.contains("not finished within"), "{line}");
    assert!(closed(conn));
    assert!(started.elapsed() >= berth::service::admin::LINE_TIMEOUT);
    assert!(berth.request("status").await.ok);
}

fn shim_args(listen: SocketAddr, target: SocketAddr, proto: &str) -> Vec<String> {
    [
        "-proto",
        proto,
        "-host-ip",
        &listen.ip().to_string(),
        "-host-port",
        &listen.port().to_string(),
        "-container-ip",
        &target.ip().to_string(),
        "-container-port",
        &target.port().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn start_shim(args: &[String], admin: &Path, fds: Vec<(OwnedFd, i32)>) -> (Guard, String) {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    shim_with_status(&argv, admin, fds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_shim_hands_its_port_to_the_daemon_as_a_lease() {
    let dir = Dir::new();
    let filed = free_addr();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let mut seen = spawn_exchange_server(server);
    let berth = Berth::spawn(
        &dir,
        &format!("{NO_METRICS}{}", mapping("file", filed, target, "")),
        None,
        vec![],
    );
    berth.up().await;
    let admin = berth.admin.clone();

    let listen = free_addr();
    let (shim, status) = start_shim(&shim_args(listen, target, "tcp"), &admin, vec![]);
    assert_eq!(status, "0\n");
    let row = rows(&admin)
        .into_iter()
        .find(|m| m.owner == "docker")
        .unwrap();
    assert_eq!(row.listen, listen.to_string());
    through(listen, 1, &mut seen).await;
    // The daemon serves it: its counters moved.
    let row = rows(&admin)
        .into_iter()
        .find(|m| m.owner == "docker")
        .unwrap();
    assert!(row.bytes_to_target >= 1 << 20, "{row:?}");
    // SIGINT: the mapping goes, and the port is free once the shim has exited.
    shim.signal(Signal::SIGINT);
    assert_eq!(shim.exited().await.code(), Some(0));
    assert!(rows(&admin).iter().all(|m| m.owner != "docker"));
    std::net::TcpListener::bind(listen).expect("the port is free after the shim exits");

    // SIGKILL: the lease ends with the connection.
    let listen = free_addr();
    let (shim, status) = start_shim(&shim_args(listen, target, "tcp"), &admin, vec![]);
    assert_eq!(status, "0\n");
    shim.signal(Signal::SIGKILL);
    drop(shim);
    wait_until("the killed shim's lease to end", || {
        rows(&admin).iter().all(|m| m.owner != "docker")
    })
    .await;

    // A busy port fails as docker-proxy's does; the daemon's refusal reaches dockerd too.
    let (shim, status) = start_shim(&shim_args(filed, target, "tcp"), &admin, vec![]);
    assert!(
        status.starts_with("1\n") && status.contains("already in use"),
        "{status:?}"
    );
    assert_eq!(shim.exited().await.code(), Some(1));
    let mut args = shim_args(free_addr(), "[::1]:80".parse().unwrap(), "tcp");
    args.extend(["-mode".into(), "dnat".into()]);
    let (shim, status) = start_shim(&args, &admin, vec![]);
    assert!(
        status.starts_with("1\nmapping: target:") && status.contains("a container's address"),
        "{status:?}"
    );
    assert_eq!(shim.exited().await.code(), Some(1));
}

/// dockerd 28 binds and listens itself, passes the socket as fd 4 with `-use-listen-fd`,
/// closes its copy once the proxy reported `0`, and stops the proxy with SIGINT: the port must
/// then be free for dockerd to bind again, delegated or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_28s_listen_fd_contract_delegated_and_standalone() {
    let dir = Dir::new();
    let berth = Berth::spawn(&dir, NO_METRICS, None, vec![]);
    berth.up().await;
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let mut seen = spawn_exchange_server(server);
    let (echo, _echo) = common::spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let standalone = Path::new("/nonexistent/berth-admin.sock");
    for (id, admin) in [(10u64, berth.admin.as_path()), (20, standalone)] {
        for (ip, proto) in [("127.0.0.1", "tcp"), ("::1", "tcp"), ("127.0.0.1", "udp")] {
            let addr: SocketAddr = (ip.parse::<std::net::IpAddr>().unwrap(), 0).into();
            let sock = dockerd_bind(addr, proto);
            let listen = sock.local_addr().unwrap().as_socket().unwrap();
            let to = if proto == "udp" { echo } else { target };
            let mut args = shim_args(listen, to, proto);
            args.push("-use-listen-fd".into());
            let (shim, status) = start_shim(&args, admin, vec![(OwnedFd::from(sock), 4)]);
            assert_eq!(status, "0\n", "{proto} {ip} via {}", admin.display());
            if proto == "udp" {
                let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                c.send_to(b"ping", listen).await.unwrap();
                let mut buf = [0u8; 16];
                let (n, from) = timeout(HANG, c.recv_from(&mut buf)).await.unwrap().unwrap();
                assert_eq!((&buf[..n], from), (&b"ping"[..], listen));
            } else {
                through(listen, id, &mut seen).await;
            }
            let delegated = rows(&berth.admin)
                .iter()
                .any(|m| m.listen == listen.to_string());
            assert_eq!(delegated, admin == berth.admin.as_path(), "{listen}");
            shim.signal(Signal::SIGINT);
            assert_eq!(shim.exited().await.code(), Some(0));
            drop(dockerd_bind(listen, proto));
        }
    }
}

/// Binds like dockerd 28: SO_REUSEADDR, IPV6_V6ONLY for IPv6, and listen for TCP. Panics if
/// the address is taken (what dockerd would report).
fn dockerd_bind(addr: SocketAddr, proto: &str) -> socket2::Socket {
    use socket2::{Domain, Socket, Type};
    let ty = if proto == "udp" {
        Type::DGRAM
    } else {
        Type::STREAM
    };
    let s = Socket::new(Domain::for_address(addr), ty, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(true).unwrap();
    }
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    if proto == "tcp" {
        s.listen(4096).unwrap();
    }
    s
}

/// 50 Docker-published ports under a steady connection load while the daemon is killed
/// (SIGKILL) and restarted, then stopped (SIGTERM) and restarted: the shims cover each gap,
/// so not one new connection is refused or fails, and the new daemon lists all 50 again.
/// Connections the old daemon was relaying when it was killed may be cut (the README says
/// so); they are counted apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_delegated_ports_survive_daemon_crash_and_restart_under_load() {
    const PORTS: usize = 50;
    const WORKERS: usize = 4;
    let dir = Dir::new();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let mut seen = spawn_exchange_server(server);
    tokio::spawn(async move { while seen.recv().await.is_some() {} });
    let mut berth = Berth::spawn(&dir, NO_METRICS, None, vec![]);
    berth.up().await;
    let admin = berth.admin.clone();
    let mut shims = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..PORTS {
        let listen = free_addr();
        let (shim, status) = start_shim(&shim_args(listen, target, "tcp"), &admin, vec![]);
        assert_eq!(status, "0\n");
        shims.push(shim);
        ports.push(listen);
    }
    let delegated = |admin: &Path| {
        Client::connect(admin)
            .ok()
            .and_then(|mut c| c.call(&Call::List, None).ok())
            .map_or(0, |r| {
                r.mappings.iter().filter(|m| m.owner == "docker").count()
            })
    };
    assert_eq!(delegated(&admin), PORTS);

    // The load: WORKERS clients, each connection a small checked exchange.
    let running = Arc::new(AtomicBool::new(true));
    let (ok, cut, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut load = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (running, ok, cut, refused, ports) = (
            running.clone(),
            ok.clone(),
            cut.clone(),
            refused.clone(),
            ports.clone(),
        );
        load.spawn(async move {
            let mut i = w;
            while running.load(Ordering::Relaxed) {
                let addr = ports[i % PORTS];
                i += WORKERS;
                match timeout(HANG, TcpStream::connect(addr)).await.unwrap() {
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(c) => match timeout(HANG, exchange(c, i as u64, 4096, 4096))
                        .await
                        .unwrap()
                    {
                        Ok(t) if t.received == 4096 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => cut.fetch_add(1, Ordering::Relaxed),
                    },
                };
            }
        });
    }
    let served = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let progress = |after: u64| {
        let ok = ok.clone();
        async move {
            wait_until("the load to make progress", || {
                ok.load(Ordering::Relaxed) > after + 50
            })
            .await;
        }
    };
    progress(0).await;

    // SIGKILL: the daemon's own connections may be cut; new ones go to the shims.
    berth.signal(Signal::SIGKILL);
    let _ = berth.child.wait();
    let cut_by_kill = {
        let before = served(&ok);
        progress(before).await;
        served(&cut)
    };
    berth = Berth::spawn(&dir, NO_METRICS, None, vec![]);
    berth.up().await;
    let restarted = || delegated(&admin) == PORTS;
    wait_until("the shims to hand their ports back", restarted).await;
    progress(served(&ok)).await;

    // SIGTERM: a planned stop loses nothing at all.
    berth.signal(Signal::SIGTERM);
    assert_eq!(berth.exit_code().await, Some(0));
    progress(served(&ok)).await;
    let berth = Berth::spawn(&dir, NO_METRICS, None, vec![]);
    berth.up().await;
    wait_until("the shims to hand their ports back again", restarted).await;
    progress(served(&ok)).await;
    running.store(false, Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    let (ok, cut, refused) = (served(&ok), served(&cut), served(&refused));
    eprintln!("{ok} exchanges served, {cut} cut by the SIGKILL, {refused} refused");
    assert_eq!(refused, 0, "a connection was refused");
    assert!(
        cut <= WORKERS as u64,
        "more cut than were open at the kill: {cut}"
    );
    assert_eq!(
        cut, cut_by_kill,
        "a connection failed after the SIGKILL's moment"
    );
    assert_eq!(delegated(&admin), PORTS);
    for shim in shims {
        shim.signal(Signal::SIGTERM);
        assert_eq!(shim.exited().await.code(), Some(0));
    }
    wait_until("every mapping to be removed", || delegated(&admin) == 0).await;
}

/// A mapping can be added on a port that one of berth's own connections to a target uses as
/// its local port: the kernel picks those from the ephemeral range, where `docker run -P`
/// picks host ports too. The connection and the new mapping then both work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_binds_a_port_that_a_connection_of_berth_uses() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = backend.local_addr().unwrap();
    let first = free_addr();
    let dir = Dir::new();
    let berth = Berth::spawn(
        &dir,
        &format!("{NO_METRICS}{}", mapping("first", first, target, "")),
        None,
        vec![],
    );
    berth.up().await;
    // A connection through "first": berth's leg to the backend has an ephemeral port.
    let mut client = timeout(HANG, TcpStream::connect(first))
        .await
        .unwrap()
        .unwrap();
    let (mut leg, berth_side) = timeout(HANG, backend.accept()).await.unwrap().unwrap();
    let taken = SocketAddr::from(([127, 0, 0, 1], berth_side.port()));
    let r = once(&berth.admin, &add(taken, target, false), None);
    assert!(r.ok, "a port berth's own connection uses: {}", r.message);
    // Both work: the new mapping, and the connection whose port it shares.
    let mut seen = spawn_exchange_server(backend);
    through(taken, 1, &mut seen).await;
    client.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    timeout(HANG, leg.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    drop((client, leg));
    berth.stop().await;
}
