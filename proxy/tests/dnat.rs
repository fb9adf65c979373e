//! Kernel mode (`mode = "dnat"`) end to end, isolated from the machine: the "host" is a
//! namespace the test creates, holding the bridge and the container namespaces plus a veth
//! pair to an external-client namespace; the cgroup programs attach to a child cgroup the test
//! creates. `berth run` runs inside that host namespace. Checked: remote clients over TCP
//! (gigabytes checksummed, 128 connections) and UDP reach the container, which sees their real
//! address; local clients (127.0.0.1 and ::1, in the cgroup) reach it too and see the address
//! they dialled; conntrack entries appear and end; two mappings do not interfere; removing
//! the mappings detaches every program; a missing feature fails only its mapping; a process
//! of another namespace in the cgroup keeps its own loopback; SIGKILL leaves nothing attached.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::net::{IpAddr, SocketAddr};

use common::{
    HANG, TestNs, assert_mirrored,
    daemon::{Dir, find_sample, scrape_in},
    exchange, random_sizes, rng, wait_until,
};
use tokio::{
    net::{TcpListener, UdpSocket},
    time::timeout,
};

use common::{
    EXT_CLIENT, EXT_HOST,
    bpf::{CGROUP_ATTACH_TYPES, cgroup_programs, map_entries_of},
    lab::Lab,
};

fn scratch() -> Dir {
    Dir::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_remote_and_local_tcp_clients_reach_the_container_with_every_byte() {
    let lab = Lab::up(1).await;
    let (server, mut seen) = lab.tcp_server(0);
    let port = lab.host.free_port();
    let dir = scratch();
    let v4 = SocketAddr::from(([0, 0, 0, 0], port));
    let v6: SocketAddr = format!("[::]:{port}").parse().unwrap();
    let berth = lab.berth(
        &dir,
        &lab.config(
            "",
            &[("web", "tcp", v4, server), ("web6", "tcp", v6, server)],
        ),
    );
    berth.up().await;
    assert_eq!(berth.row("web").await.mode, "dnat");
    let gateway = IpAddr::V4(lab.topo.gateway);

    // Remote: 2 GiB each way at once, checksummed; the container sees the client's address.
    let public = SocketAddr::from((EXT_HOST, port));
    let c = lab.ext_connect(public).await;
    const BIG: u64 = 2 << 30;
    let client = timeout(HANG * 4, exchange(c, 1, BIG, BIG))
        .await
        .unwrap()
        .unwrap();
    let (peer, id, srv) = seen.recv().await.unwrap();
    assert_eq!(id, 1);
    assert_eq!(
        peer.ip(),
        IpAddr::V4(EXT_CLIENT),
        "the container must see the real client"
    );
    assert_mirrored(1, &client, &srv);

    // Remote: 128 connections at once, random sizes up to 8 MiB each way.
    let mut rng = rng();
    let ups = random_sizes(128, 8 << 20, &mut rng);
    let downs = random_sizes(128, 8 << 20, &mut rng);
    let mut tasks = Vec::new();
    for (i, (up, down)) in ups.into_iter().zip(downs).enumerate() {
        let c = lab.ext_connect(public).await;
        tasks.push(tokio::spawn(async move {
            let id = 100 + i as u64;
            (
                id,
                timeout(HANG, exchange(c, id, up, down))
                    .await
                    .unwrap()
                    .unwrap(),
            )
        }));
    }
    let mut clients = std::collections::HashMap::new();
    for t in tasks {
        let (id, tally) = t.await.unwrap();
        clients.insert(id, tally);
    }
    for _ in 0..128 {
        let (peer, id, srv) = seen.recv().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(EXT_CLIENT));
        assert_mirrored(id, &clients[&id], &srv);
    }

    // Local, IPv4 and IPv6 loopback: straight to the container, and the client's socket
    // shows the address it dialled.
    // Each keeps a reverse-NAT entry while it is open, and only then.
    for (n, dial, v6) in [
        (2u64, SocketAddr::from(([127, 0, 0, 1], port)), false),
        (3, format!("[::1]:{port}").parse().unwrap(), true),
        (4, public, false),
    ] {
        let sock = lab.local_socket(v6);
        let c = timeout(HANG, sock.connect(dial)).await.unwrap().unwrap();
        assert_eq!(
            c.peer_addr().unwrap(),
            dial,
            "getpeername shows what was dialled"
        );
        let reverse = || map_entries_of(berth.child.id(), "BERTH_DNAT_REV");
        assert_eq!(reverse(), 1, "{dial}: an open socket's entry");
        let client = timeout(HANG, exchange(c, n, 256 << 20, 256 << 20))
            .await
            .unwrap()
            .unwrap();
        let (peer, id, srv) = seen.recv().await.unwrap();
        assert_eq!(id, n);
        assert_eq!(
            peer.ip(),
            gateway,
            "a local client comes from the bridge's address"
        );
        assert_mirrored(n, &client, &srv);
        // The socket is closed (exchange consumed it): its entry went with it.
        assert_eq!(reverse(), 0, "{dial}: a closed socket's entry");
    }

    // Every flow ended with FIN both ways: its entry goes after the closing timeout.
    let web = berth.row("web").await;
    assert!(
        web.bytes_to_target > BIG && web.bytes_to_client > BIG,
        "{web:?}"
    );
    berth
        .wait_row("web", "no conntrack entries", |r| r.active == 0)
        .await;

    // An open flow keeps its entry (tcp_timeout is days); a client's reset ends it.
    let c = lab.ext_connect(public).await;
    berth
        .wait_row("web", "the open flow's entry", |r| r.active == 1)
        .await;
    socket2::SockRef::from(&c)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(c);
    berth
        .wait_row("web", "the reset flow's entry to end", |r| r.active == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_and_local_udp_clients_get_replies_from_the_mapped_address() {
    let lab = Lab::up(1).await;
    let server = lab.udp_server(0);
    let port = lab.host.free_port();
    let dir = scratch();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    // A UDP timeout long enough that a loaded machine's status poll still sees the entry
    // before it expires.
    let (config, metrics) = lab.with_metrics(
        &lab.config("", &[("dns", "udp", listen, server)])
            .replace("udp_timeout = 0.5", "udp_timeout = 3"),
    );
    let berth = lab.berth(&dir, &config);
    berth.up().await;

    // Remote: the reply comes from the address dialled; the container saw the real client.
    let public = SocketAddr::from((EXT_HOST, port));
    let sock = lab.ext.udp();
    let me = SocketAddr::from((EXT_CLIENT, sock.local_addr().unwrap().port()));
    let mut buf = vec![0u8; 65_536];
    // Datagrams that fit in one frame; larger ones: the fragment test below.
    for size in [1usize, 1_000, 1_400] {
        let payload = vec![b'x'; size];
        sock.send_to(&payload, public).await.unwrap();
        let (n, from) = timeout(HANG, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, public);
        assert_eq!(&buf[..size], &payload[..]);
        assert_eq!(&buf[size..n], format!(" from {me}").as_bytes());
    }
    // The flow's conntrack entry exists, then expires (udp_timeout 3 s).
    berth
        .wait_row("dns", "a conntrack entry", |r| r.active == 1)
        .await;
    // The kernel-mode families count the flow: one flow, 3 packets each way, its entry.
    let m = scrape_in(&lab.host.ns, metrics).await;
    let dns = r#"mapping="dns""#;
    let value = |name: &str, labels: &[&str]| {
        find_sample(&m, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{m}"))
    };
    assert_eq!(value("berth_dnat_flows_total", &[dns]), 1.0);
    for dir in [r#"direction="to_target""#, r#"direction="to_client""#] {
        assert_eq!(value("berth_dnat_packets_total", &[dns, dir]), 3.0, "{dir}");
        assert!(
            value("berth_dnat_bytes_total", &[dns, dir]) > 2400.0,
            "{dir}"
        );
    }
    assert_eq!(value("berth_dnat_conntrack_entries", &[dns]), 1.0);
    assert_eq!(value("berth_dnat_local_rewrites_total", &[dns]), 0.0);
    berth
        .wait_row("dns", "its entry expired", |r| r.active == 0)
        .await;

    // Local, unconnected: sendto 127.0.0.1 reaches the container, recvfrom shows 127.0.0.1.
    let dial = SocketAddr::from(([127, 0, 0, 1], port));
    let local = lab
        .host
        .ns
        .run(|| {
            lab.cgroup
                .run(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
        })
        .unwrap();
    local.set_nonblocking(true).unwrap();
    let local = UdpSocket::from_std(local).unwrap();
    local.send_to(b"ping", dial).await.unwrap();
    let (n, from) = timeout(HANG, local.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, dial, "recvfrom shows the address dialled");
    let m = scrape_in(&lab.host.ns, metrics).await;
    assert_eq!(
        find_sample(&m, "berth_dnat_local_rewrites_total", &[r#"mapping="dns""#]),
        Some(1.0),
        "{m}"
    );
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        text.starts_with(&format!("ping from {}:", lab.topo.gateway)),
        "{text}"
    );

    // Stopping berth detaches everything: no TC program, no cgroup attachment.
    assert!(!lab.tc_programs("ext0").is_empty());
    let mut berth = berth;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(berth.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || berth.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(lab.tc_programs("ext0").is_empty());
    assert!(lab.tc_programs(&lab.topo.bridge.to_string()).is_empty());
    for t in CGROUP_ATTACH_TYPES {
        assert_eq!(cgroup_programs(&lab.cgroup.0, t), 0, "attach type {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hairpin_from_the_container_and_its_neighbour_is_mapped_in_the_kernel() {
    let lab = Lab::up(2).await;
    let server = lab.tcp_server(0);
    let udp = lab.udp_server(0);
    let gateway = lab.topo.gateway.into();
    hairpin_is_mapped_in_the_kernel(&lab, server, udp, EXT_HOST.into(), gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_hairpin_from_the_container_and_its_neighbour_is_mapped_in_the_kernel() {
    let lab = Lab::up(2).await;
    let (container6, host6, _) = lab.add_ipv6();
    let server = lab.tcp_server_at(0, container6.into());
    let udp = lab.udp_server_at(0, container6.into());
    // The host's address towards the container: the bridge's.
    let gateway = "fd00:77::1".parse().unwrap();
    hairpin_is_mapped_in_the_kernel(&lab, server, udp, host6.into(), gateway).await;
}

/// Container 0 dials its own published port, container 1 its neighbour's, both through the
/// host's uplink address `host` (as a container reaches a published port): TCP with every
/// byte checked, then UDP datagrams large enough to fragment. Both land on container 0's
/// servers, which see `gateway`, and the kernel maps all of it.
async fn hairpin_is_mapped_in_the_kernel(
    lab: &Lab,
    (server, mut seen): (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, u64, common::Tally)>,
    ),
    udp: SocketAddr,
    host: IpAddr,
    gateway: IpAddr,
) {
    let (port, udp_port) = (lab.host.free_port(), lab.host.free_port());
    let dir = scratch();
    let any = |port| match host {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
    };
    let (config, metrics) = lab.with_metrics(&lab.config(
        "",
        &[
            ("web", "tcp", any(port), server),
            ("dns", "udp", any(udp_port), udp),
        ],
    ));
    let berth = lab.berth(&dir, &config);
    berth.up().await;
    let public = SocketAddr::new(host, port);
    for (id, from) in [(1u64, 0usize), (2, 1)] {
        let ns = berth::net::NetNs::named(&lab.topo.containers[from].name);
        let sock = ns
            .run(|| match host {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            })
            .unwrap()
            .unwrap();
        let stream = timeout(HANG, sock.connect(public)).await.unwrap().unwrap();
        // The client sees the address it dialled, not the container's.
        assert_eq!(stream.peer_addr().unwrap(), public);
        let client = timeout(HANG, exchange(stream, id, 1 << 20, 1 << 20))
            .await
            .unwrap()
            .unwrap();
        let (peer, sid, server_side) = timeout(HANG, seen.recv()).await.unwrap().unwrap();
        // As Docker's hairpin MASQUERADE: the server sees the bridge's gateway.
        assert_eq!(peer.ip(), gateway, "from container {from}");
        assert_mirrored(sid, &client, &server_side);

        // UDP, fragments included: every fragment of both directions is mapped (a reply's
        // later fragments left to the gateway's address would never reach the container).
        let std = ns
            .run(|| std::net::UdpSocket::bind(any(0)))
            .unwrap()
            .unwrap();
        std.set_nonblocking(true).unwrap();
        let sock = tokio::net::UdpSocket::from_std(std).unwrap();
        let me = SocketAddr::new(gateway, sock.local_addr().unwrap().port());
        let public = SocketAddr::new(host, udp_port);
        echo_large_datagrams(&sock, public, me, &[64, 4_000, 20_000]).await;
    }
    // The kernel mapped both (two flows each); the relay under it served none.
    let m = scrape_in(&lab.host.ns, metrics).await;
    for name in ["web", "dns"] {
        let mapping = format!("mapping=\"{name}\"");
        assert_eq!(
            find_sample(&m, "berth_dnat_flows_total", &[&mapping]),
            Some(2.0),
            "{m}"
        );
        assert_eq!(
            find_sample(&m, "berth_connections_total", &[&mapping]).unwrap_or(0.0),
            0.0,
            "{m}"
        );
    }
    let frags = if host.is_ipv4() {
        "BERTH_DNAT_FRAG"
    } else {
        "BERTH_DNAT_FRAG6"
    };
    assert_eq!(map_entries_of(berth.child.id(), frags), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_errors_about_mapped_flows_reach_the_other_side() {
    let lab = Lab::up(1).await;
    let container = lab.container_ip(0).into();
    icmp_errors_reach_both_ends(&lab, container, EXT_HOST.into(), EXT_CLIENT.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmpv6_errors_about_mapped_flows_reach_the_other_side() {
    let lab = Lab::up(1).await;
    let (container6, host6, client6) = lab.add_ipv6();
    icmp_errors_reach_both_ends(&lab, container6.into(), host6.into(), client6.into()).await;
}

/// A closed container port's "port unreachable" reaches a connected client, and a vanished
/// client's host's reaches a connected container, through kernel-mode mappings of the
/// family of the addresses given: the container's, the host uplink's and the client's.
async fn icmp_errors_reach_both_ends(
    lab: &Lab,
    container: IpAddr,
    host: IpAddr,
    client_ip: IpAddr,
) {
    let ns = berth::net::NetNs::named(&lab.topo.containers[0].name);
    let bind = |addr: SocketAddr| ns.run(|| std::net::UdpSocket::bind(addr)).unwrap().unwrap();
    let closed = bind(SocketAddr::new(container, 0));
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let server = bind(SocketAddr::new(container, 0));
    server.set_read_timeout(Some(HANG)).unwrap();
    let any: IpAddr = if container.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let (p1, p2) = (lab.host.free_port(), lab.host.free_port());
    let dir = scratch();
    let config = lab.config(
        "",
        &[
            ("nobody", "udp", SocketAddr::new(any, p1), closed_addr),
            (
                "echo",
                "udp",
                SocketAddr::new(any, p2),
                server.local_addr().unwrap(),
            ),
        ],
    );
    let berth = lab.berth(&dir, &config);
    berth.up().await;
    let mut buf = [0u8; 64];
    let client_socket = || {
        let s = lab
            .ext
            .ns
            .run(|| std::net::UdpSocket::bind(SocketAddr::new(any, 0)).unwrap())
            .unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        s
    };

    // A round trip: mapped both ways.
    let client = client_socket();
    client.send_to(b"hello", SocketAddr::new(host, p2)).unwrap();
    let (_, from) = tokio::task::block_in_place(|| server.recv_from(&mut buf)).unwrap();
    assert_eq!(from.ip(), client_ip, "mapped in the kernel");
    server.send_to(b"hi", from).unwrap();
    tokio::task::block_in_place(|| client.recv(&mut buf)).unwrap();

    // The container's "port unreachable" reaches the client's connected socket.
    let other = client_socket();
    other.connect(SocketAddr::new(host, p1)).unwrap();
    other.send(b"anyone?").unwrap();
    let refused = tokio::task::block_in_place(|| other.recv(&mut buf)).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );

    // The container answers a client whose socket has gone; the client's host's "port
    // unreachable" reaches the container's connected socket.
    server.connect(from).unwrap();
    drop(client);
    server.send(b"too late").unwrap();
    let refused = tokio::task::block_in_place(|| server.recv(&mut buf)).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

/// Writes a sysctl of container 0's namespace.
fn container_ns_sysctl(lab: &Lab, path: &str, value: &str) {
    berth::net::NetNs::named(&lab.topo.containers[0].name)
        .run(|| std::fs::write(path, value))
        .unwrap()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
}

/// Makes every packet `sock` sends carry an IPv6 destination options header (8 bytes: a PadN
/// option of 4), as IPV6_DSTOPTS does (it needs CAP_NET_RAW).
fn with_destination_options(sock: &impl std::os::fd::AsRawFd) {
    // Next header (filled in by the kernel), length 0 (8 bytes), PadN type 1 of length 4.
    with_ipv6_header(sock, libc::IPV6_DSTOPTS, &[0, 0, 1, 4, 0, 0, 0, 0]);
}

/// Makes every packet `sock` sends carry a segment routing header (type 4) whose only
/// segment is `last` with no segment left: a source route that ends at `last`, the address
/// the socket dials.
fn with_finished_source_route(sock: &impl std::os::fd::AsRawFd, last: std::net::Ipv6Addr) {
    // Next header (the kernel's), length 2 (24 bytes), type 4, segments left 0, last
    // entry 0, flags, tag, then the segment.
    let mut header = vec![0, 2, 4, 0, 0, 0, 0, 0];
    header.extend_from_slice(&last.octets());
    with_ipv6_header(sock, libc::IPV6_RTHDR, &header);
}

/// Sets the sticky IPv6 extension header `name` (IPV6_DSTOPTS, IPV6_RTHDR) of `sock`.
fn with_ipv6_header(sock: &impl std::os::fd::AsRawFd, name: libc::c_int, header: &[u8]) {
    // SAFETY: setsockopt reads `header`'s bytes.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            name,
            header.as_ptr().cast(),
            header.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "IPv6 option {name}: {}",
        std::io::Error::last_os_error()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_remote_and_local_clients_reach_an_ipv6_container() {
    use std::net::Ipv6Addr;
    let lab = Lab::up(1).await;
    let (container6, host6, client6) = lab.add_ipv6();
    let (server, mut seen) = lab.tcp_server_at(0, container6.into());
    let udp_target = lab.udp_server_at(0, container6.into());

    let (tcp_port, udp_port) = (lab.host.free_port(), lab.host.free_port());
    let dir = scratch();
    let (config, metrics) = lab.with_metrics(&lab.config(
        "",
        &[
            (
                "web6",
                "tcp",
                format!("[::]:{tcp_port}").parse().unwrap(),
                server,
            ),
            (
                "dns6",
                "udp",
                format!("[::]:{udp_port}").parse().unwrap(),
                udp_target,
            ),
        ],
    ));
    let berth = lab.berth(&dir, &config);
    berth.up().await;
    assert_eq!(berth.row("web6").await.mode, "dnat");

    // Remote TCP: the container sees the client's own address; every byte arrives. Then the
    // same with a destination options header in every packet the client sends (an extension
    // header before TCP's), and with a routing header whose source route has ended at the
    // host (no segment left: the destination is final). The container accepts segment
    // routing headers only when told to (the host never sees these packets).
    let public = SocketAddr::from((host6, tcp_port));
    container_ns_sysctl(&lab, "/proc/sys/net/ipv6/conf/all/seg6_enabled", "1");
    container_ns_sysctl(&lab, "/proc/sys/net/ipv6/conf/eth0/seg6_enabled", "1");
    /// Sets the extension headers of a client socket that dials the host's `Ipv6Addr`.
    type Headers = fn(&tokio::net::TcpSocket, Ipv6Addr);
    let headers: [(&str, Headers); 3] = [
        ("no extension header", |_, _| {}),
        ("a destination options header", |s, _| {
            with_destination_options(s);
        }),
        ("a finished routing header", |s, host| {
            with_finished_source_route(s, host);
        }),
    ];
    for (id, (what, prepare)) in (10u64..).zip(headers) {
        let sock = lab
            .ext
            .ns
            .run(|| tokio::net::TcpSocket::new_v6().unwrap())
            .unwrap();
        prepare(&sock, host6);
        let stream = timeout(HANG, sock.connect(public)).await.unwrap().unwrap();
        let client = timeout(HANG, exchange(stream, id, 4 << 20, 4 << 20))
            .await
            .unwrap()
            .unwrap();
        let (peer, sid, server_side) = timeout(HANG, seen.recv()).await.unwrap().unwrap();
        assert_eq!(
            peer.ip(),
            IpAddr::V6(client6),
            "with {what}, the flow was not mapped in the kernel"
        );
        assert_mirrored(sid, &client, &server_side);
    }

    // Remote UDP: the reply comes from the address dialled.
    let sock = lab
        .ext
        .ns
        .run(|| std::net::UdpSocket::bind("[::]:0").unwrap())
        .unwrap();
    sock.set_read_timeout(Some(HANG)).unwrap();
    let public = SocketAddr::from((host6, udp_port));
    sock.send_to(b"ping", public).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::task::block_in_place(|| sock.recv_from(&mut buf)).unwrap();
    assert_eq!(from, public);
    let me = SocketAddr::from((client6, sock.local_addr().unwrap().port()));
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("ping from {me}")
    );

    // Local: ::1 in the cgroup reaches the IPv6 container, and getpeername shows ::1.
    let dial = SocketAddr::from((Ipv6Addr::LOCALHOST, tcp_port));
    let stream = timeout(HANG, lab.local_socket(true).connect(dial))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stream.peer_addr().unwrap(), dial);
    let client = timeout(HANG, exchange(stream, 2, 1 << 20, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    let (_, id, server_side) = timeout(HANG, seen.recv()).await.unwrap().unwrap();
    assert_mirrored(id, &client, &server_side);
    // Local UDP, unconnected: sendto [::1] reaches the IPv6 container (sendmsg6), and
    // recvfrom shows [::1] (recvmsg6); the container sees the host's bridge address.
    let dial = SocketAddr::from((Ipv6Addr::LOCALHOST, udp_port));
    let local = lab
        .host
        .ns
        .run(|| {
            lab.cgroup
                .run(|| std::net::UdpSocket::bind("[::]:0").unwrap())
        })
        .unwrap();
    local.set_read_timeout(Some(HANG)).unwrap();
    local.send_to(b"ping", dial).unwrap();
    let (n, from) = tokio::task::block_in_place(|| local.recv_from(&mut buf)).unwrap();
    assert_eq!(from, dial, "recvfrom shows the address dialled");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.starts_with("ping from [fd00:77::1]:"), "{text}");

    // The kernel mapped all of it: three remote flows, one local rewrite, no relay connection.
    let m = scrape_in(&lab.host.ns, metrics).await;
    let value = |name: &str, mapping: &str| {
        find_sample(&m, name, &[&format!("mapping=\"{mapping}\"")]).unwrap_or(0.0)
    };
    assert_eq!(value("berth_dnat_flows_total", "web6"), 3.0, "{m}");
    assert_eq!(value("berth_dnat_flows_total", "dns6"), 1.0, "{m}");
    assert_eq!(value("berth_dnat_local_rewrites_total", "dns6"), 1.0, "{m}");
    assert_eq!(value("berth_dnat_local_rewrites_total", "web6"), 1.0, "{m}");
    assert_eq!(value("berth_connections_total", "web6"), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_larger_than_the_mtu_are_mapped_fragment_by_fragment() {
    let lab = Lab::up(1).await;
    let server = lab.udp_server(0);
    let port = lab.host.free_port();
    let dir = scratch();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let berth = lab.berth(&dir, &lab.config("", &[("big", "udp", listen, server)]));
    berth.up().await;
    let sock = lab.ext.udp();
    let me = SocketAddr::from((EXT_CLIENT, sock.local_addr().unwrap().port()));
    let public = SocketAddr::from((EXT_HOST, port));
    // 1,473 bytes is the first size that fragments at MTU 1500; the largest needs 44
    // fragments each way. The reply echoes the datagram, then " from ADDR": the container
    // saw the client itself (the relay would show the bridge's gateway), so the kernel
    // mapped every fragment, both ways.
    echo_large_datagrams(&sock, public, me, &[1_473, 4_000, 20_000, 60_000]).await;
    // Each datagram's entry went with its last fragment.
    assert_eq!(map_entries_of(berth.child.id(), "BERTH_DNAT_FRAG"), 0);
}

/// Sends datagrams of each of `sizes` to `public` and checks that each comes back intact from
/// there, with " from `me`" appended by the container's server: the container saw the
/// client itself, so every fragment was mapped in the kernel, both ways.
async fn echo_large_datagrams(
    sock: &tokio::net::UdpSocket,
    public: SocketAddr,
    me: SocketAddr,
    sizes: &[usize],
) {
    let mut buf = vec![0u8; 65_536];
    for &size in sizes {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        sock.send_to(&payload, public).await.unwrap();
        let (n, from) = timeout(HANG, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, public);
        assert!(buf[..size] == payload[..], "{size} bytes came back changed");
        assert_eq!(
            String::from_utf8_lossy(&buf[size..n]),
            format!(" from {me}"),
            "{size} bytes"
        );
    }
}

/// The same over IPv6, where fragments carry a fragment header (an extension header) and no
/// header checksum needs fixing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_udp_datagrams_larger_than_the_mtu_are_mapped_fragment_by_fragment() {
    let lab = Lab::up(1).await;
    let (container6, host6, client6) = lab.add_ipv6();
    let target = lab.udp_server_at(0, container6.into());
    let port = lab.host.free_port();
    let dir = scratch();
    let listen: SocketAddr = format!("[::]:{port}").parse().unwrap();
    let berth = lab.berth(&dir, &lab.config("", &[("big6", "udp", listen, target)]));
    berth.up().await;
    let std = lab
        .ext
        .ns
        .run(|| std::net::UdpSocket::bind("[::]:0").unwrap())
        .unwrap();
    std.set_nonblocking(true).unwrap();
    let sock = tokio::net::UdpSocket::from_std(std).unwrap();
    let me = SocketAddr::from((client6, sock.local_addr().unwrap().port()));
    let public = SocketAddr::from((host6, port));
    // 1,453 bytes is the first size that fragments at MTU 1500 over IPv6. The reply names
    // the client itself (the relay would show the bridge's address): the kernel mapped every
    // fragment, both ways.
    echo_large_datagrams(&sock, public, me, &[1_453, 4_000, 20_000, 60_000]).await;
    assert_eq!(map_entries_of(berth.child.id(), "BERTH_DNAT_FRAG6"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_too_big_for_the_next_link_get_fragmentation_needed() {
    let lab = Lab::up(1).await;
    let container = lab.container_ip(0).into();
    too_big_for_the_next_link(&lab, container, EXT_HOST.into(), EXT_CLIENT.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_packets_too_big_for_the_next_link_get_packet_too_big() {
    let lab = Lab::up(1).await;
    let (container6, host6, client6) = lab.add_ipv6();
    too_big_for_the_next_link(&lab, container6.into(), host6.into(), client6.into()).await;
}

/// Sets the MTU of both ends of a link: `host_end` in the lab's host namespace, `eth0` in
/// `ns`.
async fn narrow_link(lab: &Lab, ns: &berth::net::NetNs, host_end: &str, mtu: u32) {
    let host_end = host_end.to_owned();
    lab.host
        .ns
        .run_async(|| async move {
            let nl = berth::net::Netlink::connect().unwrap();
            nl.set_mtu(&host_end, mtu).await.unwrap();
        })
        .unwrap();
    ns.run_async(|| async move {
        let nl = berth::net::Netlink::connect().unwrap();
        nl.set_mtu("eth0", mtu).await.unwrap();
    })
    .unwrap();
}

/// The path MTU a connected socket has learnt (IP_MTU / IPV6_MTU).
fn path_mtu(sock: &std::net::UdpSocket, v6: bool) -> i32 {
    use std::os::fd::AsRawFd as _;
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "path MTU: {}", std::io::Error::last_os_error());
    mtu
}

/// `sock` (connected, DF set) sends 1,400 bytes through a path of MTU 1280 and learns it:
/// its path MTU drops from 1500 to 1280 and the error reaches it; then it sends 1,000 bytes,
/// which fit.
async fn learns_a_path_mtu_of_1280(sock: &std::net::UdpSocket, v6: bool, who: &str) {
    assert_eq!(path_mtu(sock, v6), 1500, "{who}");
    sock.send(&[7u8; 1400]).unwrap();
    wait_until(&format!("{who}'s path MTU to drop to 1280"), || {
        path_mtu(sock, v6) == 1280
    })
    .await;
    assert_eq!(
        sock.take_error().unwrap().unwrap().raw_os_error(),
        Some(libc::EMSGSIZE),
        "{who}"
    );
    sock.send(&[8u8; 1000]).unwrap();
}

/// Sets "don't fragment" on every datagram of `sock` (IP_PMTUDISC_DO, or its IPv6 twin).
fn never_fragment(sock: &std::net::UdpSocket, v6: bool) {
    if v6 {
        mtu_discover(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        );
    } else {
        mtu_discover(
            sock,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        );
    }
}

/// Sets a path MTU discovery mode of `sock`.
fn mtu_discover(
    sock: &std::net::UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt reads one c_int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "MTU discovery {value}: {}",
        std::io::Error::last_os_error()
    );
}

/// Path MTU discovery through kernel-mode mappings, as a router's forwarding gives it: the
/// redirect skips the host's forwarding, so the program answers a packet too big for the
/// next link with "fragmentation needed" (IPv4) or "packet too big" (IPv6) itself. First the
/// container's link at MTU 1280: a TCP bulk transfer completes, and a client's 1,400-byte
/// datagram with DF makes the client's path MTU 1280. Then the client's link at 1280 and the
/// container's at 1500 again: the container's 1,400-byte reply does the same for it.
async fn too_big_for_the_next_link(lab: &Lab, container: IpAddr, host: IpAddr, client_ip: IpAddr) {
    let v6 = container.is_ipv6();
    let ns = berth::net::NetNs::named(&lab.topo.containers[0].name);
    let server = ns
        .run(|| std::net::UdpSocket::bind(SocketAddr::new(container, 0)))
        .unwrap()
        .unwrap();
    server.set_read_timeout(Some(HANG)).unwrap();
    never_fragment(&server, v6);
    let (tcp_server, mut seen) = lab.tcp_server_at(0, container);
    let any: IpAddr = if v6 {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let (udp_port, tcp_port) = (lab.host.free_port(), lab.host.free_port());
    let dir = scratch();
    let (config, metrics) = lab.with_metrics(&lab.config(
        "",
        &[
            (
                "dns",
                "udp",
                SocketAddr::new(any, udp_port),
                server.local_addr().unwrap(),
            ),
            ("web", "tcp", SocketAddr::new(any, tcp_port), tcp_server),
        ],
    ));
    let berth = lab.berth(&dir, &config);
    berth.up().await;
    let host_veth = lab.topo.containers[0].host_veth.to_string();
    narrow_link(lab, &ns, &host_veth, 1280).await;

    // TCP: the segment size follows the container's MSS; every byte arrives.
    let sock = lab
        .ext
        .ns
        .run(|| {
            if v6 {
                tokio::net::TcpSocket::new_v6()
            } else {
                tokio::net::TcpSocket::new_v4()
            }
        })
        .unwrap()
        .unwrap();
    let stream = timeout(HANG, sock.connect(SocketAddr::new(host, tcp_port)))
        .await
        .unwrap()
        .unwrap();
    let tally = timeout(HANG, exchange(stream, 1, 8 << 20, 8 << 20))
        .await
        .unwrap()
        .unwrap();
    let (peer, id, server_side) = timeout(HANG, seen.recv()).await.unwrap().unwrap();
    assert_eq!(peer.ip(), client_ip, "mapped in the kernel");
    assert_mirrored(id, &tally, &server_side);

    if !v6 {
        // An IPv4 datagram without DF: routing would fragment it, and so does the relay
        // under the mapping, which gets it (the container sees the relay's address). First: once
        // the client has learnt the path MTU below, its own kernel would fragment it.
        let plain = lab
            .ext
            .ns
            .run(|| std::net::UdpSocket::bind(SocketAddr::new(any, 0)))
            .unwrap()
            .unwrap();
        mtu_discover(
            &plain,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
        plain
            .send_to(&[11u8; 1400], SocketAddr::new(host, udp_port))
            .unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, relayed) = tokio::task::block_in_place(|| server.recv_from(&mut buf)).unwrap();
        assert_eq!((n, relayed.ip()), (1400, IpAddr::V4(lab.topo.gateway)));
    }

    // UDP with DF, client to container: the client learns the container link's MTU.
    let client = lab
        .ext
        .ns
        .run(|| std::net::UdpSocket::bind(SocketAddr::new(any, 0)))
        .unwrap()
        .unwrap();
    client.set_read_timeout(Some(HANG)).unwrap();
    never_fragment(&client, v6);
    client.connect(SocketAddr::new(host, udp_port)).unwrap();
    learns_a_path_mtu_of_1280(&client, v6, "the client").await;
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::task::block_in_place(|| server.recv_from(&mut buf)).unwrap();
    assert_eq!((n, from.ip()), (1000, client_ip));

    // UDP with DF, container to client: the container learns the client link's MTU.
    narrow_link(lab, &ns, &host_veth, 1500).await;
    narrow_link(lab, &lab.ext.ns, "ext0", 1280).await;
    server.connect(from).unwrap();
    learns_a_path_mtu_of_1280(&server, v6, "the container").await;
    let n = tokio::task::block_in_place(|| client.recv(&mut buf)).unwrap();
    assert_eq!(n, 1000);

    let m = scrape_in(&lab.host.ns, metrics).await;
    assert_eq!(
        find_sample(&m, "berth_dnat_too_big_total", &[r#"mapping="dns""#]),
        Some(if v6 { 2.0 } else { 3.0 }),
        "{m}"
    );
}

/// Sends `payload` to `to` with `ttl`, and returns the reply's source and TTL.
fn ask_with_ttl(sock: &std::net::UdpSocket, to: SocketAddr, ttl: i32) -> (SocketAddr, u8) {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(sock, sockopt::Ipv4Ttl, &ttl).unwrap();
    sock.send_to(b"ping", to).unwrap();
    let (from, got, _) = recv_with_ttl(sock);
    (from, got)
}

/// One datagram with the TTL it arrived with (the socket has IP_RECVTTL on).
fn recv_with_ttl(sock: &std::net::UdpSocket) -> (SocketAddr, u8, Vec<u8>) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg};
    use std::os::fd::AsRawFd as _;
    let mut buf = [0u8; 1500];
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let ttl = msg
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            ControlMessageOwned::Ipv4Ttl(t) => Some(t as u8),
            _ => None,
        })
        .expect("no TTL with the datagram");
    let from = SocketAddr::from(std::net::SocketAddrV4::from(msg.address.unwrap()));
    let n = msg.bytes;
    (from, ttl, buf[..n].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_packets_lose_one_hop_as_routed_ones_do() {
    use nix::sys::socket::{setsockopt, sockopt};
    let lab = Lab::up(1).await;
    // A container server that reports each datagram's source and TTL, and answers with TTL 40.
    let server = lab.bind_in(0, std::net::UdpSocket::bind);
    setsockopt(&server, sockopt::Ipv4RecvTtl, &true).unwrap();
    setsockopt(&server, sockopt::Ipv4Ttl, &40).unwrap();
    server.set_read_timeout(Some(HANG)).unwrap();
    let target = server.local_addr().unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        loop {
            let (from, ttl, _) = recv_with_ttl(&server);
            if seen_tx.send((from, ttl)).is_err() || server.send_to(b"pong", from).is_err() {
                return;
            }
        }
    });
    let port = lab.host.free_port();
    let dir = scratch();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let berth = lab.berth(&dir, &lab.config("", &[("ttl", "udp", listen, target)]));
    berth.up().await;

    let client = lab
        .ext
        .ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
        .unwrap();
    setsockopt(&client, sockopt::Ipv4RecvTtl, &true).unwrap();
    client.set_read_timeout(Some(HANG)).unwrap();
    let me = SocketAddr::from((EXT_CLIENT, client.local_addr().unwrap().port()));
    let public = SocketAddr::from((EXT_HOST, port));
    // One hop each way, as if the host had routed the packets.
    let (from, ttl) = tokio::task::block_in_place(|| ask_with_ttl(&client, public, 50));
    assert_eq!(
        seen.recv_timeout(HANG).unwrap(),
        (me, 49),
        "client to container"
    );
    assert_eq!((from, ttl), (public, 39), "container to client");
    // A datagram with no hop left is not redirected: berth's relay serves it, so the
    // container sees it come from the bridge's gateway.
    let (from, _) = tokio::task::block_in_place(|| ask_with_ttl(&client, public, 1));
    assert_eq!(from, public);
    let (source, _) = seen.recv_timeout(HANG).unwrap();
    assert_eq!(
        source.ip(),
        IpAddr::V4(lab.topo.gateway),
        "the relay's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_that_appears_after_start_is_mapped_too() {
    let lab = Lab::up(1).await;
    let (server, mut seen) = lab.tcp_server(0);
    let port = lab.host.free_port();
    let dir = scratch();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let berth = lab.berth(&dir, &lab.config("", &[("web", "tcp", listen, server)]));
    berth.up().await;

    // A second uplink, with a client behind it, added while berth runs.
    let (host_ip, client_ip) = (
        std::net::Ipv4Addr::new(10, 98, 0, 1),
        std::net::Ipv4Addr::new(10, 98, 0, 2),
    );
    let ext2 = TestNs::create();
    common::link_external_as(&lab.host, &ext2, "ext1", host_ip, client_ip).await;
    wait_until("the TC program on the new uplink", || {
        !lab.tc_programs("ext1").is_empty()
    })
    .await;
    // Kernel mode maps it: the container sees the client itself (the relay would show the
    // bridge's gateway).
    let sock = ext2
        .ns
        .run(|| tokio::net::TcpSocket::new_v4().unwrap())
        .unwrap();
    let stream = timeout(HANG, sock.connect(SocketAddr::from((host_ip, port))))
        .await
        .unwrap()
        .unwrap();
    let client = timeout(HANG, exchange(stream, 1, 1 << 20, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    let (peer, id, server_side) = timeout(HANG, seen.recv()).await.unwrap().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(client_ip));
    assert_mirrored(id, &client, &server_side);

    // A new container's veth, as `berth net up` adds it: qualifies for a moment, then
    // becomes a bridge port, which carries no routed traffic of its own: the program comes
    // off. The uplink that went away is forgotten.
    let bridge = lab.topo.bridge.to_string();
    lab.host
        .ns
        .run_async(|| async {
            let nl = berth::net::Netlink::connect().unwrap();
            nl.add_veth(&"vnew".parse().unwrap(), &"vnewp".parse().unwrap())
                .await
                .unwrap();
            nl.set_up("vnew").await.unwrap();
        })
        .unwrap();
    wait_until("the program on the new veth", || {
        !lab.tc_programs("vnew").is_empty()
    })
    .await;
    lab.host
        .ns
        .run_async(|| async {
            let nl = berth::net::Netlink::connect().unwrap();
            nl.set_controller("vnew", &bridge).await.unwrap();
            nl.delete("ext1").await.unwrap();
        })
        .unwrap();
    wait_until("the program off the bridge port", || {
        lab.tc_programs("vnew").is_empty()
    })
    .await;
    // Still mapping through the first uplink.
    let stream = lab.ext_connect(SocketAddr::from((EXT_HOST, port))).await;
    let client = timeout(HANG, exchange(stream, 2, 1 << 16, 1 << 16))
        .await
        .unwrap()
        .unwrap();
    let (peer, id, server_side) = timeout(HANG, seen.recv()).await.unwrap().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(EXT_CLIENT));
    assert_mirrored(id, &client, &server_side);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mappings_stay_apart_and_removing_them_detaches_everything() {
    let lab = Lab::up(2).await;
    let (s0, mut seen0) = lab.tcp_server(0);
    let (s1, mut seen1) = lab.tcp_server(1);
    let (p0, p1) = (lab.host.free_port(), lab.host.free_port());
    let dir = scratch();
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let both = lab.config("", &[("a", "tcp", any(p0), s0), ("b", "tcp", any(p1), s1)]);
    let berth = lab.berth(&dir, &both);
    berth.up().await;
    let bridge = lab.topo.bridge.to_string();
    for iface in ["ext0", bridge.as_str()] {
        assert_eq!(lab.tc_programs(iface), ["berth_dnat_tc"], "{iface}");
    }
    for t in CGROUP_ATTACH_TYPES {
        assert_eq!(cgroup_programs(&lab.cgroup.0, t), 1, "attach type {t}");
    }

    // Each port reaches its own container, remote and local.
    for (port, seen, n) in [(p0, &mut seen0, 10u64), (p1, &mut seen1, 20)] {
        let c = lab.ext_connect(SocketAddr::from((EXT_HOST, port))).await;
        let t = exchange(c, n, 1 << 20, 1 << 20).await.unwrap();
        let (_, id, srv) = seen.recv().await.unwrap();
        assert_eq!(id, n);
        assert_mirrored(n, &t, &srv);
        let sock = lab.local_socket(false);
        let c = timeout(HANG, sock.connect(SocketAddr::from(([127, 0, 0, 1], port))))
            .await
            .unwrap()
            .unwrap();
        let t = exchange(c, n + 1, 1 << 20, 1 << 20).await.unwrap();
        let (_, id, srv) = seen.recv().await.unwrap();
        assert_eq!(id, n + 1);
        assert_mirrored(n + 1, &t, &srv);
    }

    // Remove "a": its port no longer maps (nothing listens there now), "b" still does.
    let only_b = lab.config("", &[("b", "tcp", any(p1), s1)]);
    let reply = berth.reload(&only_b).await;
    assert!(reply.ok, "{}", reply.message);
    wait_until("mapping a to be gone", || {
        lab.host
            .ns
            .run(|| std::net::TcpListener::bind(any(p0)).is_ok())
            .unwrap()
    })
    .await;
    let sock = lab
        .ext
        .ns
        .run(|| tokio::net::TcpSocket::new_v4().unwrap())
        .unwrap();
    let refused = timeout(HANG, sock.connect(SocketAddr::from((EXT_HOST, p0))))
        .await
        .unwrap();
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let sock = lab.local_socket(false);
    let refused = timeout(HANG, sock.connect(SocketAddr::from(([127, 0, 0, 1], p0))))
        .await
        .unwrap();
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let c = lab.ext_connect(SocketAddr::from((EXT_HOST, p1))).await;
    let t = exchange(c, 30, 1 << 20, 0).await.unwrap();
    let (_, _, srv) = seen1.recv().await.unwrap();
    assert_mirrored(30, &t, &srv);

    // Remove "b" too: no kernel-mode mapping is left, so nothing stays attached.
    let reply = berth.reload(&lab.config("", &[])).await;
    assert!(reply.ok, "{}", reply.message);
    wait_until("the TC programs to be detached", || {
        lab.tc_programs("ext0").is_empty() && lab.tc_programs(&bridge).is_empty()
    })
    .await;
    for t in CGROUP_ATTACH_TYPES {
        wait_until("the cgroup programs to be detached", || {
            cgroup_programs(&lab.cgroup.0, t) == 0
        })
        .await;
    }
}

/// A container bridge deleted and made again (same name and address, a new interface index,
/// the container's veth enslaved again): the mapping follows it from the netlink events, and a
/// flow opened before goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_made_again_is_followed_with_its_open_flows() {
    let lab = Lab::up(1).await;
    let (server, mut seen) = lab.tcp_server(0);
    let port = lab.host.free_port();
    let dir = scratch();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let berth = lab.berth(&dir, &lab.config("", &[("web", "tcp", listen, server)]));
    berth.up().await;
    let public = SocketAddr::from((EXT_HOST, port));
    let open = lab.ext_connect(public).await;
    berth
        .wait_row("web", "the open flow", |r| r.active == 1)
        .await;

    let (bridge, veth) = (
        lab.topo.bridge.clone(),
        lab.topo.containers[0].host_veth.to_string(),
    );
    let (gateway, prefix) = (lab.topo.gateway, lab.topo.subnet.prefix_len());
    let name = bridge.to_string();
    lab.host
        .ns
        .run_async(|| async {
            let nl = berth::net::Netlink::connect().unwrap();
            nl.delete(&name).await.unwrap();
            nl.add_bridge(&bridge).await.unwrap();
            nl.add_addr(&name, gateway.into(), prefix).await.unwrap();
            nl.set_up(&name).await.unwrap();
            nl.set_controller(&veth, &name).await.unwrap();
        })
        .unwrap();

    // New connections are mapped again once berth has followed (no event tells the test
    // when: each try is bounded, and so is the whole).
    let deadline = tokio::time::Instant::now() + HANG;
    let mut n = 10u64;
    loop {
        let sock = lab
            .ext
            .ns
            .run(|| tokio::net::TcpSocket::new_v4().unwrap())
            .unwrap();
        if let Ok(Ok(c)) = timeout(std::time::Duration::from_secs(1), sock.connect(public)).await {
            let t = timeout(HANG, exchange(c, n, 1 << 20, 1 << 20))
                .await
                .unwrap()
                .unwrap();
            let (peer, id, srv) = seen.recv().await.unwrap();
            assert_eq!(
                (peer.ip(), id),
                (IpAddr::V4(EXT_CLIENT), n),
                "mapped in the kernel"
            );
            assert_mirrored(n, &t, &srv);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mapping never followed the new bridge"
        );
        n += 1;
    }
    assert_eq!(lab.tc_programs(&name), ["berth_dnat_tc"]);
    // The flow opened before the bridge went: its replies come from the new bridge now.
    let t = timeout(HANG, exchange(open, 1, 1 << 20, 1 << 20))
        .await
        .unwrap()
        .unwrap();
    let (peer, id, srv) = seen.recv().await.unwrap();
    assert_eq!((peer.ip(), id), (IpAddr::V4(EXT_CLIENT), 1));
    assert_mirrored(1, &t, &srv);
}

/// Each berth process attaches its own TC program; a packet that one does not map must reach
/// the next (TCX runs them in turn only while each returns "not mine").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_berth_processes_share_the_interfaces() {
    let lab = Lab::up(1).await;
    let (tcp_server, mut seen) = lab.tcp_server(0);
    let udp_server = lab.udp_server(0);
    let (p0, p1) = (lab.host.free_port(), lab.host.free_port());
    let (d0, d1) = (scratch(), scratch());
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let first = lab.berth(&d0, &lab.config("", &[("t", "tcp", any(p0), tcp_server)]));
    let second = lab.berth(&d1, &lab.config("", &[("u", "udp", any(p1), udp_server)]));
    first.up().await;
    second.up().await;
    assert_eq!(lab.tc_programs("ext0"), ["berth_dnat_tc", "berth_dnat_tc"]);

    // UDP is the second process's, TCP the first's: both must get through.
    let sock = lab.ext.udp();
    let public = SocketAddr::from((EXT_HOST, p1));
    sock.send_to(b"hello", public).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = timeout(HANG, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, public);
    assert!(buf[..n].starts_with(b"hello from 10.99.0.2:"));
    let c = lab.ext_connect(SocketAddr::from((EXT_HOST, p0))).await;
    let t = exchange(c, 1, 1 << 20, 1 << 20).await.unwrap();
    let (_, _, srv) = seen.recv().await.unwrap();
    assert_mirrored(1, &t, &srv);
}

/// The local programs rewrite only the host namespace's sockets: a process of another
/// namespace in the same cgroup (a container's) dialling 127.0.0.1:P reaches its own
/// loopback. And a berth killed with SIGKILL leaves nothing attached: its programs go with
/// its descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_namespaces_are_not_rewritten_and_sigkill_leaves_nothing() {
    let lab = Lab::up(1).await;
    let (server, _seen) = lab.tcp_server(0);
    let port = lab.host.free_port();
    let dir = scratch();
    let any = SocketAddr::from(([0, 0, 0, 0], port));
    let mut berth = lab.berth(&dir, &lab.config("", &[("web", "tcp", any, server)]));
    berth.up().await;
    // The host's own local client is mapped (the control: the rewrite is on).
    let sock = lab.local_socket(false);
    timeout(HANG, sock.connect(SocketAddr::from(([127, 0, 0, 1], port))))
        .await
        .unwrap()
        .expect("a host process in the cgroup is mapped");

    // In the external client's namespace, in the same cgroup: 127.0.0.1:P is its own.
    let own = lab
        .ext
        .ns
        .run(|| std::net::TcpListener::bind(("127.0.0.1", port)).unwrap())
        .unwrap();
    own.set_nonblocking(true).unwrap();
    let own = TcpListener::from_std(own).unwrap();
    let sock = lab
        .ext
        .ns
        .run(|| lab.cgroup.run(|| tokio::net::TcpSocket::new_v4().unwrap()))
        .unwrap();
    let c = timeout(HANG, sock.connect(SocketAddr::from(([127, 0, 0, 1], port))))
        .await
        .unwrap()
        .unwrap();
    let (_, peer) = timeout(HANG, own.accept())
        .await
        .expect("rewritten to the container instead of its own loopback")
        .unwrap();
    assert_eq!(peer, c.local_addr().unwrap(), "reached its own loopback");

    // SIGKILL: no chance to clean up, and still nothing stays attached.
    assert!(!lab.tc_programs("ext0").is_empty());
    berth.child.kill().unwrap();
    berth.child.wait().unwrap();
    wait_until("the TC programs to go with the process", || {
        lab.tc_programs("ext0").is_empty()
            && lab.tc_programs(&lab.topo.bridge.to_string()).is_empty()
    })
    .await;
    for t in CGROUP_ATTACH_TYPES {
        wait_until("the cgroup programs to go with the process", || {
            cgroup_programs(&lab.cgroup.0, t) == 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_feature_fails_only_its_mapping() {
    let lab = Lab::up(1).await;
    let (server, _seen) = lab.tcp_server(0);
    let (p0, p1) = (lab.host.free_port(), lab.host.free_port());
    let dir = scratch();
    // A cgroup that does not exist stands for a host without cgroup v2.
    let mut config = lab
        .config(
            "",
            &[(
                "kernel",
                "tcp",
                SocketAddr::from(([0, 0, 0, 0], p0)),
                server,
            )],
        )
        .replace(
            &lab.cgroup.0.display().to_string(),
            "/sys/fs/cgroup/no-such-cgroup",
        );
    config.push_str(&format!(
        "[[mapping]]\nname = \"relay\"\nlisten = \"0.0.0.0:{p1}\"\ntarget = \"{server}\"\n"
    ));
    let (config, metrics) = lab.with_metrics(&config);
    let berth = lab.berth(&dir, &config);
    berth.up().await;
    let m = scrape_in(&lab.host.ns, metrics).await;
    assert_eq!(
        find_sample(
            &m,
            "berth_mapping_failed",
            &[r#"mapping="kernel""#, r#"mode="dnat""#]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        find_sample(&m, "berth_mapping_failed", &[r#"mapping="relay""#]).unwrap_or(0.0),
        0.0
    );
    let row = berth.row("kernel").await;
    assert!(
        row.state
            .starts_with("failed: kernel mode unavailable: cgroup /sys/fs/cgroup/no-such-cgroup"),
        "{row:?}"
    );
    let relay = berth.row("relay").await;
    assert_eq!(
        (relay.mode.as_str(), relay.state.as_str()),
        ("auto", "active")
    );
    let c = lab.ext_connect(SocketAddr::from((EXT_HOST, p1))).await;
    exchange(c, 1, 1 << 16, 1 << 16).await.unwrap();
    // Nothing was left attached by the failed attempt.
    assert!(lab.tc_programs("ext0").is_empty());
}

/// `berth forward --mode dnat` with its flags (`--interface`, `--cgroup`, the timeouts,
/// `--no-relay`): remote and local clients reach the container, the port stays unbound, and
/// SIGTERM ends it with every program detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_forward_in_kernel_mode_with_its_flags() {
    let lab = Lab::up(1).await;
    let (server, mut seen) = lab.tcp_server(0);
    let port = lab.host.free_port();
    let cgroup = lab.cgroup.0.display().to_string();
    let child = lab
        .host
        .ns
        .command(env!("CARGO_BIN_EXE_berth"))
        .unwrap()
        .args([
            "forward",
            "--mode",
            "dnat",
            "--no-relay",
            "--interface",
            "ext0",
        ])
        .args(["--cgroup", &cgroup, "--dnat-closing-timeout", "0.2"])
        .args(["--dnat-udp-timeout", "1", "--dnat-tcp-timeout", "30"])
        .arg(format!("0.0.0.0:{port}"))
        .arg(server.to_string())
        .env("BERTH_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = common::Guard(child);
    let public = SocketAddr::from((EXT_HOST, port));
    // Ready once a remote client gets through (refused until the mapping exists).
    let deadline = tokio::time::Instant::now() + HANG;
    let c = loop {
        let sock = lab
            .ext
            .ns
            .run(|| tokio::net::TcpSocket::new_v4().unwrap())
            .unwrap();
        if let Ok(Ok(c)) = timeout(std::time::Duration::from_secs(1), sock.connect(public)).await {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "never mapped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let t = exchange(c, 1, 1 << 20, 1 << 20).await.unwrap();
    let (peer, _, srv) = seen.recv().await.unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(EXT_CLIENT));
    assert_mirrored(1, &t, &srv);
    let sock = lab.local_socket(false);
    let c = timeout(HANG, sock.connect(SocketAddr::from(([127, 0, 0, 1], port))))
        .await
        .unwrap()
        .unwrap();
    let t = exchange(c, 2, 4096, 4096).await.unwrap();
    let (_, _, srv) = seen.recv().await.unwrap();
    assert_mirrored(2, &t, &srv);
    // No relay: the port is free in the host namespace.
    lab.host
        .ns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", port)).unwrap())
        .unwrap();
    child.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(child.exited().await.success());
    assert!(lab.tc_programs("ext0").is_empty());
    for t in CGROUP_ATTACH_TYPES {
        assert_eq!(cgroup_programs(&lab.cgroup.0, t), 0, "attach type {t}");
    }
}

#[test]
fn the_cli_refuses_what_kernel_mode_cannot_map_or_is_not_allowed_to() {
    common::require_root();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("forward")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--mode", "dnat", "127.0.0.1:0", "10.0.0.1:80"]);
    assert!(err.contains("explicit port"), "{err}");
    let err = run(&["--mode", "dnat", "127.0.0.1:9", "[::1]:80"]);
    assert!(err.contains("a container's address"), "{err}");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let err = run(&[
        "--mode",
        "dnat",
        &format!("127.0.0.1:{port}"),
        "10.0.0.1:80",
    ]);
    assert!(err.contains("already in use"), "{err}");

    // Without the privileges, in a namespace of its own (nothing gets that far anyway).
    let ns = TestNs::create();
    let out = ns
        .ns
        .command("setpriv")
        .unwrap()
        .args([
            "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon",
            "--inh-caps=-bpf,-sys_admin,-net_admin,-perfmon",
            "--",
            env!("CARGO_BIN_EXE_berth"),
            "forward",
            "--mode",
            "dnat",
            "127.0.0.1:9000",
            "10.0.0.1:80",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("kernel mode needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root"),
        "{err}"
    );
}
