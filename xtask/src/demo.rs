//! `cargo xtask demo`: what berth is for, in a minute. Inside a private host (network and mount
//! namespaces of the demo's own, and a child cgroup it creates), it builds the walk-through
//! topology, runs a server in a container, and publishes one port twice from one `berth run`:
//! relayed by splice, and in kernel mode (a cgroup connect rewrite, no process in the data
//! path). A short iperf3 run through each, next to the container reached directly, then
//! `berth status` and a few lines of /metrics. Everything goes at the end, on failure and on
//! Ctrl-C too; if the demo is killed outright, its namespaces go with its last process.
use std::{
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

const BRIDGE: &str = "berthdemo0";
const SERVER: &str = "demo-web";
const CLIENT: &str = "demo-cli";
const SERVER_IP: &str = "172.16.1.1";
const SERVER_PORT: u16 = 5201;
/// The published ports, on the private host's loopback.
const SPLICE_PORT: u16 = 9091;
const KERNEL_PORT: u16 = 9092;
const METRICS: &str = "127.0.0.1:9475";
/// Seconds of iperf3 per path: enough for a stable figure on two cores, short enough for
/// the whole demo to take about a minute.
const SECONDS: u32 = 3;

/// What to undo: child processes, the topology, the cgroup.
struct Teardown {
    berth: PathBuf,
    cgroup: PathBuf,
    children: Arc<Mutex<Vec<Child>>>,
}

impl Teardown {
    fn spawn(&self, cmd: &mut Command) -> anyhow::Result<()> {
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {:?}", cmd.get_program()))?;
        self.children.lock().expect("not poisoned").push(child);
        Ok(())
    }
}

fn teardown(berth: &Path, cgroup: &Path, children: &Mutex<Vec<Child>>) {
    for mut child in children
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default()
    {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = Command::new(berth)
        .args(["net", "down", "--bridge", BRIDGE])
        .args(["--container", SERVER, "--container", CLIENT])
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir(cgroup);
}

impl Drop for Teardown {
    fn drop(&mut self) {
        println!("\n== Tearing down");
        teardown(&self.berth, &self.cgroup, &self.children);
    }
}

pub(crate) fn run() -> anyhow::Result<()> {
    setup::run()?;
    setup::apt(&["iperf3"])?;
    if !setup::is_root() {
        bail!("the demo creates namespaces, a bridge and a cgroup: run it as root");
    }
    let root = exec::root();
    exec::build_release(&["berth"])?;
    let berth = root.join("target/release/berth");
    // Before any thread exists (unshare moves only the calling thread's view).
    enter_private_host()?;
    let cgroup = cgroup2_root()?.join(format!("berth-demo-{}", std::process::id()));
    std::fs::create_dir(&cgroup)
        .with_context(|| format!("cannot create the cgroup {}", cgroup.display()))?;
    let children = Arc::new(Mutex::new(Vec::new()));
    {
        let (berth, cgroup, children) = (berth.clone(), cgroup.clone(), children.clone());
        ctrlc::set_handler(move || {
            println!("\ninterrupted: tearing down");
            teardown(&berth, &cgroup, &children);
            std::process::exit(130);
        })
        .context("failed to install the Ctrl-C handler")?;
    }
    let guard = Teardown {
        berth: berth.clone(),
        cgroup: cgroup.clone(),
        children,
    };
    let work = std::env::temp_dir().join(format!("berth-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = show(&guard, &berth, &work);
    drop(guard);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    leftovers(&cgroup)?;
    println!("\nDemo done: no namespace, link, cgroup or process is left behind.");
    Ok(())
}

fn show(guard: &Teardown, berth: &Path, work: &Path) -> anyhow::Result<()> {
    println!("\n== 1. The container network: bridge {BRIDGE}, containers {SERVER} and {CLIENT}");
    exec::run(Command::new(berth).args([
        "net",
        "up",
        "--bridge",
        BRIDGE,
        "--container",
        &format!("{SERVER}={SERVER_IP}"),
        "--container",
        CLIENT,
    ]))?;
    exec::run(Command::new("ip").args(["-br", "addr"]))?;

    println!("\n== 2. A server in {SERVER}: iperf3 on {SERVER_IP}:{SERVER_PORT}");
    guard.spawn(
        Command::new(berth)
            .args(["net", "exec", SERVER, "--", "iperf3", "--server"])
            .args(["--bind", SERVER_IP, "--port", &SERVER_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let server: SocketAddr = format!("{SERVER_IP}:{SERVER_PORT}").parse()?;
    wait_for(server, &format!("iperf3 in {SERVER}"))?;

    println!("\n== 3. One berth publishing it twice: splice relay and kernel mode");
    let config = work.join("berth.toml");
    let admin = work.join("admin.sock");
    std::fs::write(
        &config,
        format!(
            r#"[metrics]
listen = "{METRICS}"
[admin]
socket = "{admin}"
# Kernel mode for local clients: connections from processes in this cgroup are rewritten
# at connect() to the container's address. No TC attachment: the demo has no remote clients.
[dnat]
cgroup = "{cgroup}"
interfaces = []
[[mapping]]
name = "web-splice"
listen = "127.0.0.1:{SPLICE_PORT}"
target = "{server}"
mode = "splice"
[[mapping]]
name = "web-kernel"
listen = "127.0.0.1:{KERNEL_PORT}"
target = "{server}"
mode = "dnat"
"#,
            admin = admin.display(),
            cgroup = guard.cgroup.display(),
        ),
    )?;
    print!("{}", std::fs::read_to_string(&config)?);
    guard.spawn(
        Command::new(berth)
            .args(["run", "--config"])
            .arg(&config)
            .env("BERTH_LOG", "info"),
    )?;
    wait_for(
        format!("127.0.0.1:{SPLICE_PORT}").parse()?,
        "berth's splice mapping",
    )?;

    println!("\n== 4. Throughput, {SECONDS} s each (iperf3, one stream, from the host)");
    let paths = [
        ("direct to the container", server.to_string()),
        ("berth splice", format!("127.0.0.1:{SPLICE_PORT}")),
        ("berth kernel mode", format!("127.0.0.1:{KERNEL_PORT}")),
    ];
    let mut rows = Vec::new();
    for (name, to) in &paths {
        let gbps = iperf3(to, &guard.cgroup)?;
        println!("  {name:<24} {gbps:6.2} Gbit/s");
        rows.push((name, gbps));
    }
    let direct = rows[0].1;
    println!("\n  {:<24} {:>6}", "path", "× direct");
    for (name, gbps) in &rows {
        println!("  {name:<24} {:>6.2}", gbps / direct);
    }
    println!(
        "  (a short, unpinned run on a shared machine: `cargo xtask bench` measures properly)"
    );

    println!(
        "\n== 5. berth status (kernel mode's bytes never pass through berth: the client's connect()\n      is rewritten to the container; /metrics counts those rewrites)"
    );
    exec::run(
        Command::new(berth)
            .args(["status", "--admin-socket"])
            .arg(&admin),
    )?;

    println!("\n== 6. A few lines of http://{METRICS}/metrics");
    let metrics = exec::output(Command::new("curl").args([
        "-sS",
        "--max-time",
        "5",
        &format!("http://{METRICS}/metrics"),
    ]))?;
    anyhow::ensure!(metrics.status.success(), "cannot fetch the metrics");
    for line in String::from_utf8_lossy(&metrics.stdout)
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("berth_connections_total")
                    || l.starts_with("berth_bytes_total")
                    || l.starts_with("berth_dnat_local_rewrites_total"))
        })
    {
        println!("  {line}");
    }
    Ok(())
}

/// One iperf3 run to `to` from a process in `cgroup`; returns Gbit/s received.
fn iperf3(to: &str, cgroup: &Path) -> anyhow::Result<f64> {
    let (host, port) = to.rsplit_once(':').context("host:port")?;
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new("iperf3");
    cmd.args(["--client", host, "--port", port, "--json"])
        .args(["--time", &SECONDS.to_string()]);
    // The client joins the demo's cgroup before it runs, so that kernel mode maps its
    // connections (the other paths do not care).
    let procs = std::ffi::CString::new(procs.to_string_lossy().as_bytes())?;
    // SAFETY: open, write and close are async-signal-safe; nothing is allocated after the
    // fork ("0" moves the writing process itself).
    unsafe {
        cmd.pre_exec(move || {
            let fd = nix::libc::open(procs.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            nix::libc::close(fd);
            if n == 1 { Ok(()) } else { Err(err) }
        });
    }
    let out = exec::output(&mut cmd)?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 to {to} printed no report"))?;
    if let Some(e) = report.get("error") {
        bail!("iperf3 to {to}: {e}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("iperf3 to {to}: no received rate in its report"))
}

/// Moves this (still single-threaded) process into new network and mount namespaces, with
/// a private /run/netns: the demo's bridge, veths and named namespaces exist only there.
fn enter_private_host() -> anyhow::Result<()> {
    use nix::{mount, sched};
    sched::unshare(sched::CloneFlags::CLONE_NEWNET | sched::CloneFlags::CLONE_NEWNS)
        .context("cannot create the demo's private namespaces")?;
    // Nothing mounted from here on propagates to the machine.
    mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        mount::MsFlags::MS_REC | mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    std::fs::create_dir_all("/run/netns")?;
    mount::mount(
        Some("tmpfs"),
        "/run/netns",
        Some("tmpfs"),
        mount::MsFlags::empty(),
        Some("mode=0755"),
    )?;
    exec::run(Command::new("ip").args(["link", "set", "lo", "up"]))
}

/// The cgroup v2 mount point.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 hierarchy is mounted: kernel mode needs one")
}

/// Fails if the teardown left an interface, a namespace or the cgroup.
fn leftovers(cgroup: &Path) -> anyhow::Result<()> {
    let links = exec::output(Command::new("ip").args(["-br", "link"]))?;
    let mut left: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter(|l| !l.starts_with("lo "))
        .map(str::to_owned)
        .collect();
    left.extend(
        std::fs::read_dir("/run/netns")?
            .flatten()
            .map(|e| e.path().display().to_string()),
    );
    if cgroup.exists() {
        left.push(cgroup.display().to_string());
    }
    if !left.is_empty() {
        bail!("teardown left these behind: {left:?}");
    }
    Ok(())
}

/// Polls until `addr` accepts TCP, for at most 15 s.
fn wait_for(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on {addr}")
}
