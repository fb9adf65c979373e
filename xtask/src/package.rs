//! `cargo xtask package`: berth as a Debian package, built from the tree `cargo xtask install`
//! stages (in [`Layout::debian`]) with dpkg-deb, then checked with lintian.
//!
//! Not cargo-deb: the manual pages and completions come from running the built binary, which
//! an asset list cannot express without this staging step anyway, and dpkg-deb is on every
//! Debian host while cargo-deb would be one more tool to install.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    exec,
    install::{self, Layout},
    setup,
};

/// lintian's findings at or above this level fail the build (overrides, each with its reason,
/// are in proxy/dist/debian/lintian-overrides).
const LINTIAN_FAIL_ON: &str = "error,warning";

#[derive(Debug, clap::Args)]
pub(crate) struct PackageArgs {
    /// Where the .deb goes [default: target/package].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip lintian (it takes about half a minute).
    #[arg(long)]
    no_lintian: bool,
}

pub(crate) fn run(args: &PackageArgs) -> anyhow::Result<()> {
    setup::apt(&["lintian", "dpkg-dev"])?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| exec::root().join("target/package"));
    let deb = build(&out)?;
    if !args.no_lintian {
        lintian(&deb)?;
    }
    println!("xtask: built {}", deb.display());
    Ok(())
}

/// Builds the package into `out` and returns its path.
pub(crate) fn build(out: &Path) -> anyhow::Result<PathBuf> {
    let root = exec::root();
    let version = version()?;
    let debian = root.join("proxy/dist/debian");
    let changelog = fs::read_to_string(debian.join("changelog"))?;
    if !changelog.starts_with(&format!("berth ({version})")) {
        bail!("proxy/dist/debian/changelog does not start with berth ({version}): add an entry");
    }
    exec::build_release(&["berth", "berth-bench"])?;
    let berth = exec::build_static()?.join("berth");
    // berth-bench is an ordinary dynamically linked program (see lintian-overrides for why
    // berth is not).
    let bench = exec::stripped(
        &root.join("target/release/berth-bench"),
        &root.join("target/release/package"),
    )?;

    let tree = out.join("root");
    let _ = fs::remove_dir_all(&tree);
    let layout = Layout::debian();
    install::stage(&layout, Some(&tree), &berth)?;
    let usr = tree.join("usr");
    install::copy(&bench, &usr.join("bin/berth-bench"), 0o755)?;
    let page = exec::output(Command::new(&bench).arg("--print-man"))?;
    anyhow::ensure!(page.status.success(), "berth-bench --print-man failed");
    let man1 = usr.join("share/man/man1/berth-bench.1");
    install::write_bytes(&man1, &page.stdout, 0o644)?;
    gzip(&man1)?;
    let doc = tree.join(layout.doc().strip_prefix("/")?);
    install::copy(&debian.join("copyright"), &doc.join("copyright"), 0o644)?;
    install::copy(&debian.join("changelog"), &doc.join("changelog"), 0o644)?;
    gzip(&doc.join("changelog"))?;
    install::copy(
        &debian.join("lintian-overrides"),
        &usr.join("share/lintian/overrides/berth"),
        0o644,
    )?;

    let control = tree.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install::copy(&debian.join(script), &control.join(script), 0o755)?;
    }
    install::write_bytes(
        &control.join("conffiles"),
        b"/etc/berth/berth.toml\n",
        0o644,
    )?;
    install::write_bytes(&control.join("md5sums"), md5sums(&tree)?.as_bytes(), 0o644)?;
    let arch =
        String::from_utf8(exec::output(Command::new("dpkg").arg("--print-architecture"))?.stdout)?;
    let arch = arch.trim();
    install::write_bytes(
        &control.join("control"),
        control_file(
            &version,
            arch,
            installed_size_kib(&tree)?,
            &depends(&bench)?,
        )
        .as_bytes(),
        0o644,
    )?;
    let deb = out.join(format!("berth_{version}_{arch}.deb"));
    exec::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&tree)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Runs lintian on `deb`; fails on any warning or error that is not overridden.
pub(crate) fn lintian(deb: &Path) -> anyhow::Result<()> {
    exec::run(
        Command::new("lintian")
            .args([
                "--fail-on",
                LINTIAN_FAIL_ON,
                "--display-info",
                "--tag-display-limit",
                "0",
            ])
            .arg(deb),
    )
    .context("lintian found problems in the package")
}

fn control_file(version: &str, arch: &str, size_kib: u64, depends: &str) -> String {
    format!(
        "Package: berth
Version: {version}
Architecture: {arch}
Maintainer: berth maintainers <berth@example.invalid>
Installed-Size: {size_kib}
Depends: {depends}
Section: net
Priority: optional
Homepage: https://example.invalid/berth
Suggests: docker.io | podman, containernetworking-plugins, socat, haproxy
Description: port-forwarding proxy for containers, with an eBPF fast path
 berth publishes container ports for Docker (as its userland-proxy-path,
 berth-docker-proxy), for CNI runtimes such as Podman (the chained plugin
 berth-cni) and from its own configuration, all in one daemon with
 Prometheus metrics, live reload and systemd integration.
 .
 Ports are relayed in userland (copy or splice), by a sockmap relay in the
 kernel, or in kernel mode (TC and cgroup eBPF programs, no process in the
 data path, the client address preserved).
 .
 berth-bench compares berth with direct access, docker-proxy, socat, HAProxy
 and iptables DNAT on this host.
"
    )
}

/// The shared libraries `binary` needs, as Debian dependencies (dpkg-shlibdeps, which wants
/// to run beside a debian/control).
fn depends(binary: &Path) -> anyhow::Result<String> {
    let dir = exec::root().join("target/package/shlibs");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        "Source: berth\n\nPackage: berth\nArchitecture: any\n",
    )?;
    let out = exec::output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&dir)
            .arg("-O")
            .arg(format!("-e{}", binary.display())),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "dpkg-shlibdeps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

fn version() -> anyhow::Result<String> {
    let manifest = fs::read_to_string(exec::root().join("Cargo.toml"))?;
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .context("no version in [workspace.package]")
}

fn gzip(path: &Path) -> anyhow::Result<()> {
    // -n: no name or time stamp, so that the package is reproducible.
    exec::run(Command::new("gzip").arg("-9nf").arg(path))
}

/// DEBIAN/md5sums: every regular file, as dpkg --verify checks them.
fn md5sums(tree: &Path) -> anyhow::Result<String> {
    let files = walk(tree)?;
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(tree);
    for f in files.iter().filter(|f| !f.starts_with("DEBIAN")) {
        cmd.arg(f);
    }
    let out = exec::output(&mut cmd)?;
    anyhow::ensure!(out.status.success(), "md5sum failed");
    Ok(String::from_utf8(out.stdout)?)
}

fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for f in walk(tree)?.iter().filter(|f| !f.starts_with("DEBIAN")) {
        bytes += fs::symlink_metadata(tree.join(f))?.len();
    }
    Ok(bytes.div_ceil(1024))
}

/// Regular files under `dir`, relative to it, sorted.
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for entry in fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
