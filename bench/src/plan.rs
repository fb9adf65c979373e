//! What a run measures: the scenarios, the jobs each needs, which contenders take part in
//! each, and the durations and sizes (quick or full).
use berth::addr::Proto;
use clap::ValueEnum;

use crate::{contender::Contender, host::fd_limit, load::Dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
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
    /// Connection rate with many hostPorts published (CNI: portmap against berth-cni), the
    /// one measured published last.
    Hostport,
    /// Connections lost and refused while the contender is killed (SIGKILL) and started again
    /// 2 s later, and while it is upgraded in place (`berth upgrade`).
    Restart,
    /// IPv6 from the external namespace: 1 stream each way and the connection rate, through
    /// kernel mode, ip6tables DNAT and a relay.
    Ipv6,
    /// 100,000 connections one after another from the external namespace, the client closing
    /// first: the proxy's leg to the server closes first too, and its port waits 60 s in
    /// TIME_WAIT. The host namespace has Linux's default TIME_WAIT reuse (loopback only) and
    /// ephemeral range for it. The slowest tenth's rate shows whether the proxy runs out of
    /// ports.
    Sequential,
    /// The single-flow figures again with independent tools: iperf3 (1 stream each way) and
    /// sockperf (TCP ping-pong, 64 B).
    Crosscheck,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Bulk => "bulk",
            Self::Rr => "rr",
            Self::Crr => "crr",
            Self::Idle => "idle",
            Self::Mappings => "mappings",
            Self::Cpu => "cpu",
            Self::External => "external",
            Self::Udp => "udp",
            Self::Hostport => "hostport",
            Self::Restart => "restart",
            Self::Ipv6 => "ipv6",
            Self::Sequential => "sequential",
            Self::Crosscheck => "crosscheck",
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Scenario {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Connections held open through a restart or an upgrade.
pub(crate) const RESTART_HELD: usize = 32;
/// How long the restart scenario's load runs: the event comes after 1 s, a restart after a
/// further 2 s.
pub(crate) const RESTART_SECS: u64 = 6;

/// Durations and sizes for a run.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Plan {
    pub(crate) reps: u32,
    pub(crate) warmup: bool,
    pub(crate) bulk_secs: f64,
    pub(crate) rr_secs: f64,
    pub(crate) rr_max_rounds: u64,
    pub(crate) crr_secs: f64,
    pub(crate) crr_clients: usize,
    pub(crate) idle_conns: usize,
    pub(crate) mappings: usize,
    pub(crate) udp_secs: f64,
    pub(crate) udp_flows: usize,
    pub(crate) udp_window: usize,
    /// Connections in the sequential scenario, and the most time it may take.
    pub(crate) seq_conns: u64,
    pub(crate) seq_max_secs: f64,
}

impl Plan {
    /// The plan for a run; `idle_conns` overrides the idle scenario's size.
    pub(crate) fn new(quick: bool, idle_conns: Option<usize>) -> Self {
        let plan = Self::unclamped(quick);
        Self {
            idle_conns: idle_conns.unwrap_or(plan.idle_conns).min(Self::fd_cap()),
            ..plan
        }
    }

    /// One proxy process holds 2 sockets per idle connection, and so does this process
    /// (client + server thread): stay under the hard RLIMIT_NOFILE, which may be fixed, with
    /// headroom for each proxy's own pipes and runtime descriptors.
    pub(crate) fn fd_cap() -> usize {
        usize::try_from(fd_limit().saturating_sub(4000) / 2).unwrap_or(usize::MAX)
    }

    pub(crate) fn unclamped(quick: bool) -> Self {
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
                seq_conns: 2_000,
                seq_max_secs: 10.0,
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
                seq_conns: 100_000,
                seq_max_secs: 90.0,
            }
        }
    }
}

impl Plan {
    fn quick_run(&self) -> bool {
        self.reps == 1 && !self.warmup
    }
}

/// One measurement to take, for each eligible contender and repetition.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Job {
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
    /// Connection rate through the last of `plan.mappings` published hostPorts.
    Hostport {
        external: bool,
    },
    /// Held and new connections across a crash and restart, or an upgrade.
    Restart {
        upgrade: bool,
    },
    /// The external bulk (`Some(dir)`, 1 stream) or connection rate (`None`) job over IPv6.
    Ipv6 {
        dir: Option<Dir>,
    },
    /// One iperf3 stream, local.
    Iperf3 {
        dir: Dir,
    },
    /// sockperf's TCP ping-pong, 64 B, local.
    Sockperf,
    /// Connections one after another, the client closing first, external.
    Sequential,
}

impl Job {
    pub(crate) fn scenario(self) -> Scenario {
        match self {
            Self::Bulk {
                external: false, ..
            } => Scenario::Bulk,
            Self::Bulk { external: true, .. } | Self::Crr { external: true } => Scenario::External,
            Self::Rr => Scenario::Rr,
            Self::Crr { external: false } => Scenario::Crr,
            Self::Idle => Scenario::Idle,
            Self::Mappings => Scenario::Mappings,
            Self::Udp { .. } => Scenario::Udp,
            Self::Hostport { .. } => Scenario::Hostport,
            Self::Restart { .. } => Scenario::Restart,
            Self::Ipv6 { .. } => Scenario::Ipv6,
            Self::Iperf3 { .. } | Self::Sockperf => Scenario::Crosscheck,
            Self::Sequential => Scenario::Sequential,
        }
    }

    /// Measured once per run, without a warm-up: the sequential job leaves the proxy's ports
    /// in TIME_WAIT for 60 s, so every sample waits that out first.
    pub(crate) fn once(self) -> bool {
        matches!(self, Self::Sequential)
    }

    /// The IPv4 job an IPv6 one measures the same way (itself for the others).
    pub(crate) fn as_v4(self) -> Self {
        match self {
            Self::Ipv6 { dir: Some(dir) } => Self::Bulk {
                streams: 1,
                dir,
                external: true,
            },
            Self::Ipv6 { dir: None } => Self::Crr { external: true },
            other => other,
        }
    }

    /// The protocol the job's mapping serves.
    pub(crate) fn proto(self) -> Proto {
        if matches!(self, Self::Udp { .. }) {
            Proto::Udp
        } else {
            Proto::Tcp
        }
    }

    /// One flow at a time, whose figures depend on where client, server and proxy run: these
    /// run with all three on one CPU ([`crate::pin`]).
    pub(crate) fn single_flow(self) -> bool {
        match self {
            Self::Bulk { streams, .. } => streams == 1,
            Self::Rr | Self::Iperf3 { .. } | Self::Sockperf => true,
            Self::Ipv6 { dir } => dir.is_some(),
            _ => false,
        }
    }

    pub(crate) fn variant(self, plan: &Plan) -> String {
        let pinned = if self.single_flow() {
            format!(", all on CPU {}", crate::pin::CPU)
        } else {
            String::new()
        };
        format!("{}{pinned}", self.describe(plan))
    }

    /// [`Self::variant`] without the CPU placement.
    fn describe(self, plan: &Plan) -> String {
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
            Self::Hostport { external } => format!(
                "connect+64 B+64 B+close through the last of {} hostPorts, {} clients, {}",
                plan.mappings,
                plan.crr_clients,
                if external { "external" } else { "local" }
            ),
            Self::Udp { size } => format!(
                "{size} B datagrams, echo, {} clients x {} in flight",
                plan.udp_flows, plan.udp_window
            ),
            Self::Restart { upgrade: false } => format!(
                "SIGKILL, started again 2 s later; {RESTART_HELD} held echo connections and a connect loop, external, {RESTART_SECS} s"
            ),
            Self::Ipv6 { .. } => format!("IPv6, external, {}", self.as_v4().describe(plan)),
            Self::Iperf3 { dir } => format!(
                "iperf3, {}",
                Self::Bulk {
                    streams: 1,
                    dir,
                    external: false
                }
                .describe(plan)
            ),
            Self::Sockperf => "sockperf ping-pong, 64 B, 1 connection".into(),
            Self::Sequential => format!(
                "{} connections one after another (at most {} s), connect+64 B echo, the client closing first, external; host with tcp_tw_reuse=2 and ports 32768–60999 (Linux's defaults)",
                plan.seq_conns, plan.seq_max_secs
            ),
            Self::Restart { upgrade: true } => format!(
                "berth upgrade; {RESTART_HELD} held echo connections and a connect loop, external, {RESTART_SECS} s"
            ),
        }
    }

    /// Which contenders take part, given the selection.
    pub(crate) fn eligible(self, c: Contender) -> Result<(), &'static str> {
        use Contender as C;
        let proto = self.proto();
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
                        | C::BerthAuto
                        | C::BerthDnat
                        | C::CniPortmap
                        | C::BerthCni
                ) {
                    Ok(())
                } else {
                    Err("not part of the external comparison")
                }
            }
            Self::Idle if c == C::TokioSplice => Err(
                "tokio-splice is measured for bulk, rr and crr (it holds two pipes per connection)",
            ),
            Self::Idle => {
                if c.has_process() {
                    Ok(())
                } else {
                    Err("no proxy process to measure")
                }
            }
            Self::Iperf3 { .. } | Self::Sockperf => match c {
                C::Direct
                | C::BerthSplice
                | C::BerthAuto
                | C::BerthDnat
                | C::DockerProxy
                | C::Haproxy
                | C::IptablesDnat => Ok(()),
                _ => Err("not part of the cross-check"),
            },
            Self::Ipv6 { .. } => match c {
                C::Direct | C::BerthDnat | C::IptablesDnat | C::BerthSplice => Ok(()),
                _ => {
                    Err("the IPv6 comparison is kernel mode against direct, ip6tables and a relay")
                }
            },
            Self::Restart { upgrade } => match c {
                C::BerthDnat | C::BerthSplice | C::IptablesDnat => Ok(()),
                C::Direct => Err("nothing to restart"),
                _ if upgrade => Err("the upgrade comparison is berth's own modes"),
                _ => Err("the restart comparison is berth-dnat, berth-splice and iptables-dnat"),
            },
            Self::Sequential => match c {
                C::Direct
                | C::BerthSplice
                | C::BerthAuto
                | C::DockerProxy
                | C::Haproxy
                | C::TokioSplice
                | C::IptablesDnat => Ok(()),
                _ => Err("the sequential comparison is the relays and iptables DNAT"),
            },
            Self::Hostport { .. } => {
                if matches!(c, C::Direct | C::CniPortmap | C::BerthCni) {
                    Ok(())
                } else {
                    Err("the hostport comparison is berth-cni against portmap")
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

    pub(crate) fn estimate_secs(self, plan: &Plan) -> f64 {
        match self {
            Self::Bulk { .. } => plan.bulk_secs + 0.3,
            Self::Rr => plan.rr_secs + 0.3,
            Self::Crr { .. } => plan.crr_secs + 0.3,
            Self::Idle => plan.idle_conns as f64 / 2000.0 + 1.0,
            Self::Mappings => plan.mappings as f64 * 0.01 + 1.0,
            Self::Udp { .. } => plan.udp_secs + 0.3,
            Self::Hostport { .. } => plan.crr_secs + plan.mappings as f64 * 0.05 + 1.0,
            Self::Restart { .. } => RESTART_SECS as f64 + 1.0,
            Self::Ipv6 { .. } => self.as_v4().estimate_secs(plan),
            // The tools take whole seconds, and start a server each.
            Self::Iperf3 { .. } => plan.bulk_secs.ceil().max(1.0) + 1.0,
            Self::Sockperf => plan.rr_secs.ceil().max(1.0) + 1.0,
            // About 4,000 conn/s when nothing runs out, plus waiting out the last run's
            // TIME_WAIT (60 s).
            Self::Sequential => (plan.seq_conns as f64 / 4000.0).min(plan.seq_max_secs) + 30.0,
        }
    }
}

/// The selected scenarios, and the jobs they need.
pub(crate) struct ScenarioSet(pub(crate) Vec<Scenario>);

impl ScenarioSet {
    pub(crate) fn all() -> Self {
        Self(Scenario::value_variants().to_vec())
    }

    pub(crate) fn has(&self, s: Scenario) -> bool {
        self.0.contains(&s)
    }

    pub(crate) fn jobs(&self) -> Vec<Job> {
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
        if self.has(Scenario::Ipv6) {
            jobs.extend([
                Job::Ipv6 { dir: Some(Dir::Up) },
                Job::Ipv6 {
                    dir: Some(Dir::Down),
                },
                Job::Ipv6 { dir: None },
            ]);
        }
        if self.has(Scenario::Restart) {
            jobs.extend([
                Job::Restart { upgrade: false },
                Job::Restart { upgrade: true },
            ]);
        }
        if self.has(Scenario::Hostport) {
            jobs.extend([
                Job::Hostport { external: false },
                Job::Hostport { external: true },
            ]);
        }
        if self.has(Scenario::Sequential) {
            jobs.push(Job::Sequential);
        }
        if self.has(Scenario::Crosscheck) {
            jobs.extend([
                Job::Iperf3 { dir: Dir::Up },
                Job::Iperf3 { dir: Dir::Down },
                Job::Sockperf,
            ]);
        }
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_scenario_is_a_crash_and_an_upgrade_of_berth_against_iptables() {
        let jobs = ScenarioSet(vec![Scenario::Restart]).jobs();
        assert_eq!(jobs.len(), 2);
        for job in jobs {
            assert_eq!(job.scenario(), Scenario::Restart);
            for c in [
                Contender::BerthDnat,
                Contender::BerthSplice,
                Contender::IptablesDnat,
            ] {
                assert_eq!(job.eligible(c), Ok(()), "{}", c.name());
            }
            for c in [Contender::Direct, Contender::Haproxy, Contender::BerthShim] {
                assert!(job.eligible(c).is_err(), "{}", c.name());
            }
        }
    }

    #[test]
    fn ipv6_jobs_are_the_external_ones_over_ipv6() {
        let jobs = ScenarioSet(vec![Scenario::Ipv6]).jobs();
        assert_eq!(jobs.len(), 3);
        for job in jobs {
            assert_eq!(job.scenario(), Scenario::Ipv6);
            assert_eq!(job.as_v4().scenario(), Scenario::External);
            assert_eq!(job.eligible(Contender::BerthDnat), Ok(()));
            assert!(job.eligible(Contender::DockerProxy).is_err());
        }
    }
}
