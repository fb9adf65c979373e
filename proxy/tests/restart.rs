//! Kernel-mode flows outlive the process: `berth run` pins its maps and links on a bpf
//! filesystem (here one the test mounts), a crash (SIGKILL) leaves every flow running, and
//! the next `berth run` adopts the pinned state. Checked in the kernel-mode lab (a host
//! namespace with a bridge, a container and an external client, a child cgroup): 64
//! connections carry checksummed transfers across the crash, with no process at all for
//! half of them; the successor adopts the rest and serves new ones; a plain stop leaves
//! nothing pinned or attached. State that cannot be adopted (other sizes) is replaced by a
//! clean start, and state that no mapping wants any more is removed. `berth upgrade` hands a
//! running daemon over to its successor under load: no connection attempt is refused, the
//! kernel-mode flows go on through the successor, the relayed ones finish in the old daemon,
//! and an upgrade whose successor cannot start leaves the old daemon serving.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::net::{IpAddr, SocketAddr};

use common::{
    EXT_CLIENT, EXT_HOST, HANG, Tally, assert_mirrored,
    bpf::{BpfFs, all_cgroup_programs, map_entries_of},
    daemon::{Berth, Dir, successor_pid, upgrade},
    exchange,
    lab::Lab,
    spawn_gated_exchange_server, wait_until,
};
use tokio::{net::TcpListener, task::JoinHandle, time::timeout};

/// The pin directory's name inside the test's bpffs.
const PINS: &str = "berth";

/// Server-side results of exchanges, by connection.
type Served = tokio::sync::mpsc::UnboundedReceiver<std::io::Result<(u64, Tally)>>;

/// A gated exchange server in container `i`: each connection waits at the gate before it
/// reads or sends a byte.
fn gated_server(lab: &Lab, i: usize) -> (SocketAddr, Served, tokio::sync::watch::Sender<bool>) {
    let std = lab.bind_in(i, std::net::TcpListener::bind);
    std.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std).unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, gate) = spawn_gated_exchange_server(listener);
    (addr, seen, gate)
}

/// `n` exchanges from the external client, ids from `first`, each `size` bytes both ways.
async fn start_exchanges(
    lab: &Lab,
    public: SocketAddr,
    first: u64,
    n: u64,
    size: u64,
) -> Vec<(u64, JoinHandle<Tally>)> {
    let mut out = Vec::new();
    for id in first..first + n {
        let c = lab.ext_connect(public).await;
        out.push((
            id,
            tokio::spawn(async move {
                timeout(HANG * 2, exchange(c, id, size, size))
                    .await
                    .unwrap_or_else(|_| panic!("transfer {id} hung"))
                    .unwrap_or_else(|e| panic!("transfer {id}: {e}"))
            }),
        ));
    }
    out
}

/// Waits for every transfer of `clients` and checks each against its server side.
async fn finish(clients: Vec<(u64, JoinHandle<Tally>)>, seen: &mut Served) {
    let mut done = Vec::new();
    for (id, task) in clients {
        done.push((id, task.await.unwrap()));
    }
    common::assert_all_served(seen, &done).await;
}

/// Waits until no berth program is left on the lab's uplink, its bridge or its cgroup.
async fn nothing_attached(lab: &Lab) {
    let bridge = lab.topo.bridge.to_string();
    wait_until("the TC programs to be detached", || {
        lab.tc_programs("ext0").is_empty() && lab.tc_programs(&bridge).is_empty()
    })
    .await;
    wait_until("the cgroup programs to be detached", || {
        all_cgroup_programs(&lab.cgroup.0) == 0
    })
    .await;
}

fn sigkill(berth: &mut Berth) {
    berth.child.kill().unwrap();
    berth.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_mode_flows_survive_a_crash_and_the_successor_adopts_them() {
    let lab = Lab::up(1).await;
    let bpffs = BpfFs::mount();
    let (during, mut seen_during, gate_during) = gated_server(&lab, 0);
    let (after, mut seen_after, gate_after) = gated_server(&lab, 0);
    let (p_during, p_after) = (lab.host.free_port(), lab.host.free_port());
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let config = lab.config(
        &format!("pin_dir = \"{}\"", bpffs.0.join(PINS).display()),
        &[
            ("during", "tcp", any(p_during), during),
            ("after", "tcp", any(p_after), after),
        ],
    );
    let dir = Dir::new();
    let mut first = lab.berth(&dir, &config);
    first.up().await;
    let pinned = bpffs.pinned(PINS);
    for name in [
        "BERTH_DNAT_CT",
        "BERTH_DNAT_SVC",
        "link_tc_",
        "link_berth_dnat_connect4",
    ] {
        assert!(
            pinned.iter().any(|p| p.starts_with(name)),
            "{name} is not pinned: {pinned:?}"
        );
    }

    // 64 connections, each held at its server's gate with its buffers full: 32 run while no
    // berth exists, 32 once the successor has adopted them.
    const SIZE: u64 = 8 << 20;
    let public = |p: u16| SocketAddr::from((EXT_HOST, p));
    let c_during = start_exchanges(&lab, public(p_during), 1, 32, SIZE).await;
    let c_after = start_exchanges(&lab, public(p_after), 101, 32, SIZE).await;
    first
        .wait_row("after", "its 32 flows", |r| r.active == 32)
        .await;
    first
        .wait_row("during", "its 32 flows", |r| r.active == 32)
        .await;
    sigkill(&mut first);
    let bridge = lab.topo.bridge.to_string();
    assert_eq!(lab.tc_programs("ext0"), ["berth_dnat_tc"], "pinned on");
    assert_eq!(lab.tc_programs(&bridge), ["berth_dnat_tc"], "pinned on");

    // No berth at all: the first 32 run to the end, every byte checked.
    gate_during.send(true).unwrap();
    finish(c_during, &mut seen_during).await;

    // The successor, 2 s after the crash, adopts the pinned state: the last 32 are still
    // open (their first bytes crossed before the crash) and run to the end through it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let second = lab.berth(&dir, &config);
    second.up().await;
    let row = second.row("after").await;
    assert_eq!(row.mode, "dnat");
    assert!(
        row.active >= 32,
        "the adopted flows count as the mapping's: {row:?}"
    );
    assert!(
        row.bytes_to_target > 0,
        "the counters went on from the predecessor's: {row:?}"
    );
    assert_eq!(
        lab.tc_programs("ext0"),
        ["berth_dnat_tc"],
        "one program per interface: the link was taken over, not doubled"
    );
    gate_after.send(true).unwrap();
    finish(c_after, &mut seen_after).await;

    // New connections, remote and local, are the successor's as usual.
    let c = lab.ext_connect(public(p_after)).await;
    let t = exchange(c, 500, 1 << 20, 1 << 20).await.unwrap();
    let (id, srv) = seen_after.recv().await.unwrap().unwrap();
    assert_eq!(id, 500);
    assert_mirrored(500, &t, &srv);
    let sock = lab.local_socket(false);
    let c = timeout(
        HANG,
        sock.connect(SocketAddr::from(([127, 0, 0, 1], p_after))),
    )
    .await
    .unwrap()
    .unwrap();
    let t = exchange(c, 501, 1 << 20, 1 << 20).await.unwrap();
    let (id, srv) = seen_after.recv().await.unwrap().unwrap();
    assert_eq!(id, 501);
    assert_mirrored(501, &t, &srv);
    let c = lab.ext_connect(public(p_during)).await;
    let t = exchange(c, 502, 1 << 20, 0).await.unwrap();
    let (_, srv) = seen_during.recv().await.unwrap().unwrap();
    assert_mirrored(502, &t, &srv);

    // A plain stop leaves nothing pinned, on a TC hook or on the cgroup.
    second.stop().await;
    assert_eq!(bpffs.pinned(PINS), Vec::<String>::new(), "nothing pinned");
    assert!(!bpffs.0.join(PINS).exists(), "the pin directory is gone");
    nothing_attached(&lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_that_cannot_be_adopted_or_is_not_wanted_is_removed() {
    let lab = Lab::up(1).await;
    let bpffs = BpfFs::mount();
    let (server, mut seen) = lab.tcp_server(0);
    let port = lab.host.free_port();
    let any = SocketAddr::from(([0, 0, 0, 0], port));
    let public = SocketAddr::from((EXT_HOST, port));
    let pin_dir = format!("pin_dir = \"{}\"", bpffs.0.join(PINS).display());
    let dir = Dir::new();
    let mut first = lab.berth(&dir, &lab.config(&pin_dir, &[("web", "tcp", any, server)]));
    first.up().await;
    let open = lab.ext_connect(public).await;
    first
        .wait_row("web", "the open flow", |r| r.active == 1)
        .await;
    sigkill(&mut first);

    // Another conntrack capacity: the pinned maps cannot serve, so they are replaced by empty
    // ones. The crashed berth's connection still goes on, as a new flow: kernel mode maps any
    // packet to a mapped port, not only a SYN, and the container is the same.
    let resized = format!("{pin_dir}\nconntrack_entries = 4096");
    let mut second = lab.berth(&dir, &lab.config(&resized, &[("web", "tcp", any, server)]));
    second.up().await;
    let ct = aya::maps::MapInfo::from_pin(bpffs.0.join(PINS).join("BERTH_DNAT_CT")).unwrap();
    assert_eq!(
        ct.max_entries(),
        4096,
        "a fresh conntrack map of the new size"
    );
    assert_eq!(second.row("web").await.active, 0, "nothing adopted");
    assert_eq!(
        lab.tc_programs("ext0"),
        ["berth_dnat_tc"],
        "only the new program"
    );
    for (n, c) in [(1u64, open), (2, lab.ext_connect(public).await)] {
        let t = exchange(c, n, 1 << 20, 1 << 20).await.unwrap();
        let (peer, id, srv) = seen.recv().await.unwrap();
        assert_eq!((peer.ip(), id), (IpAddr::V4(EXT_CLIENT), n));
        assert_mirrored(n, &t, &srv);
    }
    sigkill(&mut second);

    // A successor without a kernel-mode mapping removes what was pinned: nothing stays.
    let third = lab.berth(&dir, &lab.config(&pin_dir, &[]));
    third.up().await;
    assert_eq!(bpffs.pinned(PINS), Vec::<String>::new(), "nothing pinned");
    assert!(!bpffs.0.join(PINS).exists(), "the pin directory is gone");
    nothing_attached(&lab).await;
    third.stop().await;
}

/// The successor, which is not the test's child until its parent exits: killed if the test
/// fails before it stopped it.
struct Successor(Option<i32>);

impl Successor {
    /// SIGTERM, then its exit status (it has come to this process, a subreaper, by then).
    async fn stop(mut self) -> nix::sys::wait::WaitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.take().unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(pid, None).unwrap())
            .await
            .unwrap()
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_refuses_no_connection_and_loses_no_flow() {
    let lab = Lab::up(1).await;
    let bpffs = BpfFs::mount();
    let (kernel, mut seen_kernel, gate_kernel) = gated_server(&lab, 0);
    let (relayed, mut seen_relayed, gate_relayed) = gated_server(&lab, 0);
    let (echo, _seen_echo, gate_echo) = gated_server(&lab, 0);
    gate_echo.send(true).unwrap();
    // The successor is the old daemon's child; once the old one exits it comes to this
    // process, which can then wait for it.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let (p_kernel, p_relayed, p_echo) = (
        lab.host.free_port(),
        lab.host.free_port(),
        lab.host.free_port(),
    );
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let relay = |name: &str, p: u16, target: SocketAddr| {
        format!(
            "[[mapping]]\nname = \"{name}\"\nlisten = \"{}\"\ntarget = \"{target}\"\nmode = \"splice\"\n",
            any(p)
        )
    };
    let config = lab.config(
        &format!("pin_dir = \"{}\"", bpffs.0.join(PINS).display()),
        &[("kernel", "tcp", any(p_kernel), kernel)],
    ) + &relay("relayed", p_relayed, relayed)
        + &relay("echo", p_echo, echo);
    let dir = Dir::new();
    let mut old = lab.berth(&dir, &config);
    old.up().await;

    // A successor that cannot start (its configuration is broken) changes nothing.
    std::fs::write(&old.file, "this is not toml").unwrap();
    let (ok, out) = upgrade(&old.admin).await;
    assert!(!ok, "{out}");
    assert!(out.contains("before it took over"), "{out}");
    std::fs::write(&old.file, &config).unwrap();
    assert_eq!(
        old.row("kernel").await.mode,
        "dnat",
        "the old berth serves on"
    );

    // Held transfers: 32 through kernel mode, 4 relayed by the old process.
    const SIZE: u64 = 8 << 20;
    let public = |p: u16| SocketAddr::from((EXT_HOST, p));
    let c_kernel = start_exchanges(&lab, public(p_kernel), 1, 32, SIZE).await;
    let c_relayed = start_exchanges(&lab, public(p_relayed), 101, 4, SIZE).await;
    old.wait_row("kernel", "its 32 flows", |r| r.active == 32)
        .await;
    old.wait_row("relayed", "its 4 connections", |r| r.active == 4)
        .await;

    // New connections all along: none may be refused or lost.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, ext) = (stop.clone(), lab.ext.ns.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sock = ext
                    .run(|| tokio::net::TcpSocket::new_v4().unwrap())
                    .unwrap();
                let c = timeout(HANG, sock.connect(public(p_echo)))
                    .await
                    .expect("a connection hung")
                    .unwrap_or_else(|e| panic!("connection {n} refused: {e}"));
                let t = timeout(HANG, exchange(c, 1000 + n, 4096, 4096))
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("connection {n}: {e}"));
                assert_eq!((t.sent, t.received), (4096, 4096), "connection {n}");
                n += 1;
            }
            n
        })
    };

    let (ok, out) = upgrade(&old.admin).await;
    assert!(ok, "{out}");
    let new_pid = successor_pid(&out);
    assert_ne!(new_pid as u32, old.child.id());
    let successor = Successor(Some(new_pid));
    let new = old.admin.clone();
    let rows = timeout(HANG, berth::service::admin::request(&new, "status"))
        .await
        .unwrap()
        .unwrap()
        .mappings;
    let kernel_row = rows.iter().find(|r| r.name == "kernel").unwrap();
    assert!(
        kernel_row.active >= 32,
        "the successor adopted the flows: {kernel_row:?}"
    );
    assert_eq!(lab.tc_programs("ext0"), ["berth_dnat_tc"]);

    // Kernel-mode transfers run through the successor; relayed ones finish in the old
    // process, which then exits cleanly.
    gate_kernel.send(true).unwrap();
    gate_relayed.send(true).unwrap();
    finish(c_kernel, &mut seen_kernel).await;
    finish(c_relayed, &mut seen_relayed).await;
    let status = tokio::task::spawn_blocking(move || old.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "the old berth exited with {status}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = prober.await.unwrap();
    assert!(probes > 0, "no connection was tried during the upgrade");
    // The old daemon left the kernel-mode state to its successor: still pinned, and the
    // mapping's entry still there (it went with neither the drain nor the exit).
    let pinned = bpffs.pinned(PINS);
    assert!(
        pinned.iter().any(|p| p == "BERTH_DNAT_SVC")
            && pinned.iter().any(|p| p.starts_with("link_tc_")),
        "{pinned:?}"
    );
    assert_eq!(map_entries_of(new_pid as u32, "BERTH_DNAT_SVC"), 1);

    // The successor serves new flows, and a plain stop leaves nothing behind.
    let c = lab.ext_connect(public(p_kernel)).await;
    let t = exchange(c, 500, 1 << 20, 1 << 20).await.unwrap();
    let (id, srv) = seen_kernel.recv().await.unwrap().unwrap();
    assert_eq!(id, 500);
    assert_mirrored(500, &t, &srv);
    let status = successor.stop().await;
    assert!(
        matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
        "the successor stopped with {status:?}"
    );
    assert_eq!(bpffs.pinned(PINS), Vec::<String>::new(), "nothing pinned");
    nothing_attached(&lab).await;
}

/// bpffs refuses names with a dot (EPERM: the kernel keeps them for its own files), so the
/// default directory, named after the admin socket, has none, and a configured one with a dot
/// is refused with the reason before anything is created.
#[test]
fn pin_directories_are_named_as_bpffs_allows() {
    common::require_root();
    let bpffs = BpfFs::mount();
    let default = berth::dnat::pin::default_dir(std::path::Path::new("/run/berth/admin.sock"));
    let name = default.file_name().unwrap();
    let ok = bpffs.0.join("berth").join(name);
    berth::dnat::pin::PinDir::prepare(&ok).unwrap();
    assert!(ok.is_dir());
    let e = berth::dnat::pin::PinDir::prepare(&bpffs.0.join("berth/admin.sock")).unwrap_err();
    assert!(
        e.to_string().contains("refuses the name \"admin.sock\""),
        "{e}"
    );
    // What the kernel says without the check.
    let raw = std::fs::create_dir(bpffs.0.join("admin.sock")).unwrap_err();
    assert_eq!(raw.raw_os_error(), Some(libc::EPERM));
}
