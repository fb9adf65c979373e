//! `berth-cni` chained after Debian's reference plugins (`bridge` + `host-local`), run the way
//! a runtime runs them: the "host" is a namespace the test creates, with an external-client
//! namespace linked to it and a child cgroup for kernel mode's local programs; the container
//! is a namespace of its own that `bridge` wires up. Checked: VERSION; ADD passes
//! `prevResult` through; a daemon restart between ADD and traffic; remote TCP and UDP
//! clients reach the container with their own address, local ones through 127.0.0.1 and
//! [::1]; CHECK; DEL (repeated, without `prevResult`) removes the mappings and their
//! conntrack, so a re-added mapping never inherits a stale UDP flow; GC; DEL while the
//! daemon is down (the mappings do not come back); STATUS with and without a daemon; ADD
//! without a daemon.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
};

use common::{
    EXT_CLIENT, EXT_HOST, TestCgroup, TestNs,
    daemon::{Berth, Dir},
    unique,
};
use serde_json::{Value, json};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, UdpSocket},
};

/// Debian's reference plugins.
const CNI_BIN: &str = "/usr/lib/cni";

/// The host, its external client and cgroup, one container namespace, and the plugin
/// configuration's pieces.
struct Lab {
    host: TestNs,
    ext: TestNs,
    container: TestNs,
    cgroup: TestCgroup,
    dir: Dir,
    /// `berth-cni`: a link to the berth binary, which dispatches on its name.
    plugin: PathBuf,
    bridge: String,
}

/// What a plugin run printed and how it ended.
struct Outcome {
    ok: bool,
    json: Value,
}

impl Lab {
    async fn up() -> Self {
        common::require_root();
        assert!(
            Path::new(CNI_BIN).join("bridge").exists(),
            "the reference CNI plugins are missing: run through `cargo xtask test`, which installs containernetworking-plugins"
        );
        let lab = Self {
            host: TestNs::create(),
            ext: TestNs::create(),
            container: TestNs::create(),
            cgroup: TestCgroup::create(),
            dir: Dir::new(),
            plugin: PathBuf::new(),
            bridge: unique("cb"),
        };
        common::link_external(&lab.host, &lab.ext).await;
        let plugin = lab.dir.path("berth-cni");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_berth"), &plugin).unwrap();
        Self { plugin, ..lab }
    }

    fn daemon(&self) -> Berth {
        let config = format!(
            "[metrics]\nenabled = false\n[dnat]\ncgroup = \"{}\"\nudp_timeout = 30\n",
            self.cgroup.0.display()
        );
        Berth::spawn_in(&self.host.ns, &self.dir, &config)
    }

    fn admin(&self) -> PathBuf {
        self.dir.path("admin.sock")
    }

    /// Runs `plugin` with `command` on the container's `eth0`, `conf` on stdin.
    fn run(&self, plugin: &Path, command: &str, conf: &Value) -> Outcome {
        let mut child = self
            .host
            .ns
            .command(plugin)
            .unwrap()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_NETNS", self.container.ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN)
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"))
        };
        Outcome {
            ok: out.status.success(),
            json,
        }
    }

    /// The main plugin's ADD: the container gets 10.66.0.x on a bridge in the host.
    fn bridge_add(&self) -> Value {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "berthtest",
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.66.0.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.dir.path("ipam"),
            },
        });
        let out = self.run(&Path::new(CNI_BIN).join("bridge"), "ADD", &conf);
        assert!(out.ok, "bridge ADD: {}", out.json);
        out.json
    }

    /// berth-cni's configuration, with `prev` as `prevResult` (if any).
    fn conf(&self, mappings: &Value, prev: Option<&Value>) -> Value {
        let mut c = json!({
            "cniVersion": "1.0.0",
            "name": "berthtest",
            "type": "berth-cni",
            "adminSocket": self.admin(),
            // What Podman 4.3 adds: tolerated.
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings},
        });
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn berth_cni(&self, command: &str, conf: &Value) -> Outcome {
        self.run(&self.plugin, command, conf)
    }

    fn container_ip(prev: &Value) -> Ipv4Addr {
        let a = prev["ips"][0]["address"].as_str().unwrap();
        a.split('/').next().unwrap().parse().unwrap()
    }

    /// A TCP server in the container that answers each connection with the peer it saw.
    fn tcp_server(&self, ip: Ipv4Addr) -> u16 {
        let std = self
            .container
            .ns
            .run(|| std::net::TcpListener::bind((ip, 0)).unwrap())
            .unwrap();
        std.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
            }
        });
        port
    }

    /// A UDP server in the container that answers `tag` and the sender's address.
    fn udp_server(&self, ip: Ipv4Addr, tag: &'static str) -> u16 {
        let std = self
            .container
            .ns
            .run(|| std::net::UdpSocket::bind((ip, 0)).unwrap())
            .unwrap();
        std.set_nonblocking(true).unwrap();
        let sock = UdpSocket::from_std(std).unwrap();
        let port = sock.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = sock.recv_from(&mut buf).await {
                let _ = sock
                    .send_to(format!("{tag} {}", from.ip()).as_bytes(), from)
                    .await;
            }
        });
        port
    }

    /// What the container's TCP server says to a client connecting to `addr` from the
    /// external namespace (`local`: from the host, in the cgroup).
    async fn tcp_peer(&self, addr: SocketAddr, local: bool) -> String {
        let sock = if local {
            common::tcp_socket_in(&self.host.ns, Some(&self.cgroup), addr)
        } else {
            common::tcp_socket_in(&self.ext.ns, None, addr)
        };
        common::answer(sock, addr).await
    }
}

fn owner_rows(rows: &[berth::service::status::Row]) -> Vec<&berth::service::status::Row> {
    rows.iter()
        .filter(|r| r.owner == "cni:c0ffee:eth0")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_cni_publishes_ports_through_restarts_and_cleans_up() {
    let lab = Lab::up().await;
    let version = lab.berth_cni("VERSION", &json!({"cniVersion": "1.1.0"}));
    assert!(version.ok);
    assert_eq!(
        version.json["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );

    let prev = lab.bridge_add();
    let ip = Lab::container_ip(&prev);
    let tcp = lab.tcp_server(ip);
    let (udp_a, udp_b) = (lab.udp_server(ip, "a"), lab.udp_server(ip, "b"));
    let (hp, up) = (lab.host.free_port(), lab.host.free_port());
    let mappings = |udp_target: u16| {
        json!([
            {"hostPort": hp, "containerPort": tcp, "protocol": "tcp"},
            {"hostPort": up, "containerPort": udp_target, "protocol": "udp"},
        ])
    };

    // ADD without a daemon: "try again later", nothing half-done.
    let out = lab.berth_cni("ADD", &lab.conf(&mappings(udp_a), Some(&prev)));
    assert!(!out.ok);
    assert_eq!(out.json["code"], 11, "{}", out.json);
    assert!(
        out.json["msg"]
            .as_str()
            .unwrap()
            .contains("cannot be reached")
    );
    let status = lab.berth_cni("STATUS", &lab.conf(&json!([]), None));
    assert_eq!((status.ok, &status.json["code"]), (false, &json!(50)));

    let berth = lab.daemon();
    berth.up().await;
    let status = lab.berth_cni("STATUS", &lab.conf(&json!([]), None));
    assert!(status.ok, "{}", status.json);

    // ADD prints prevResult unchanged.
    let conf = lab.conf(&mappings(udp_a), Some(&prev));
    let out = lab.berth_cni("ADD", &conf);
    assert!(out.ok, "{}", out.json);
    assert_eq!(out.json, prev);
    let rows = berth.rows().await;
    let ours = owner_rows(&rows);
    assert_eq!(ours.len(), 4, "tcp and udp, 0.0.0.0 and [::]: {rows:?}");
    assert!(
        ours.iter().all(|r| r.mode == "dnat" && r.state == "active"),
        "{rows:?}"
    );
    // Kernel mode without a relay: the port stays free for a runtime that reserves it.
    lab.host
        .ns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", hp)).unwrap())
        .unwrap();
    assert!(lab.berth_cni("CHECK", &conf).ok);

    // The daemon restarts between ADD and traffic: the mappings come back from its state.
    berth.stop().await;
    let berth = lab.daemon();
    berth.up().await;
    let rows = berth.rows().await;
    assert_eq!(owner_rows(&rows).len(), 4, "not restored: {rows:?}");
    assert!(lab.berth_cni("CHECK", &conf).ok);

    // Remote clients keep their address; local ones reach the container on 127.0.0.1 and ::1.
    let public = SocketAddr::from((EXT_HOST, hp));
    assert_eq!(lab.tcp_peer(public, false).await, EXT_CLIENT.to_string());
    for local in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let peer = lab.tcp_peer(SocketAddr::new(local, hp), true).await;
        assert!(!peer.is_empty(), "{local}: no answer");
    }
    let client = lab.ext.udp();
    let (answer, from) = common::udp_ask(&client, SocketAddr::from((EXT_HOST, up))).await;
    assert_eq!(answer, format!("a {EXT_CLIENT}"));
    assert_eq!(
        from,
        SocketAddr::from((EXT_HOST, up)),
        "reply from the mapped address"
    );

    // DEL: the mappings go with their conntrack, and DEL may repeat, without prevResult.
    assert!(
        common::bpf::conntrack_entries() > 0,
        "the UDP flow has a conntrack entry"
    );
    let out = lab.berth_cni("DEL", &conf);
    assert!(out.ok, "{}", out.json);
    assert!(owner_rows(&berth.rows().await).is_empty());
    assert_eq!(
        common::bpf::conntrack_entries(),
        0,
        "DEL leaves no conntrack entry"
    );
    let out = lab.berth_cni("DEL", &lab.conf(&mappings(udp_a), None));
    assert!(out.ok, "{}", out.json);
    let out = lab.berth_cni("CHECK", &conf);
    assert_eq!(
        (out.ok, &out.json["code"]),
        (false, &json!(101)),
        "{}",
        out.json
    );

    // The container "restarts" with its UDP port on another server: the same client flow
    // must reach the new one (a stale conntrack entry would still lead to "a").
    let conf_b = lab.conf(&mappings(udp_b), Some(&prev));
    assert!(lab.berth_cni("ADD", &conf_b).ok);
    let (answer, _) = common::udp_ask(&client, SocketAddr::from((EXT_HOST, up))).await;
    assert_eq!(answer, format!("b {EXT_CLIENT}"));

    // GC keeps valid attachments and removes the rest.
    let mut gc = lab.conf(&json!([]), None);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c0ffee", "ifname": "eth0"}]);
    assert!(lab.berth_cni("GC", &gc).ok);
    assert_eq!(owner_rows(&berth.rows().await).len(), 4);
    gc["cni.dev/valid-attachments"] = json!([]);
    assert!(lab.berth_cni("GC", &gc).ok);
    assert!(owner_rows(&berth.rows().await).is_empty());

    // DEL while the daemon is down: the state file forgets the owner, so nothing comes back
    // when the daemon starts.
    assert!(lab.berth_cni("ADD", &conf_b).ok);
    assert_eq!(owner_rows(&berth.rows().await).len(), 4);
    berth.stop().await;
    let out = lab.berth_cni("DEL", &conf_b);
    assert!(out.ok, "DEL without a daemon: {}", out.json);
    let berth = lab.daemon();
    berth.up().await;
    assert!(owner_rows(&berth.rows().await).is_empty());
    berth.stop().await;
    let status = lab.berth_cni("STATUS", &lab.conf(&json!([]), None));
    assert_eq!((status.ok, &status.json["code"]), (false, &json!(50)));
}

#[test]
fn bad_requests_get_the_spec_error_object() {
    let lab_dir = Dir::new();
    let plugin = lab_dir.path("berth-cni");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_berth"), &plugin).unwrap();
    let run = |env: &[(&str, &str)], stdin: &str| {
        let mut cmd = std::process::Command::new(&plugin);
        cmd.env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        // A request refused on its environment alone is answered before stdin is read: the
        // plugin may be gone before the test has written.
        if let Err(e) = written {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        )
    };
    let (ok, v) = run(&[], "{}");
    assert!(!ok);
    assert_eq!(v["code"], 4);
    let (ok, v) = run(&[("CNI_COMMAND", "ADD")], "{not json");
    assert_eq!((ok, &v["code"]), (false, &json!(6)));
    let (ok, v) = run(&[("CNI_COMMAND", "ADD")], r#"{"cniVersion":"0.2.0"}"#);
    assert_eq!((ok, &v["code"]), (false, &json!(1)));
    let (ok, v) = run(&[("CNI_COMMAND", "ADD")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!((ok, &v["code"]), (false, &json!(4)), "{v}");
    assert_eq!(v["cniVersion"], "1.0.0");
}
