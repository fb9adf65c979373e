//! Taking one sample: start a contender, put the job's load through it, and turn what the
//! load and /proc saw into metrics.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use berth::addr::Proto;

use crate::{
    contender::{self, Contender, Tools},
    load,
    metric::{Metric, Metrics},
    plan,
    plan::{Job, Plan},
    procstat, report, topo,
};

/// What every sample needs: the contenders' binaries, the topology, the plan, where logs go,
/// and the runtime the local clients run on.
#[derive(Clone, Copy)]
pub(crate) struct Env<'a> {
    pub(crate) tools: &'a Tools,
    pub(crate) topology: &'a topo::Topo,
    pub(crate) plan: &'a Plan,
    pub(crate) logs: &'a Path,
    pub(crate) rt: &'a tokio::runtime::Runtime,
}

/// One sample of `job` with contender `c`, on port slot `slot` (its proxy port and the
/// server port it maps to; [`slot`] rotates them between repetitions).
pub(crate) fn take(job: Job, c: Contender, slot: u16, env: &Env<'_>) -> anyhow::Result<Metrics> {
    match job {
        Job::Mappings => mappings(c, env),
        Job::Restart { upgrade } => restart(c, upgrade, slot, env),
        Job::Iperf3 { .. } | Job::Sockperf => crosscheck(job, c, slot, env),
        Job::Sequential => {
            // The last sample's TIME_WAIT would count against this one (a quick run's
            // figures are rough anyway: it does not wait).
            if env.plan.seq_conns >= 10_000 {
                time_wait_gone(env.topology)?;
            }
            let _defaults = topo::HostDefaults::set()?;
            sample(job, c, slot, env)
        }
        _ => sample(job, c, slot, env),
    }
}

/// The port slot of contender `c` in repetition `rep`: every contender moves one slot on per
/// repetition, so that no contender keeps a port (its listener's hash bucket, its
/// server-side socket) that might favour it, and with enough repetitions each has had
/// several.
pub(crate) fn slot(c: Contender, rep: u32) -> u16 {
    let n = Contender::ALL.len() as u32;
    ((c as u32 + rep) % n) as u16
}

/// iperf3 or sockperf through contender `c`: the tool's server in the container namespace,
/// its client in the host's, all of it (and the proxy) on the pinned CPU.
fn crosscheck(job: Job, c: Contender, slot: u16, env: &Env<'_>) -> anyhow::Result<Metrics> {
    use crate::crosscheck as x;
    let Env {
        tools,
        topology,
        plan,
        logs,
        ..
    } = *env;
    let missing = |what| anyhow::anyhow!("{what} is not installed (cargo xtask bench installs it)");
    let ip = topology.server.ip();
    let (server, target) = match job {
        Job::Iperf3 { .. } => {
            let tool = tools.iperf3.as_deref().ok_or_else(|| missing("iperf3"))?;
            let at = std::net::SocketAddr::new(ip, x::IPERF3_PORT + slot);
            (
                x::serve(&topology.server_ns, x::iperf3_server(tool, at), at, logs)?,
                at,
            )
        }
        _ => {
            let tool = tools
                .sockperf
                .as_deref()
                .ok_or_else(|| missing("sockperf"))?;
            let at = std::net::SocketAddr::new(ip, x::SOCKPERF_PORT + slot);
            (
                x::serve(&topology.server_ns, x::sockperf_server(tool, at), at, logs)?,
                at,
            )
        }
    };
    let running = c.start(tools, Proto::Tcp, proxy_port(slot), target, logs)?;
    let mut pids = running.pids();
    pids.push(server.pid());
    let _pinned = crate::pin::Pinned::new(&pids)?;
    let mut m = Metrics::new();
    match job {
        Job::Iperf3 { dir } => {
            let tool = tools.iperf3.as_deref().ok_or_else(|| missing("iperf3"))?;
            let gbit = x::iperf3(tool, running.local, plan.bulk_secs, dir == load::Dir::Down)?;
            m.insert(Metric::GbitPerSec, gbit);
        }
        _ => {
            let tool = tools
                .sockperf
                .as_deref()
                .ok_or_else(|| missing("sockperf"))?;
            let (p50, p99) = x::sockperf(tool, running.local, plan.rr_secs)?;
            m.insert(Metric::P50Us, p50);
            m.insert(Metric::P99Us, p99);
        }
    }
    Ok(m)
}

/// Waits (at most 65 s: TIME_WAIT lasts 60) until neither the host's namespace nor the
/// external client's holds a TCP socket in TIME_WAIT.
fn time_wait_gone(topology: &topo::Topo) -> anyhow::Result<()> {
    fn count() -> anyhow::Result<usize> {
        let mut n = 0;
        for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let text = std::fs::read_to_string(file)?;
            // The fourth column is the state; 06 is TIME_WAIT.
            n += text
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(3) == Some("06"))
                .count();
        }
        Ok(n)
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(65);
    loop {
        let left = count()? + topology.ext_ns.run(count)??;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{left} sockets still in TIME_WAIT after 65 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The proxy port of slot `slot`.
fn proxy_port(slot: u16) -> u16 {
    10_000 + slot * 10
}

/// Held connections and a connect loop from the external namespace while the contender is
/// killed and started again 2 s later (its kernel-mode state pinned on a bpffs of the run's
/// own), or upgraded with `berth upgrade`. iptables has nothing to restart: its state is the
/// kernel's.
fn restart(c: Contender, upgrade: bool, slot: u16, env: &Env<'_>) -> anyhow::Result<Metrics> {
    let Env {
        tools,
        topology,
        logs,
        ..
    } = *env;
    let port = proxy_port(slot);
    let server = topology.server_for(slot);
    // Absolute (a config needs it) and outside the report directory.
    let bpffs = topo::BpfFs::mount(
        &std::env::temp_dir().join(format!("berth-bench-bpffs-{}", std::process::id())),
    )?;
    let mut running = match c {
        Contender::BerthDnat | Contender::BerthSplice => c.start_daemon(
            tools,
            Proto::Tcp,
            port,
            server,
            logs,
            Some(&bpffs.dir("berth")),
        )?,
        _ => c.start(tools, Proto::Tcp, port, server, logs)?,
    };
    let addr = running.external;
    let window = Duration::from_secs(plan::RESTART_SECS);
    let (ready, opened) = std::sync::mpsc::channel();
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| {
            on_client(env.rt, topology, true, || {
                load::outage(addr, plan::RESTART_HELD, window, ready)
            })
        });
        // Once every held connection is open, 1 s of traffic before the event (part of the
        // scenario, not a wait for anything). A load that failed to open says why on join.
        if opened.recv_timeout(Duration::from_secs(30)).is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
        let event = if upgrade {
            running.upgrade(tools)
        } else {
            running.crash_and_restart(tools, logs, Duration::from_secs(2))
        };
        let out = load
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
        event?;
        out
    })?;
    running.terminate();
    drop(running);
    drop(bpffs);
    Ok(Metrics::from([
        (Metric::HeldLost, out.held_lost as f64),
        (Metric::NewFailed, out.new_failed as f64),
        (Metric::LongestGapMs, out.longest_gap.as_secs_f64() * 1e3),
    ]))
}

/// Runs `f` on a runtime whose threads live in the client's namespace: the host namespace for
/// local clients, the external namespace for remote ones.
fn on_client<T: Send, Fut: Future<Output = anyhow::Result<T>>>(
    rt: &tokio::runtime::Runtime,
    topology: &topo::Topo,
    external: bool,
    f: impl FnOnce() -> Fut + Send,
) -> anyhow::Result<T> {
    if !external {
        return rt.block_on(f());
    }
    topology.ext_ns.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(f())
    })?
}

fn sample(job: Job, c: Contender, slot: u16, env: &Env<'_>) -> anyhow::Result<Metrics> {
    let Env {
        tools,
        topology,
        plan,
        logs,
        rt,
    } = *env;
    let port = proxy_port(slot);
    let running = if let Job::Ipv6 { .. } = job {
        c.start_v6(tools, port, topology.server6_for(slot), logs)?
    } else {
        c.start(tools, job.proto(), port, topology.server_for(slot), logs)?
    };
    // Single flows with client, server and proxy on one CPU (see `pin`): kept until the
    // load is done, released before the contender stops.
    let _pinned = if job.single_flow() {
        Some(crate::pin::Pinned::new(&running.pids())?)
    } else {
        None
    };
    // An IPv6 job is measured as its IPv4 twin, at the IPv6 addresses.
    let job = job.as_v4();
    let pids = running.pids();
    let mut m = Metrics::new();
    match job {
        Job::Bulk {
            streams,
            dir,
            external,
        } => {
            let addr = if external {
                running.external
            } else {
                running.local
            };
            let cpu0 = procstat::cpu_seconds(&pids);
            let machine0 = procstat::machine_cpu_seconds();
            let (bytes, elapsed) = on_client(rt, topology, external, || {
                load::bulk(addr, streams, dir, Duration::from_secs_f64(plan.bulk_secs))
            })?;
            let cpu = procstat::cpu_seconds(&pids) - cpu0;
            let machine = procstat::machine_cpu_seconds() - machine0;
            m.insert(
                Metric::GbitPerSec,
                bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
            );
            if c.has_process() && bytes > 0 {
                m.insert(Metric::CpuSecsPerGb, cpu / (bytes as f64 / 1e9));
            }
            if bytes > 0 {
                m.insert(Metric::MachineCpuSecsPerGb, machine / (bytes as f64 / 1e9));
            }
        }
        Job::Rr => {
            let hist = rt.block_on(load::rr(
                running.local,
                Duration::from_secs_f64(plan.rr_secs),
                plan.rr_max_rounds,
            ))?;
            for (key, q) in [
                (Metric::P50Us, 0.5),
                (Metric::P99Us, 0.99),
                (Metric::P999Us, 0.999),
            ] {
                m.insert(key, hist.value_at_quantile(q) as f64 / 1000.0);
            }
        }
        Job::Crr { external } | Job::Hostport { external } => {
            let addr = if external {
                running.external
            } else {
                running.local
            };
            let (n, elapsed, hist) = on_client(rt, topology, external, || {
                load::crr(
                    addr,
                    plan.crr_clients,
                    Duration::from_secs_f64(plan.crr_secs),
                )
            })?;
            m.insert(Metric::ConnPerSec, n as f64 / elapsed.as_secs_f64());
            m.insert(Metric::P99Ms, hist.value_at_quantile(0.99) as f64 / 1e6);
        }
        Job::Sequential => {
            let run = on_client(rt, topology, true, || {
                load::sequential(
                    running.external,
                    plan.seq_conns,
                    Duration::from_secs_f64(plan.seq_max_secs),
                )
            })?;
            anyhow::ensure!(run.done > 0, "no connection completed");
            if let Some(slowest) = run.tenths.iter().copied().reduce(f64::min) {
                m.insert(Metric::SlowestTenthConnPerSec, slowest);
            }
            // Completed connections only: a proxy that drops clients fast is not faster.
            m.insert(
                Metric::ConnPerSec,
                run.done as f64 / run.elapsed.as_secs_f64(),
            );
            m.insert(Metric::NewFailed, run.failed as f64);
        }
        Job::Idle => {
            let conns = rt.block_on(load::open_idle(running.local, plan.idle_conns))?;
            let (pss, rss) = procstat::memory_mib(&pids);
            m.insert(Metric::PssMib, pss);
            m.insert(Metric::RssMib, rss);
            m.insert(Metric::Processes, procstat::tree(&pids).len() as f64);
            drop(conns);
        }
        Job::Udp { size } => {
            let cpu0 = procstat::cpu_seconds(&pids);
            let run = rt.block_on(load::udp_echo(
                running.local,
                plan.udp_flows,
                plan.udp_window,
                size,
                Duration::from_secs_f64(plan.udp_secs),
            ))?;
            let cpu = procstat::cpu_seconds(&pids) - cpu0;
            anyhow::ensure!(run.replies > 0, "no datagram came back");
            let secs = run.elapsed.as_secs_f64();
            m.insert(Metric::KdgramPerSec, run.replies as f64 / secs / 1e3);
            m.insert(
                Metric::GbitPerSec,
                (run.replies * size as u64) as f64 * 8.0 / secs / 1e9,
            );
            m.insert(
                Metric::LossPct,
                100.0 * run.lost as f64 / (run.replies + run.lost) as f64,
            );
            if c.has_process() {
                // Each echoed datagram crossed the proxy twice.
                m.insert(
                    Metric::CpuUsPerDgram,
                    cpu / (2.0 * run.replies as f64) * 1e6,
                );
            }
        }
        Job::Mappings
        | Job::Restart { .. }
        | Job::Ipv6 { .. }
        | Job::Iperf3 { .. }
        | Job::Sockperf => {
            unreachable!("handled by take(), or turned into its IPv4 twin")
        }
    }
    Ok(m)
}

/// Starts `plan.mappings` mappings one after another, each waited for as dockerd waits for
/// docker-proxy, then measures their memory: PSS in all and per proxy process, and how much
/// the machine's MemAvailable dropped (what the host really gave up); and each proxy's time
/// from spawn to its `0` on the status pipe.
fn mappings(c: Contender, env: &Env<'_>) -> anyhow::Result<Metrics> {
    let Env {
        tools,
        topology,
        plan,
        logs,
        ..
    } = *env;
    let available_before = procstat::mem_available_mib();
    let start = Instant::now();
    let mut running = Vec::with_capacity(plan.mappings);
    let ports: Vec<u16> = (0..plan.mappings)
        .map(|i| u16::try_from(i).map(|i| 11_000 + i))
        .collect::<Result<_, _>>()?;
    let server = topology.server_for(c as u16);
    let mut ready = Vec::new();
    match c {
        // One daemon for every port, from its file: what berth is for.
        Contender::BerthSplice => {
            running.push(contender::start_berth_daemon(tools, &ports, server, logs)?);
        }
        Contender::BerthShim | Contender::BerthShimDaemon => {
            let delegate = c == Contender::BerthShimDaemon;
            let (shims, times) = contender::start_shims(tools, &ports, server, logs, delegate)?;
            running.push(shims);
            ready = times;
        }
        _ => {
            for &port in &ports {
                let started = Instant::now();
                running.push(c.start(tools, Proto::Tcp, port, server, logs)?);
                ready.push(started.elapsed());
            }
        }
    }
    let startup = start.elapsed().as_secs_f64();
    let pids: Vec<u32> = running.iter().flat_map(contender::Running::pids).collect();
    let (pss, rss) = procstat::memory_mib(&pids);
    let drop_mib = available_before - procstat::mem_available_mib();
    drop(running);
    let mut m = Metrics::from([
        (Metric::StartupSecs, startup),
        (Metric::PssMib, pss),
        (Metric::RssMib, rss),
        (Metric::Processes, pids.len() as f64),
        (Metric::MemAvailableDropMib, drop_mib),
    ]);
    if !ready.is_empty() {
        m.insert(Metric::PssKibPerProxy, pss * 1024.0 / pids.len() as f64);
        let ms: Vec<f64> = ready.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        m.insert(Metric::ReadyMs, report::stat(&ms).map_or(0.0, |s| s.median));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_in_a_round_and_move_on_each_round() {
        for rep in 0..4 {
            let slots: std::collections::BTreeSet<u16> =
                Contender::ALL.iter().map(|c| slot(*c, rep)).collect();
            assert_eq!(slots.len(), Contender::ALL.len(), "round {rep}");
        }
        for c in Contender::ALL {
            assert_ne!(slot(c, 1), slot(c, 2));
        }
    }
}
