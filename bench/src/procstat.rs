//! Per-process CPU time and memory from /proc, summed over a process tree.
use std::{collections::HashMap, fs};

/// Clock ticks per second, for /proc/PID/stat times.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `pids` and all their descendants.
pub(crate) fn tree(pids: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = pids.to_vec();
    while let Some(p) = stack.pop() {
        out.push(p);
        stack.extend(children.get(&p).into_iter().flatten());
    }
    out
}

/// Fields of /proc/PID/stat after the command name: [state, ppid, …].
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU seconds of `pids`, including their waited-for children (socat forks a
/// process per connection; their time lands in the parent's cutime/cstime).
pub(crate) fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = tree(pids)
        .iter()
        .filter_map(|&p| stat_fields(p))
        // utime, stime, cutime, cstime are fields 14–17 of stat; 12–15 after the name.
        .map(|f| {
            f.iter()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    ticks as f64 / ticks_per_sec()
}

/// Busy CPU seconds of the whole machine (all CPUs): user, nice, system, irq and softirq
/// from /proc/stat. Kernel work that no proxy process is charged for (softirqs, the kworkers
/// of sockmap's psock backlog) shows here, so modes can be compared on what they really cost.
pub(crate) fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // Fields after "cpu": user nice system idle iowait irq softirq steal ...
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / ticks_per_sec()
}

/// (PSS, RSS) in MiB over the process tree. PSS splits shared pages between the processes
/// that share them, so it is the fair figure for many-process proxies.
pub(crate) fn memory_mib(pids: &[u32]) -> (f64, f64) {
    let mut pss = 0u64;
    let mut rss = 0u64;
    for p in tree(pids) {
        let Ok(rollup) = fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        for line in rollup.lines() {
            let kib = || {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("Pss:") {
                pss += kib();
            } else if line.starts_with("Rss:") {
                rss += kib();
            }
        }
    }
    (pss as f64 / 1024.0, rss as f64 / 1024.0)
}

/// True if something listens on TCP `port` (IPv4 wildcard) in this namespace.
///
/// A bind with SO_REUSEADDR fails with EADDRINUSE only when a *listening* socket holds the
/// port, and it cannot get in a listener's way since every contender binds with SO_REUSEADDR
/// too. It costs two syscalls, where scanning /proc/net/tcp grows with every TIME_WAIT socket.
pub(crate) fn is_listening(port: u16) -> bool {
    let Ok(probe) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return false;
    };
    if probe.set_reuse_address(true).is_err() {
        return false;
    }
    matches!(probe.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into()), Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE))
}

/// [`is_listening`] for an IPv6 listener (which may be IPv6-only).
pub(crate) fn is_listening6(port: u16) -> bool {
    let Ok(probe) = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None) else {
        return false;
    };
    if probe.set_reuse_address(true).is_err() || probe.set_only_v6(true).is_err() {
        return false;
    }
    matches!(probe.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into()), Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE))
}

/// True when UDP `port` is bound on the wildcard or any address: a bind without SO_REUSEADDR
/// collides with any socket on the port.
pub(crate) fn is_udp_bound(port: u16) -> bool {
    match std::net::UdpSocket::bind(std::net::SocketAddr::from(([0, 0, 0, 0], port))) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EADDRINUSE),
    }
}

/// The machine's MemAvailable in MiB (what could still be given to programs).
pub(crate) fn mem_available_mib() -> f64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
