//! `cargo xtask test`: the gate CI runs. Formatting, lints on every target, then all tests.
use std::process::Command;

use anyhow::bail;

use crate::{exec, setup};

pub(crate) fn run(cargo_test_args: &[String]) -> anyhow::Result<()> {
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
    exec::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--locked"])
            .arg("--")
            .args(cargo_test_args),
    )
}
