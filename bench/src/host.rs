//! What the report says about the host: its machine, the contenders' versions, the date; and
//! the descriptor limit the run works within.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use crate::contender::Tools;

/// The hard RLIMIT_NOFILE (after [`raise_nofile`] tried to lift it).
pub(crate) fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard)
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `program` in the directory this executable is in (an installed berth-bench's berth).
pub(crate) fn beside_self(program: &str) -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.with_file_name(program);
    path.is_file().then_some(path)
}

fn first_line(cmd: &Path, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn versions(tools: &Tools) -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::new();
    v.insert("berth", first_line(&tools.berth, &["--version"]));
    if let Some(p) = &tools.docker_proxy {
        let version =
            std::fs::read_to_string(p.with_extension("version")).map(|s| s.trim().to_owned());
        v.insert(
            "docker-proxy",
            format!("docker.io {}", version.unwrap_or_else(|_| "unknown".into())),
        );
    }
    if let Some(p) = &tools.socat {
        let text = Command::new(p)
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let version = text
            .lines()
            .find(|l| l.contains("socat version"))
            .map_or("unknown".into(), |l| l.trim().to_owned());
        v.insert("socat", version);
    }
    if let Some(p) = &tools.haproxy {
        v.insert("haproxy", first_line(p, &["-v"]));
    }
    if let Some(p) = &tools.iptables {
        v.insert("iptables", first_line(p, &["-V"]));
    }
    if tools.cni_portmap.is_some() {
        // The plugin itself says "version unknown": the package knows.
        let version = first_line(
            Path::new("dpkg-query"),
            &["-W", "-f", "${Version}", "containernetworking-plugins"],
        );
        v.insert(
            "cni-portmap",
            format!("containernetworking-plugins {version}"),
        );
    }
    v
}

pub(crate) fn machine() -> BTreeMap<&'static str, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("?".into(), |k| format!("{:.0} GiB", k / 1024.0 / 1024.0));
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    BTreeMap::from([
        (
            "cores",
            std::thread::available_parallelism()
                .map_or(0, usize::from)
                .to_string(),
        ),
        ("cpu", model),
        ("memory", mem_gib),
        ("kernel", format!("Linux {kernel}")),
    ])
}

pub(crate) fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Idle connections need many descriptors here and in the server thread; root may raise the
/// hard limit too.
pub(crate) fn raise_nofile() {
    use nix::sys::resource::{Resource, setrlimit};
    if setrlimit(Resource::RLIMIT_NOFILE, 1 << 20, 1 << 20).is_err() {
        berth::sys::raise_nofile_limit();
    }
}
