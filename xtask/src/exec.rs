//! Running commands: print them, run them, and fail with the command line when they fail.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

fn line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = line(cmd);
    println!("xtask> {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its output, whatever the exit status.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    let shown = line(cmd);
    cmd.output()
        .with_context(|| format!("failed to start `{shown}`"))
}

/// `cargo build --release --locked` of `packages`, in the workspace root.
pub(crate) fn build_release(packages: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "--release", "--locked"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    run(&mut cmd)
}

/// Where [`static_binary`] puts its output (the Containerfile copies berth from there).
const STATIC_DIR: &str = "target/release/static";

/// `berth` as installed, from [`static_binary`], in `target/release/static/` with
/// `berth-docker-proxy` and `berth-cni` beside it as links (berth dispatches on its name).
/// With no dynamic relocations to apply at start, a waiting shim dirties almost nothing (64 kB
/// private here, against 112 kB dynamically linked), and one binary for both lets a thousand
/// shims share their code pages with the daemon. Returns the directory.
pub(crate) fn build_static() -> anyhow::Result<PathBuf> {
    let berth = static_binary("berth", "berth")?;
    let dir = berth.parent().expect("in a directory").to_owned();
    for name in ["berth-docker-proxy", "berth-cni"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("berth", &link)
            .with_context(|| format!("cannot link {name}"))?;
    }
    Ok(dir)
}

/// Binary `bin` of `package`, linked statically and not position-independent, and stripped
/// (73 MB of line tables become 10 MB) as `target/release/static/BIN`. Only the binary gets
/// these flags (`cargo rustc`); the library and tests keep theirs, and `target/release/BIN`
/// keeps its symbols for profiling.
pub(crate) fn static_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").current_dir(root()).args([
        "rustc",
        "--release",
        "--locked",
        "-p",
        package,
        "--bin",
        bin,
        "--",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "relocation-model=static",
    ]))?;
    stripped(
        &root().join("target/release").join(bin),
        &root().join(STATIC_DIR),
    )
}

/// A stripped copy of `binary` in `dir`, as dh_strip makes for a Debian package.
pub(crate) fn stripped(binary: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = binary.file_name().context("a binary has a file name")?;
    // Beside, then rename: a running copy (a bench's daemon) is replaced, not rewritten.
    let tmp = dir.join(name).with_extension("new");
    std::fs::copy(binary, &tmp).with_context(|| format!("cannot copy {}", binary.display()))?;
    run(Command::new("strip")
        .args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
        ])
        .arg(&tmp))?;
    let out = dir.join(name);
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}
