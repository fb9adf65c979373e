//! Real Podman (Debian's 4.3, CNI backend, runc) publishing ports through `berth-cni` in
//! place of `portmap`: `podman run -p P:80 -p U:53/udp` on an image imported offline, traffic
//! from 127.0.0.1, [::1] and a remote client (which the container sees as itself), then
//! `podman stop`, `podman start` and `podman rm`, after which no mapping, conntrack entry or
//! BPF attachment is left.
//!
//! Isolation: Podman runs in a network namespace of the test's own (its bridge and its
//! containers' veths live and die there), with its own storage, run root, temporary
//! directory, `containers.conf`, `storage.conf`, CNI configuration and plugin directory;
//! `berth run` runs in the same namespace, its kernel-mode cgroup programs on a child cgroup
//! the test creates. Rootful Podman reserves the published ports itself (conmon holds them);
//! berth-cni's kernel-only mappings bind nothing, so the two coexist.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
};

use berth::service::status::Row;
use common::{
    EXT_CLIENT, EXT_HOST, TestCgroup, TestNs,
    bpf::{all_cgroup_programs, conntrack_entries, tc_programs},
    daemon::{Berth, Dir},
    unique,
};
use tokio::io::AsyncWriteExt as _;

const PODMAN: &str = "/usr/bin/podman";
const IMAGE: &str = "localhost/berth-test:busybox";
const NETWORK: &str = "berthtest";

/// Podman with a configuration of its own, in a namespace of the test's, beside a berth
/// daemon; every container is removed and everything mounted unmounted on drop.
struct Podman {
    host: TestNs,
    ext: TestNs,
    cgroup: TestCgroup,
    dir: Dir,
}

impl Podman {
    async fn start() -> Self {
        common::require_root();
        for tool in [
            PODMAN,
            "/usr/sbin/runc",
            "/usr/bin/conmon",
            "/usr/lib/cni/bridge",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: `cargo xtask test` installs podman, runc and containernetworking-plugins"
            );
        }
        let p = Self {
            host: TestNs::create(),
            ext: TestNs::create(),
            cgroup: TestCgroup::create(),
            dir: Dir::new(),
        };
        common::link_external(&p.host, &p.ext).await;
        p.configure();
        p.import_image();
        p
    }

    /// containers.conf and storage.conf of the test's own, a CNI network whose chain is
    /// bridge + berth-cni, and a plugin directory with the reference plugins and berth-cni.
    fn configure(&self) {
        let d = |n: &str| self.dir.path(n).display().to_string();
        let bin = self.dir.path("cni-bin");
        std::fs::create_dir_all(&bin).unwrap();
        for plugin in std::fs::read_dir("/usr/lib/cni").unwrap() {
            let plugin = plugin.unwrap().path();
            std::os::unix::fs::symlink(&plugin, bin.join(plugin.file_name().unwrap())).unwrap();
        }
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_berth"), bin.join("berth-cni")).unwrap();
        std::fs::create_dir_all(self.dir.path("net.d")).unwrap();
        // runc (crun refuses this cgroup layout), cgroupfs, file events, bounded ulimits (the
        // default 1048576 needs CAP_SYS_RESOURCE).
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
             [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
             cni_plugin_dirs = [\"{}\"]\ndefault_network = \"{NETWORK}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             events_logfile_path = \"{}\"\nruntime = \"runc\"\nstatic_dir = \"{}\"\n\
             tmp_dir = \"{}\"\nvolume_path = \"{}\"\n",
            d("net.d"),
            bin.display(),
            d("events.log"),
            d("libpod"),
            d("tmp"),
            d("volumes"),
        );
        std::fs::write(self.dir.path("containers.conf"), conf).unwrap();
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            d("storage"),
            d("run")
        );
        std::fs::write(self.dir.path("storage.conf"), storage).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": unique("cb"),
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "ranges": [[{"subnet": "10.89.7.0/24"}]],
                        "dataDir": d("ipam"),
                    },
                },
                {
                    "type": "berth-cni",
                    "capabilities": {"portMappings": true},
                    "adminSocket": d("admin.sock"),
                },
            ],
        });
        std::fs::write(
            self.dir.path(&format!("net.d/{NETWORK}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
    }

    fn command(&self) -> Command {
        let mut cmd = self.host.ns.command(PODMAN).unwrap();
        cmd.env("CONTAINERS_CONF", self.dir.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.path("storage.conf"))
            .arg("--root")
            .arg(self.dir.path("storage"))
            .arg("--runroot")
            .arg(self.dir.path("run"));
        cmd
    }

    /// Runs podman with `args`: success and its output (stdout, or stderr on failure).
    fn podman(&self, args: &[&str]) -> (bool, String) {
        let out = self.command().args(args).output().unwrap();
        let text = if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        (out.status.success(), text)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.podman(args);
        assert!(ok, "podman {args:?}: {text}");
        text
    }

    /// `podman import` of a rootfs made from busybox-static.
    fn import_image(&self) {
        let root = self.dir.path("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/usr/bin/busybox", root.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .output()
            .unwrap();
        assert!(tar.status.success());
        let mut import = self
            .command()
            .args(["import", "-", IMAGE])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
        assert!(import.wait().unwrap().success(), "podman import failed");
    }

    fn daemon(&self) -> Berth {
        let config = format!(
            "[metrics]\nenabled = false\n[dnat]\ncgroup = \"{}\"\nudp_timeout = 30\n",
            self.cgroup.0.display()
        );
        Berth::spawn_in(&self.host.ns, &self.dir, &config)
    }

    /// What the container's "who" server says to a client of `addr`: from the external
    /// namespace, or (`local`) from the host in the cgroup.
    async fn who(&self, addr: SocketAddr, local: bool) -> String {
        let sock = if local {
            common::tcp_socket_in(&self.host.ns, Some(&self.cgroup), addr)
        } else {
            common::tcp_socket_in(&self.ext.ns, None, addr)
        };
        common::answer(sock, addr).await
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-af", "-t", "0"]);
        self.dir.unmount_all();
    }
}

/// Servers made by the test inside the running container's namespace (busybox has no UDP
/// server): "who" on 80 answers with the peer it sees, an echo on 53/udp.
fn serve_in(p: &Podman, container: &str) -> common::Tasks {
    let pid: u32 = p
        .ok(&["inspect", "-f", "{{.State.Pid}}", container])
        .parse()
        .unwrap();
    let (who, udp) = common::in_netns(pid, || {
        (
            std::net::TcpListener::bind("0.0.0.0:80").unwrap(),
            std::net::UdpSocket::bind("0.0.0.0:53").unwrap(),
        )
    });
    who.set_nonblocking(true).unwrap();
    udp.set_nonblocking(true).unwrap();
    let who = tokio::net::TcpListener::from_std(who).unwrap();
    let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
    common::Tasks(vec![
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = who.accept().await {
                let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
            }
        }),
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], from).await;
            }
        }),
    ])
}

fn cni_rows(rows: &[Row]) -> Vec<&Row> {
    rows.iter()
        .filter(|r| r.owner.starts_with("cni:"))
        .collect()
}

/// Every published port works: TCP from 127.0.0.1, [::1] and remote (seen as itself), UDP
/// from remote (answered from the mapped address).
async fn check_ports(p: &Podman, tcp: u16, udp: u16) {
    for local in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let seen = p.who(SocketAddr::new(local, tcp), true).await;
        assert!(!seen.is_empty(), "{local}: no answer");
    }
    let seen = p.who(SocketAddr::from((EXT_HOST, tcp)), false).await;
    assert_eq!(
        seen,
        EXT_CLIENT.to_string(),
        "the container sees the client"
    );
    let sock = p.ext.udp();
    let to = SocketAddr::from((EXT_HOST, udp));
    let (answer, from) = common::udp_ask(&sock, to).await;
    assert_eq!(
        (answer.as_str(), from),
        ("ping", to),
        "echoed from the mapped address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_publishes_ports_through_berth_cni() {
    let p = Podman::start().await;
    let berth = p.daemon();
    berth.up().await;
    let (tcp, udp) = (p.host.free_port(), p.host.free_port());
    let (tcp_s, udp_s) = (format!("{tcp}:80"), format!("{udp}:53/udp"));
    p.ok(&[
        "run", "-d", "--name", "web", "-p", &tcp_s, "-p", &udp_s, IMAGE, "sleep", "3600",
    ]);
    let rows = berth.rows().await;
    let ours = cni_rows(&rows);
    assert_eq!(ours.len(), 4, "tcp and udp, 0.0.0.0 and [::]: {rows:?}");
    assert!(
        ours.iter().all(|r| r.mode == "dnat" && r.state == "active"),
        "{rows:?}"
    );
    let servers = serve_in(&p, "web");
    check_ports(&p, tcp, udp).await;
    assert!(
        conntrack_entries() > 0,
        "the remote flows have conntrack entries"
    );

    // Stop: CNI DEL. Nothing of the container's stays in berth or in the kernel's maps.
    drop(servers);
    p.ok(&["stop", "-t", "0", "web"]);
    assert!(cni_rows(&berth.rows().await).is_empty());
    assert_eq!(conntrack_entries(), 0);

    // Start: ADD again, with whatever address the container gets now.
    p.ok(&["start", "web"]);
    assert_eq!(cni_rows(&berth.rows().await).len(), 4);
    let servers = serve_in(&p, "web");
    check_ports(&p, tcp, udp).await;

    // Remove: no mapping, conntrack entry or program left, and nothing to restore.
    drop(servers);
    p.ok(&["rm", "-f", "-t", "0", "web"]);
    assert!(cni_rows(&berth.rows().await).is_empty());
    assert_eq!(conntrack_entries(), 0);
    assert_eq!(all_cgroup_programs(&p.cgroup.0), 0, "cgroup programs left");
    assert!(
        tc_programs(&p.host.ns, "ext0").is_empty(),
        "TC program left"
    );
    let state = std::fs::read_to_string(p.dir.path("admin.state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["mappings"], serde_json::json!([]));
    berth.stop().await;
}
