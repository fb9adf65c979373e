//! The Debian package (`cargo xtask package`), installed with dpkg into a throw-away root: its
//! files, its binaries, and its maintainer scripts (enabled on install, an operator's disable
//! and config kept, the config kept on remove and deleted on purge). The scripts run outside
//! the root with DPKG_ROOT set (`--force-script-chrootless`), as when bootstrapping a system;
//! tests/systemd.rs installs the same package under a running systemd.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::daemon::Dir;

/// The package under test: `cargo xtask test` builds it and sets BERTH_DEB.
fn deb() -> PathBuf {
    let deb = std::env::var_os("BERTH_DEB").map(PathBuf::from).expect(
        "BERTH_DEB is not set: `cargo xtask test` builds the package (`cargo xtask package`) and sets it",
    );
    assert!(deb.is_file(), "BERTH_DEB={} does not exist", deb.display());
    deb
}

/// An empty dpkg database under a fresh directory.
struct Root(Dir);

impl Root {
    fn new() -> Self {
        common::require_root();
        let dir = Dir::new();
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            std::fs::create_dir_all(dir.path(d)).unwrap();
        }
        for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
            std::fs::write(dir.path(f), "").unwrap();
        }
        Self(dir)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.0.path(p)
    }

    fn dpkg(&self, args: &[&str]) -> Output {
        Command::new("dpkg")
            .arg(format!("--root={}", self.0.0.display()))
            // The empty root has no libc6 for berth-bench's Depends (its binaries run on the
            // host's); tests/systemd.rs installs into a full Debian root, dependencies met.
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--force-unsafe-io",
            ])
            .args(args)
            .output()
            .unwrap()
    }

    /// `dpkg ARGS`, which must succeed; returns its stdout.
    fn dpkg_ok(&self, args: &[&str]) -> String {
        let out = self.dpkg(args);
        assert!(
            out.status.success(),
            "dpkg {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self) -> String {
        let out = self.dpkg(&["--status", "berth"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Status: "))
            .unwrap_or("not installed")
            .to_owned()
    }

    fn install(&self) {
        self.dpkg_ok(&["--install", deb().to_str().unwrap()]);
        assert_eq!(self.status(), "install ok installed");
    }

    /// The link `systemctl enable berth` makes.
    fn enabled(&self) -> bool {
        self.path("etc/systemd/system/multi-user.target.wants/berth.service")
            .symlink_metadata()
            .is_ok()
    }
}

fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_package_installs_every_file_and_its_binaries_run() {
    let root = Root::new();
    root.install();
    for f in [
        "usr/bin/berth",
        "usr/bin/berth-bench",
        "lib/systemd/system/berth.service",
        "lib/systemd/system/berth.socket",
        "etc/berth/berth.toml",
        "usr/share/man/man1/berth.1.gz",
        "usr/share/man/man1/berth-run.1.gz",
        "usr/share/man/man1/berth-net-up.1.gz",
        "usr/share/man/man1/berth-docker-proxy.1.gz",
        "usr/share/man/man1/berth-bench.1.gz",
        "usr/share/man/man5/berth.toml.5.gz",
        "usr/share/bash-completion/completions/berth",
        "usr/share/zsh/vendor-completions/_berth",
        "usr/share/fish/vendor_completions.d/berth.fish",
        "usr/share/doc/berth/copyright",
        "usr/share/doc/berth/changelog.gz",
        "usr/share/doc/berth/ebpf.conf",
        "usr/share/doc/berth/berth.toml.example",
        "usr/share/doc/berth/grafana/berth.json",
        "usr/share/doc/berth/prometheus/berth-rules.yml",
    ] {
        let meta = std::fs::metadata(root.path(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    for (link, to) in [
        ("usr/bin/berth-docker-proxy", "berth"),
        ("usr/lib/cni/berth-cni", "../../bin/berth"),
    ] {
        assert_eq!(
            std::fs::read_link(root.path(link)).unwrap(),
            Path::new(to),
            "{link}"
        );
    }
    // The unit names the packaged binary, not a placeholder.
    let unit = std::fs::read_to_string(root.path("lib/systemd/system/berth.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/berth run --config /etc/berth/berth.toml"));
    assert!(
        !unit.contains("@BINDIR@"),
        "an unreplaced placeholder:\n{unit}"
    );
    // Every file matches the package's md5sums, and the config is a conffile.
    root.dpkg_ok(&["--verify", "berth"]);
    let status = root.dpkg_ok(&["--status", "berth"]);
    assert!(
        status.contains("Conffiles:\n /etc/berth/berth.toml "),
        "{status}"
    );

    let berth = root.path("usr/bin/berth");
    assert_eq!(
        run_ok(&berth, &["--version"]).trim(),
        format!("berth {}", env!("CARGO_PKG_VERSION"))
    );
    let config = root.path("etc/berth/berth.toml");
    run_ok(&berth, &["check", "--config", config.to_str().unwrap()]);
    let bench = root.path("usr/bin/berth-bench");
    assert!(run_ok(&bench, &["--version"]).starts_with("berth-bench "));
    assert!(run_ok(&bench, &["--help"]).contains("--quick"));
    // berth-docker-proxy is the same binary under the name it dispatches on.
    let shim = Command::new(root.path("usr/bin/berth-docker-proxy"))
        .arg("-h")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&shim.stderr).contains("-container-ip")
            || String::from_utf8_lossy(&shim.stdout).contains("-container-ip"),
        "{shim:?}"
    );
}

#[test]
fn the_package_is_enabled_on_install_and_keeps_an_operators_choices() {
    let root = Root::new();
    root.install();
    assert!(root.enabled(), "berth.service is not enabled on install");
    // berth.socket is an example: known to the helper, not enabled.
    assert!(
        !root
            .path("etc/systemd/system/sockets.target.wants/berth.socket")
            .exists()
    );

    // The operator disables berth and edits the config; a reinstall (an upgrade does the
    // same) keeps both.
    std::fs::remove_file(root.path("etc/systemd/system/multi-user.target.wants/berth.service"))
        .unwrap();
    let config = root.path("etc/berth/berth.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, &edited).unwrap();
    root.install();
    assert!(!root.enabled(), "a reinstall enabled a disabled berth");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    // Remove: the binaries go, the config stays.
    root.dpkg_ok(&["--remove", "berth"]);
    assert_eq!(root.status(), "deinstall ok config-files");
    assert!(!root.path("usr/bin/berth").exists());
    assert!(!root.path("lib/systemd/system/berth.service").exists());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    // Purge: the config and every trace of the enablement go too.
    root.dpkg_ok(&["--purge", "berth"]);
    assert_eq!(root.status(), "not installed");
    assert!(
        !root.path("etc/berth").exists(),
        "/etc/berth survived a purge"
    );
    assert!(
        !root
            .path("var/lib/systemd/deb-systemd-helper-enabled/berth.service.dsh-also")
            .exists()
    );
    let left: Vec<_> = walk(&root.path("etc/systemd"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("berth"))
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
}

#[test]
fn a_fresh_install_after_a_purge_is_enabled_again() {
    let root = Root::new();
    root.install();
    std::fs::remove_file(root.path("etc/systemd/system/multi-user.target.wants/berth.service"))
        .unwrap();
    root.dpkg_ok(&["--purge", "berth"]);
    root.install();
    assert!(root.enabled(), "a purge must forget the operator's disable");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_packaged_bench_finds_its_berth_and_says_what_it_skipped() {
    let root = Root::new();
    root.install();
    let out = root.path("report");
    // A PATH with nothing on it: socat cannot be found, berth must be (beside the bench).
    let run = Command::new(root.path("usr/bin/berth-bench"))
        .args(["--quick", "--scenario", "rr"])
        .args(["--contender", "direct", "--contender", "berth-splice"])
        .args(["--contender", "socat", "--out"])
        .arg(&out)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "berth-bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(report.contains("| berth-splice |"), "{report}");
    assert!(
        report.contains("Skipped:\n- socat: socat not found (apt install socat"),
        "{report}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["skipped"][0][0], "socat", "{json}");
}
