//! UDP forwarding through real sockets: replies reach the right client from the right
//! address, datagrams keep their boundaries and sizes, flows expire and are evicted (on
//! tokio's paused clock), ICMP errors are survived, and IPv6 works in a namespace.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use berth::{
    listen,
    udp::{self, Snapshot, Stats},
};
use common::{HANG, TestNs, spawn_udp_echo, wait_until};
use tokio::{net::UdpSocket, sync::oneshot, time::timeout};

/// A running UDP mapping; stopped on drop.
struct Mapping {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Mapping {
    fn start(listen: &str, config: udp::Config) -> Self {
        let socket = listen::bind_udp(listen.parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let run = udp::run(socket, config, stats.clone(), stopped);
        let task = tokio::spawn(async move { run.await.unwrap() });
        Self {
            addr,
            stats,
            stop: Some(stop),
            task,
        }
    }

    fn to(target: SocketAddr) -> udp::Config {
        udp::Config::new(target.into())
    }

    fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        timeout(HANG, &mut self.task).await.unwrap().unwrap();
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn client(bind: &str) -> UdpSocket {
    UdpSocket::bind(bind).await.unwrap()
}

/// Sends `payload` to `to` and returns the reply and where it came from.
async fn round_trip(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    c.send_to(payload, to).await.unwrap();
    recv(c).await
}

/// Sends `payload` to `to` until the same bytes come back (once lost in a full suite run,
/// never reproduced: a second try every second, at most 30) and returns where they came
/// from. A stale reply of an earlier try is skipped; a corrupted one never matches, and the
/// test fails after the last try.
async fn echoed(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> SocketAddr {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..30 {
        c.send_to(payload, to).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(r) = tokio::time::timeout_at(deadline, c.recv_from(&mut buf)).await {
            let (n, from) = r.unwrap();
            if &buf[..n] == payload {
                return from;
            }
        }
    }
    panic!(
        "{} bytes sent to {to} never came back intact",
        payload.len()
    );
}

async fn recv(c: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = timeout(HANG, c.recv_from(&mut buf))
        .await
        .expect("no reply")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

#[tokio::test]
async fn several_clients_each_get_only_their_own_replies() {
    const CLIENTS: u32 = 16;
    const ROUNDS: u32 = 50;
    let (echo, _server) = spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let m = Mapping::start("127.0.0.1:0", Mapping::to(echo));
    let to = m.addr;
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        tasks.spawn(async move {
            let c = client("127.0.0.1:0").await;
            for round in 0..ROUNDS {
                let payload = format!("client {id} round {round}").into_bytes();
                let (reply, from) = round_trip(&c, to, &payload).await;
                assert_eq!(from, to, "reply from the wrong address");
                assert_eq!(
                    String::from_utf8_lossy(&reply),
                    String::from_utf8_lossy(&payload),
                    "client {id} got someone else's reply"
                );
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let s = m.stats();
    assert_eq!(s.flows_created, u64::from(CLIENTS), "one flow per client");
    assert_eq!(s.flows_active, u64::from(CLIENTS));
    assert_eq!(s.datagrams_to_target, u64::from(CLIENTS * ROUNDS));
    assert_eq!(s.datagrams_to_client, u64::from(CLIENTS * ROUNDS));
    assert_eq!((s.dropped, s.flows_evicted, s.flows_expired), (0, 0, 0));
    m.stop().await;
}

#[tokio::test]
async fn datagrams_arrive_whole_at_every_size() {
    let (echo, _server) = spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let m = Mapping::start("127.0.0.1:0", Mapping::to(echo));
    let c = client("127.0.0.1:0").await;
    let mut bytes = 0;
    for (k, len) in [1usize, 1472, 65_507, 0].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|i| (i * 31 + k) as u8).collect();
        let (reply, _) = round_trip(&c, m.addr, &payload).await;
        assert_eq!(reply.len(), len, "{len}-byte datagram changed size");
        assert!(reply == payload, "{len}-byte datagram corrupted");
        bytes += len as u64;
    }
    let s = m.stats();
    assert_eq!((s.bytes_to_target, s.bytes_to_client), (bytes, bytes));
    m.stop().await;
}

/// A burst that arrives faster than it is read is moved in batches (recvmmsg, then one
/// sendmmsg per client); each datagram must still keep its own boundary, size and order.
#[tokio::test]
async fn a_burst_keeps_boundaries_and_order() {
    const N: usize = 64;
    let (echo, _server) = spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    for batch in [1, 7, udp::Config::MAX_BATCH] {
        let mut config = Mapping::to(echo);
        config.batch = batch;
        let m = Mapping::start("127.0.0.1:0", config);
        let c = client("127.0.0.1:0").await;
        // 64 datagrams of 1..=1,024 bytes fit the default socket buffers, so none is lost.
        let sent: Vec<Vec<u8>> = (0..N)
            .map(|k| vec![k as u8; 1 + k * 1023 / (N - 1)])
            .collect();
        for d in &sent {
            c.send_to(d, m.addr).await.unwrap();
        }
        for (k, want) in sent.iter().enumerate() {
            let (got, _) = recv(&c).await;
            assert!(got == *want, "batch {batch}: datagram {k} differs");
        }
        m.stop().await;
    }
}

#[tokio::test]
async fn replies_leave_from_the_address_the_client_used() {
    // 127.0.0.0/8 is all local: a 0.0.0.0 listener answers on 127.0.0.2 and 127.0.0.3 too, and
    // without IP_PKTINFO the kernel would pick 127.0.0.1 as the source of every reply.
    let (echo, _server) = spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let m = Mapping::start("0.0.0.0:0", Mapping::to(echo));
    let c = client("127.0.0.1:0").await;
    for host in ["127.0.0.2", "127.0.0.3", "127.0.0.2"] {
        let to = SocketAddr::new(host.parse().unwrap(), m.addr.port());
        let (reply, from) = round_trip(&c, to, host.as_bytes()).await;
        assert_eq!(reply, host.as_bytes());
        assert_eq!(
            from, to,
            "reply must come from the address the client sent to"
        );
    }
    assert_eq!(m.stats().flows_created, 1, "one client address, one flow");
    m.stop().await;
}

#[tokio::test]
async fn an_unreachable_target_is_counted_and_survived() {
    // A port nothing listens on (a moment ago something did): datagrams draw ICMP port
    // unreachable, which the flow socket reports as ECONNREFUSED.
    let target = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let m = Mapping::start("127.0.0.1:0", Mapping::to(target));
    let c = client("127.0.0.1:0").await;
    c.send_to(b"anyone?", m.addr).await.unwrap();
    wait_until("the ICMP error to be counted", || {
        m.stats().unreachable >= 1
    })
    .await;
    c.send_to(b"still nobody?", m.addr).await.unwrap();
    wait_until("the second ICMP error", || m.stats().unreachable >= 2).await;
    // The target comes up: the same flow (and the listener) carry on.
    let (_, _server) = spawn_udp_echo(target);
    let (reply, _) = round_trip(&c, m.addr, b"now?").await;
    assert_eq!(reply, b"now?");
    let s = m.stats();
    assert_eq!(
        (s.flows_created, s.flows_active),
        (1, 1),
        "the flow survived"
    );
    m.stop().await;
}

/// Expiry on tokio's paused clock: the runtime jumps to the next timer whenever every task
/// waits, and loopback delivery is immediate, so 90 s pass at once and exactly.
#[tokio::test(start_paused = true)]
async fn idle_flows_expire_and_traffic_either_way_keeps_them() {
    const IDLE: Duration = Duration::from_secs(90);
    // The target is the test: it answers by hand, when it wants.
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let m = Mapping::start("127.0.0.1:0", Mapping::to(server.local_addr().unwrap()));
    let c = client("127.0.0.1:0").await;
    c.send_to(b"hello", m.addr).await.unwrap();
    let (_, flow) = recv(&server).await;
    tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
    assert_eq!(m.stats().flows_active, 1, "not idle long enough yet");
    // Only the target speaks now, every 60 s: each reply refreshes the flow.
    for round in 0..3u8 {
        server.send_to(&[round], flow).await.unwrap();
        assert_eq!(recv(&c).await.0, [round]);
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let s = m.stats();
    assert_eq!(
        (s.flows_active, s.flows_expired),
        (1, 0),
        "replies keep a flow alive"
    );
    tokio::time::sleep(IDLE).await;
    let s = m.stats();
    assert_eq!(
        (s.flows_active, s.flows_expired),
        (0, 1),
        "silent for 90 s: expired"
    );
    // A new datagram opens a new flow, from a new source port.
    c.send_to(b"again", m.addr).await.unwrap();
    let (_, flow2) = recv(&server).await;
    assert_ne!(flow, flow2);
    assert_eq!(m.stats().flows_created, 2);
    m.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_table_evicts_the_least_recently_used_flow() {
    let (echo, _server) = spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    let mut config = Mapping::to(echo);
    config.max_flows = 2;
    let m = Mapping::start("127.0.0.1:0", config);
    let [a, b, c] = [
        client("127.0.0.1:0").await,
        client("127.0.0.1:0").await,
        client("127.0.0.1:0").await,
    ];
    for (name, s) in [("a", &a), ("b", &b), ("c", &c)] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            round_trip(s, m.addr, name.as_bytes()).await.0,
            name.as_bytes()
        );
    }
    let s = m.stats();
    assert_eq!(
        (s.flows_active, s.flows_evicted),
        (2, 1),
        "c evicted a, the oldest"
    );
    // b is now older than c; a comes back and evicts b. Everyone is still served.
    for (name, s) in [("a", &a), ("c", &c)] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            round_trip(s, m.addr, name.as_bytes()).await.0,
            name.as_bytes()
        );
    }
    let s = m.stats();
    assert_eq!(
        (s.flows_created, s.flows_evicted),
        (4, 2),
        "a reopened, b evicted, c kept"
    );
    m.stop().await;
}

#[test]
fn ipv6_in_a_namespace_with_two_addresses() {
    let ns = TestNs::create();
    let a1: IpAddr = "fd00:be7::1".parse().unwrap();
    let a2: IpAddr = "fd00:be7::2".parse().unwrap();
    ns.add_lo_addr(a1);
    ns.add_lo_addr(a2);
    ns.ns
        .run_async(|| async move {
            let (echo, _server) = spawn_udp_echo("[::1]:0".parse().unwrap());
            let m = Mapping::start("[::]:0", Mapping::to(echo));
            let c = client("[::1]:0").await;
            for host in [a1, a2, a1] {
                let to = SocketAddr::new(host, m.addr.port());
                let from = echoed(&c, to, host.to_string().as_bytes()).await;
                assert_eq!(
                    from, to,
                    "reply must come from the address the client sent to"
                );
            }
            // The largest IPv6 datagram without jumbograms.
            let big: Vec<u8> = (0..65_527).map(|i| (i % 251) as u8).collect();
            echoed(&c, SocketAddr::new(a2, m.addr.port()), &big).await;
            m.stop().await;
        })
        .unwrap();
}

/// berth binds first, as a second berth would find it: a berth socket that allowed sharing
/// (SO_REUSEADDR / SO_REUSEPORT on both) would let the second bind succeed.
#[tokio::test]
async fn an_occupied_port_is_reported_plainly() {
    let taken = listen::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let err = listen::bind_udp(taken.local_addr().unwrap().into()).unwrap_err();
    assert!(matches!(err, listen::ListenError::InUse(_)), "{err:?}");
    assert!(err.to_string().contains("already in use"), "{err}");
}

/// A datagram that arrives before the mapping has asked for packet info (a socket bound by
/// someone else: systemd, dockerd, the runtime API) is answered from the bound address, as
/// is one that arrives right after berth bound the socket itself. Before the fix, such a
/// datagram carried stale packet info and its replies left from 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_queued_before_the_mapping_starts_are_answered_from_the_bound_address() {
    let (echo, _server) = spawn_udp_echo("127.0.0.1:0".parse().unwrap());
    // Bound as an adopter would get it: a specific loopback address, no packet info.
    let adopted = std::net::UdpSocket::bind("127.0.0.9:0").unwrap();
    // And bound as berth binds it.
    let own = berth::listen::bind_udp("127.0.0.10:0".parse().unwrap()).unwrap();
    let own = own.into_std().unwrap();
    for std_sock in [adopted, own] {
        std_sock.set_nonblocking(true).unwrap();
        let addr = std_sock.local_addr().unwrap();
        let c = client("127.0.0.1:0").await;
        // Queued before the mapping runs.
        c.send_to(b"early", addr).await.unwrap();
        let socket = UdpSocket::from_std(std_sock).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let run = udp::run(socket, Mapping::to(echo), Arc::default(), async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(run);
        let mut buf = [0u8; 64];
        for expected in [&b"early"[..], b"late"] {
            if expected == b"late" {
                c.send_to(b"late", addr).await.unwrap();
            }
            let (n, from) = timeout(HANG, c.recv_from(&mut buf)).await.unwrap().unwrap();
            assert_eq!(
                (&buf[..n], from),
                (expected, addr),
                "reply source for {addr}"
            );
        }
        let _ = stop.send(());
        timeout(HANG, task).await.unwrap().unwrap().unwrap();
    }
}

/// The flow table's policy under a source-port spray (see `udp::flows`): one address
/// sending from thousands of new ports churns through its own half of a full table, and the
/// flows of the other clients are never replaced: each keeps its flow (the target sees the
/// same source port throughout) and every one of its requests is answered.
#[tokio::test]
async fn a_client_spraying_source_ports_cannot_evict_the_other_flows() {
    // The target answers with the address it sees (the flow's own socket).
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(from.to_string().as_bytes(), from).await;
        }
    });
    let mut config = Mapping::to(target);
    config.max_flows = 32;
    let m = Mapping::start("127.0.0.1:0", config);
    let mut legit = Vec::new();
    for i in 2..6 {
        let c = client(&format!("127.0.0.{i}:0")).await;
        let seen = String::from_utf8(round_trip(&c, m.addr, b"who").await.0).unwrap();
        legit.push((c, seen));
    }
    let sprayed = 3_000;
    for n in 1..=sprayed {
        let spray = client("127.0.0.9:0").await;
        spray.send_to(b"x", m.addr).await.unwrap();
        if n % 250 == 0 {
            for (c, seen) in &legit {
                let now = String::from_utf8(round_trip(c, m.addr, b"who").await.0).unwrap();
                assert_eq!(
                    &now, seen,
                    "a legitimate flow was replaced after {n} sprays"
                );
            }
        }
    }
    // Some sprayed datagrams may overflow the socket's buffer; most make a flow.
    let s = m.stats();
    assert!(
        s.flows_evicted > sprayed / 2,
        "the sprayer churned through the table: {s:?}"
    );
    assert_eq!(s.flows_active, 32);
    m.stop().await;
}

/// A client's segmented bursts (UDP_SEGMENT) reach a container behind a bridge datagram by
/// datagram, in order, both ways; a segment size the container's link (MTU 1500) cannot
/// take is refused by the path, counted, and sent again one datagram at a time: nothing lost.
#[test]
fn segmented_bursts_arrive_datagram_by_datagram_and_a_refused_size_goes_one_by_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = rt.block_on(common::lab::Lab::up(1));
    let server = rt.block_on(async { lab.udp_server(0) });
    let _keep_serving = rt.enter();
    lab.host
        .ns
        .run_async(|| async move {
            let m = Mapping::start("127.0.0.1:0", Mapping::to(server));
            let c = client("127.0.0.1:0").await;
            c.connect(m.addr).await.unwrap();
            let mut expected = Snapshot::default();
            for (segment, count) in [(1000usize, 20usize), (4000, 5)] {
                nix::sys::socket::setsockopt(
                    &c,
                    nix::sys::socket::sockopt::UdpGsoSegment,
                    &i32::try_from(segment).unwrap(),
                )
                .unwrap();
                let burst: Vec<u8> = (0..segment * count)
                    .map(|i| ((i / segment) * 7 + i % 251) as u8)
                    .collect();
                assert_eq!(c.send(&burst).await.unwrap(), burst.len());
                let mut buf = vec![0u8; 65_536];
                for (k, datagram) in burst.chunks(segment).enumerate() {
                    let n = timeout(HANG, c.recv(&mut buf)).await.unwrap().unwrap();
                    assert!(
                        buf[..n].starts_with(datagram) && buf[segment..n].starts_with(b" from "),
                        "reply {k} of the {segment} B burst is not its datagram's echo ({n} B)"
                    );
                }
                expected.datagrams_to_target += count as u64;
                expected.datagrams_to_client += count as u64;
            }
            let s = m.stats();
            assert_eq!(
                (s.datagrams_to_target, s.datagrams_to_client, s.dropped),
                (
                    expected.datagrams_to_target,
                    expected.datagrams_to_client,
                    0
                )
            );
            assert!(
                s.offload_refused >= 1,
                "4,000 B segments cannot cross a 1,500 B link: {s:?}"
            );
            m.stop().await;
        })
        .unwrap();
    drop(lab);
}
