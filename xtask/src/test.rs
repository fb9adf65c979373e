//! `cargo xtask test`: the gate CI runs. Formatting, lints on every target, cargo-deny, docs,
//! then all tests (`--quick` leaves out the stress tier), then each fuzz target for a few
//! seconds.
use std::process::Command;

use anyhow::bail;

use crate::{exec, fuzz, package, setup};

/// The tier `--quick` skips: long transfers (4 GiB, 2 GiB, 64 × 64 MiB), by name.
const STRESS_PREFIX: &str = "stress_";

/// The longest one test binary may run (the slowest, with the stress tier, takes about 2
/// minutes here): a test that hangs fails the run instead of holding CI until its limit.
const BINARY_LIMIT_SECS: u32 = 900;

pub(crate) fn run(quick: bool, cargo_test_args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!(
            "the privileged tests need root (network namespaces, bridges, BPF): run `sudo -E cargo xtask test`"
        );
    }
    let root = exec::root();
    exec::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    // The fuzz targets are a workspace of their own.
    exec::run(
        Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args(["fmt", "--", "--check"]),
    )?;
    // Without --workspace, cargo uses default-members: everything but the BPF-only crate.
    exec::run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs only build for the BPF target, with nightly and build-std.
    exec::run(Command::new("cargo").current_dir(root.join("ebpf")).args([
        "+nightly",
        "clippy",
        "--locked",
        "-p",
        "berth-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Licenses, duplicate versions and sources (deny.toml); advisories need a database
    // fetched from GitHub, which these machines cannot reach.
    exec::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["deny", "check", "licenses", "bans", "sources"]),
    )?;
    // The docs build warning-free too: a broken intra-doc link is a broken reference.
    exec::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["doc", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // The Debian package, checked by lintian here, installed by tests/package.rs into a
    // throw-away root and by tests/systemd.rs into a Debian root booted with systemd.
    let deb = package::build(&root.join("target/package"))?;
    package::lintian(&deb)?;
    let debian_root = setup::debian_root()?;
    let mut test = Command::new("cargo");
    test.current_dir(&root)
        .env("BERTH_DEB", &deb)
        .env("BERTH_ROOTFS", &debian_root)
        .args(["test", "--locked", "--config"])
        // Every test binary runs under timeout(1), which kills it (and so fails the run)
        // past the limit; its Drop guards do not run then, but its namespaces and cgroups
        // carry unique names and the next run is not disturbed by them.
        .arg(format!(
            "target.'cfg(target_os = \"linux\")'.runner = ['timeout', '--kill-after=30', '{BINARY_LIMIT_SECS}']"
        ))
        .arg("--")
        .args(cargo_test_args);
    if quick {
        test.args(["--skip", STRESS_PREFIX]);
    }
    exec::run(&mut test)?;
    // A filtered run is for iterating on some tests; the fuzz targets run with the full one.
    if cargo_test_args.is_empty() {
        fuzz::bounded()?;
    }
    Ok(())
}
