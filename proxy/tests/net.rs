//! The container network: `up` builds what the walk-through builds, `down` leaves nothing,
//! `up` twice is refused cleanly, failures roll back, and the CLI says what is wrong.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{net::SocketAddr, path::Path, process::Command};

use berth::net::{self, ContainerSpec, NetError, NetNs, Netlink, Topology};
use common::{HANG, TestNet, require_root, unique};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

async fn link_exists(name: &str) -> bool {
    Netlink::connect()
        .unwrap()
        .link(name)
        .await
        .unwrap()
        .is_some()
}

/// What `ip netns list` would show for `name`, read the way iproute2 reads it.
fn netns_listed(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_builds_the_walk_through_and_down_leaves_nothing() {
    let net = TestNet::up(2).await;
    let topo = net.topo.clone();
    let (a, b) = (&topo.containers[0], &topo.containers[1]);

    // Host side: the bridge with the gateway, both host veths on it.
    assert!(link_exists(topo.bridge.as_str()).await);
    assert!(link_exists(a.host_veth.as_str()).await && link_exists(b.host_veth.as_str()).await);
    assert!(
        !link_exists(a.peer_tmp.as_str()).await,
        "peer must have moved into the namespace"
    );
    assert!(netns_listed(&a.name) && NetNs::named(&a.name).exists());

    // Inside: eth0 with the address, lo up, a default route via the gateway.
    let (gw, addr) = (topo.gateway, a.addr);
    let inside = net
        .ns(0)
        .run(move || {
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            let route = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            let lo = std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().unwrap());
            let eth0 = std::net::TcpListener::bind((addr, 0)).is_ok();
            (dev, route, lo.is_ok(), eth0)
        })
        .unwrap();
    assert!(
        inside.0.contains("eth0:") && !inside.0.contains(a.host_veth.as_str()),
        "{}",
        inside.0
    );
    let default = inside
        .1
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("00000000"))
        .expect("no default route");
    let via = u32::from_str_radix(default.split_whitespace().nth(2).unwrap(), 16).unwrap();
    assert_eq!(
        std::net::Ipv4Addr::from(via.swap_bytes()),
        gw,
        "default route gateway"
    );
    assert!(inside.2 && inside.3, "lo and eth0 must be usable");

    // Container to container over the bridge, and host to container.
    let listener = net.listen(0);
    let server = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        (peer, buf)
    });
    let b_ip = b.addr;
    net.ns(1)
        .run(move || {
            use std::io::Write as _;
            std::net::TcpStream::connect(server)
                .unwrap()
                .write_all(b"hello")
                .unwrap();
        })
        .unwrap();
    let (peer, got) = timeout(HANG, accept).await.unwrap().unwrap();
    assert_eq!((peer.ip(), &got), (std::net::IpAddr::V4(b_ip), b"hello"));
    let listener = net.listen(0);
    let addr = listener.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
    c.unwrap().write_all(b"x").await.unwrap();
    assert_eq!(
        s.unwrap().1.ip(),
        std::net::IpAddr::V4(gw),
        "host reaches the container from the gateway address"
    );

    // Down: nothing left.
    drop(net);
    for c in &topo.containers {
        assert!(!netns_listed(&c.name), "namespace {} left behind", c.name);
        assert!(
            !link_exists(c.host_veth.as_str()).await,
            "veth {} left behind",
            c.host_veth
        );
    }
    assert!(
        !link_exists(topo.bridge.as_str()).await,
        "bridge left behind"
    );
    assert!(
        !Path::new(&format!("/run/berth/net/{}.toml", topo.bridge)).exists(),
        "state file left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !topo
            .containers
            .iter()
            .any(|c| mounts.contains(&format!("/run/netns/{} ", c.name))),
        "mount left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_twice_is_refused_and_changes_nothing() {
    let net = TestNet::up(1).await;
    let err = net::up(&net.topo).await.unwrap_err();
    assert!(matches!(err, NetError::AlreadyExists { .. }), "{err:?}");
    assert!(err.to_string().contains("already exists"), "{err}");
    // The first topology still works.
    let l = net.listen(0);
    let (c, s) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    assert!(c.is_ok() && s.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_up_rolls_back_everything() {
    require_root();
    // The second container's namespace exists already; nothing of the first may remain.
    let taken = unique("tc");
    let stray = NetNs::create(&taken).unwrap();
    let bridge = unique("tb");
    let specs = [
        ContainerSpec {
            name: unique("tc"),
            addr: None,
        },
        ContainerSpec {
            name: taken.clone(),
            addr: None,
        },
    ];
    let (subnet, _) = common::unique_subnet();
    let topo = Topology::resolve(Some(&bridge), Some(&subnet), None, &specs).unwrap();
    let err = net::up(&topo).await.unwrap_err();
    assert!(err.to_string().contains(&taken), "{err}");
    assert!(
        !link_exists(&bridge).await,
        "bridge created despite the failure"
    );
    assert!(
        !netns_listed(&specs[0].name),
        "first container created despite the failure"
    );
    stray.delete().unwrap();
    assert!(!netns_listed(&taken));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_is_idempotent_and_keeps_foreign_ports() {
    let net = TestNet::up(1).await;
    let bridge = net.topo.bridge.clone();
    // A port berth did not create keeps the bridge alive.
    let foreign = unique("tf");
    let nl = Netlink::connect().unwrap();
    nl.add_veth(&foreign.parse().unwrap(), &unique("tp").parse().unwrap())
        .await
        .unwrap();
    let _guard = LinkGuard(foreign.clone());
    nl.set_controller(&foreign, bridge.as_str()).await.unwrap();
    let report = net::down(&bridge, &[]).await.unwrap();
    assert_eq!(report.foreign_ports, vec![foreign.clone()]);
    assert!(!report.bridge_removed && link_exists(bridge.as_str()).await);
    nl.delete(&foreign).await.unwrap();
    let again = net::down(&bridge, &[]).await.unwrap();
    assert!(again.bridge_removed && !link_exists(bridge.as_str()).await);
    drop(net); // runs down a third time: must still succeed quietly
}

/// Deletes a link the test created, even when the test fails.
struct LinkGuard(String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Drop may run inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { Netlink::connect().unwrap().delete(&name).await })
        })
        .join();
    }
}

// === The CLI ===

fn berth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_berth"))
}

#[test]
fn cli_exec_runs_inside_the_namespace_and_passes_the_exit_code() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let net = rt.block_on(TestNet::up(1));
    let name = net.topo.containers[0].name.clone();
    let out = berth()
        .args(["net", "exec", &name, "--", "cat", "/proc/net/dev"])
        .output()
        .unwrap();
    let dev = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dev.contains("eth0:") && !dev.contains(net.topo.bridge.as_str()),
        "{dev}"
    );
    let code = berth()
        .args(["net", "exec", &name, "--", "sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(code.code(), Some(7));
    let missing = berth()
        .args(["net", "exec", "nosuchns1", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no network namespace named \"nosuchns1\"")
    );
    drop(net);
}

#[test]
fn cli_up_and_down_from_a_topology_file() {
    require_root();
    let bridge = unique("tb");
    let c = unique("tc");
    let file = std::env::temp_dir().join(format!("{bridge}.toml"));
    let (subnet, [a, b, n]) = common::unique_subnet();
    let ip = format!("{a}.{b}.{n}.7");
    std::fs::write(
        &file,
        format!(
            "bridge = \"{bridge}\"\nsubnet = \"{subnet}\"\n[[container]]\nname = \"{c}\"\nip = \"{ip}\"\n"
        ),
    )
    .unwrap();
    let up = berth()
        .args(["net", "up", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&up.stdout);
    let ok = up.status.success() && shown.contains(&format!("{ip}/24"));
    let down = berth()
        .args(["net", "down", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        ok,
        "up failed: {shown} {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!netns_listed(&c));
    // Running it again is harmless, and says there was nothing left.
    let again = berth()
        .args(["net", "down", "--bridge", &bridge])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
}

#[test]
fn cli_rejects_bad_input_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (&["net", "up", "--subnet", "10.0.0.0/33"], "invalid subnet"),
        (&["net", "up", "--subnet", "banana"], "invalid subnet"),
        (
            &["net", "up", "--container", "averyveryverylongname"],
            "longer than 15 bytes",
        ),
        (
            &["net", "up", "--container", "thirteenchars"],
            "shorter container name",
        ),
        (
            &["net", "up", "--container", "a=300.1.1.1"],
            "not an IPv4 address",
        ),
        (&["net", "up", "--bridge", "a/b"], "invalid interface name"),
        (
            &["net", "up", "--config", "/nonexistent/topo.toml"],
            "failed to read topology file",
        ),
        (&["forward", "nonsense", "127.0.0.1:80"], "expected IP:PORT"),
        (
            &["forward", "127.0.0.1:0", "127.0.0.1:80", "--mode", "bogus"],
            "unknown mode",
        ),
        (
            &[
                "forward",
                "127.0.0.1:0",
                "127.0.0.1:80",
                "--max-connections",
                "0",
            ],
            "--max-connections: 0 is not a number from 1",
        ),
        (
            &[
                "forward",
                "127.0.0.1:0",
                "127.0.0.1:80",
                "--connect-timeout=-1",
            ],
            "not a number of seconds",
        ),
        (&["forward", "127.0.0.1:0"], "required"),
        (&["bogus"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let out = berth().args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn cli_net_without_privileges_says_so() {
    use std::os::unix::process::CommandExt as _;
    require_root();
    // As `nobody`, with no capabilities left.
    let out = berth()
        .args(["net", "up", "--container", "nopriv"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(!netns_listed("nopriv"));
}

#[test]
fn cli_forward_reports_an_occupied_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let out = berth()
        .args(["forward", &addr.to_string(), "127.0.0.1:9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already in use"), "{err}");
}
