//! berth-bench: maps one host port to one container server with every contender, and measures
//! throughput, latency, connection rate, memory and CPU, interleaved, in one run.
//!
//! Run it through `cargo xtask bench`, which installs the contenders and builds berth. The
//! process first moves into a private network namespace (the bench's "host"), so nothing it
//! does touches the machine's own network namespace.
mod chart;
mod contender;
mod load;
mod procstat;
mod report;
mod server;
mod topo;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use berth::addr::Proto;
use clap::{Parser, ValueEnum};
use contender::{Contender, Tools};
use indicatif::{ProgressBar, ProgressStyle};
use load::Dir;
use report::Sample;

#[derive(Debug, Parser)]
#[command(
    name = "berth-bench",
    about = "Forwarding benchmark: berth against direct, docker-proxy, socat, HAProxy and kernel DNAT"
)]
struct Cli {
    /// A short run (about 2 minutes) that proves the harness; its numbers are rough.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run (repeatable); all by default.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Contenders to run (repeatable); all by default.
    #[arg(long = "contender", value_enum)]
    contenders: Vec<Contender>,
    /// Where the Markdown, JSON, SVG charts and logs go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The berth binary to measure.
    #[arg(long)]
    berth: PathBuf,
    /// The docker-proxy binary (from Debian's docker.io package).
    #[arg(long)]
    docker_proxy: Option<PathBuf>,
    /// The berth-docker-proxy binary [default: beside --berth].
    #[arg(long)]
    berth_docker_proxy: Option<PathBuf>,
    /// Idle connections for the idle scenario [default: 10000, 500 with --quick; capped by
    /// the fd limit].
    #[arg(long)]
    idle_conns: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Throughput of 1 and 4 streams, each direction.
    Bulk,
    /// 64-byte request/response latency over one connection.
    Rr,
    /// Connection rate: connect, 64 B request, 64 B response, close.
    Crr,
    /// Memory with many idle connections held open.
    Idle,
    /// Memory and start-up time for many mapped ports.
    Mappings,
    /// Proxy CPU seconds per GB moved (from the bulk runs).
    Cpu,
    /// Bulk and connection rate from the external-client namespace.
    External,
    /// UDP datagrams per second and throughput at 64 B and 1,400 B (echo, 4 clients).
    Udp,
}

/// Durations and sizes for a run.
#[derive(Debug, Clone, serde::Serialize)]
struct Plan {
    reps: u32,
    warmup: bool,
    bulk_secs: f64,
    rr_secs: f64,
    rr_max_rounds: u64,
    crr_secs: f64,
    crr_clients: usize,
    idle_conns: usize,
    mappings: usize,
    udp_secs: f64,
    udp_flows: usize,
    udp_window: usize,
}

impl Plan {
    /// The plan for a run; `idle_conns` overrides the idle scenario's size.
    fn new(quick: bool, idle_conns: Option<usize>) -> Self {
        let plan = Self::unclamped(quick);
        Self {
            idle_conns: idle_conns.unwrap_or(plan.idle_conns).min(Self::fd_cap()),
            ..plan
        }
    }

    /// One proxy process holds 2 sockets per idle connection, and so does this process
    /// (client + server thread): stay under the hard RLIMIT_NOFILE, which may be fixed, with
    /// headroom for each proxy's own pipes and runtime descriptors.
    fn fd_cap() -> usize {
        usize::try_from(fd_limit().saturating_sub(4000) / 2).unwrap_or(usize::MAX)
    }

    fn unclamped(quick: bool) -> Self {
        if quick {
            Self {
                reps: 1,
                warmup: false,
                bulk_secs: 1.0,
                rr_secs: 1.0,
                rr_max_rounds: 200_000,
                crr_secs: 1.0,
                crr_clients: 8,
                idle_conns: 500,
                mappings: 100,
                udp_secs: 1.0,
                udp_flows: 4,
                udp_window: 32,
            }
        } else {
            Self {
                reps: 3,
                warmup: true,
                bulk_secs: 5.0,
                rr_secs: 5.0,
                rr_max_rounds: 2_000_000,
                crr_secs: 5.0,
                crr_clients: 8,
                idle_conns: 10_000,
                mappings: 1_000,
                udp_secs: 5.0,
                udp_flows: 4,
                udp_window: 32,
            }
        }
    }
}

impl Plan {
    fn quick_run(&self) -> bool {
        self.reps == 1 && !self.warmup
    }
}

/// The hard RLIMIT_NOFILE (after [`raise_nofile`] tried to lift it).
pub(crate) fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard)
}

/// One measurement to take, for each eligible contender and repetition.
#[derive(Debug, Clone, Copy)]
enum Job {
    Bulk {
        streams: usize,
        dir: Dir,
        external: bool,
    },
    Rr,
    Crr {
        external: bool,
    },
    Idle,
    Mappings,
    Udp {
        size: usize,
    },
}

impl Job {
    fn scenario(self) -> &'static str {
        match self {
            Self::Bulk {
                external: false, ..
            } => "bulk",
            Self::Bulk { external: true, .. } | Self::Crr { external: true } => "external",
            Self::Rr => "rr",
            Self::Crr { external: false } => "crr",
            Self::Idle => "idle",
            Self::Mappings => "mappings",
            Self::Udp { .. } => "udp",
        }
    }

    fn variant(self, plan: &Plan) -> String {
        match self {
            Self::Bulk { streams, dir, .. } => {
                format!(
                    "{streams} stream{} {}",
                    if streams > 1 { "s" } else { "" },
                    if dir == Dir::Up {
                        "client→container"
                    } else {
                        "container→client"
                    }
                )
            }
            Self::Rr => "64 B ping-pong, 1 connection".into(),
            Self::Crr { .. } => format!("connect+64 B+64 B+close, {} clients", plan.crr_clients),
            Self::Idle if plan.idle_conns == Plan::fd_cap() && !plan.quick_run() => {
                format!(
                    "{} idle connections (capped by the hard RLIMIT_NOFILE of {})",
                    plan.idle_conns,
                    fd_limit()
                )
            }
            Self::Idle => format!("{} idle connections", plan.idle_conns),
            Self::Mappings => format!(
                "{} mapped ports (berth: one `berth run` daemon; docker-proxy: a process per port)",
                plan.mappings
            ),
            Self::Udp { size } => format!(
                "{size} B datagrams, echo, {} clients x {} in flight",
                plan.udp_flows, plan.udp_window
            ),
        }
    }

    /// Which contenders take part, given the selection.
    fn eligible(self, c: Contender) -> Result<(), &'static str> {
        use Contender as C;
        let proto = if matches!(self, Self::Udp { .. }) {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        if !c.serves(proto) {
            return Err(if proto == Proto::Udp {
                "TCP only"
            } else {
                "UDP only"
            });
        }
        if matches!(c, C::BerthShim | C::BerthShimDaemon) && !matches!(self, Self::Mappings) {
            return Err("berth-docker-proxy is measured in the mappings scenario");
        }
        match self {
            Self::Bulk { external: true, .. } | Self::Crr { external: true } => {
                if matches!(
                    c,
                    C::Direct
                        | C::DockerProxy
                        | C::IptablesDnat
                        | C::BerthCopy
                        | C::BerthSplice
                        | C::BerthSockmap
                        | C::BerthDnat
                ) {
                    Ok(())
                } else {
                    Err("not part of the external comparison")
                }
            }
            Self::Idle => {
                if c.has_process() {
                    Ok(())
                } else {
                    Err("no proxy process to measure")
                }
            }
            Self::Mappings => {
                if matches!(
                    c,
                    C::BerthSplice | C::DockerProxy | C::BerthShim | C::BerthShimDaemon
                ) {
                    Ok(())
                } else {
                    Err("the mappings comparison is berth against docker-proxy")
                }
            }
            _ => Ok(()),
        }
    }

    fn estimate_secs(self, plan: &Plan) -> f64 {
        match self {
            Self::Bulk { .. } => plan.bulk_secs + 0.3,
            Self::Rr => plan.rr_secs + 0.3,
            Self::Crr { .. } => plan.crr_secs + 0.3,
            Self::Idle => plan.idle_conns as f64 / 2000.0 + 1.0,
            Self::Mappings => plan.mappings as f64 * 0.01 + 1.0,
            Self::Udp { .. } => plan.udp_secs + 0.3,
        }
    }
}

const METRIC_ORDER: &[&str] = &[
    "kdgram_s",
    "gbit_s",
    "conn_s",
    "p50_us",
    "pss_mib",
    "startup_s",
    "cpu_s_per_gb",
    "machine_cpu_s_per_gb",
    "cpu_us_per_dgram",
    "loss_pct",
    "p99_us",
    "p999_us",
    "p99_ms",
    "rss_mib",
    "processes",
    "pss_kib_per_proxy",
    "mem_available_drop_mib",
    "ready_ms",
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: every thread and child from here on lives in the private ns.
    if let Err(e) = topo::enter_private_host_ns().and_then(|()| topo::enter_bench_cgroup()) {
        eprintln!("berth-bench: {e:#}");
        topo::teardown();
        return ExitCode::FAILURE;
    }
    let result = run(&cli);
    topo::teardown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    raise_nofile();
    let plan = Plan::new(cli.quick, cli.idle_conns);
    if plan.idle_conns
        < cli
            .idle_conns
            .unwrap_or(Plan::unclamped(cli.quick).idle_conns)
    {
        eprintln!(
            "note: idle connections capped at {} by the hard RLIMIT_NOFILE ({})",
            plan.idle_conns,
            fd_limit()
        );
    }
    let logs = cli.out.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let tools = Tools {
        berth: cli.berth.clone(),
        berth_docker_proxy: cli
            .berth_docker_proxy
            .clone()
            .unwrap_or_else(|| cli.berth.with_file_name("berth-docker-proxy")),
        docker_proxy: cli.docker_proxy.clone().filter(|p| p.exists()),
        socat: which("socat"),
        haproxy: which("haproxy"),
        iptables: which("iptables"),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing down");
        topo::teardown();
        std::process::exit(130);
    })?;
    let topology = rt
        .block_on(topo::build())
        .context("failed to build the bench topology")?;
    let ports: Vec<u16> = Contender::ALL
        .iter()
        .map(|c| topo::SERVER_PORT + *c as u16)
        .collect();
    server::spawn(&topology.server_ns, topology.server.ip(), &ports)?;

    let selected_scenarios = if cli.scenarios.is_empty() {
        ScenarioSet::all()
    } else {
        ScenarioSet(cli.scenarios.clone())
    };
    let selected: Vec<Contender> = if cli.contenders.is_empty() {
        Contender::ALL.to_vec()
    } else {
        Contender::ALL
            .into_iter()
            .filter(|c| cli.contenders.contains(c))
            .collect()
    };
    let mut skipped: Vec<(String, String)> = Vec::new();
    let available: Vec<Contender> = selected
        .into_iter()
        .filter(|c| match c.unavailable(&tools) {
            Some(why) => {
                eprintln!("skipping {}: {why}", c.name());
                skipped.push((c.name().into(), why));
                false
            }
            None => true,
        })
        .collect();

    let jobs = selected_scenarios.jobs();
    let reps: Vec<(u32, bool)> = (if plan.warmup { Some((0, true)) } else { None })
        .into_iter()
        .chain((1..=plan.reps).map(|r| (r, false)))
        .collect();
    let total: f64 = jobs
        .iter()
        .map(|j| {
            available.iter().filter(|c| j.eligible(**c).is_ok()).count() as f64
                * j.estimate_secs(&plan)
                * reps.len() as f64
        })
        .sum();
    let bar = ProgressBar::new(total.ceil() as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta} {msg}",
    )?);

    let mut samples = Vec::new();
    let mut failures = Vec::new();
    let mut retried = Vec::new();
    let mut own_failures = 0;
    for job in &jobs {
        for c in &available {
            // A TCP-only or UDP-only contender sitting out the other protocol is no news.
            if let Err(why) = job.eligible(*c)
                && !why.ends_with(" only")
            {
                skipped.push((format!("{} in {}", c.name(), job.scenario()), why.into()));
            }
        }
        // Interleaved: A B C, A B C, … so that drift hits every contender alike.
        for &(rep, warmup) in &reps {
            for &c in available.iter().filter(|c| job.eligible(**c).is_ok()) {
                bar.set_message(format!(
                    "{} · {} · {}",
                    job.scenario(),
                    c.name(),
                    if warmup {
                        "warm-up".into()
                    } else {
                        format!("rep {rep}/{}", plan.reps)
                    }
                ));
                let attempt = || {
                    if let Job::Mappings = job {
                        mappings(c, &tools, &topology, &plan, &logs)
                    } else {
                        sample(*job, c, &tools, &topology, &plan, &logs, &rt)
                    }
                };
                // One retry, reported: a single transient failure should not void a long run.
                let result = attempt().or_else(|first| {
                    bar.println(format!(
                        "{} {} failed, retrying once: {first:#}",
                        job.scenario(),
                        c.name()
                    ));
                    let second = attempt();
                    if second.is_ok() {
                        retried.push(format!(
                            "{} / {} / {} (rep {rep}): {first:#}",
                            job.scenario(),
                            job.variant(&plan),
                            c.name()
                        ));
                    }
                    second
                });
                match result {
                    Ok(metrics) => samples.push(Sample {
                        scenario: job.scenario(),
                        variant: job.variant(&plan),
                        contender: c,
                        rep,
                        warmup,
                        metrics,
                    }),
                    Err(e) => {
                        bar.println(format!("{} {} failed: {e:#}", job.scenario(), c.name()));
                        // berth's own or the baseline's failure is a bug here or in berth;
                        // another contender failing (docker-proxy out of fds) is a result.
                        if c.is_own() {
                            own_failures += 1;
                        }
                        failures.push(format!(
                            "{} / {} / {}: {e:#}",
                            job.scenario(),
                            job.variant(&plan),
                            c.name()
                        ));
                    }
                }
                bar.inc(job.estimate_secs(&plan).round() as u64);
            }
        }
    }
    bar.finish_and_clear();
    // The cpu scenario is the bulk runs seen through their CPU column.
    if selected_scenarios.has(Scenario::Cpu) {
        let cpu: Vec<Sample> = samples
            .iter()
            .filter(|s| s.scenario == "bulk" && s.metrics.contains_key("machine_cpu_s_per_gb"))
            .map(|s| Sample {
                scenario: "cpu",
                metrics: s
                    .metrics
                    .iter()
                    .filter(|(k, _)| matches!(**k, "cpu_s_per_gb" | "machine_cpu_s_per_gb"))
                    .map(|(k, v)| (*k, *v))
                    .collect(),
                ..s.clone()
            })
            .collect();
        samples.extend(cpu);
    }
    let outcome = Outcome {
        samples,
        skipped,
        retried,
        failures,
    };
    write_outputs(cli, &plan, &tools, &outcome)?;
    if own_failures > 0 {
        anyhow::bail!(
            "{own_failures} sample(s) of berth or direct failed; see above and {}",
            logs.display()
        );
    }
    if !outcome.failures.is_empty() {
        eprintln!(
            "note: {} sample(s) of other contenders failed; they are listed in the report",
            outcome.failures.len()
        );
    }
    Ok(())
}

/// The selected scenarios, and the jobs they need.
struct ScenarioSet(Vec<Scenario>);

impl ScenarioSet {
    fn all() -> Self {
        Self(Scenario::value_variants().to_vec())
    }

    fn has(&self, s: Scenario) -> bool {
        self.0.contains(&s)
    }

    fn jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        let bulk = |streams, dir| Job::Bulk {
            streams,
            dir,
            external: false,
        };
        if self.has(Scenario::Bulk) {
            jobs.extend([
                bulk(1, Dir::Up),
                bulk(1, Dir::Down),
                bulk(4, Dir::Up),
                bulk(4, Dir::Down),
            ]);
        } else if self.has(Scenario::Cpu) {
            jobs.extend([bulk(1, Dir::Up), bulk(1, Dir::Down)]);
        }
        if self.has(Scenario::Rr) {
            jobs.push(Job::Rr);
        }
        if self.has(Scenario::Crr) {
            jobs.push(Job::Crr { external: false });
        }
        if self.has(Scenario::External) {
            jobs.extend([
                Job::Bulk {
                    streams: 1,
                    dir: Dir::Up,
                    external: true,
                },
                Job::Bulk {
                    streams: 1,
                    dir: Dir::Down,
                    external: true,
                },
                Job::Crr { external: true },
            ]);
        }
        if self.has(Scenario::Idle) {
            jobs.push(Job::Idle);
        }
        if self.has(Scenario::Mappings) {
            jobs.push(Job::Mappings);
        }
        if self.has(Scenario::Udp) {
            jobs.extend([Job::Udp { size: 64 }, Job::Udp { size: 1400 }]);
        }
        jobs
    }
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

fn sample(
    job: Job,
    c: Contender,
    tools: &Tools,
    topology: &topo::Topo,
    plan: &Plan,
    logs: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<BTreeMap<&'static str, f64>> {
    let port = 10_000 + c as u16 * 10;
    let proto = if matches!(job, Job::Udp { .. }) {
        Proto::Udp
    } else {
        Proto::Tcp
    };
    let running = c.start(tools, proto, port, topology.server_for(c as u16), logs)?;
    let pids = running.pids();
    let mut m = BTreeMap::new();
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
            m.insert("gbit_s", bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9);
            if c.has_process() && bytes > 0 {
                m.insert("cpu_s_per_gb", cpu / (bytes as f64 / 1e9));
            }
            if bytes > 0 {
                m.insert("machine_cpu_s_per_gb", machine / (bytes as f64 / 1e9));
            }
        }
        Job::Rr => {
            let hist = rt.block_on(load::rr(
                running.local,
                Duration::from_secs_f64(plan.rr_secs),
                plan.rr_max_rounds,
            ))?;
            for (key, q) in [("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)] {
                m.insert(key, hist.value_at_quantile(q) as f64 / 1000.0);
            }
        }
        Job::Crr { external } => {
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
            m.insert("conn_s", n as f64 / elapsed.as_secs_f64());
            m.insert("p99_ms", hist.value_at_quantile(0.99) as f64 / 1e6);
        }
        Job::Idle => {
            let conns = rt.block_on(load::open_idle(running.local, plan.idle_conns))?;
            let (pss, rss) = procstat::memory_mib(&pids);
            m.insert("pss_mib", pss);
            m.insert("rss_mib", rss);
            m.insert("processes", procstat::tree(&pids).len() as f64);
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
            m.insert("kdgram_s", run.replies as f64 / secs / 1e3);
            m.insert(
                "gbit_s",
                (run.replies * size as u64) as f64 * 8.0 / secs / 1e9,
            );
            m.insert(
                "loss_pct",
                100.0 * run.lost as f64 / (run.replies + run.lost) as f64,
            );
            if c.has_process() {
                // Each echoed datagram crossed the proxy twice.
                m.insert("cpu_us_per_dgram", cpu / (2.0 * run.replies as f64) * 1e6);
            }
        }
        Job::Mappings => unreachable!("handled by mappings()"),
    }
    Ok(m)
}

/// Starts `plan.mappings` mappings one after another, each waited for as dockerd waits for
/// docker-proxy, then measures their memory: PSS in all and per proxy process, and how much
/// the machine's MemAvailable dropped (what the host really gave up); and each proxy's time
/// from spawn to its `0` on the status pipe.
fn mappings(
    c: Contender,
    tools: &Tools,
    topology: &topo::Topo,
    plan: &Plan,
    logs: &Path,
) -> anyhow::Result<BTreeMap<&'static str, f64>> {
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
    let mut m = BTreeMap::from([
        ("startup_s", startup),
        ("pss_mib", pss),
        ("rss_mib", rss),
        ("processes", pids.len() as f64),
        ("mem_available_drop_mib", drop_mib),
    ]);
    if !ready.is_empty() {
        m.insert("pss_kib_per_proxy", pss * 1024.0 / pids.len() as f64);
        let ms: Vec<f64> = ready.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        m.insert("ready_ms", report::stat(&ms).map_or(0.0, |s| s.median));
    }
    Ok(m)
}

/// Everything a run produced, for the report.
#[derive(Debug, Default)]
struct Outcome {
    samples: Vec<Sample>,
    skipped: Vec<(String, String)>,
    retried: Vec<String>,
    failures: Vec<String>,
}

fn write_outputs(cli: &Cli, plan: &Plan, tools: &Tools, outcome: &Outcome) -> anyhow::Result<()> {
    let Outcome {
        samples,
        skipped,
        retried,
        failures,
    } = outcome;
    let machine = machine();
    let versions = versions(tools);
    let mut md = format!(
        "## berth-bench results ({})\n\nMachine: {}. Date: {}.\n\nVersions: {}.\n\nEach cell is the median of {} run(s), with min–max when there are several; `× direct` is the ratio to `direct` measured in the same run.\n",
        if cli.quick {
            "quick run: rough numbers"
        } else {
            "full run"
        },
        machine
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        today(),
        versions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        plan.reps,
    );
    md.push_str(&report::markdown(samples, METRIC_ORDER));
    if !skipped.is_empty() {
        md.push_str("\nSkipped:\n");
        for (who, why) in skipped {
            md.push_str(&format!("- {who}: {why}\n"));
        }
    }
    if !retried.is_empty() {
        md.push_str("\nSamples that failed once and succeeded on retry:\n");
        for r in retried {
            md.push_str(&format!("- {r}\n"));
        }
    }
    if !failures.is_empty() {
        md.push_str("\nFailed samples (a contender that cannot do the job fails its sample; berth or direct failing fails the run):\n");
        for f in failures {
            md.push_str(&format!("- {f}\n"));
        }
    }
    println!("{md}");
    std::fs::write(cli.out.join("results.md"), &md)?;
    let json = serde_json::json!({ "machine": machine, "versions": versions, "plan": plan, "samples": samples, "skipped": skipped, "retried": retried, "failures": failures });
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    charts(&cli.out, samples)?;
    eprintln!(
        "wrote {}/results.md, results.json and *.svg",
        cli.out.display()
    );
    Ok(())
}

/// Throughput, latency and connection-rate charts from the medians.
fn charts(out: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let grouped = report::group(samples);
    let median = |scenario: &str, variant: &str, c: Contender, m: &str| {
        grouped
            .iter()
            .find(|((s, v), _)| *s == scenario && v == variant)
            .and_then(|(_, per)| per.get(&c))
            .and_then(|x| x.get(m))
            .and_then(|v| report::stat(v))
            .map(|s| s.median)
    };
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| samples.iter().any(|s| s.contender == *c))
        .collect();
    let names: Vec<&str> = contenders.iter().map(|c| c.name()).collect();
    let variants = |scenario: &str| -> Vec<String> {
        let mut v: Vec<String> = grouped
            .iter()
            .filter(|((s, _), _)| *s == scenario)
            .map(|((_, v), _)| v.clone())
            .collect();
        v.dedup();
        v
    };
    let series_of = |scenario: &str, metric: &str| -> Vec<(String, Vec<Option<f64>>)> {
        variants(scenario)
            .into_iter()
            .map(|v| {
                let values = contenders
                    .iter()
                    .map(|c| median(scenario, &v, *c, metric))
                    .collect();
                (v, values)
            })
            .filter(|(_, vals): &(String, Vec<Option<f64>>)| vals.iter().any(Option::is_some))
            .collect()
    };
    chart::grouped_bars(
        &out.join("throughput.svg"),
        "Bulk throughput (median)",
        "Gbit/s",
        &names,
        &series_of("bulk", "gbit_s"),
    )?;
    let rr: Vec<(String, Vec<Option<f64>>)> =
        [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]
            .iter()
            .map(|(m, label)| {
                (
                    (*label).to_owned(),
                    contenders
                        .iter()
                        .map(|c| variants("rr").first().and_then(|v| median("rr", v, *c, m)))
                        .collect(),
                )
            })
            .collect();
    chart::grouped_bars(
        &out.join("latency.svg"),
        "64 B request/response latency (median of runs)",
        "µs",
        &names,
        &rr,
    )?;
    let mut crr = series_of("crr", "conn_s");
    crr.extend(
        series_of("external", "conn_s")
            .into_iter()
            .map(|(v, x)| (format!("external: {v}"), x)),
    );
    chart::grouped_bars(
        &out.join("crr.svg"),
        "Connection rate (median)",
        "connections/s",
        &names,
        &crr,
    )?;
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
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

fn versions(tools: &Tools) -> BTreeMap<&'static str, String> {
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
    v
}

fn machine() -> BTreeMap<&'static str, String> {
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

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Idle connections need many descriptors here and in the server thread; root may raise the
/// hard limit too.
fn raise_nofile() {
    use nix::sys::resource::{Resource, setrlimit};
    if setrlimit(Resource::RLIMIT_NOFILE, 1 << 20, 1 << 20).is_err() {
        berth::sys::raise_nofile_limit();
    }
}
