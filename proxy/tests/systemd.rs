//! berth.service under a real systemd: a Debian root (made by `cargo xtask test` with
//! mmdebstrap, BERTH_ROOTFS) booted by systemd-nspawn with systemd as its PID 1 and a network
//! namespace of its own, the package (BERTH_DEB) installed in it with dpkg. Checked there: the
//! package starts berth (Type=notify), the hardened unit (DynamicUser, CAP_NET_BIND_SERVICE
//! only) binds a privileged port and relays, `systemctl reload` applies a change with a
//! transfer in flight, socket activation keeps a port accepting across a restart, the
//! watchdog restarts a hung berth, and removing the package stops it.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{HANG, daemon::Dir};
use tokio::net::{TcpListener, TcpStream};

/// A booted container: systemd-nspawn, and the PID (in our namespace) of its systemd.
struct Machine {
    nspawn: Child,
    init: u32,
    dir: Dir,
    _cgroups: Cgroups,
}

/// A child cgroup of ours in each hierarchy systemd uses (the cgroup v2 one and, on a hybrid
/// host like this one, v1's name=systemd): nspawn and the container's systemd build their
/// trees below it, not in the machine's root cgroup. Removed, subtree and all, on drop.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn create() -> Self {
        let name = format!("berth-test-{}", common::unique("sd"));
        let mut roots = vec![berth::dnat::cgroup2_root().expect("no cgroup v2 mount")];
        let v1 = PathBuf::from("/sys/fs/cgroup/systemd");
        if v1.join("cgroup.procs").exists() && !roots.contains(&v1) {
            roots.push(v1);
        }
        let dirs: Vec<PathBuf> = roots.into_iter().map(|r| r.join(&name)).collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        Self(dirs)
    }

    /// Makes `cmd`'s child enter every one of them before it runs.
    fn enter_before_exec(&self, cmd: &mut Command) {
        use std::os::unix::{ffi::OsStrExt as _, process::CommandExt as _};
        let procs: Vec<std::ffi::CString> = self
            .0
            .iter()
            .map(|d| std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).unwrap())
            .collect();
        // SAFETY: open, write and close are async-signal-safe; nothing is allocated after the
        // fork ("0" moves the writing process itself).
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in &self.0 {
            // Deepest first; a group empties a moment after its last process is reaped.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut groups = Vec::new();
                collect_dirs(d, &mut groups);
                groups.sort_by_key(|g| std::cmp::Reverse(g.components().count()));
                let failed = groups
                    .iter()
                    .filter(|g| std::fs::remove_dir(g).is_err())
                    .count();
                if failed == 0 || Instant::now() > deadline {
                    if failed > 0 {
                        eprintln!("warning: cannot remove cgroup {}", d.display());
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn collect_dirs(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

impl Machine {
    fn boot() -> Self {
        Self::boot_with(&[])
    }

    /// [`Machine::boot`] with more systemd-nspawn options.
    fn boot_with(options: &[&str]) -> Self {
        common::require_root();
        let tarball = env_path("BERTH_ROOTFS", "the Debian root");
        let dir = Dir::new();
        let root = dir.path("root");
        std::fs::create_dir_all(&root).unwrap();
        let untar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-xf")
            .arg(&tarball)
            .status()
            .unwrap();
        assert!(untar.success(), "cannot unpack {}", tarball.display());
        std::fs::copy(
            env_path("BERTH_DEB", "the package"),
            root.join("root/berth.deb"),
        )
        .unwrap();
        let name = common::unique("sd");
        let log = std::fs::File::create(dir.path("console.log")).unwrap();
        let cgroups = Cgroups::create();
        // No host systemd here to register with or to put the container in a unit of its own:
        // nspawn keeps the cgroup it starts in, ours.
        let mut nspawn = Command::new("systemd-nspawn");
        cgroups.enter_before_exec(&mut nspawn);
        let nspawn = nspawn
            .arg("--directory")
            .arg(&root)
            .args(["--machine", &name, "--register=no", "--keep-unit"])
            .args(["--private-network", "--boot"])
            .args(options)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn is missing: `cargo xtask test` installs systemd-container");
        let mut machine = Self {
            init: 0,
            nspawn,
            dir,
            _cgroups: cgroups,
        };
        machine.init = machine.find_init();
        // Boot finished: every start job done (degraded if some container-hostile unit failed).
        // Until systemd has set up /run/systemd and its private socket, systemctl answers at
        // once ("offline", "Failed to connect to bus").
        let deadline = Instant::now() + HANG;
        let state = loop {
            let state = machine.sh("timeout 120 systemctl is-system-running --wait || true");
            let settled =
                ["running", "degraded", "maintenance", "stopping"].contains(&state.trim());
            if settled || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            matches!(state.trim(), "running" | "degraded"),
            "systemd did not finish booting ({state}):\n{}",
            machine.sh("systemctl --failed --no-pager || true")
        );
        machine
    }

    /// The container's PID 1, a descendant of systemd-nspawn in a PID namespace of its own.
    fn find_init(&mut self) -> u32 {
        let deadline = Instant::now() + HANG;
        loop {
            if let Some(status) = self.nspawn.try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited with {status}:\n{}",
                    std::fs::read_to_string(self.dir.path("console.log")).unwrap_or_default()
                );
            }
            let found = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .find(|&pid| {
                    let status =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"));
                    // Once nspawn's child has become systemd.
                    status.starts_with("Name:\tsystemd\n")
                        && nspid.is_some_and(|n| n.split_whitespace().nth(1) == Some("1"))
                        && descends_from(pid, self.nspawn.id())
                });
            if let Some(pid) = found {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "the container's init never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `script` with /bin/sh inside the container (all its namespaces); returns whether
    /// it succeeded, and its stdout and stderr together.
    fn run(&self, script: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--target={}", self.init))
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--"])
            .args(["/bin/sh", "-c", script])
            .output()
            .unwrap();
        common::outcome(&out)
    }

    /// [`Machine::run`]'s output, whatever the exit status.
    fn sh(&self, script: &str) -> String {
        self.run(script).1
    }

    /// [`Machine::run`] that must succeed.
    fn ok(&self, script: &str) -> String {
        match self.run(script) {
            (true, out) => out,
            (false, out) => panic!(
                "in the container, `{script}` failed:\n{out}\njournal:\n{}",
                self.sh("journalctl -u berth --no-pager -n 50")
            ),
        }
    }

    fn prop(&self, unit: &str, name: &str) -> String {
        self.ok(&format!("systemctl show --property={name} --value {unit}"))
            .trim()
            .to_owned()
    }

    /// A file of the container, from the host.
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path("root").join(p.trim_start_matches('/'))
    }

    /// A listening socket on the container's loopback, with the server's tallies.
    fn listen(&self) -> TcpListener {
        let l = common::in_netns(self.init, || std::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        l.set_nonblocking(true).unwrap();
        TcpListener::from_std(l).unwrap()
    }

    /// A connection from inside the container (a local client of its berth).
    async fn connect(&self, to: SocketAddr) -> TcpStream {
        connect_in(self.init, to).await
    }

    /// Waits until `unit`'s property `name` satisfies `pred`.
    async fn wait_prop(&self, unit: &str, name: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let v = self.prop(unit, name);
            if pred(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{unit} {name} stayed {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Killing a PID namespace's init kills everything in it; nspawn then exits.
        if self.init != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.init as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        self.dir.unmount_all();
    }
}

fn env_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} ({what}) is not set: `cargo xtask test` makes it and sets it")
    });
    assert!(p.is_file(), "{var}={} does not exist", p.display());
    p
}

/// A connection from the network namespace of process `pid`.
async fn connect_in(pid: u32, to: SocketAddr) -> TcpStream {
    let s = common::in_netns(pid, || {
        if to.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    })
    .unwrap();
    tokio::time::timeout(HANG, s.connect(to))
        .await
        .expect("connect hung")
        .unwrap_or_else(|e| panic!("connect to {to} in the container: {e}"))
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    while pid > 1 {
        if pid == ancestor {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The field after the parenthesised name (which may hold spaces): state, then ppid.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        pid = ppid;
    }
    false
}

fn config(mappings: &[(&str, u16, SocketAddr)]) -> String {
    let mut c = String::from("[admin]\nsocket = \"/run/berth/admin.sock\"\n");
    for (name, port, target) in mappings {
        c += &format!(
            "[[mapping]]\nname = \"{name}\"\nlisten = \"0.0.0.0:{port}\"\ntarget = \"{target}\"\nmode = \"splice\"\n"
        );
    }
    c
}

async fn transfer(m: &Machine, port: u16, id: u64) -> common::Tally {
    let c = m.connect(SocketAddr::from(([127, 0, 0, 1], port))).await;
    tokio::time::timeout(HANG, common::exchange(c, id, 4 << 20, 4 << 20))
        .await
        .expect("transfer hung")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_runs_hardened_under_systemd_reloads_restarts_and_is_removed() {
    let m = Machine::boot();

    // The package starts berth, and start returns once berth said READY=1.
    m.ok("dpkg -i /root/berth.deb");
    assert_eq!(m.prop("berth.service", "Type"), "notify");
    assert_eq!(m.prop("berth.service", "ActiveState"), "active");
    assert_eq!(m.prop("berth.service", "UnitFileState"), "enabled");
    let pid = m.prop("berth.service", "MainPID");
    let uid = m.ok(&format!("awk '/^Uid:/ {{print $2}}' /proc/{pid}/status"));
    assert_ne!(uid.trim(), "0", "DynamicUser: berth must not run as root");
    assert!(m.ok("berth status").contains("NAME"));

    // A privileged port, and a transfer held open across `systemctl reload`.
    let held = m.listen();
    let held_addr = held.local_addr().unwrap();
    let (mut held_seen, gate) = common::spawn_gated_exchange_server(held);
    write(&m, &config(&[("web", 80, held_addr)]));
    m.ok("systemctl reload berth");
    let c = m.connect(SocketAddr::from(([127, 0, 0, 1], 80))).await;
    let live = tokio::spawn(common::exchange(c, 1, 8 << 20, 8 << 20));
    let open = m.listen();
    let open_addr = open.local_addr().unwrap();
    let mut open_seen = common::spawn_exchange_server(open);
    write(
        &m,
        &config(&[("web", 80, held_addr), ("web2", 81, open_addr)]),
    );
    m.ok("systemctl reload berth");
    assert!(
        !live.is_finished(),
        "the transfer ended before the gate opened"
    );
    let client = transfer(&m, 81, 2).await;
    common::assert_served(&mut open_seen, 2, &client).await;
    gate.send(true).unwrap();
    let client = tokio::time::timeout(HANG, live)
        .await
        .expect("the held transfer hung")
        .unwrap()
        .unwrap();
    common::assert_served(&mut held_seen, 1, &client).await;
    assert_eq!(
        m.prop("berth.service", "MainPID"),
        pid,
        "reload restarted berth"
    );
    // An invalid file: reload fails, berth keeps serving the old one.
    write(&m, "[[mapping]]\nname = 5\n");
    assert!(
        !m.run("systemctl reload berth").0,
        "reload accepted an invalid file"
    );
    assert_eq!(m.prop("berth.service", "ActiveState"), "active");
    let client = transfer(&m, 81, 3).await;
    common::assert_served(&mut open_seen, 3, &client).await;

    // Socket activation: systemd holds mapping "web"'s socket (the shipped berth.socket, on
    // 9091), so a client that connects while berth is stopped is served by the berth that
    // the connection itself starts.
    write(&m, &config(&[("web", 9091, open_addr)]));
    m.ok("systemctl stop berth.service && systemctl start berth.socket");
    assert_eq!(m.prop("berth.service", "ActiveState"), "inactive");
    let client = transfer(&m, 9091, 4).await;
    common::assert_served(&mut open_seen, 4, &client).await;
    assert_eq!(m.prop("berth.service", "ActiveState"), "active");
    // And across a restart: a client connecting in a loop is never refused or reset, since
    // connections made while no berth runs queue in systemd's socket.
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looper = tokio::spawn({
        let (served, stop, init) = (served.clone(), stop.clone(), m.init);
        async move {
            let mut tallies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = 100 + tallies.len() as u64;
                let c = connect_in(init, SocketAddr::from(([127, 0, 0, 1], 9091))).await;
                let t = tokio::time::timeout(HANG, common::exchange(c, id, 64 << 10, 64 << 10))
                    .await
                    .expect("a transfer hung across the restart")
                    .unwrap_or_else(|e| panic!("transfer {id} across the restart: {e}"));
                tallies.push((id, t));
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tallies
        }
    });
    let count = || served.load(std::sync::atomic::Ordering::Relaxed);
    common::wait_until("transfers before the restart", || count() >= 3).await;
    let before = m.prop("berth.service", "MainPID");
    tokio::task::block_in_place(|| m.ok("systemctl restart berth.service"));
    let after_restart = count();
    common::wait_until("transfers after the restart", || {
        count() >= after_restart + 3
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_ne!(
        m.prop("berth.service", "MainPID"),
        before,
        "berth did not restart"
    );
    // Transfers end one after another, but their servers may report in another order.
    common::assert_all_served(&mut open_seen, &looper.await.unwrap()).await;

    // The watchdog: a berth that stops answering (SIGSTOP) is killed and started again.
    std::fs::create_dir_all(m.path("etc/systemd/system/berth.service.d")).unwrap();
    std::fs::write(
        m.path("etc/systemd/system/berth.service.d/watchdog.conf"),
        "[Service]\nWatchdogSec=2s\n",
    )
    .unwrap();
    m.ok("systemctl daemon-reload && systemctl restart berth.service");
    let pid = m.prop("berth.service", "MainPID");
    assert_eq!(m.prop("berth.service", "WatchdogUSec"), "2s");
    m.ok(&format!("kill -STOP {pid}"));
    m.wait_prop("berth.service", "NRestarts", |n| n == "1")
        .await;
    m.wait_prop("berth.service", "ActiveState", |s| s == "active")
        .await;
    assert_ne!(m.prop("berth.service", "MainPID"), pid);
    let journal = m.ok("journalctl -u berth.service --no-pager");
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    let client = transfer(&m, 9091, 6).await;
    common::assert_served(&mut open_seen, 6, &client).await;

    // A package upgrade (dpkg -i over the installed version) runs `berth upgrade`: the
    // running berth starts its successor, hands over and, drained, stays the unit's main
    // process as berth-keeper; the successor notifies systemd (NotifyAccess=all) and feeds
    // the watchdog; the port never closes.
    let keeper = m.prop("berth.service", "MainPID");
    let out = tokio::task::block_in_place(|| m.ok("dpkg -i /root/berth.deb 2>&1"));
    assert!(!out.contains("restarting"), "{out}");
    let journal = m.ok("journalctl -u berth.service --no-pager");
    assert!(journal.contains("upgrade: successor started"), "{journal}");
    common::wait_until("the old berth to become berth-keeper", || {
        m.run(&format!("cat /proc/{keeper}/comm")).1.trim() == "berth-keeper"
    })
    .await;
    assert_eq!(m.prop("berth.service", "MainPID"), keeper);
    let client = transfer(&m, 9091, 7).await;
    common::assert_served(&mut open_seen, 7, &client).await;
    // Past two watchdog periods: the successor feeds it (no event marks that; the wait is
    // bounded and only proves an absence).
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(
        m.prop("berth.service", "NRestarts"),
        "1",
        "the watchdog fired"
    );
    assert_eq!(m.prop("berth.service", "ActiveState"), "active");
    // A second upgrade; its successor then comes to the keeper. Then a stop drains it: a
    // transfer held open across `systemctl stop` completes, and the unit stops cleanly.
    let out = tokio::task::block_in_place(|| m.ok("berth upgrade"));
    assert!(out.contains("handed over to pid"), "{out}");
    let held = m.listen();
    let held_addr = held.local_addr().unwrap();
    let (mut held_seen, gate) = common::spawn_gated_exchange_server(held);
    write(
        &m,
        &config(&[("web", 9091, open_addr), ("held", 82, held_addr)]),
    );
    m.ok("systemctl reload berth");
    assert_eq!(m.prop("berth.service", "MainPID"), keeper);
    let c = m.connect(SocketAddr::from(([127, 0, 0, 1], 82))).await;
    let live = tokio::spawn(common::exchange(c, 8, 8 << 20, 8 << 20));
    common::wait_until("the held transfer to show in berth status", || {
        let rows: Vec<berth::service::status::Row> =
            serde_json::from_str(&m.ok("berth status --json")).unwrap();
        rows.iter().any(|r| r.name == "held" && r.active == 1)
    })
    .await;
    m.ok("systemctl --no-block stop berth.service");
    m.wait_prop("berth.service", "ActiveState", |s| s == "deactivating")
        .await;
    gate.send(true).unwrap();
    let client = tokio::time::timeout(HANG, live)
        .await
        .expect("the held transfer hung")
        .unwrap()
        .unwrap();
    common::assert_served(&mut held_seen, 8, &client).await;
    m.wait_prop("berth.service", "ActiveState", |s| s == "inactive")
        .await;
    assert_eq!(m.prop("berth.service", "Result"), "success");
    let journal = m.ok("journalctl -u berth.service --no-pager");
    assert!(
        journal.contains("berth-keeper: no berth left; exiting with 0"),
        "{journal}"
    );
    m.ok("systemctl start berth.service");

    // Removing the package stops berth and its socket.
    m.ok("dpkg --remove berth");
    for unit in ["berth.service", "berth.socket"] {
        assert_eq!(
            m.prop(unit, "ActiveState"),
            "inactive",
            "{unit}: {}",
            m.sh(&format!(
                "systemctl status {unit} --no-pager; journalctl -u {unit} --no-pager | tail -40"
            ))
        );
    }
    assert!(m.path("etc/berth/berth.toml").exists());
    m.ok("dpkg --purge berth");
    assert!(!m.path("etc/berth").exists());
}

fn write(m: &Machine, config: &str) {
    std::fs::write(m.path("etc/berth/berth.toml"), config).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ebpf_drop_in_lets_the_hardened_unit_load_its_programs() {
    // The container may hold what the drop-in grants (nspawn keeps CAP_NET_ADMIN already),
    // and nspawn's own system call filter lets bpf(2) through.
    let m = Machine::boot_with(&[
        "--capability=CAP_BPF,CAP_PERFMON",
        "--system-call-filter=bpf",
    ]);
    m.ok("dpkg -i /root/berth.deb");
    let backend = m.listen();
    let target = backend.local_addr().unwrap();
    let mut seen = common::spawn_exchange_server(backend);
    let sockmap = format!(
        "[[mapping]]\nname = \"fast\"\nlisten = \"127.0.0.1:8080\"\ntarget = \"{target}\"\nmode = \"sockmap\"\n"
    );
    // Without the drop-in the unit's system call filter refuses bpf(2): the reload fails with
    // the reason, and berth (not killed by SIGSYS) keeps running.
    let pid = m.prop("berth.service", "MainPID");
    write(&m, &sockmap);
    let (ok, out) = m.run("systemctl reload berth");
    assert!(!ok, "sockmap loaded without the drop-in: {out}");
    let journal = m.sh("journalctl -u berth.service --no-pager");
    assert!(
        journal.contains("mode sockmap") && journal.contains("Operation not permitted"),
        "{journal}"
    );
    assert_eq!(m.prop("berth.service", "ActiveState"), "active");
    assert_eq!(m.prop("berth.service", "MainPID"), pid);
    std::fs::create_dir_all(m.path("etc/systemd/system/berth.service.d")).unwrap();
    std::fs::copy(
        m.path("usr/share/doc/berth/ebpf.conf"),
        m.path("etc/systemd/system/berth.service.d/ebpf.conf"),
    )
    .unwrap();
    m.ok("systemctl daemon-reload && systemctl restart berth");
    let status = m.ok("berth status");
    assert!(status.contains("sockmap"), "{status}");
    let pid = m.prop("berth.service", "MainPID");
    let uid = m.ok(&format!("awk '/^Uid:/ {{print $2}}' /proc/{pid}/status"));
    assert_ne!(uid.trim(), "0");
    let client = transfer(&m, 8080, 1).await;
    common::assert_served(&mut seen, 1, &client).await;
    let metrics = m.ok("berth status --json");
    assert!(metrics.contains("fast"), "{metrics}");

    // Kernel mode pins its state as the dynamic user, thanks to the drop-in's directory
    // (made and handed over before each start) and ReadWritePaths. A bpffs at /sys/fs/bpf
    // as systemd mounts it on a host (nspawn's /sys, a read-only tmpfs, has none: made from
    // outside); an interface for a container to be behind.
    m.ok(
        "mount -o remount,rw /sys && mkdir -p /sys/fs/bpf && mount -t bpf bpffs /sys/fs/bpf \
         && mount -o remount,ro /sys",
    );
    let net = |args: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--target={}", m.init))
            .args(["--net", "ip"])
            .args(args.split(' '))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args}: {}",
            common::outcome(&out).1
        );
    };
    net("link add bk0 type veth peer name bk1");
    net("addr add 10.77.0.1/24 dev bk0");
    net("link set bk0 up");
    net("link set bk1 up");
    write(
        &m,
        "[[mapping]]\nname = \"kernel\"\nlisten = \"0.0.0.0:8090\"\ntarget = \"10.77.0.2:80\"\nmode = \"dnat\"\n",
    );
    m.ok("systemctl restart berth");
    let pins = "/sys/fs/bpf/berth/run-berth-admin_sock";
    let pid = m.prop("berth.service", "MainPID");
    let uid = m.ok(&format!("awk '/^Uid:/ {{print $2}}' /proc/{pid}/status"));
    let listed = m.ok(&format!("ls {pins}"));
    assert!(
        listed.contains("BERTH_DNAT_SVC") && listed.contains("link_tc_"),
        "{listed}\n{}",
        m.sh("journalctl -u berth.service --no-pager | tail -20")
    );
    assert_eq!(m.ok(&format!("stat -c %u {pins}")).trim(), uid.trim());
    // A crash: systemd starts berth again, which adopts what its predecessor pinned.
    let restarts = m.prop("berth.service", "NRestarts");
    m.ok("systemctl kill --signal=KILL berth.service");
    m.wait_prop("berth.service", "NRestarts", |n| n != restarts)
        .await;
    m.wait_prop("berth.service", "ActiveState", |s| s == "active")
        .await;
    let journal = m.ok("journalctl -u berth.service --no-pager");
    assert!(
        journal.contains("adopted=true") && !journal.contains("is not pinned"),
        "{journal}"
    );
    // A plain stop leaves nothing pinned.
    m.ok("systemctl stop berth");
    assert_eq!(m.ok("ls -A /sys/fs/bpf/berth").trim(), "");
}
