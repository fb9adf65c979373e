//! The contenders: every way of mapping a host port to the container server. Adding one is a
//! variant, a name, and an arm in [`Contender::start`].
use std::{
    fs::File,
    io::Read as _,
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use berth::addr::Proto;

use crate::{procstat, topo::HOST_EXT_IP};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Contender {
    /// No proxy: the client connects to the container address (the upper bound).
    Direct,
    BerthCopy,
    BerthSplice,
    /// `tokio-splice-proxy` (bench/src/bin): tokio-splice's `zero_copy_bidirectional`, the
    /// crate's own splice loop against berth's.
    TokioSplice,
    DockerProxy,
    Socat,
    Haproxy,
    IptablesDnat,
    /// `berth forward --proto udp` (recvmmsg/sendmmsg batches of up to 32).
    BerthUdp,
    /// The same with `--udp-batch 1`: what batching is worth.
    BerthUdpB1,
    /// The same with `--no-udp-offload`: what UDP_GRO / UDP_SEGMENT are worth.
    BerthUdpNoOffload,
    /// `berth forward --mode sockmap`: the kernel moves the bytes (experimental).
    BerthSockmap,
    /// `berth forward` (mode auto): splice, each connection promoted to the kernel relay
    /// once it has moved 1 MiB or lived 1 s.
    BerthAuto,
    /// `mode = "dnat"`: TC and cgroup programs map the port, no process in the data path.
    BerthDnat,
    /// `berth-docker-proxy` on its own, one process per port as dockerd starts them (the
    /// mappings scenario only).
    BerthShim,
    /// `berth-docker-proxy` handing each port to one `berth run` (the mappings scenario only).
    BerthShimDaemon,
    /// CNI's reference `portmap` plugin: iptables DNAT rules per attachment (hostPort).
    CniPortmap,
    /// `berth-cni` in portmap's place: kernel-mode mappings of a `berth run` daemon.
    BerthCni,
}

/// Paths of the external programs; `None` when not installed.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub(crate) berth: PathBuf,
    /// berth-docker-proxy, as installed (statically linked).
    pub(crate) berth_docker_proxy: PathBuf,
    pub(crate) docker_proxy: Option<PathBuf>,
    pub(crate) socat: Option<PathBuf>,
    pub(crate) haproxy: Option<PathBuf>,
    pub(crate) iptables: Option<PathBuf>,
    /// The cross-check's load tools.
    pub(crate) iperf3: Option<PathBuf>,
    pub(crate) sockperf: Option<PathBuf>,
    /// CNI's reference portmap plugin.
    pub(crate) cni_portmap: Option<PathBuf>,
    /// berth-cni, as installed (a link to the static berth).
    pub(crate) berth_cni: PathBuf,
    /// The tokio-splice contender, built beside this program.
    pub(crate) tokio_splice: PathBuf,
    /// The server's namespace, for the CNI contenders' `CNI_NETNS` (set once it exists).
    pub(crate) server_netns: PathBuf,
}

/// Where a started contender can be reached, and what to measure.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) local: SocketAddr,
    pub(crate) external: SocketAddr,
    children: Vec<Child>,
    iptables: Option<(PathBuf, Vec<Vec<String>>)>,
    /// CNI attachments, deleted (DEL) before the processes stop.
    cni: Vec<crate::cni::Attachment>,
    /// Remove the nat tables at the end (what iptables rules leave registered).
    nat_tables: bool,
    /// A `berth run` contender's name (its config and admin socket under the logs) and who
    /// it is, to restart or upgrade it.
    daemon: Option<(String, PathBuf, Contender)>,
}

impl Running {
    fn new(local: SocketAddr, external: SocketAddr) -> Self {
        Self {
            local,
            external,
            children: Vec::new(),
            iptables: None,
            cni: Vec::new(),
            nat_tables: false,
            daemon: None,
        }
    }

    /// SIGKILL to the `berth run` contender, and the same `berth run` again `after` that
    /// (waited for until its mapping is active). Nothing to do for a contender without one.
    pub(crate) fn crash_and_restart(
        &mut self,
        tools: &Tools,
        logs: &Path,
        after: Duration,
    ) -> anyhow::Result<()> {
        let Some((name, _, who)) = self.daemon.clone() else {
            return Ok(());
        };
        let mut old = self.children.pop().context("no berth process")?;
        old.kill()?;
        old.wait()?;
        std::thread::sleep(after);
        let file = logs.join(format!("{name}.toml"));
        let config = std::fs::read_to_string(&file)?;
        let (daemon, admin) = spawn_berth_run(tools, &config, &name, logs, who)?;
        self.children.push(daemon);
        wait_mapped(&admin, &mut self.children)
    }

    /// A plain stop of every process (SIGTERM to each group, a successor included), waited
    /// for at most 10 s: a `berth run` removes its pinned state then. Drop kills the rest.
    pub(crate) fn terminate(&mut self) {
        let groups: Vec<nix::unistd::Pid> = self
            .children
            .iter()
            .map(|c| nix::unistd::Pid::from_raw(c.id() as i32))
            .collect();
        for &g in &groups {
            let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGTERM);
        }
        for c in &mut self.children {
            let _ = c.try_wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && groups
                .iter()
                .any(|&g| nix::sys::signal::killpg(g, None).is_ok())
        {
            for c in &mut self.children {
                let _ = c.try_wait();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `berth upgrade` of the `berth run` contender, onto the same binary. Its successor is
    /// in the old one's process group, which Drop kills.
    pub(crate) fn upgrade(&mut self, tools: &Tools) -> anyhow::Result<()> {
        let Some((_, admin, _)) = &self.daemon else {
            return Ok(());
        };
        let out = Command::new(&tools.berth)
            .arg("upgrade")
            .arg("--admin-socket")
            .arg(admin)
            .output()?;
        if !out.status.success() {
            bail!(
                "berth upgrade failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The proxy processes (empty for direct and kernel DNAT).
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // DEL while berth-cni's daemon still runs; in reverse, as a runtime tears down.
        while self.cni.pop().is_some() {}
        for c in &mut self.children {
            // The whole process group: socat's per-client UDP children would otherwise keep
            // the port bound into the next sample.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
        if let Some((iptables, rules)) = self.iptables.take() {
            for undo in rules.iter().rev().flat_map(|r| undo_rule(r)) {
                let _ = Command::new(&iptables)
                    .args(&undo)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            self.nat_tables = true;
        }
        if self.nat_tables {
            // Deleting the rules leaves the nat table's base chains registered, which keeps
            // conntrack and NAT hooks active for every later sample of every contender (it
            // cut `direct`'s connection rate by 3x in one run). Delete the tables themselves.
            for family in ["ip", "ip6"] {
                let _ = Command::new("nft")
                    .args(["delete", "table", family, "nat"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// The commands that undo one of [`dnat_rules`]: `-A` becomes `-D`; `-N` becomes `-F` + `-X`.
fn undo_rule(rule: &[String]) -> Vec<Vec<String>> {
    let swap = |from: &str, to: &str| {
        rule.iter()
            .map(|a| if a == from { to.to_owned() } else { a.clone() })
            .collect::<Vec<_>>()
    };
    if rule.iter().any(|a| a == "-N") {
        vec![swap("-N", "-F"), swap("-N", "-X")]
    } else {
        vec![swap("-A", "-D")]
    }
}

const CHAIN: &str = "BERTH-BENCH";

impl Contender {
    pub(crate) const ALL: [Self; 18] = [
        Self::Direct,
        Self::BerthCopy,
        Self::BerthSplice,
        Self::TokioSplice,
        Self::DockerProxy,
        Self::Socat,
        Self::Haproxy,
        Self::IptablesDnat,
        Self::BerthUdp,
        Self::BerthUdpB1,
        Self::BerthUdpNoOffload,
        Self::BerthSockmap,
        Self::BerthAuto,
        Self::BerthDnat,
        Self::BerthShim,
        Self::BerthShimDaemon,
        Self::CniPortmap,
        Self::BerthCni,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::BerthCopy => "berth-copy",
            Self::BerthSplice => "berth-splice",
            Self::TokioSplice => "tokio-splice",
            Self::DockerProxy => "docker-proxy",
            Self::Socat => "socat",
            Self::Haproxy => "haproxy",
            Self::IptablesDnat => "iptables-dnat",
            Self::BerthUdp => "berth-udp",
            Self::BerthUdpB1 => "berth-udp-batch1",
            Self::BerthUdpNoOffload => "berth-udp-no-offload",
            Self::BerthSockmap => "berth-sockmap",
            Self::BerthAuto => "berth-auto",
            Self::BerthDnat => "berth-dnat",
            Self::BerthShim => "berth-docker-proxy",
            Self::BerthShimDaemon => "berth-docker-proxy+daemon",
            Self::CniPortmap => "cni-portmap",
            Self::BerthCni => "berth-cni",
        }
    }

    /// berth itself, or the baseline: their failure fails the run. The experimental sockmap
    /// mode is not: its failures are results, listed in the report.
    pub(crate) fn is_own(self) -> bool {
        matches!(
            self,
            Self::Direct
                | Self::BerthCopy
                | Self::BerthSplice
                | Self::BerthAuto
                | Self::BerthUdp
                | Self::BerthUdpB1
                | Self::BerthUdpNoOffload
                | Self::BerthDnat
                | Self::BerthShim
                | Self::BerthShimDaemon
                | Self::BerthCni
        )
    }

    /// The protocols this contender can map.
    pub(crate) fn serves(self, proto: Proto) -> bool {
        match self {
            Self::BerthCopy
            | Self::BerthSplice
            | Self::BerthSockmap
            | Self::BerthAuto
            | Self::Haproxy
            | Self::TokioSplice
            | Self::BerthShim
            | Self::BerthShimDaemon => proto == Proto::Tcp,
            Self::BerthUdp | Self::BerthUdpB1 | Self::BerthUdpNoOffload => proto == Proto::Udp,
            Self::Direct
            | Self::DockerProxy
            | Self::Socat
            | Self::IptablesDnat
            | Self::BerthDnat
            | Self::CniPortmap
            | Self::BerthCni => true,
        }
    }

    /// True when a userspace process carries the bytes (so CPU and memory can be measured).
    pub(crate) fn has_process(self) -> bool {
        !matches!(
            self,
            Self::Direct | Self::IptablesDnat | Self::BerthDnat | Self::CniPortmap | Self::BerthCni
        )
    }

    /// Why this contender cannot run here, if it cannot.
    pub(crate) fn unavailable(self, tools: &Tools) -> Option<String> {
        // `package`: the Debian package that has it.
        let missing = |tool: &Option<PathBuf>, what: &str, package: &str| {
            tool.is_none().then(|| {
                format!("{what} not found (apt install {package}; `cargo xtask bench` installs it)")
            })
        };
        match self {
            Self::Direct
            | Self::BerthCopy
            | Self::BerthSplice
            | Self::BerthUdp
            | Self::BerthUdpB1
            | Self::BerthUdpNoOffload
            | Self::BerthSockmap
            | Self::BerthAuto
            | Self::BerthDnat
            | Self::BerthShim
            | Self::BerthShimDaemon => None,
            Self::DockerProxy => missing(&tools.docker_proxy, "docker-proxy", "docker.io"),
            Self::Socat => missing(&tools.socat, "socat", "socat"),
            Self::Haproxy => missing(&tools.haproxy, "haproxy", "haproxy"),
            Self::IptablesDnat => missing(&tools.iptables, "iptables", "iptables"),
            Self::CniPortmap => missing(
                &tools.cni_portmap,
                "the portmap CNI plugin",
                "containernetworking-plugins",
            )
            .or_else(|| missing(&tools.iptables, "iptables", "iptables")),
            Self::BerthCni => (!tools.berth_cni.exists())
                .then(|| format!("{} not found", tools.berth_cni.display())),
            Self::TokioSplice => (!tools.tokio_splice.exists()).then(|| {
                format!(
                    "{} not found (built with berth-bench)",
                    tools.tokio_splice.display()
                )
            }),
        }
    }

    /// Maps host port `port` to `server` and waits until the mapping accepts connections (or,
    /// for UDP, until the port is bound).
    pub(crate) fn start(
        self,
        tools: &Tools,
        proto: Proto,
        port: u16,
        server: SocketAddr,
        logs: &Path,
    ) -> anyhow::Result<Running> {
        if !self.serves(proto) {
            bail!("{} does not map {proto}", self.name());
        }
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        let external = SocketAddr::from((HOST_EXT_IP, port));
        let mut running = Running::new(local, external);
        match self {
            Self::Direct => {
                running.local = server;
                running.external = server;
                return Ok(running);
            }
            Self::BerthCopy | Self::BerthSplice | Self::BerthSockmap | Self::BerthAuto => {
                let mode = match self {
                    Self::BerthCopy => "copy",
                    Self::BerthSockmap => "sockmap",
                    Self::BerthAuto => "auto",
                    _ => "splice",
                };
                let mut cmd = Command::new(&tools.berth);
                cmd.args([
                    "forward",
                    "--mode",
                    mode,
                    "--max-connections",
                    "1000000",
                    "--drain-timeout",
                    "0",
                ])
                .arg(format!("0.0.0.0:{port}"))
                .arg(server.to_string())
                // Warnings, and when the ephemeral ports crowded and berth chose its own
                // (the sequential scenario's question; two lines per episode).
                .env("BERTH_LOG", "warn,berth::forward::connect=info");
                running.children.push(spawn(&mut cmd, logs, self)?);
            }
            Self::TokioSplice => {
                let mut cmd = Command::new(&tools.tokio_splice);
                cmd.arg(format!("0.0.0.0:{port}")).arg(server.to_string());
                running.children.push(spawn(&mut cmd, logs, self)?);
            }
            Self::BerthUdp | Self::BerthUdpB1 | Self::BerthUdpNoOffload => {
                let batch = if self == Self::BerthUdpB1 { "1" } else { "32" };
                let mut cmd = Command::new(&tools.berth);
                cmd.args(["forward", "--proto", "udp", "--udp-batch", batch]);
                if self == Self::BerthUdpNoOffload {
                    cmd.arg("--no-udp-offload");
                }
                cmd.arg(format!("0.0.0.0:{port}"))
                    .arg(server.to_string())
                    .env("BERTH_LOG", "warn");
                running.children.push(spawn(&mut cmd, logs, self)?);
            }
            Self::DockerProxy => {
                let path = tools
                    .docker_proxy
                    .as_ref()
                    .context("docker-proxy missing")?;
                let mut cmd = docker_proxy_command(path, proto, port, server);
                running
                    .children
                    .push(spawn_docker_proxy(&mut cmd, logs, self)?);
            }
            Self::Socat => {
                let path = tools.socat.as_ref().context("socat missing")?;
                let mut cmd = Command::new(path);
                match proto {
                    Proto::Tcp => cmd
                        .arg(format!("TCP-LISTEN:{port},fork,reuseaddr,backlog=4096"))
                        .arg(format!("TCP:{server}")),
                    // One child per client, each connected to that client and to the server.
                    // -T: a child whose client went quiet exits, should a kill miss it.
                    Proto::Udp => cmd
                        .arg("-T")
                        .arg("30")
                        .arg(format!("UDP4-LISTEN:{port},fork,reuseaddr"))
                        .arg(format!("UDP4:{server}")),
                };
                running.children.push(spawn(&mut cmd, logs, self)?);
            }
            Self::Haproxy => {
                let path = tools.haproxy.as_ref().context("haproxy missing")?;
                let cfg = logs.join("haproxy.cfg");
                std::fs::write(&cfg, haproxy_config(port, server))?;
                let mut cmd = Command::new(path);
                cmd.arg("-db").arg("-f").arg(&cfg);
                running.children.push(spawn(&mut cmd, logs, self)?);
            }
            Self::BerthShim | Self::BerthShimDaemon => {
                bail!("{} is measured in the mappings scenario only", self.name());
            }
            Self::BerthDnat => {
                return self.start_daemon(tools, proto, port, server, logs, None);
            }
            Self::CniPortmap | Self::BerthCni => {
                return start_hostports(self, tools, proto, &[port], server, logs);
            }
            Self::IptablesDnat => {
                let iptables = tools.iptables.clone().context("iptables missing")?;
                let rules = dnat_rules(proto, port, server);
                for rule in &rules {
                    let out = Command::new(&iptables).args(rule).output()?;
                    if !out.status.success() {
                        running.iptables = Some((iptables, rules.clone()));
                        bail!(
                            "iptables {} failed: {}",
                            rule.join(" "),
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
                running.iptables = Some((iptables, rules));
                return Ok(running);
            }
        }
        match proto {
            Proto::Tcp => wait_listening(port, &mut running.children)?,
            Proto::Udp => wait_udp_bound(port, &mut running.children)?,
        }
        Ok(running)
    }
}

impl Contender {
    /// The contender as `berth run` serving one mapping (berth-dnat always is; berth-splice
    /// is for the restart scenario), with kernel mode's state pinned under `pin_dir` if given.
    pub(crate) fn start_daemon(
        self,
        tools: &Tools,
        proto: Proto,
        port: u16,
        server: SocketAddr,
        logs: &Path,
        pin_dir: Option<&Path>,
    ) -> anyhow::Result<Running> {
        let listen = SocketAddr::from(([0, 0, 0, 0], port));
        let mut running = self.start_daemon_on(tools, proto, listen, server, logs, pin_dir)?;
        running.local = SocketAddr::from(([127, 0, 0, 1], port));
        running.external = SocketAddr::from((HOST_EXT_IP, port));
        Ok(running)
    }

    /// The contender mapping TCP `[::]:port` to the IPv6 `server`, reached by the external
    /// client at the host's IPv6 address (the `ipv6` scenario): direct, a relay, kernel mode
    /// and ip6tables DNAT.
    pub(crate) fn start_v6(
        self,
        tools: &Tools,
        port: u16,
        server: SocketAddr,
        logs: &Path,
    ) -> anyhow::Result<Running> {
        let listen = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        let external = SocketAddr::from((crate::topo::HOST_EXT_IP6, port));
        let mut running = match self {
            Self::Direct => Running::new(server, server),
            Self::BerthDnat => {
                self.start_daemon_on(tools, Proto::Tcp, listen, server, logs, None)?
            }
            Self::BerthSplice => {
                let mut running = Running::new(listen, external);
                let mut cmd = Command::new(&tools.berth);
                cmd.args(["forward", "--mode", "splice", "--drain-timeout", "0"])
                    .arg(listen.to_string())
                    .arg(server.to_string())
                    .env("BERTH_LOG", "warn");
                running.children.push(spawn(&mut cmd, logs, self)?);
                wait_ports(&[port], &mut running.children, procstat::is_listening6)?;
                running
            }
            Self::IptablesDnat => {
                let iptables = tools.iptables.clone().context("iptables missing")?;
                let ip6tables = iptables.with_file_name("ip6tables");
                let mut running = Running::new(listen, external);
                let rules = dnat_rules(Proto::Tcp, port, server);
                running.iptables = Some((ip6tables.clone(), rules.clone()));
                for rule in &rules {
                    let out = Command::new(&ip6tables).args(rule).output()?;
                    if !out.status.success() {
                        bail!(
                            "ip6tables {} failed: {}",
                            rule.join(" "),
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
                running
            }
            _ => bail!("{} is not part of the IPv6 comparison", self.name()),
        };
        if self != Self::Direct {
            running.external = external;
        }
        Ok(running)
    }

    /// `berth run` serving one mapping from `listen` to `server`; see [`Contender::start_daemon`].
    fn start_daemon_on(
        self,
        tools: &Tools,
        proto: Proto,
        listen: SocketAddr,
        server: SocketAddr,
        logs: &Path,
        pin_dir: Option<&Path>,
    ) -> anyhow::Result<Running> {
        let port = listen.port();
        let mode = match self {
            Self::BerthDnat => "dnat",
            Self::BerthSplice => "splice",
            _ => bail!("{} is not served by berth run here", self.name()),
        };
        // Remote clients arrive on bxh; local ones are this process, in the bench's cgroup
        // (see topo::enter_bench_cgroup). No pin directory: pinned state of an earlier sample
        // must not be adopted.
        let pin_dir = pin_dir.map_or(String::new(), |p| p.display().to_string());
        let config = format!(
            "[metrics]\nenabled = false\n[service]\ndrain_timeout = 30\n\
             [dnat]\ninterfaces = [\"{}\"]\ncgroup = \"{}\"\npin_dir = \"{pin_dir}\"\n\
             [[mapping]]\nname = \"bench\"\nproto = \"{proto}\"\nlisten = \"{listen}\"\ntarget = \"{server}\"\nmode = \"{mode}\"\n",
            crate::topo::EXT_IFACE,
            crate::topo::cgroup().display()
        );
        let name = format!("{}-{port}", self.name());
        let (daemon, admin) = spawn_berth_run(tools, &config, &name, logs, self)?;
        let mut running = Running::new(listen, listen);
        running.children.push(daemon);
        running.daemon = Some((name, admin.clone(), self));
        wait_mapped(&admin, &mut running.children)?;
        Ok(running)
    }
}

/// One `berth run` daemon serving a TCP mapping from each of `ports` to `server`, as a
/// host with many published ports would run it; waits until every port listens.
pub(crate) fn start_berth_daemon(
    tools: &Tools,
    ports: &[u16],
    server: SocketAddr,
    logs: &Path,
) -> anyhow::Result<Running> {
    let mut config = String::from("[metrics]\nenabled = false\n");
    for p in ports {
        config.push_str(&format!(
            "[[mapping]]\nname = \"p{p}\"\nlisten = \"0.0.0.0:{p}\"\ntarget = \"{server}\"\n"
        ));
    }
    let (daemon, _) = spawn_berth_run(
        tools,
        &config,
        "berth-mappings",
        logs,
        Contender::BerthSplice,
    )?;
    let first = ports.first().copied().unwrap_or(0);
    let mut running = Running::new(
        SocketAddr::from(([127, 0, 0, 1], first)),
        SocketAddr::from((HOST_EXT_IP, first)),
    );
    running.children.push(daemon);
    wait_all_listening(ports, &mut running.children)?;
    Ok(running)
}

/// A CNI contender publishing each of `ports` (one attachment per port, as one pod per
/// hostPort would) to `server`; the last port is the one to measure: added last, it is the
/// last rule portmap's chains walk. berth-cni gets a `berth run` in kernel mode first.
pub(crate) fn start_hostports(
    who: Contender,
    tools: &Tools,
    proto: Proto,
    ports: &[u16],
    server: SocketAddr,
    logs: &Path,
) -> anyhow::Result<Running> {
    let last = ports.last().copied().context("no port")?;
    let mut running = Running::new(
        SocketAddr::from(([127, 0, 0, 1], last)),
        SocketAddr::from((HOST_EXT_IP, last)),
    );
    let (plugin, extra) = match who {
        Contender::CniPortmap => {
            running.nat_tables = true;
            let plugin = tools.cni_portmap.clone().context("portmap missing")?;
            (plugin, serde_json::json!({}))
        }
        Contender::BerthCni => {
            // Remote clients arrive on bxh; local ones are this process, in the bench's
            // cgroup (see topo::enter_bench_cgroup).
            let config = format!(
                "[metrics]\nenabled = false\n[dnat]\ninterfaces = [\"{}\"]\ncgroup = \"{}\"\n",
                crate::topo::EXT_IFACE,
                crate::topo::cgroup().display()
            );
            let (daemon, admin) = spawn_berth_run(tools, &config, "berth-cni", logs, who)?;
            running.children.push(daemon);
            wait_admin(&admin, &mut running.children)?;
            let extra = serde_json::json!({"adminSocket": admin});
            (tools.berth_cni.clone(), extra)
        }
        _ => bail!("{} is not a CNI plugin", who.name()),
    };
    for (i, port) in ports.iter().enumerate() {
        let id = format!("bench-{}-{i}", who.name());
        let a = crate::cni::Attachment::add(
            &plugin,
            &id,
            proto,
            &[*port],
            server,
            &tools.server_netns,
            &extra,
        )?;
        running.cni.push(a);
    }
    Ok(running)
}

/// Starts `berth run` with `config`, written to `logs/<name>.toml`, on the admin socket
/// `logs/<name>.sock` (a stale one removed). Returns the process and the admin socket.
fn spawn_berth_run(
    tools: &Tools,
    config: &str,
    name: &str,
    logs: &Path,
    who: Contender,
) -> anyhow::Result<(Child, PathBuf)> {
    let file = logs.join(format!("{name}.toml"));
    std::fs::write(&file, config)?;
    let admin = logs.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&admin);
    // Persistent runtime mappings (berth-cni's) of an earlier sample must not come back.
    let _ = std::fs::remove_file(berth::service::config::default_state_file(&admin));
    let mut cmd = Command::new(&tools.berth);
    cmd.args(["run", "--config"])
        .arg(&file)
        .arg("--admin-socket")
        .arg(&admin)
        .env("BERTH_LOG", "warn");
    Ok((spawn(&mut cmd, logs, who)?, admin))
}

/// `berth-docker-proxy` for each of `ports`, started one after another as dockerd starts
/// them (each waited for on its status pipe), standalone or handing its port to one
/// `berth run` started first. Returns the processes and each shim's time from spawn to `0`.
pub(crate) fn start_shims(
    tools: &Tools,
    ports: &[u16],
    server: SocketAddr,
    logs: &Path,
    delegate: bool,
) -> anyhow::Result<(Running, Vec<std::time::Duration>)> {
    let who = if delegate {
        Contender::BerthShimDaemon
    } else {
        Contender::BerthShim
    };
    let first = ports.first().copied().unwrap_or(0);
    let mut running = Running::new(
        SocketAddr::from(([127, 0, 0, 1], first)),
        SocketAddr::from((HOST_EXT_IP, first)),
    );
    let mut admin = PathBuf::from("/nonexistent/berth-admin.sock");
    if delegate {
        let (daemon, socket) = spawn_berth_run(
            tools,
            "[metrics]\nenabled = false\n",
            "berth-shims",
            logs,
            who,
        )?;
        running.children.push(daemon);
        admin = socket;
        wait_admin(&admin, &mut running.children)?;
    }
    let mut ready = Vec::with_capacity(ports.len());
    for &port in ports {
        let mut cmd = docker_proxy_command(&tools.berth_docker_proxy, Proto::Tcp, port, server);
        // Standalone: an admin socket nobody serves.
        cmd.env("BERTH_ADMIN_SOCKET", &admin);
        let started = Instant::now();
        running
            .children
            .push(spawn_docker_proxy(&mut cmd, logs, who)?);
        ready.push(started.elapsed());
    }
    // Stopped in order: the shims before their daemon, or each would take its port back.
    running.children.rotate_left(usize::from(delegate));
    Ok((running, ready))
}

/// `path` (docker-proxy or berth-docker-proxy) with dockerd's command line for `proto` port
/// `port` on every address to `server`, and dockerd's environment.
fn docker_proxy_command(path: &Path, proto: Proto, port: u16, server: SocketAddr) -> Command {
    let mut cmd = Command::new(path);
    dockerd_env(&mut cmd);
    cmd.args([
        "-proto",
        proto.as_str(),
        "-host-ip",
        "0.0.0.0",
        "-host-port",
        &port.to_string(),
        "-container-ip",
        &server.ip().to_string(),
        "-container-port",
        &server.port().to_string(),
    ]);
    cmd
}

/// The environment dockerd (a systemd service) gives its proxies: small. The bench's own
/// (cargo's, the shell's) would sit on each of a thousand proxies' stacks, a page apiece.
fn dockerd_env(cmd: &mut Command) {
    cmd.env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
}

/// Waits (at most 30 s) until a `berth run` answers on `admin`.
fn wait_admin(admin: &Path, children: &mut [Child]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(admin).is_err() {
        for c in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("berth run exited with {status} before it was up");
            }
        }
        if Instant::now() > deadline {
            bail!(
                "berth run did not answer on {} within 30 s",
                admin.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Docker's rules for a published port with `userland-proxy=false`: DNAT for packets to any
/// local address (PREROUTING for remote clients, OUTPUT for local ones, loopback included,
/// which is why `route_localnet` is on), and MASQUERADE for locally sourced traffic into the
/// bridge so that the container's replies come back through the host.
fn dnat_rules(proto: Proto, port: u16, server: SocketAddr) -> Vec<Vec<String>> {
    let p = port.to_string();
    let to = server.to_string();
    let bridge = &crate::topo::bridge();
    [
        vec!["-t", "nat", "-N", CHAIN],
        vec![
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            CHAIN,
        ],
        vec![
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            CHAIN,
        ],
        vec![
            "-t",
            "nat",
            "-A",
            CHAIN,
            "!",
            "-i",
            bridge,
            "-p",
            proto.as_str(),
            "--dport",
            &p,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
        vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            bridge,
            "-m",
            "addrtype",
            "--src-type",
            "LOCAL",
            "-j",
            "MASQUERADE",
        ],
    ]
    .into_iter()
    .map(|r| r.into_iter().map(str::to_owned).collect())
    .collect()
}

/// HAProxy in TCP mode with splice, its maxconn sized to the fds it can have.
fn haproxy_config(port: u16, server: SocketAddr) -> String {
    // HAProxy needs 2 fds per connection plus 2 per pipe; pin the pipes so that maxconn can
    // cover the idle scenario.
    let maxpipes = 512;
    let maxconn = crate::host::fd_limit().saturating_sub(500 + 2 * maxpipes) / 2;
    format!(
        "global\n  maxconn {maxconn}\n  maxpipes {maxpipes}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n  option splice-auto\n\n\
         frontend fe\n  bind 0.0.0.0:{port}\n  default_backend be\n\nbackend be\n  server s1 {server}\n"
    )
}

/// Spawns with stderr to a log file, and with SIGKILL on our death so nothing outlives a crash.
fn spawn(cmd: &mut Command, logs: &Path, who: Contender) -> anyhow::Result<Child> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(logs.join(format!("{}.log", who.name())))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // A group of its own, so that Drop can kill its forked children too.
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("failed to start {:?}", cmd.get_program()))
}

/// Starts docker-proxy (or berth-docker-proxy) the way dockerd does: a pipe on fd 3 that says
/// `0\n` once listening.
pub(crate) fn spawn_docker_proxy(
    cmd: &mut Command,
    logs: &Path,
    who: Contender,
) -> anyhow::Result<Child> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let raw = w.as_raw_fd();
    // SAFETY: dup2/fcntl are async-signal-safe and only touch the child's fd table.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = spawn(cmd, logs, who)?;
    drop(w);
    let mut status = String::new();
    File::from(r).read_to_string(&mut status)?;
    if status != "0\n" {
        bail!("{} failed to start: {status:?}", who.name());
    }
    Ok(child)
}

/// Waits (at most 30 s) until `port` is in LISTEN state in our namespace.
pub(crate) fn wait_listening(port: u16, children: &mut [Child]) -> anyhow::Result<()> {
    wait_all_listening(&[port], children)
}

pub(crate) fn wait_all_listening(ports: &[u16], children: &mut [Child]) -> anyhow::Result<()> {
    wait_ports(ports, children, procstat::is_listening)
}

/// Waits (at most 30 s) until the `berth run` behind `admin` answers and its mapping is
/// active: it answers only once every mapping has started (or failed, which is an error).
fn wait_mapped(admin: &Path, children: &mut [Child]) -> anyhow::Result<()> {
    wait_admin(admin, children)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(berth::service::admin::request(admin, "status"))?;
    let row = reply.mappings.first().context("berth runs no mapping")?;
    if row.state != "active" {
        bail!("the mapping is {}", row.state);
    }
    Ok(())
}

/// Waits (at most 30 s) until UDP `port` is bound in our namespace.
fn wait_udp_bound(port: u16, children: &mut [Child]) -> anyhow::Result<()> {
    wait_ports(&[port], children, procstat::is_udp_bound)
}

fn wait_ports(ports: &[u16], children: &mut [Child], ready: fn(u16) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<u16> = ports.to_vec();
    loop {
        pending.retain(|p| !ready(*p));
        if pending.is_empty() {
            return Ok(());
        }
        for c in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("process {} exited with {status} before listening", c.id());
            }
        }
        if Instant::now() > deadline {
            bail!("{} port(s) still not listening after 30 s", pending.len());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dnat_rule_is_undone_in_reverse() {
        let rules = dnat_rules(Proto::Tcp, 10_060, "198.18.0.1:7006".parse().unwrap());
        let undo: Vec<Vec<String>> = rules.iter().rev().flat_map(|r| undo_rule(r)).collect();
        // Each -A has its -D with the same arguments, and the chain is flushed then deleted last.
        for rule in rules.iter().filter(|r| r.contains(&"-A".to_owned())) {
            let del: Vec<String> = rule
                .iter()
                .map(|a| if a == "-A" { "-D".into() } else { a.clone() })
                .collect();
            assert!(undo.contains(&del), "no undo for {rule:?}");
        }
        let tail: Vec<&str> = undo[undo.len() - 2..]
            .iter()
            .map(|r| r[2].as_str())
            .collect();
        assert_eq!(tail, ["-F", "-X"]);
    }

    #[test]
    fn haproxy_config_fits_the_fd_limit() {
        let cfg = haproxy_config(10_050, "198.18.0.1:7005".parse().unwrap());
        let maxconn: u64 = cfg
            .lines()
            .find_map(|l| l.trim().strip_prefix("maxconn "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(maxconn * 2 + 2 * 512 < crate::host::fd_limit(), "{cfg}");
        assert!(cfg.contains("bind 0.0.0.0:10050") && cfg.contains("server s1 198.18.0.1:7005"));
    }
}
