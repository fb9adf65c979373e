//! berth-bench: maps one host port to one container server with every contender, and measures
//! throughput, latency, connection rate, memory and CPU, interleaved, in one run.
//!
//! Run it through `cargo xtask bench`, which installs the contenders and builds berth. The
//! process first moves into a private network namespace (the bench's "host"), so nothing it
//! does touches the machine's own network namespace.
//!
//! - `plan`: scenarios, jobs and sizes; `schedule`: the interleaved run; `measure`: one sample;
//! - `contender`: starting each proxy; `cni`: driving the CNI plugins; `load`: the clients; `server`: the container's server;
//! - `topo`: namespaces and bridge; `procstat`: CPU and memory from /proc; `host`: probing;
//! - `metric`, `report`, `chart`: typed figures, Markdown and JSON, SVG.
mod chart;
mod cni;
mod contender;
mod crosscheck;
mod host;
mod load;
mod measure;
mod metric;
mod pin;
mod plan;
mod procstat;
mod report;
mod schedule;
mod server;
mod topo;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use contender::{Contender, Tools};
use plan::{Plan, Scenario, ScenarioSet};

#[derive(Debug, Parser)]
#[command(
    name = "berth-bench",
    version,
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
    #[arg(long, default_value = "berth-bench-report")]
    out: PathBuf,
    /// The berth binary to measure [default: the `berth` beside this program, else the one
    /// on PATH].
    #[arg(long)]
    berth: Option<PathBuf>,
    /// The docker-proxy binary (from Debian's docker.io package) [default: the one on PATH
    /// or in /usr/sbin, /usr/bin, /usr/libexec/docker; skipped when there is none].
    #[arg(long)]
    docker_proxy: Option<PathBuf>,
    /// The berth-docker-proxy binary [default: beside --berth].
    #[arg(long)]
    berth_docker_proxy: Option<PathBuf>,
    /// Print the manual page (roff) and exit; the package builds berth-bench(1) with it.
    #[arg(long, hide = true)]
    print_man: bool,
    /// Idle connections for the idle scenario [default: 10000, 500 with --quick; capped by
    /// the fd limit].
    #[arg(long)]
    idle_conns: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_man {
        use clap::CommandFactory as _;
        return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("berth-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
    host::raise_nofile();
    let plan = Plan::new(cli.quick, cli.idle_conns);
    if plan.idle_conns
        < cli
            .idle_conns
            .unwrap_or(Plan::unclamped(cli.quick).idle_conns)
    {
        eprintln!(
            "note: idle connections capped at {} by the hard RLIMIT_NOFILE ({})",
            plan.idle_conns,
            host::fd_limit()
        );
    }
    let logs = cli.out.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let berth = match &cli.berth {
        Some(b) => b.clone(),
        None => host::beside_self("berth")
            .or_else(|| host::which("berth"))
            .context("no berth binary beside berth-bench or on PATH: pass --berth")?,
    };
    anyhow::ensure!(
        berth.is_file(),
        "--berth {} does not exist",
        berth.display()
    );
    let mut tools = Tools {
        berth_docker_proxy: cli
            .berth_docker_proxy
            .clone()
            .unwrap_or_else(|| berth.with_file_name("berth-docker-proxy")),
        docker_proxy: match &cli.docker_proxy {
            Some(p) => Some(p.clone()).filter(|p| p.exists()),
            None => host::which("docker-proxy").or_else(|| {
                ["/usr/sbin", "/usr/bin", "/usr/libexec/docker"]
                    .iter()
                    .map(|d| std::path::Path::new(d).join("docker-proxy"))
                    .find(|p| p.is_file())
            }),
        },
        socat: host::which("socat"),
        haproxy: host::which("haproxy"),
        iperf3: host::which("iperf3"),
        sockperf: host::which("sockperf"),
        iptables: host::which("iptables"),
        cni_portmap: Some(std::path::Path::new(cni::PLUGIN_DIR).join("portmap"))
            .filter(|p| p.exists()),
        berth_cni: berth.with_file_name("berth-cni"),
        tokio_splice: std::env::current_exe()?.with_file_name("tokio-splice-proxy"),
        berth,
        server_netns: PathBuf::new(),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    ctrlc::set_handler(|| {
        // Ctrl-C, SIGTERM or SIGHUP (the "termination" feature): the namespaces go too.
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
    server::spawn(&topology.server_ns, topo::SERVER_IP6.into(), &ports)?;
    tools.server_netns = topology.server_ns.path().to_owned();

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

    let env = measure::Env {
        tools: &tools,
        topology: &topology,
        plan: &plan,
        logs: &logs,
        rt: &rt,
    };
    let mut outcome = schedule::run(&selected_scenarios.jobs(), &available, skipped, &env)?;
    if selected_scenarios.has(Scenario::Cpu) {
        let cpu = schedule::cpu_samples(&outcome.samples);
        outcome.samples.extend(cpu);
    }
    report::write(&cli.out, cli.quick, &plan, &tools, &outcome)?;
    if outcome.own_failures > 0 {
        anyhow::bail!(
            "{} sample(s) of berth or direct failed; see above and {}",
            outcome.own_failures,
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
