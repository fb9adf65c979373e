//! Shared helpers for berth's privileged integration tests: a root check, unique names, a
//! topology guard that always tears down, servers inside container namespaces, and a
//! checksummed traffic generator.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use berth::net::{self, ContainerSpec, NetNs, Topology};
use rand::{Rng as _, RngCore as _, SeedableRng as _, rngs::SmallRng};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Hang guard for single network operations. A test that hits it has failed; it is never
/// used to wait for something to happen.
pub const HANG: Duration = Duration::from_secs(60);

/// Panics with a clear message unless the test runs as root: these tests create namespaces,
/// bridges and BPF programs, and must never pass silently without doing so.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "this test needs root (network namespaces, bridges, BPF); run the suite with `sudo -E cargo xtask test`"
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `<prefix><pid>x<n>` (pid_max is 32768 here,
/// so with a 2-byte prefix it stays within 12 bytes and leaves room for the `ve-` veth prefix).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id());
    assert!(name.len() <= 12, "test name {name} too long");
    name
}

/// A /24 of 198.18.0.0/15 (the range RFC 2544 sets aside for benchmark tests) of this
/// process and call: `198.18.0.0/24`-style text and the first three octets. Every test that
/// needs a bridge subnet takes one here, so that none overlaps another's.
pub fn unique_subnet() -> (String, [u8; 3]) {
    let idx = (std::process::id() * 8 + COUNTER.fetch_add(1, Ordering::Relaxed)) % 512;
    let octets = [198, (18 + idx / 256) as u8, (idx % 256) as u8];
    (
        format!("{}.{}.{}.0/24", octets[0], octets[1], octets[2]),
        octets,
    )
}

/// A topology in the root namespace with its own bridge and a /24 of 198.18.0.0/15 (the
/// range RFC 2544 sets aside for benchmark tests), torn down on drop even when a test fails.
pub struct TestNet {
    pub topo: Topology,
}

impl TestNet {
    pub async fn up(containers: usize) -> Self {
        require_root();
        let bridge = unique("tb");
        let (subnet, _) = unique_subnet();
        let specs: Vec<ContainerSpec> = (0..containers)
            .map(|_| ContainerSpec {
                name: unique("tc"),
                addr: None,
            })
            .collect();
        let topo = Topology::resolve(Some(&bridge), Some(&subnet), None, &specs).unwrap();
        net::up(&topo).await.unwrap();
        Self { topo }
    }

    pub fn ns(&self, i: usize) -> NetNs {
        NetNs::named(&self.topo.containers[i].name)
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.topo.containers[i].addr
    }

    /// A listener on `container i`'s address, created inside its namespace.
    pub fn listen(&self, i: usize) -> TcpListener {
        let addr = SocketAddr::from((self.ip(i), 0));
        let std = self
            .ns(i)
            .run(|| std::net::TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        std.set_nonblocking(true).unwrap();
        TcpListener::from_std(std).unwrap()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        tear_down(&self.topo, None);
    }
}

/// Removes `topo` (`berth net down`), inside `ns` if given, from a thread of its own: Drop
/// may run inside a runtime. Failures are reported, never raised (a test is already over).
pub fn tear_down(topo: &Topology, ns: Option<NetNs>) {
    let bridge = topo.bridge.clone();
    let names: Vec<String> = topo.containers.iter().map(|c| c.name.clone()).collect();
    let torn = std::thread::spawn(move || match ns {
        Some(ns) => ns
            .run_async(|| net::down(&bridge, &names))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string()),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(net::down(&bridge, &names))
            .map_err(|e| e.to_string()),
    })
    .join();
    match torn {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("warning: teardown of {} failed: {e}", topo.bridge),
        Err(_) => eprintln!("warning: teardown of {} panicked", topo.bridge),
    }
}

// === Checksummed traffic ===

/// What one side of a connection sent and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub sent_sha: [u8; 32],
    pub received: u64,
    pub received_sha: [u8; 32],
}

/// Writes `len` pseudo-random bytes from `seed`, hashing them; then shuts down writing.
pub async fn send_random(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    len: u64,
    seed: u64,
) -> std::io::Result<[u8; 32]> {
    send_random_counted(w, len, seed, &AtomicU64::new(0)).await
}

/// [`send_random`], adding to `sent` what each write has handed to the kernel.
pub async fn send_random_counted(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    len: u64,
    seed: u64,
    sent: &AtomicU64,
) -> std::io::Result<[u8; 32]> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sha = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap();
        rng.fill_bytes(&mut buf[..n]);
        sha.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        sent.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(sha.finalize().into())
}

/// Reads until EOF, hashing.
pub async fn recv_all(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<(u64, [u8; 32])> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sha = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, sha.finalize().into()));
        }
        sha.update(&buf[..n]);
        total += n as u64;
    }
}

/// Client side: sends a 16-byte header (a connection id, and how much the server should send
/// back), then `up` random bytes, half-closes, and reads the server's bytes until EOF. Both
/// directions run at once, so neither side can deadlock on full buffers.
pub async fn exchange(stream: TcpStream, id: u64, up: u64, down: u64) -> std::io::Result<Tally> {
    let (mut r, mut w) = stream.into_split();
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&id.to_be_bytes());
    header[8..].copy_from_slice(&down.to_be_bytes());
    w.write_all(&header).await?;
    let seed = id ^ 0x00c1_1e47;
    let (sent_sha, (received, received_sha)) =
        tokio::try_join!(send_random(&mut w, up, seed), recv_all(&mut r))?;
    Ok(Tally {
        sent: up,
        sent_sha,
        received,
        received_sha,
    })
}

/// Server side of [`exchange`]: reads the header, then sends that many random bytes and
/// half-closes while reading the client's bytes until EOF. Returns the connection id too.
pub async fn serve_exchange(stream: TcpStream) -> std::io::Result<(u64, Tally)> {
    let (mut r, mut w) = stream.into_split();
    let mut header = [0u8; 16];
    r.read_exact(&mut header).await?;
    let id = u64::from_be_bytes(header[..8].try_into().unwrap());
    let down = u64::from_be_bytes(header[8..].try_into().unwrap());
    let seed = id ^ 0x005e_77e7;
    let (sent_sha, (received, received_sha)) =
        tokio::try_join!(send_random(&mut w, down, seed), recv_all(&mut r))?;
    Ok((
        id,
        Tally {
            sent: down,
            sent_sha,
            received,
            received_sha,
        },
    ))
}

/// Accepts connections until the listener fails, answering each with [`serve_exchange`] and
/// reporting the server-side tallies.
pub fn spawn_exchange_server(
    listener: TcpListener,
) -> tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>> {
    // No gate: a dropped sender lets every connection through.
    spawn_gated_exchange_server(listener).0
}

/// [`spawn_exchange_server`] whose connections wait at a gate (`false`: closed) before they
/// read or send a byte: a test closes it to keep transfers open across an event (a reload, a
/// signal), then opens it. It starts closed.
pub fn spawn_gated_exchange_server(
    listener: TcpListener,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>,
    tokio::sync::watch::Sender<bool>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, mut gate) = (tx.clone(), gate_rx.clone());
            tokio::spawn(async move {
                let _ = gate.wait_for(|open| *open).await;
                let _ = tx.send(serve_exchange(stream).await);
            });
        }
    });
    (rx, gate)
}

/// The server's half of transfer `id` from a [`spawn_exchange_server`] channel, checked
/// against the client's half (the test's only transfer in flight: the ids must match).
pub async fn assert_served(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>,
    id: u64,
    client: &Tally,
) {
    let (sid, server) = tokio::time::timeout(HANG, seen.recv())
        .await
        .unwrap_or_else(|_| panic!("transfer {id}: the server never finished"))
        .expect("the exchange server is gone")
        .unwrap_or_else(|e| panic!("transfer {id}, server side: {e}"));
    assert_eq!(sid, id, "another transfer finished first");
    assert_mirrored(id, client, &server);
}

/// The server halves of the transfers `clients` (in any order: servers finish in their own),
/// each checked against its client's half.
pub async fn assert_all_served(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>,
    clients: &[(u64, Tally)],
) {
    let mut servers = std::collections::HashMap::new();
    for _ in clients {
        let (id, tally) = tokio::time::timeout(HANG, seen.recv())
            .await
            .expect("a server never finished")
            .expect("the exchange server is gone")
            .unwrap_or_else(|e| panic!("a transfer's server side: {e}"));
        servers.insert(id, tally);
    }
    for (id, client) in clients {
        let server = servers
            .get(id)
            .unwrap_or_else(|| panic!("transfer {id}: no server side"));
        assert_mirrored(*id, client, server);
    }
}

/// Checks that each side received exactly what the other sent, byte count and SHA-256.
pub fn assert_mirrored(id: u64, client: &Tally, server: &Tally) {
    assert_eq!(
        client.sent, server.received,
        "conn {id}: upload length differs"
    );
    assert_eq!(
        client.sent_sha, server.received_sha,
        "conn {id}: upload SHA-256 differs"
    );
    assert_eq!(
        server.sent, client.received,
        "conn {id}: download length differs"
    );
    assert_eq!(
        server.sent_sha, client.received_sha,
        "conn {id}: download SHA-256 differs"
    );
}

/// Sizes for `n` connections: log-uniform from 0 to `max`, with 0, 1 and `max` always present,
/// Runs one checksummed [`exchange`] per `(up, down)` pair through `addr`, all at once, and
/// checks each against what the exchange server behind it reported on `tallies`.
pub async fn exchanges_at_once(
    addr: SocketAddr,
    sizes: Vec<(u64, u64)>,
    tallies: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>,
) {
    let n = sizes.len();
    let mut clients = tokio::task::JoinSet::new();
    for (id, (up, down)) in (0u64..).zip(sizes) {
        clients.spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            (id, exchange(s, id, up, down).await.unwrap())
        });
    }
    let mut client_side = std::collections::HashMap::new();
    while let Some(r) = tokio::time::timeout(HANG * 5, clients.join_next())
        .await
        .unwrap()
    {
        let (id, tally) = r.unwrap();
        client_side.insert(id, tally);
    }
    for _ in 0..n {
        let (id, server) = tokio::time::timeout(HANG, tallies.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_mirrored(id, &client_side[&id], &server);
    }
}

/// Reads until the connection fails, which must be a reset, never a clean EOF.
pub async fn expect_reset(s: &mut TcpStream, who: &str) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(HANG, s.read(&mut buf)).await.unwrap() {
            Ok(0) => panic!("{who}: clean EOF instead of a reset"),
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{who}: {e}");
                return;
            }
        }
    }
}

/// so that tiny, medium and large transfers all occur.
pub fn random_sizes(n: usize, max: u64, rng: &mut impl rand::Rng) -> Vec<u64> {
    let mut sizes: Vec<u64> = (0..n)
        .map(|_| {
            let bits = rng.random_range(0.0..(max as f64).log2());
            2f64.powf(bits) as u64
        })
        .collect();
    for (slot, fixed) in sizes.iter_mut().zip([0, 1, max]) {
        *slot = fixed;
    }
    sizes
}

pub fn rng() -> SmallRng {
    let seed: u64 = rand::rng().random();
    eprintln!("rng seed {seed:#x}");
    SmallRng::seed_from_u64(seed)
}

pub mod bpf;
pub mod daemon;
pub mod lab;

// === Spawned processes ===

/// A spawned process that is killed (and reaped) when the guard goes, so that a failing
/// test never leaves it running; every wait has a deadline.
pub struct Guard(pub std::process::Child);

impl Guard {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    pub fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), s).unwrap();
    }

    /// Waits (at most [`HANG`]) for the process to exit, without blocking the runtime.
    pub async fn exited(mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process {} did not exit",
                self.0.id()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The same for synchronous tests.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + HANG;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {} did not exit",
                self.0.id()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A finished command's stdout and stderr, one after the other, and whether it succeeded.
pub fn outcome(out: &std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Tasks (servers inside a container, say) aborted when the test drops them, so that a
/// container can be stopped and started again with fresh ones.
pub struct Tasks(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

// === Bare namespaces ===

/// A network namespace of its own with only `lo` (up), deleted on drop even when a test fails.
pub struct TestNs {
    pub ns: NetNs,
}

impl TestNs {
    pub fn create() -> Self {
        require_root();
        let ns = NetNs::create(&unique("tn")).unwrap();
        let guard = Self { ns };
        guard
            .ns
            .run_async(|| async {
                let nl = net::Netlink::connect().unwrap();
                nl.set_up("lo").await.unwrap();
            })
            .unwrap();
        guard
    }

    /// A TCP port free in this namespace a moment ago (nothing else runs there).
    pub fn free_port(&self) -> u16 {
        self.ns
            .run(|| {
                std::net::TcpListener::bind("0.0.0.0:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .unwrap()
    }

    /// Moves this namespace's ephemeral ports (those the kernel picks for connect and bind
    /// to port 0) to 40000-60999, so that [`TestNs::fixed_port`]'s are never taken by an
    /// outgoing connection between the moment it is picked and the moment it is bound.
    pub fn narrow_ephemeral_ports(&self) {
        self.ns
            .run(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 60999"))
            .unwrap()
            .unwrap();
    }

    /// A TCP and UDP port under 40000 free in this namespace now, for something that binds
    /// it later and more than once (see [`TestNs::narrow_ephemeral_ports`]).
    pub fn fixed_port(&self) -> u16 {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        self.ns
            .run(|| {
                loop {
                    let n = NEXT.fetch_add(1, Ordering::Relaxed);
                    let port = 20_000 + ((std::process::id() * 7 + n * 13) % 20_000) as u16;
                    if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
                        && std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok()
                    {
                        return port;
                    }
                }
            })
            .unwrap()
    }

    /// A UDP socket of this namespace, on any port (one source port for its life).
    pub fn udp(&self) -> tokio::net::UdpSocket {
        udp_socket_in(&self.ns)
    }

    /// Adds `addr` (a host address, /32 or /128) to this namespace's `lo`.
    pub fn add_lo_addr(&self, addr: std::net::IpAddr) {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        self.ns
            .run_async(|| async move {
                let nl = net::Netlink::connect().unwrap();
                nl.add_addr("lo", addr, prefix).await.unwrap();
            })
            .unwrap();
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if let Err(e) = self.ns.delete() {
            eprintln!("warning: cannot delete namespace {}: {e}", self.ns.name());
        }
    }
}

/// The host side of the link to an external client: `ext0` in the test's host namespace.
pub const EXT_HOST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 0, 1);
/// The external client: `eth0` in its own namespace, routed through [`EXT_HOST`].
pub const EXT_CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 0, 2);

/// Links `ext` to `host` with a veth pair (`ext0` ⇄ `eth0`), so that `ext` is a remote
/// client of `host` at [`EXT_HOST`], with its default route there.
pub async fn link_external(host: &TestNs, ext: &TestNs) {
    link_external_as(host, ext, "ext0", EXT_HOST, EXT_CLIENT).await;
}

/// [`link_external`] with the host side named `host_if` (in the host namespace), `host_ip`
/// on it and `client_ip` on the client's `eth0`.
pub async fn link_external_as(
    host: &TestNs,
    ext: &TestNs,
    host_if: &'static str,
    host_ip: std::net::Ipv4Addr,
    client_ip: std::net::Ipv4Addr,
) {
    let (host_ns, ext_ns) = (host.ns.clone(), ext.ns.clone());
    tokio::task::spawn_blocking(move || {
        let ext_fd = ext_ns.open().unwrap();
        host_ns
            .run_async(|| async move {
                let nl = net::Netlink::connect().unwrap();
                nl.add_veth(&host_if.parse().unwrap(), &"extp".parse().unwrap())
                    .await
                    .unwrap();
                nl.add_addr(host_if, host_ip.into(), 24).await.unwrap();
                nl.set_up(host_if).await.unwrap();
                nl.move_to_ns("extp", &ext_fd).await.unwrap();
            })
            .unwrap();
        ext_ns
            .run_async(|| async move {
                let nl = net::Netlink::connect().unwrap();
                nl.rename("extp", "eth0").await.unwrap();
                nl.add_addr("eth0", client_ip.into(), 24).await.unwrap();
                nl.set_up("eth0").await.unwrap();
                nl.add_default_route(host_ip).await.unwrap();
            })
            .unwrap();
    })
    .await
    .unwrap();
}

/// Runs `f` on a thread inside the network namespace of process `pid` (a container's).
pub fn in_netns<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsFd as _;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// A TCP socket of namespace `ns` for `addr`'s family, created inside `cgroup` if given (so
/// that kernel mode's local programs see it as the cgroup's).
pub fn tcp_socket_in(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    addr: SocketAddr,
) -> tokio::net::TcpSocket {
    let make = || {
        if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6().unwrap()
        } else {
            tokio::net::TcpSocket::new_v4().unwrap()
        }
    };
    ns.run(|| match cgroup {
        Some(c) => c.run(make),
        None => make(),
    })
    .unwrap()
}

/// A UDP socket bound to `0.0.0.0:0` in namespace `ns`.
pub fn udp_socket_in(ns: &NetNs) -> tokio::net::UdpSocket {
    let sock = ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
        .unwrap();
    sock.set_nonblocking(true).unwrap();
    tokio::net::UdpSocket::from_std(sock).unwrap()
}

/// Connects `sock` to `addr` and reads until EOF (a server that answers and closes).
pub async fn answer(sock: tokio::net::TcpSocket, addr: SocketAddr) -> String {
    let mut s = tokio::time::timeout(HANG, sock.connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connect {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut text = String::new();
    tokio::time::timeout(HANG, s.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    text
}

/// Sends a datagram to `to` until an answer comes (a datagram may be lost; at most 50 tries,
/// 200 ms apart) and returns it with where it came from.
pub async fn udp_ask(sock: &tokio::net::UdpSocket, to: SocketAddr) -> (String, SocketAddr) {
    let mut buf = [0u8; 512];
    for _ in 0..50 {
        sock.send_to(b"ping", to).await.unwrap();
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
        {
            let (n, from) = r.unwrap();
            return (String::from_utf8_lossy(&buf[..n]).into_owned(), from);
        }
    }
    panic!("no answer from {to}");
}

// === A child cgroup, for kernel mode's local programs ===

/// A child of the cgroup v2 root, removed on drop.
pub struct TestCgroup(pub std::path::PathBuf);

impl TestCgroup {
    pub fn create() -> Self {
        let root = berth::dnat::cgroup2_root().expect("no cgroup v2 mount");
        let path = root.join(format!("berth-test-{}", unique("cg")));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    /// Runs `f` with this process in the cgroup: sockets it creates belong to the cgroup for
    /// life. Serialised, since the whole process moves.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("not in a cgroup v2 hierarchy")
            .trim_start_matches('/')
            .to_owned();
        let root = self.0.parent().unwrap();
        let pid = std::process::id().to_string();
        std::fs::write(self.0.join("cgroup.procs"), &pid).unwrap();
        let out = f();
        std::fs::write(root.join(rel).join("cgroup.procs"), &pid).unwrap();
        out
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

// === UDP ===

/// A UDP echo server on `addr`: every datagram goes back to its sender unchanged.
pub fn spawn_udp_echo(addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let std = std::net::UdpSocket::bind(addr).unwrap();
    std.set_nonblocking(true).unwrap();
    let sock = tokio::net::UdpSocket::from_std(std).unwrap();
    let local = sock.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if sock.send_to(&buf[..n], from).await.is_err() {
                break;
            }
        }
    });
    (local, task)
}

/// Polls `cond` until it holds; panics after [`HANG`]. For state another task updates with no
/// event to await (a counter), never as a fixed delay.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until a TCP socket of this network namespace listens on `addr`: a child's
/// readiness without connecting to it and without reading its log.
/// The lines of a child's stdout or stderr, read on a thread of their own so that the child
/// never blocks on a full pipe.
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

/// Waits until nothing listens on TCP `addr` (a drain has closed the listener). Probed by
/// binding the address, so that no probe is ever accepted and relayed.
pub async fn wait_closed(addr: SocketAddr) {
    wait_until("the listener to close", || {
        let domain = socket2::Domain::for_address(addr);
        let probe = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        probe.set_reuse_address(true).unwrap();
        probe.bind(&addr.into()).is_ok()
    })
    .await;
}

pub async fn wait_listening(addr: SocketAddr) {
    wait_socket(addr, "tcp", "0A").await;
}

/// Waits until a UDP socket of this network namespace is bound to `addr`.
pub async fn wait_udp_bound(addr: SocketAddr) {
    wait_socket(addr, "udp", "07").await;
}

/// Polls /proc/thread-self/net/{proto}{,6} for a socket on `addr` in `state` (hex, as the
/// kernel shows it): the calling thread's network namespace, which a test may have entered.
async fn wait_socket(addr: SocketAddr, proto: &str, state: &str) {
    let (file, hex) = match addr {
        SocketAddr::V4(a) => (
            format!("/proc/thread-self/net/{proto}"),
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let words: String = a
                .ip()
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            (
                format!("/proc/thread-self/net/{proto}6"),
                format!("{words}:{:04X}", a.port()),
            )
        }
    };
    wait_until(&format!("a {proto} socket on {addr}"), || {
        std::fs::read_to_string(&file).is_ok_and(|t| {
            t.lines().any(|l| {
                let mut f = l.split_whitespace();
                f.nth(1) == Some(hex.as_str()) && f.nth(1) == Some(state)
            })
        })
    })
    .await;
}

// === Passing descriptors to a child ===

/// Makes the child of `cmd` start with each `(from, to)` descriptor of ours at number `to`
/// (fd 3 for a status pipe, fd 3.. for systemd's sockets, fd 4 for docker's listener).
/// The caller keeps `from` open until spawn and closes its copies after.
pub fn place_fds(
    cmd: &mut std::process::Command,
    fds: Vec<(std::os::fd::RawFd, std::os::fd::RawFd)>,
) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: dup2 and fcntl are async-signal-safe and only touch the child's fd table.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &fds {
                if from == to {
                    // dup2 onto itself keeps O_CLOEXEC: clear it instead.
                    libc::fcntl(to, libc::F_SETFD, 0);
                } else if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A `berth forward` proxy running in this process; stops (and drains) when stopped, and is
/// aborted when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Binds `listen` (port 0 picks a free one) and relays by `config`.
    pub fn start(listen: &str, config: berth::forward::Config) -> Self {
        let listener = berth::listen::bind_tcp(listen.parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            berth::forward::run(listener, config, async {
                stopped.await.ok();
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Stops accepting, lets the open connections drain and waits for the proxy to end.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(HANG, &mut self.task)
            .await
            .expect("proxy did not stop")
            .unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
