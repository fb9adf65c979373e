//! Container egress (`berth net up --masquerade`), in a host namespace of the test's own with an
//! "outside" namespace behind it: a container reaches a server outside, which sees the host's
//! address; replies come back; the kernel's conntrack entries expire; `down` removes the table
//! and turns forwarding off again.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use berth::net::{self, ContainerSpec, NetNs, Topology};
use common::{EXT_CLIENT, EXT_HOST, HANG, TestNs, exchange, serve_exchange, unique};
use tokio::{
    net::{TcpListener, TcpSocket, UdpSocket},
    time::{Instant, timeout},
};

fn sysctl(ns: &NetNs, key: &str) -> String {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    ns.run(|| std::fs::read_to_string(&path))
        .unwrap()
        .unwrap()
        .trim()
        .to_owned()
}

fn set_sysctl(ns: &NetNs, key: &str, value: &str) {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    ns.run(|| std::fs::write(&path, value)).unwrap().unwrap();
}

/// `berth net ARGS…` run inside `ns`; its stdout, or a panic with its stderr.
fn berth_net(ns: &NetNs, args: &[&str]) -> String {
    let out = ns
        .command(env!("CARGO_BIN_EXE_berth"))
        .unwrap()
        .arg("net")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berth net {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn installed(ns: &NetNs, topo: &Topology) -> bool {
    let bridge = topo.bridge.clone();
    ns.run(move || net::masquerade_installed(&bridge))
        .unwrap()
        .unwrap()
}

/// Removes the topology if the test did not get as far as `down`.
struct Down<'a>(&'a Topology, &'a NetNs);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        common::tear_down(self.0, Some(self.1.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_reach_the_outside_through_the_hosts_address() {
    let host = TestNs::create();
    let outside = TestNs::create();
    common::link_external(&host, &outside).await;
    let container = unique("te");
    let topo = Topology::resolve(
        Some(&unique("tb")),
        Some("10.78.0.0/24"),
        None,
        &[ContainerSpec {
            name: container.clone(),
            addr: None,
        }],
    )
    .unwrap();
    let _down = Down(&topo, &host.ns);
    // Conntrack timeouts of the host namespace, short enough to watch entries go.
    for key in [
        "udp_timeout",
        "udp_timeout_stream",
        "tcp_timeout_time_wait",
        "tcp_timeout_close",
        "tcp_timeout_fin_wait",
        "tcp_timeout_last_ack",
        "tcp_timeout_close_wait",
    ] {
        set_sysctl(&host.ns, &format!("net.netfilter.nf_conntrack_{key}"), "1");
    }
    assert_eq!(
        sysctl(&host.ns, "net.ipv4.ip_forward"),
        "0",
        "a new namespace does not forward"
    );

    let out = berth_net(
        &host.ns,
        &[
            "up",
            "--masquerade",
            "--bridge",
            topo.bridge.as_str(),
            "--subnet",
            "10.78.0.0/24",
            "--container",
            &container,
        ],
    );
    assert!(
        out.contains(&format!(
            "egress from 10.78.0.0/24 masqueraded (nf_tables table ip berth_{})",
            topo.bridge
        )),
        "{out}"
    );
    assert_eq!(sysctl(&host.ns, "net.ipv4.ip_forward"), "1");
    let c_ns = NetNs::named(&container);

    // TCP: a checksummed exchange with a server outside, which sees the host's address.
    let listener = outside
        .ns
        .run(|| std::net::TcpListener::bind((EXT_CLIENT, 0)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    let server: SocketAddr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        (peer, serve_exchange(stream).await.unwrap())
    });
    let sock = c_ns.run(|| TcpSocket::new_v4().unwrap()).unwrap();
    let stream = timeout(HANG, sock.connect(server)).await.unwrap().unwrap();
    // The open connection is tracked, its replies addressed to the host's address.
    let tracked = flows_outside(&host.ns);
    assert!(
        tracked.iter().any(|l| l.contains("tcp")
            && l.contains(&format!("src={} ", topo.containers[0].addr))
            && l.contains(&format!("dst={EXT_HOST} "))),
        "{tracked:#?}"
    );
    let client = timeout(HANG, exchange(stream, 7, 3 << 20, 5 << 20))
        .await
        .unwrap()
        .unwrap();
    let (peer, (id, tally)) = timeout(HANG, served).await.unwrap().unwrap();
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(EXT_HOST),
        "the server sees the host's address"
    );
    common::assert_mirrored(id, &client, &tally);
    assert!(installed(&host.ns, &topo));

    // UDP: the reply to a masqueraded datagram comes back to the container.
    let echo = outside
        .ns
        .run(|| std::net::UdpSocket::bind((EXT_CLIENT, 0)))
        .unwrap()
        .unwrap();
    echo.set_nonblocking(true).unwrap();
    let echo = UdpSocket::from_std(echo).unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let reply = format!("{} from {}", String::from_utf8_lossy(&buf[..n]), from.ip());
            let _ = echo.send_to(reply.as_bytes(), from).await;
        }
    });
    let udp = c_ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp = UdpSocket::from_std(udp).unwrap();
    udp.send_to(b"ping", echo_addr).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = timeout(HANG, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], format!("ping from {EXT_HOST}").as_bytes());

    // Both flows are over: their entries expire (timeouts of 1 s set above).
    drop(udp);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = flows_outside(&host.ns);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "conntrack entries never expired: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Down: the table is gone and forwarding is off again, as it was.
    let out = berth_net(
        &host.ns,
        &[
            "down",
            "--bridge",
            topo.bridge.as_str(),
            "--container",
            &container,
        ],
    );
    assert!(out.contains("egress table ip berth_"), "{out}");
    assert!(out.contains("ip_forward turned off again"), "{out}");
    assert!(!installed(&host.ns, &topo));
    assert_eq!(sysctl(&host.ns, "net.ipv4.ip_forward"), "0");
}

/// The kernel's conntrack entries in `ns` for flows to the outside namespace.
fn flows_outside(ns: &NetNs) -> Vec<String> {
    let table = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack"))
        .unwrap()
        .unwrap();
    table
        .lines()
        .filter(|l| l.contains(&format!("dst={EXT_CLIENT} ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn up_help_says_what_masquerade_changes() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["net", "up", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--masquerade"), "{help}");
    assert!(help.contains("berth_BRIDGE"), "{help}");
}
