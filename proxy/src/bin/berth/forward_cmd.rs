//! `berth forward`: one TCP or UDP mapping in the foreground.
use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::bail;
use berth::{
    addr::{ListenAddr, Proto, TargetAddr},
    dnat::{self, Dnat},
    forward, listen,
    service::config::ModeChoice,
    sockmap::{self, Sockmap},
    sys, udp,
};
use clap::Args;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  berth forward 0.0.0.0:9091 172.16.1.1:80
  berth forward --proto udp --udp-idle-timeout 30 0.0.0.0:5353 172.16.1.1:53
  berth forward --mode dnat --interface eth0 0.0.0.0:9091 172.16.1.1:80")]
pub(crate) struct ForwardArgs {
    /// Transport protocol: tcp or udp.
    #[arg(long, default_value = "tcp")]
    proto: Proto,
    /// How the mapping is served. auto: the best reliable relay (splice for now). copy: a
    /// userspace buffer. splice: zero-copy through pipes. sockmap (experimental): the kernel
    /// moves the bytes of each relayed connection. dnat (TCP and UDP): no relay at all; TC
    /// and cgroup programs rewrite the traffic (IPv4 containers). sockmap and dnat need
    /// CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN [default: auto].
    #[arg(long)]
    mode: Option<ModeChoice>,
    /// dnat: a client-facing interface for the TC program (repeat for several). Default:
    /// every non-loopback interface that is not a bridge or bond port.
    #[arg(long = "interface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// dnat: the cgroup (v2 directory) whose processes get local mapping (connect rewrite).
    /// Default: the root of the cgroup v2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<std::path::PathBuf>,
    /// dnat: remote flows the conntrack table holds (the least recently used go first).
    #[arg(long, default_value_t = dnat::Settings::default().conntrack_entries, value_parser = parse_conntrack)]
    conntrack_entries: u32,
    /// dnat: seconds an idle open TCP flow keeps its conntrack entry.
    #[arg(long, default_value_t = dnat::Timeouts::default().tcp.as_secs_f64(), value_parser = parse_secs)]
    dnat_tcp_timeout: f64,
    /// dnat: seconds a TCP flow keeps its entry after FIN from both sides or a RST.
    #[arg(long, default_value_t = dnat::Timeouts::default().closing.as_secs_f64(), value_parser = parse_secs)]
    dnat_closing_timeout: f64,
    /// dnat: seconds an idle UDP flow keeps its conntrack entry.
    #[arg(long, default_value_t = dnat::Timeouts::default().udp.as_secs_f64(), value_parser = parse_secs)]
    dnat_udp_timeout: f64,
    /// TCP: sockets the sockmap maps hold (two per connection); connections beyond fall back
    /// to splice.
    #[arg(long, default_value_t = sockmap::DEFAULT_MAX_ENTRIES, value_parser = parse_entries)]
    sockmap_entries: u32,
    /// TCP, sockmap: send-buffer limit in bytes of both sockets of a relayed connection; 0
    /// keeps the kernel's autotuning. Half of it is how many unacknowledged bytes the
    /// kernel may have on their way to a slow receiver, per direction; it should hold what
    /// the link moves in a few milliseconds.
    #[arg(long, default_value_t = sockmap::DEFAULT_SEND_BUFFER, value_parser = parse_send_buffer)]
    sockmap_send_buffer: u32,
    /// TCP: seconds to wait for the target to accept a connection.
    #[arg(long, default_value_t = forward::Config::DEFAULT_CONNECT_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    connect_timeout: f64,
    /// TCP: connections relayed at once; further clients are reset at once.
    #[arg(long, default_value_t = forward::Config::DEFAULT_MAX_CONNECTIONS, value_parser = parse_limit)]
    max_connections: usize,
    /// TCP: seconds that open connections may still run after SIGINT/SIGTERM.
    #[arg(long, default_value_t = forward::Config::DEFAULT_DRAIN_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    drain_timeout: f64,
    /// UDP: seconds without a datagram in either direction after which a client's flow closes.
    #[arg(long, default_value_t = udp::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    udp_idle_timeout: f64,
    /// UDP: flows (clients) open at once; a new client beyond it evicts the least recently
    /// used flow.
    #[arg(long, default_value_t = udp::Config::DEFAULT_MAX_FLOWS, value_parser = parse_limit)]
    max_flows: usize,
    /// UDP: datagrams per system call (recvmmsg/sendmmsg); 1 turns batching off.
    #[arg(long, default_value_t = udp::Config::DEFAULT_BATCH, value_parser = parse_batch)]
    udp_batch: usize,
    /// Address to accept on, e.g. 0.0.0.0:9090 or [::]:9090 (port 0 picks a free port).
    listen: ListenAddr,
    /// Address to forward to, e.g. 172.16.1.1:8080.
    target: TargetAddr,
}

fn parse_entries(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(format!("{s:?} is not a number of sockets (at least 2)")),
    }
}

fn parse_send_buffer(s: &str) -> Result<u32, String> {
    let n = s
        .parse::<i64>()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    sockmap::check_send_buffer(n)
}

fn parse_conntrack(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=16_777_216).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a number of entries from 1 to 16777216"
        )),
    }
}

fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn parse_batch(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=udp::Config::MAX_BATCH).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a batch size from 1 to {}",
            udp::Config::MAX_BATCH
        )),
    }
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

pub(crate) async fn run(args: ForwardArgs) -> anyhow::Result<ExitCode> {
    sys::raise_nofile_limit();
    if args.mode == Some(ModeChoice::Dnat) {
        return run_dnat(args).await;
    }
    match args.proto {
        Proto::Tcp => {
            let listener = listen::bind_tcp(args.listen)?;
            let choice = args.mode.unwrap_or_default();
            let sockmap = if choice.wants_sockmap() {
                match Sockmap::load(sockmap::Settings {
                    max_entries: args.sockmap_entries,
                    send_buffer: args.sockmap_send_buffer,
                }) {
                    Ok(sm) => Some(sm),
                    Err(e) => bail!("--mode sockmap: {e}"),
                }
            } else {
                None
            };
            let config = forward::Config {
                target: args.target,
                mode: choice.tcp_mode(),
                sockmap,
                connect_timeout: Duration::from_secs_f64(args.connect_timeout),
                max_connections: args.max_connections,
                drain_timeout: Duration::from_secs_f64(args.drain_timeout),
            };
            forward::run(listener, config, sys::stop_signal()).await?;
        }
        Proto::Udp => {
            if let Some(mode) = args.mode {
                bail!("--mode {mode} applies to TCP; UDP datagrams are always copied");
            }
            let socket = listen::bind_udp(args.listen)?;
            let config = udp::Config {
                target: args.target,
                idle_timeout: Duration::from_secs_f64(args.udp_idle_timeout),
                max_flows: args.max_flows,
                batch: args.udp_batch,
            };
            let stats = Arc::new(udp::Stats::default());
            udp::run(socket, config, stats, sys::stop_signal()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--mode dnat`: loads kernel mode, maps the port, and holds it until SIGINT/SIGTERM; then
/// everything is detached and freed.
async fn run_dnat(args: ForwardArgs) -> anyhow::Result<ExitCode> {
    let (listen, target) = (args.listen.get(), args.target.get());
    // Before the port is held and anything is loaded.
    dnat::check_listen(listen)?;
    dnat::check_target(target)?;
    // The port is held first: an occupied port is an error before anything is loaded.
    let _reserved = listen::reserve(args.proto, args.listen)?;
    let settings = dnat::Settings {
        interfaces: (!args.interfaces.is_empty()).then_some(args.interfaces),
        cgroup: args.cgroup,
        conntrack_entries: args.conntrack_entries,
        timeouts: dnat::Timeouts {
            tcp: Duration::from_secs_f64(args.dnat_tcp_timeout),
            closing: Duration::from_secs_f64(args.dnat_closing_timeout),
            udp: Duration::from_secs_f64(args.dnat_udp_timeout),
        },
    };
    let stop = sys::stop_signal();
    let kernel = Dnat::start(settings).await?;
    let via = Dnat::route(target).await?;
    let mapping = kernel.add(args.proto, listen, target, &via)?;
    tracing::info!(
        proto = %args.proto,
        %listen,
        %target,
        interfaces = ?kernel.interfaces(),
        cgroup = %kernel.cgroup().display(),
        "mapped in kernel mode; no process is in the data path"
    );
    stop.await;
    let s = mapping.snapshot();
    tracing::info!(
        flows = s.flows,
        local = s.local_rewrites,
        packets_in = s.packets_in,
        packets_out = s.packets_out,
        "stopping: detaching the programs"
    );
    Ok(ExitCode::SUCCESS)
}
