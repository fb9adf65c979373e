//! `berth forward` in-process: a proxy in the root namespace relaying to servers inside
//! container namespaces, checked with SHA-256 in both directions, half-close, resets,
//! refused and dying backends, the connection limit and IPv6.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use berth::{
    addr::{ListenAddr, TargetAddr},
    forward::{self, Config},
    listen::{self, ListenError},
    relay::Mode,
};
use common::{
    HANG, Proxy, TestNet, assert_mirrored, exchange, random_sizes, rng, spawn_exchange_server,
};
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// A proxy to `target` on a free loopback port.
fn proxy_to(target: SocketAddr, mode: Mode) -> Proxy {
    let mut config = Config::new(TargetAddr(target));
    config.pump = mode.into();
    Proxy::start("127.0.0.1:0", config)
}

/// 64 concurrent connections, random sizes up to 64 MiB each way, checksummed both ways.
async fn integrity(mode: Mode) {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let target = listener.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(listener);
    let proxy = proxy_to(target, mode);

    let mut rng = rng();
    let ups = random_sizes(64, 64 << 20, &mut rng);
    let mut downs = random_sizes(64, 64 << 20, &mut rng);
    downs.reverse();
    let mut clients = tokio::task::JoinSet::new();
    for (id, (up, down)) in (0u64..).zip(ups.into_iter().zip(downs)) {
        let addr = proxy.addr;
        clients.spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            (id, exchange(stream, id, up, down).await.unwrap())
        });
    }
    let mut client_side = HashMap::new();
    while let Some(r) = timeout(HANG * 5, clients.join_next())
        .await
        .expect("clients hung")
    {
        let (id, tally) = r.unwrap();
        client_side.insert(id, tally);
    }
    for _ in 0..64 {
        let (id, server) = timeout(HANG, tallies.recv())
            .await
            .expect("server hung")
            .unwrap()
            .unwrap();
        assert_mirrored(id, &client_side[&id], &server);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_integrity_64_connections_copy() {
    integrity(Mode::Copy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_integrity_64_connections_splice() {
    integrity(Mode::Splice).await;
}

/// The client half-closes after its request and still receives the whole response, which
/// the server only starts sending after it saw the client's EOF.
async fn half_close_client_first(mode: Mode) {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = proxy_to(listener.local_addr().unwrap(), mode);
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        let response = request.repeat(1000);
        s.write_all(&response).await.unwrap();
        s.shutdown().await.unwrap();
        request
    });
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"request-before-eof").await.unwrap();
    c.shutdown().await.unwrap();
    let mut response = Vec::new();
    timeout(HANG, c.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.await.unwrap(), b"request-before-eof");
    assert_eq!(response, b"request-before-eof".repeat(1000));
}

/// The server sends everything and half-closes first; the client sees EOF after all the
/// data, and can still send to the server afterwards.
async fn half_close_server_first(mode: Mode) {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = proxy_to(listener.local_addr().unwrap(), mode);
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&payload).await.unwrap();
        s.shutdown().await.unwrap();
        let mut late = Vec::new();
        s.read_to_end(&mut late).await.unwrap();
        late
    });
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut got = Vec::new();
    timeout(HANG, c.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "payload corrupted");
    c.write_all(b"sent after the server's EOF").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(
        timeout(HANG, server).await.unwrap().unwrap(),
        b"sent after the server's EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways_copy() {
    half_close_client_first(Mode::Copy).await;
    half_close_server_first(Mode::Copy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways_splice() {
    half_close_client_first(Mode::Splice).await;
    half_close_server_first(Mode::Splice).await;
}

/// A reply that the server's close follows at once reaches the client in one segment, the
/// FIN with the last bytes (a segment, its softirq and its ACK less per connection); a close
/// that comes later still comes on its own, after everything.
async fn fin_leaves_with_the_last_bytes(mode: Mode) {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let proxy = proxy_to(listener.local_addr().unwrap(), mode);
    let (later, close_later) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let mut request = [0u8; 64];
        // Answers and closes at once: the reply and the FIN reach berth together.
        let (mut s, _) = listener.accept().await.unwrap();
        s.read_exact(&mut request).await.unwrap();
        SockRef::from(&s)
            .send_with_flags(&request, libc::MSG_MORE)
            .unwrap();
        s.shutdown().await.unwrap();
        // Closes once the client has the reply.
        let (mut s, _) = listener.accept().await.unwrap();
        s.read_exact(&mut request).await.unwrap();
        s.write_all(&request).await.unwrap();
        close_later.await.unwrap();
        s.shutdown().await.unwrap();
        s
    });
    let mut together = TcpStream::connect(proxy.addr).await.unwrap();
    together.write_all(&[7; 64]).await.unwrap();
    assert_eq!(read_until_end(&mut together).await.unwrap(), 64);

    let mut apart = TcpStream::connect(proxy.addr).await.unwrap();
    apart.write_all(&[8; 64]).await.unwrap();
    let mut reply = [0u8; 64];
    timeout(HANG, apart.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, [8; 64]);
    later.send(()).unwrap();
    assert_eq!(read_until_end(&mut apart).await.unwrap(), 0);
    let _server_side = timeout(HANG, server).await.unwrap().unwrap();

    // Both saw the same handshake and the same ACK of their request; only the FIN differs.
    assert_eq!(
        segments_in(&together) + 1,
        segments_in(&apart),
        "{mode}: the FIN after a reply should leave in the reply's segment"
    );
}

/// Segments `s` has received (TCP_INFO).
fn segments_in(s: &TcpStream) -> u32 {
    berth::sys::tcp_info(s).expect("TCP_INFO").tcpi_segs_in
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_leaves_with_the_last_bytes_copy_and_splice() {
    fin_leaves_with_the_last_bytes(Mode::Copy).await;
    fin_leaves_with_the_last_bytes(Mode::Splice).await;
}

/// Reads until the connection ends and returns how it ended.
async fn read_until_end(c: &mut TcpStream) -> std::io::Result<usize> {
    let mut sink = Vec::new();
    timeout(HANG, c.read_to_end(&mut sink))
        .await
        .expect("client connection hung")
}

/// The connection must have ended with a reset, not a clean EOF or a hang.
fn assert_reset(err: &std::io::Error, mode: Mode) {
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{mode}: {err}"
    );
}

/// Connects and reads until the end. The proxy can reset the client before tokio's
/// `connect()` returns (it then reports SO_ERROR), so a reset may surface at either step.
async fn connect_and_read_until_end(addr: SocketAddr) -> std::io::Result<usize> {
    let mut c = timeout(HANG, TcpStream::connect(addr))
        .await
        .expect("connect hung")?;
    read_until_end(&mut c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_target_closes_client_at_once() {
    let net = TestNet::up(1).await;
    // A port in the container with nothing listening: the container's kernel answers RST.
    let closed = net.listen(0).local_addr().unwrap();
    for mode in Mode::ALL {
        let proxy = proxy_to(closed, mode);
        let err = connect_and_read_until_end(proxy.addr)
            .await
            .expect_err("client should see the refusal as a reset");
        assert_reset(&err, mode);
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_stream_resets_client() {
    let net = TestNet::up(1).await;
    for mode in Mode::ALL {
        let listener = net.listen(0);
        let proxy = proxy_to(listener.local_addr().unwrap(), mode);
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&[7u8; 100_000]).await.unwrap();
            // Die abruptly: RST instead of FIN.
            SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        });
        let client = tokio::spawn(connect_and_read_until_end(proxy.addr));
        server.await.unwrap();
        let err = client
            .await
            .unwrap()
            .expect_err("a dead backend must not look like a clean EOF");
        assert_reset(&err, mode);
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_aborts_backend() {
    let net = TestNet::up(1).await;
    for mode in Mode::ALL {
        let listener = net.listen(0);
        let proxy = proxy_to(listener.local_addr().unwrap(), mode);
        let c = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        let err = read_until_end(&mut s)
            .await
            .expect_err("backend should see the client's reset");
        assert_reset(&err, mode);
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_resets_excess_clients() {
    let net = TestNet::up(1).await;
    let listener = net.listen(0);
    let mut config = Config::new(TargetAddr(listener.local_addr().unwrap()));
    config.max_connections = 1;
    let proxy = Proxy::start("127.0.0.1:0", config);

    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut backend, _) = listener.accept().await.unwrap();
    first.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    backend.read_exact(&mut one).await.unwrap(); // the first connection is established end to end

    let err = connect_and_read_until_end(proxy.addr)
        .await
        .expect_err("over the limit: reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

    drop(first);
    drop(backend);
    // The slot frees when the first relay ends; a new client then gets through.
    // The slot frees once the first relay has ended. A client racing that is reset; retry
    // (bounded) until one is admitted, which the backend accepting it proves.
    let mut admitted = false;
    for _ in 0..1000 {
        let Ok(mut c) = TcpStream::connect(proxy.addr).await else {
            continue;
        };
        let _ = c.write_all(b"y").await;
        let mut probe = [0u8; 1];
        tokio::select! {
            accepted = listener.accept() => {
                let (mut b, _) = accepted.unwrap();
                timeout(HANG, b.read_exact(&mut one)).await.unwrap().unwrap();
                assert_eq!(&one, b"y");
                admitted = true;
                break;
            }
            r = c.read(&mut probe) => assert!(!matches!(r, Ok(n) if n > 0), "refused client got data"),
        }
    }
    assert!(
        admitted,
        "a client should be admitted once the first connection closed"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_forwarding() {
    common::require_root();
    let target = TcpListener::bind("[::1]:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let mut tallies = spawn_exchange_server(target);
    for mode in Mode::ALL {
        let mut config = Config::new(TargetAddr(target_addr));
        config.pump = mode.into();
        let proxy = Proxy::start("[::1]:0", config);
        assert!(proxy.addr.is_ipv6());
        let c = TcpStream::connect(proxy.addr).await.unwrap();
        let id = mode as u64;
        let client = exchange(c, id, 5 << 20, 3 << 20).await.unwrap();
        let (sid, server) = tallies.recv().await.unwrap().unwrap();
        assert_eq!(sid, id);
        assert_mirrored(id, &client, &server);
        proxy.stop().await;
    }
}

/// berth binds first, as a second berth would find it: a listener that allowed sharing
/// (SO_REUSEPORT on both) would let the second bind succeed.
#[tokio::test]
async fn occupied_port_is_a_clear_error() {
    let taken = listen::bind_tcp(ListenAddr("127.0.0.1:0".parse().unwrap())).unwrap();
    let addr = ListenAddr(taken.local_addr().unwrap());
    let err = listen::bind_tcp(addr).unwrap_err();
    assert!(matches!(err, ListenError::InUse(_)), "{err:?}");
    assert!(err.to_string().contains("already in use"), "{err}");
}

/// Connected loopback pair: (the end a relay holds, the end a peer uses).
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    (b.unwrap().0, a.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_returns_exact_byte_counts() {
    for mode in Mode::ALL {
        let ((client_side, mut client), (target_side, mut target)) = (pair().await, pair().await);
        let relay = tokio::spawn(async move {
            let meter = berth::relay::Meter::default();
            berth::relay::relay(&client_side, &target_side, mode, &meter).await
        });
        let up = vec![1u8; 1_234_567];
        let down = vec![2u8; 765_432];
        let (u, d) = (up.clone(), down.clone());
        let (got_down, got_up) = tokio::join!(
            async move {
                client.write_all(&u).await.unwrap();
                client.shutdown().await.unwrap();
                let mut v = Vec::new();
                client.read_to_end(&mut v).await.unwrap();
                v
            },
            async move {
                target.write_all(&d).await.unwrap();
                target.shutdown().await.unwrap();
                let mut v = Vec::new();
                target.read_to_end(&mut v).await.unwrap();
                v
            }
        );
        assert!(got_up == up && got_down == down, "{mode}: payload mismatch");
        let t = timeout(HANG, relay).await.unwrap().unwrap().unwrap();
        assert_eq!((t.to_target, t.to_client), (1_234_567, 765_432), "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_target_times_out_and_the_client_is_reset() {
    let net = TestNet::up(1).await;
    // An address on the bridge's subnet that nobody answers ARP for: the kernel holds the
    // SYN for seconds of ARP retries, so a 300 ms connect timeout must fire first.
    let silent = SocketAddr::from((
        std::net::Ipv4Addr::from(u32::from(net.topo.gateway) - 4),
        80,
    ));
    let err = forward::connect(TargetAddr(silent), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
    assert!(err.to_string().contains("no answer from"), "{err}");

    let mut config = Config::new(TargetAddr(silent));
    config.connect_timeout = Duration::from_millis(300);
    let proxy = Proxy::start("127.0.0.1:0", config);
    let err = connect_and_read_until_end(proxy.addr)
        .await
        .expect_err("client must not be left hanging");
    assert_reset(&err, Mode::Splice);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_by_the_drain_timeout_are_reset_not_closed() {
    // A connection cut short must not look like a complete one: a clean EOF would let a
    // client take a truncated response for the whole thing.
    let net = TestNet::up(1).await;
    for mode in Mode::ALL {
        let listener = net.listen(0);
        let mut config = Config::new(TargetAddr(listener.local_addr().unwrap()));
        config.pump = mode.into();
        config.drain_timeout = Duration::ZERO;
        let proxy = Proxy::start("127.0.0.1:0", config);
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let (mut backend, _) = listener.accept().await.unwrap();
        let mut one = [0u8; 1];
        backend.read_exact(&mut one).await.unwrap(); // relayed end to end
        proxy.stop().await;
        let err = read_until_end(&mut c)
            .await
            .expect_err("a cut connection must be reset");
        assert_reset(&err, mode);
        let err = read_until_end(&mut backend)
            .await
            .expect_err("the backend must see the reset too");
        assert_reset(&err, mode);
    }
}
