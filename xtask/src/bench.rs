//! `cargo xtask bench`: installs the contenders, builds berth and the bench in release mode,
//! and runs the benchmark (as root: it creates namespaces).
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

/// Debian packages the contenders come from (docker-proxy is extracted separately); nft
/// removes the nat table after each kernel-DNAT sample; CNI's portmap plugin is the hostport
/// baseline; iperf3 and sockperf are the cross-check's load tools.
const APT_PACKAGES: &[&str] = &[
    "socat",
    "haproxy",
    "iptables",
    "nftables",
    "containernetworking-plugins",
    "iperf3",
    "sockperf",
];

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// A short run (about 2 minutes) that proves the harness; its numbers are rough.
    #[arg(long)]
    quick: bool,
    /// bulk, rr, crr, idle, mappings, cpu, external, udp, hostport, restart, ipv6,
    /// sequential, crosscheck (repeatable; all by default).
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// direct, berth-copy, berth-splice, berth-sockmap, berth-auto, berth-dnat, berth-udp,
    /// berth-udp-b1, berth-udp-no-offload, tokio-splice, docker-proxy, socat, haproxy,
    /// iptables-dnat, berth-shim, berth-shim-daemon, cni-portmap, berth-cni (repeatable; all
    /// by default).
    #[arg(long = "contender")]
    contenders: Vec<String>,
    /// Output directory [default: target/bench].
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Idle connections for the idle scenario (capped by the fd limit).
    #[arg(long)]
    idle_conns: Option<usize>,
}

pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the bench creates network namespaces: run it as root");
    }
    setup::apt(APT_PACKAGES)?;
    let root = exec::root();
    let tools = root.join("target/bench/tools");
    let docker_proxy = docker_proxy(&tools)?;
    exec::build_release(&["berth", "berth-bench"])?;
    // What `cargo xtask install` installs: berth static, berth-docker-proxy a link to it.
    let built = exec::build_static()?;

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench"));
    let mut cmd = Command::new(root.join("target/release/berth-bench"));
    cmd.arg("--berth")
        .arg(built.join("berth"))
        .arg("--docker-proxy")
        .arg(&docker_proxy)
        .arg("--berth-docker-proxy")
        .arg(built.join("berth-docker-proxy"))
        .arg("--out")
        .arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    for s in &args.scenarios {
        cmd.args(["--scenario", s]);
    }
    for c in &args.contenders {
        cmd.args(["--contender", c]);
    }
    if let Some(n) = args.idle_conns {
        cmd.arg("--idle-conns").arg(n.to_string());
    }
    exec::run(&mut cmd)
}

/// The real docker-proxy, from Debian's docker.io package: downloaded and unpacked with
/// `apt-get download` + `dpkg -x`, never installed, and dockerd is never started.
fn docker_proxy(tools: &Path) -> anyhow::Result<std::path::PathBuf> {
    let bin = tools.join("docker-proxy");
    if bin.is_file() {
        println!("xtask: docker-proxy present at {}", bin.display());
        return Ok(bin);
    }
    println!("xtask: fetching docker-proxy from Debian's docker.io package (not installing it)");
    let work = tools.join("docker.io");
    std::fs::create_dir_all(&work)?;
    let download = || {
        exec::run(
            Command::new("apt-get")
                .current_dir(&work)
                .args(["download", "-q", "docker.io"]),
        )
    };
    if download().is_err() {
        exec::run(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let deb = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let unpacked = work.join("root");
    exec::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    std::fs::copy(unpacked.join("usr/sbin/docker-proxy"), &bin)
        .context("the docker.io package has no usr/sbin/docker-proxy")?;
    let version = exec::output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version"),
    )?;
    std::fs::write(bin.with_extension("version"), &version.stdout)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(bin)
}
