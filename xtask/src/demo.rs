//! `cargo xtask demo`: the walk-through topology, a file server in a container, a host port
//! mapped to it with `berth forward --mode splice`, and a container-to-container request.
//! Everything is torn down at the end, on failure and on Ctrl-C too.
use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

/// Its own bridge, so that the demo's clean-up can never touch a user's `berth0` topology.
const BRIDGE: &str = "berthdemo0";
const SUBNET: &str = "172.16.0.0/16";
const SERVER: &str = "demo-web";
const CLIENT: &str = "demo-cli";
const SERVER_IP: &str = "172.16.1.1";
const SERVER_PORT: u16 = 8080;

/// Stops the demo's processes and removes its topology when dropped.
struct Teardown {
    berth: PathBuf,
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

fn teardown(berth: &Path, children: &Mutex<Vec<Child>>) {
    for mut child in children
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default()
    {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = Command::new(berth)
        .args([
            "net",
            "down",
            "--bridge",
            BRIDGE,
            "--container",
            SERVER,
            "--container",
            CLIENT,
        ])
        .status();
}

impl Drop for Teardown {
    fn drop(&mut self) {
        println!("\n== Tearing down");
        teardown(&self.berth, &self.children);
    }
}

pub(crate) fn run() -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the demo creates network namespaces and a bridge: run it as root");
    }
    let root = exec::root();
    exec::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--locked",
        "--release",
        "-p",
        "berth",
    ]))?;
    let berth = root.join("target/release/berth");

    let children = Arc::new(Mutex::new(Vec::new()));
    {
        let (berth, children) = (berth.clone(), children.clone());
        ctrlc::set_handler(move || {
            println!("\ninterrupted: tearing down");
            teardown(&berth, &children);
            std::process::exit(130);
        })
        .context("failed to install the Ctrl-C handler")?;
    }
    // A demo killed earlier may have left its topology: clear it first (only the demo's own).
    teardown(&berth, &children);
    subnet_is_free()?;
    let guard = Teardown {
        berth: berth.clone(),
        children,
    };

    println!("\n== 1. The container network: bridge {BRIDGE}, namespaces {SERVER} and {CLIENT}");
    exec::run(Command::new(&berth).args([
        "net",
        "up",
        "--bridge",
        BRIDGE,
        "--container",
        &format!("{SERVER}={SERVER_IP}"),
        "--container",
        CLIENT,
    ]))?;
    exec::run(Command::new("ip").args(["netns", "list"]))?;

    println!("\n== 2. A file server inside {SERVER} on {SERVER_IP}:{SERVER_PORT}");
    let site = std::env::temp_dir().join(format!("berth-demo-{}", std::process::id()));
    std::fs::create_dir_all(&site)?;
    for (name, body) in [
        ("hello.txt", "hello from inside the container\n"),
        ("index-of-berth.md", "# berth demo\n"),
    ] {
        std::fs::write(site.join(name), body)?;
    }
    guard.spawn(
        Command::new(&berth)
            .args([
                "net",
                "exec",
                SERVER,
                "--",
                "python3",
                "-m",
                "http.server",
                &SERVER_PORT.to_string(),
                "--bind",
                SERVER_IP,
                "--directory",
            ])
            .arg(&site)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let server: SocketAddr = format!("{SERVER_IP}:{SERVER_PORT}").parse()?;
    wait_for(server, &format!("the file server in {SERVER}"))?;

    // A port free a moment ago: berth reports a bind failure plainly if it is taken since.
    let host: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    println!("\n== 3. Map a host port to it: berth forward --mode splice {host} {server}");
    guard.spawn(
        Command::new(&berth)
            .args([
                "forward",
                "--mode",
                "splice",
                &host.to_string(),
                &server.to_string(),
            ])
            .env("BERTH_LOG", "info"),
    )?;
    wait_for(host, "berth forward")?;
    println!("berth is listening on {host}");

    println!("\n== 4. Fetch the listing through the host port");
    exec::run(Command::new("curl").args(["-sS", "--max-time", "10", &format!("http://{host}/")]))?;

    println!("\n== 5. Container to container over the bridge: {CLIENT} -> {server}");
    exec::run(Command::new(&berth).args([
        "net",
        "exec",
        CLIENT,
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{server}/hello.txt"),
    ]))?;

    drop(guard);
    let _ = std::fs::remove_dir_all(&site);
    let left = exec::output(Command::new("ip").args(["netns", "list"]))?;
    let links = exec::output(Command::new("ip").args(["-br", "link"]))?;
    let leftovers: Vec<String> = String::from_utf8_lossy(&left.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&links.stdout).lines())
        .filter(|l| [BRIDGE, SERVER, CLIENT].iter().any(|n| l.contains(n)))
        .map(str::to_owned)
        .collect();
    if !leftovers.is_empty() {
        bail!("teardown left these behind: {leftovers:?}");
    }
    println!("\nDemo done; no namespace or link is left behind.");
    Ok(())
}

/// Refuses to run when another interface already has an address in the demo's subnet (for
/// example a `berth net up` topology on `berth0`): two bridges with one subnet break routing.
fn subnet_is_free() -> anyhow::Result<()> {
    let out = exec::output(Command::new("ip").args(["-o", "-4", "addr", "show"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = text
        .lines()
        .find(|l| l.contains(" inet 172.16.") && !l.contains(BRIDGE))
    {
        let dev = line.split_whitespace().nth(1).unwrap_or("?");
        bail!(
            "{SUBNET} is already in use on {dev}; remove it first (e.g. `berth net down --bridge {dev}`)"
        );
    }
    Ok(())
}

/// Polls until `addr` accepts TCP, for at most 15 s (python needs a moment to start).
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
