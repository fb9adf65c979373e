//! `cargo xtask install`: the release binaries, the systemd units, an example config, the
//! manual pages and shell completions, and the dashboard and alert rules. The same staging
//! builds the Debian package (`package.rs`), with [`Layout::debian`].
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
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

/// Where each part of an installation goes.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Binaries in PREFIX/bin, pages, completions and docs in PREFIX/share.
    pub(crate) prefix: PathBuf,
    /// The systemd unit directory.
    pub(crate) units: PathBuf,
    /// Directories that get the `berth-cni` link.
    pub(crate) cni_dirs: Vec<PathBuf>,
    /// Compressed manual pages, as Debian policy wants them.
    pub(crate) gzip_man: bool,
    /// An existing /etc/berth/berth.toml is kept (a package's conffile is dpkg's business).
    pub(crate) keep_config: bool,
}

impl Layout {
    /// The Debian package's: /usr, units where bookworm's systemd packages put theirs, and
    /// the CNI link only in Debian's plugin directory (policy forbids /opt).
    pub(crate) fn debian() -> Self {
        Self {
            prefix: "/usr".into(),
            units: "/lib/systemd/system".into(),
            cni_dirs: vec!["/usr/lib/cni".into()],
            gzip_man: true,
            keep_config: false,
        }
    }

    fn bindir(&self) -> PathBuf {
        self.prefix.join("bin")
    }

    pub(crate) fn doc(&self) -> PathBuf {
        self.prefix.join("share/doc/berth")
    }
}

pub(crate) fn run(args: &InstallArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.prefix.is_absolute(),
        "--prefix must be an absolute path"
    );
    exec::build_release(&["berth"])?;
    let built = exec::build_static()?;
    let layout = Layout {
        prefix: args.prefix.clone(),
        units: "/etc/systemd/system".into(),
        cni_dirs: if args.cni_bin_dirs.is_empty() {
            vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()]
        } else {
            args.cni_bin_dirs.clone()
        },
        gzip_man: false,
        keep_config: true,
    };
    stage(&layout, args.destdir.as_deref(), &built.join("berth"))?;
    println!(
        "xtask: installed. Edit /etc/berth/berth.toml, check it with `berth check`, then\n       systemctl daemon-reload && systemctl enable --now berth.service\n       (berth.socket is an example of socket activation; it is not enabled)."
    );
    Ok(())
}

/// Installs `berth` (the static binary) and everything around it as `layout` says, under
/// `destdir` if given.
pub(crate) fn stage(layout: &Layout, destdir: Option<&Path>, berth: &Path) -> anyhow::Result<()> {
    let root = exec::root();
    let stage = |p: &Path| match destdir {
        Some(d) => d.join(p.strip_prefix("/").unwrap_or(p)),
        None => p.to_owned(),
    };
    let bindir = layout.bindir();
    copy(berth, &stage(&bindir.join("berth")), 0o755)?;
    // dockerd's userland-proxy-path: the same binary under the name it dispatches on.
    link("berth", &stage(&bindir.join("berth-docker-proxy")))?;
    // The CNI plugin: runtimes look plugins up by name in their plugin directories.
    for dir in &layout.cni_dirs {
        link(
            link_target(dir, &bindir.join("berth")),
            &stage(&dir.join("berth-cni")),
        )?;
    }
    let dist = root.join("proxy/dist");
    let units = stage(&layout.units);
    let service = fs::read_to_string(dist.join("berth.service"))?
        .replace("@BINDIR@", &bindir.to_string_lossy());
    write_bytes(&units.join("berth.service"), service.as_bytes(), 0o644)?;
    copy(
        &dist.join("berth.socket"),
        &units.join("berth.socket"),
        0o644,
    )?;
    let doc = stage(&layout.doc());
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
    man_and_completions(berth, &stage(&layout.prefix.join("share")), layout.gzip_man)?;
    let config = stage(Path::new("/etc/berth/berth.toml"));
    if layout.keep_config && config.exists() {
        // Never overwrite an operator's configuration.
        println!("xtask: kept the existing {}", config.display());
    } else {
        copy(&dist.join("berth.toml"), &config, 0o644)?;
    }
    Ok(())
}

/// The manual pages and shell completions, generated by the built binary from its own
/// command-line definitions.
fn man_and_completions(berth: &Path, share: &Path, gzip: bool) -> anyhow::Result<()> {
    let pages = share.join("man/man1");
    exec::run(Command::new(berth).args(["man", "--dir"]).arg(&pages))?;
    // berth.toml(5) is a section-5 page.
    let man5 = share.join("man/man5");
    fs::create_dir_all(&man5)?;
    fs::rename(pages.join("berth.toml.5"), man5.join("berth.toml.5"))?;
    if gzip {
        for dir in [&pages, &man5] {
            // -n: no name or time stamp, so that the package is reproducible.
            exec::run(
                Command::new("gzip").args(["-9nf"]).args(
                    fs::read_dir(dir)?
                        .map(|e| e.map(|e| e.path()))
                        .collect::<Result<Vec<_>, _>>()?
                        .iter()
                        .filter(|p| p.extension().is_none_or(|e| e != "gz")),
                ),
            )?;
        }
    }
    for (shell, path) in [
        ("bash", "bash-completion/completions/berth"),
        ("zsh", "zsh/vendor-completions/_berth"),
        ("fish", "fish/vendor_completions.d/berth.fish"),
    ] {
        let script = exec::output(Command::new(berth).args(["completions", shell]))?;
        anyhow::ensure!(script.status.success(), "berth completions {shell} failed");
        write_bytes(&share.join(path), &script.stdout, 0o644)?;
    }
    Ok(())
}

/// What a link in directory `from` to `to` (both absolute) holds, as Debian policy wants
/// it: relative within one top-level directory, absolute across two.
fn link_target(from: &Path, to: &Path) -> PathBuf {
    let (mut a, mut b) = (from.components().peekable(), to.components().peekable());
    // Skip the root, then compare the top-level directories.
    a.next();
    b.next();
    if a.peek() != b.peek() {
        return to.to_owned();
    }
    while a.peek().is_some() && a.peek() == b.peek() {
        a.next();
        b.next();
    }
    a.map(|_| std::path::Component::ParentDir)
        .chain(b)
        .collect()
}

/// A symbolic link `at` -> `to`, replacing whatever `at` was.
fn link(to: impl AsRef<Path>, at: &Path) -> anyhow::Result<()> {
    if let Some(parent) = at.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(at);
    std::os::unix::fs::symlink(to.as_ref(), at)
        .with_context(|| format!("cannot link {}", at.display()))?;
    println!(
        "xtask: installed {} -> {}",
        at.display(),
        to.as_ref().display()
    );
    Ok(())
}

pub(crate) fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let data = fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    write_bytes(to, &data, mode)
}

pub(crate) fn write_bytes(to: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_relative_within_a_top_level_directory_only() {
        let t = |from: &str, to: &str| link_target(Path::new(from), Path::new(to));
        assert_eq!(
            t("/usr/lib/cni", "/usr/bin/berth"),
            Path::new("../../bin/berth")
        );
        assert_eq!(t("/usr/bin", "/usr/bin/berth"), Path::new("berth"));
        assert_eq!(
            t("/opt/cni/bin", "/usr/local/bin/berth"),
            Path::new("/usr/local/bin/berth")
        );
    }
}
