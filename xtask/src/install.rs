//! `cargo xtask install`: the release binaries, the systemd units and an example config.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::exec;

#[derive(Debug, clap::Args)]
pub(crate) struct InstallArgs {
    /// Where the binaries go: PREFIX/bin.
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// A staging root prepended to every path (for packaging); the units still name PREFIX.
    #[arg(long)]
    destdir: Option<PathBuf>,
    /// CNI plugin directories that get `berth-cni` (repeatable) [default: /usr/lib/cni
    /// (Debian's) and /opt/cni/bin (upstream's)].
    #[arg(long = "cni-bin-dir")]
    cni_bin_dirs: Vec<PathBuf>,
}

pub(crate) fn run(args: &InstallArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.prefix.is_absolute(),
        "--prefix must be an absolute path"
    );
    let root = exec::root();
    exec::build_release(&["berth"])?;
    let built = exec::build_static()?;
    let stage = |p: &Path| match &args.destdir {
        Some(d) => d.join(p.strip_prefix("/").unwrap_or(p)),
        None => p.to_owned(),
    };
    let bindir = args.prefix.join("bin");
    copy(&built.join("berth"), &stage(&bindir.join("berth")), 0o755)?;
    // dockerd's userland-proxy-path: the same binary under the name it dispatches on.
    let shim = stage(&bindir.join("berth-docker-proxy"));
    let _ = fs::remove_file(&shim);
    std::os::unix::fs::symlink("berth", &shim)
        .with_context(|| format!("cannot link {}", shim.display()))?;
    println!("xtask: installed {} -> berth", shim.display());
    // The CNI plugin: runtimes look plugins up by name in their plugin directories.
    let cni_dirs = if args.cni_bin_dirs.is_empty() {
        vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")]
    } else {
        args.cni_bin_dirs.clone()
    };
    for dir in cni_dirs {
        let link = stage(&dir.join("berth-cni"));
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(bindir.join("berth"), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
        println!(
            "xtask: installed {} -> {}",
            link.display(),
            bindir.join("berth").display()
        );
    }
    let dist = root.join("proxy/dist");
    let units = stage(Path::new("/etc/systemd/system"));
    let service = fs::read_to_string(dist.join("berth.service"))?
        .replace("@BINDIR@", &bindir.to_string_lossy());
    write(&units.join("berth.service"), &service, 0o644)?;
    copy(
        &dist.join("berth.socket"),
        &units.join("berth.socket"),
        0o644,
    )?;
    let doc = stage(&args.prefix.join("share/doc/berth"));
    copy(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    copy(
        &dist.join("berth.toml"),
        &doc.join("berth.toml.example"),
        0o644,
    )?;
    // Opt-in: the eBPF modes need capabilities the hardened unit does not grant.
    copy(&dist.join("ebpf.conf"), &doc.join("ebpf.conf"), 0o644)?;
    // To import into Grafana and load into Prometheus (docs/metrics.md).
    for f in [
        "grafana/berth.json",
        "prometheus/berth-rules.yml",
        "prometheus/berth-rules.test.yml",
    ] {
        copy(&dist.join(f), &doc.join(f), 0o644)?;
    }
    // Never overwrite an operator's configuration.
    let config = stage(Path::new("/etc/berth/berth.toml"));
    if config.exists() {
        println!("xtask: kept the existing {}", config.display());
    } else {
        copy(&dist.join("berth.toml"), &config, 0o644)?;
    }
    println!(
        "xtask: installed. Edit /etc/berth/berth.toml, check it with `berth check`, then\n       systemctl daemon-reload && systemctl enable --now berth.service\n       (berth.socket is an example of socket activation; it is not enabled)."
    );
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let data = fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    write_bytes(to, &data, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    write_bytes(to, text.as_bytes(), mode)
}

fn write_bytes(to: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Write beside, then rename: a running binary is replaced, not truncated under itself.
    let tmp = to.with_extension("xtask-new");
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to).with_context(|| format!("cannot install {}", to.display()))?;
    println!("xtask: installed {}", to.display());
    Ok(())
}
