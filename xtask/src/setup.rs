//! `cargo xtask setup`: idempotent installation of the toolchain pieces and packages berth needs.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::exec;

/// The bpf-linker release that links against nightly's LLVM here; 0.11+ wants a system LLVM.
const BPF_LINKER_VERSION: &str = "0.10.3";
/// The cargo-deny release `cargo xtask test` checks licenses, bans and sources with.
const CARGO_DENY_VERSION: &str = "0.20.2";
/// The cargo-fuzz release that builds and runs the targets in fuzz/.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the tests and the demo use: `ip` for inspecting what tests leave behind,
/// python3 for the demo's file server, curl to fetch through the proxy, systemd for
/// `systemd-analyze verify` of the shipped units, and for the real-dockerd test dockerd 20.10
/// (docker.io, with containerd and runc), iptables for its rules, and busybox-static for the
/// image it imports; the reference CNI plugins (bridge, host-local) that berth-cni chains
/// after in its tests, and Podman 4.3 (with runc and conmon) for the real-Podman test. The
/// package: dpkg-dev (dpkg-shlibdeps), binutils (strip) and lintian to build and check it,
/// mmdebstrap and systemd-container (systemd-nspawn) to boot it under a real systemd.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "python3",
    "curl",
    "systemd",
    "docker.io",
    "iptables",
    "busybox-static",
    "containernetworking-plugins",
    "podman",
    "dpkg-dev",
    "binutils",
    "lintian",
    "mmdebstrap",
    "systemd-container",
];

/// Where `promtool` is unpacked (see [`promtool`]), under the repository.
pub(crate) const PROMTOOL: &str = "target/tools/prometheus/usr/bin/promtool";

pub(crate) fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_tool(
        "cargo-deny",
        CARGO_DENY_VERSION,
        &["cargo-deny", "--version"],
    )?;
    cargo_tool(
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        &["cargo", "fuzz", "--version"],
    )?;
    apt(APT_PACKAGES)?;
    promtool()?;
    println!("xtask: setup complete");
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = exec::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !installed.status.success() {
        bail!(
            "the nightly toolchain is missing: install it with `rustup toolchain install nightly`"
        );
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("xtask: rust-src for nightly is installed");
        return Ok(());
    }
    println!("xtask: installing rust-src for nightly (needed for -Z build-std=core)");
    exec::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// Installs crate `name` at `version` with `cargo install --locked` unless `probe` (a command
/// line) already prints that version.
fn cargo_tool(name: &str, version: &str, probe: &[&str]) -> anyhow::Result<()> {
    let found = exec::output(Command::new(probe[0]).args(&probe[1..]))
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if found.contains(version) {
        println!("xtask: {name} {version} is installed");
        return Ok(());
    }
    println!("xtask: installing {name} {version} (cargo install, a few minutes)");
    exec::run(Command::new("cargo").args([
        "install",
        &format!("{name}@{version}"),
        "--locked",
        "--force",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    cargo_tool(
        "bpf-linker",
        BPF_LINKER_VERSION,
        &["bpf-linker", "--version"],
    )
}

/// Installs the Debian packages in `packages` that are not installed yet.
pub(crate) fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !exec::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("xtask: apt packages present: {}", packages.join(" "));
        return Ok(());
    }
    println!("xtask: installing apt packages: {}", missing.join(" "));
    if !is_root() {
        bail!(
            "installing {} needs root (run `sudo cargo xtask setup`)",
            missing.join(" ")
        );
    }
    exec::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed")
}

/// `promtool` checks and unit-tests the shipped alert rules. Debian ships it only inside the
/// `prometheus` package, whose installation would also create a user and start a Prometheus
/// server on a systemd host: the package is downloaded and unpacked under target/ instead.
fn promtool() -> anyhow::Result<()> {
    let root = exec::root();
    if root.join(PROMTOOL).exists() {
        println!("xtask: promtool is unpacked");
        return Ok(());
    }
    let dir = root.join("target/tools");
    std::fs::create_dir_all(&dir)?;
    println!("xtask: unpacking promtool from Debian's prometheus package into target/tools");
    let download = || {
        exec::run(
            Command::new("apt-get")
                .args(["download", "-q", "prometheus"])
                .current_dir(&dir),
        )
    };
    if download().is_err() {
        exec::run(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let deb = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("prometheus_"))
        })
        .context("apt-get download left no prometheus_*.deb")?;
    exec::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("prometheus")),
    )?;
    std::fs::remove_file(&deb)?;
    Ok(())
}

/// A minimal Debian root with systemd as its init, as a tarball under target/tools (made once
/// with mmdebstrap from the host's apt sources, about 20 s), for tests/systemd.rs to boot.
pub(crate) fn debian_root() -> anyhow::Result<std::path::PathBuf> {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let suite = release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .context(
            "/etc/os-release names no VERSION_CODENAME: the systemd test needs a Debian host",
        )?;
    let dir = exec::root().join("target/tools");
    let tarball = dir.join(format!("debian-{suite}-systemd.tar"));
    if tarball.exists() {
        println!("xtask: {} is there", tarball.display());
        return Ok(tarball);
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = tarball.with_extension("partial.tar");
    exec::run(
        Command::new("mmdebstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv",
                "--quiet",
            ])
            .arg(&suite)
            .arg(&tmp),
    )?;
    std::fs::rename(&tmp, &tarball)?;
    Ok(tarball)
}

pub(crate) fn is_root() -> bool {
    exec::output(Command::new("id").arg("-u")).is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
