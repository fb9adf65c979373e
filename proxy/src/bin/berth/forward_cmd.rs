//! `berth forward`: one TCP or UDP mapping in the foreground.
use std::{process::ExitCode, time::Duration};

use anyhow::bail;
use berth::{
    dnat, forward,
    mapping::{Bound, Defaults, Draft, Kernel},
    relay,
    service::{self, ServiceError},
    sockmap, sys,
};
use clap::Args;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  berth forward 0.0.0.0:9091 172.16.1.1:80
  berth forward --proto udp --udp-idle-timeout 30 0.0.0.0:5353 172.16.1.1:53
  berth forward --mode dnat --interface eth0 0.0.0.0:9091 172.16.1.1:80")]
pub(crate) struct ForwardArgs {
    /// Transport protocol: tcp or udp [default: tcp].
    #[arg(long)]
    proto: Option<String>,
    /// How the mapping is served. auto (TCP): splice, and each connection handed to the
    /// kernel relay (sockmap) once it has moved --sockmap-promote-bytes or lived
    /// --sockmap-promote-after, where the sockmap programs load (else splice only). copy: a
    /// userspace buffer. splice: zero-copy through pipes. sockmap (experimental, TCP): the
    /// kernel moves the bytes of each relayed connection. dnat (TCP and UDP): TC and cgroup
    /// programs rewrite the traffic (IPv4 and IPv6 containers) and a relay serves what they pass
    /// through. sockmap and dnat need CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN [default: auto].
    #[arg(long)]
    mode: Option<String>,
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
    /// TCP, auto: bytes (both directions) after which a connection goes from splice to the
    /// kernel relay.
    #[arg(long, default_value_t = relay::Threshold::DEFAULT.bytes)]
    sockmap_promote_bytes: u64,
    /// TCP, auto: seconds after which a connection still moving bytes goes from splice to the
    /// kernel relay, however few it moved.
    #[arg(long, default_value_t = relay::Threshold::DEFAULT.age.as_secs_f64(), value_parser = parse_secs)]
    sockmap_promote_after: f64,
    /// TCP: seconds to wait for the target to accept a connection [default: 5].
    #[arg(long)]
    connect_timeout: Option<f64>,
    /// TCP: connections relayed at once; further clients are reset at once [default: 10000].
    #[arg(long)]
    max_connections: Option<i64>,
    /// TCP: connections one client address may hold at once; its further clients are reset
    /// at once [default: no cap but --max-connections].
    #[arg(long)]
    max_connections_per_client: Option<i64>,
    /// TCP: seconds without a byte in either direction after which a connection is reset;
    /// at least 2, 0 for none [default: none].
    #[arg(long)]
    tcp_idle_timeout: Option<f64>,
    /// Seconds that open connections may still run after SIGINT/SIGTERM.
    #[arg(long, default_value_t = forward::Config::DEFAULT_DRAIN_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    drain_timeout: f64,
    /// UDP: seconds without a datagram in either direction after which a client's flow
    /// closes [default: 60].
    #[arg(long)]
    udp_idle_timeout: Option<f64>,
    /// UDP: flows (clients) open at once; a new client beyond it evicts the least recently
    /// used flow, its own address's if that address holds half the table [default: 10000].
    #[arg(long)]
    max_flows: Option<i64>,
    /// UDP: datagrams per system call (recvmmsg/sendmmsg), 1 to 32; 1 turns batching off
    /// [default: 32].
    #[arg(long)]
    udp_batch: Option<i64>,
    /// UDP: turn segmentation offload off (UDP_GRO on receive, UDP_SEGMENT on send, used
    /// where the kernel and the path take them; a path that refuses a segment size is sent
    /// that size one datagram at a time anyway).
    #[arg(long)]
    no_udp_offload: bool,
    /// Kernel mode only (`--mode dnat`): map the port in the kernel alone and bind no
    /// socket, as CNI's portmap does. What the programs pass through (hairpin, fragments)
    /// is then not served.
    #[arg(long)]
    no_relay: bool,
    /// Address to accept on, e.g. 0.0.0.0:9090 or [::]:9090 (port 0 picks a free port).
    listen: String,
    /// Address to forward to, e.g. 172.16.1.1:8080.
    target: String,
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

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

/// `berth forward` is a service with one mapping: the mapping goes through the same
/// validator as the file's and the runtime API's, and starts the same way.
pub(crate) async fn run(args: ForwardArgs) -> anyhow::Result<ExitCode> {
    sys::raise_nofile_limit();
    let draft = Draft {
        name: Some("forward".into()),
        proto: args.proto,
        listen: Some(args.listen),
        target: Some(args.target),
        mode: args.mode,
        max_connections: args.max_connections,
        connect_timeout: args.connect_timeout,
        max_connections_per_client: args.max_connections_per_client,
        tcp_idle_timeout: args.tcp_idle_timeout,
        udp_idle_timeout: args.udp_idle_timeout,
        max_flows: args.max_flows,
        udp_batch: args.udp_batch,
        udp_offload: args.no_udp_offload.then_some(false),
        relay: args.no_relay.then_some(false),
    };
    let spec = match draft.resolve(&Defaults::default()) {
        Ok(s) => s,
        Err(e) => bail!("{}: {}", e.flag(), e.why),
    };
    let kernel = Kernel::new(
        sockmap::Settings {
            max_entries: args.sockmap_entries,
            send_buffer: args.sockmap_send_buffer,
            promote: relay::Threshold {
                bytes: args.sockmap_promote_bytes,
                age: Duration::from_secs_f64(args.sockmap_promote_after),
            },
        },
        dnat::Settings {
            interfaces: (!args.interfaces.is_empty()).then_some(args.interfaces),
            cgroup: args.cgroup,
            conntrack_entries: args.conntrack_entries,
            timeouts: dnat::Timeouts {
                tcp: Duration::from_secs_f64(args.dnat_tcp_timeout),
                closing: Duration::from_secs_f64(args.dnat_closing_timeout),
                udp: Duration::from_secs_f64(args.dnat_udp_timeout),
            },
            // A foreground mapping's flows end with it: it has no successor to adopt them.
            pin_dir: None,
        },
    );
    let bound = Bound::bind(&spec)?;
    let stop = sys::stop_signal();
    let served = service::forward(
        spec,
        bound,
        kernel,
        Duration::from_secs_f64(args.drain_timeout),
        stop,
    )
    .await;
    // One mapping on the command line: say it in the command line's terms.
    match served {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(ServiceError::Sockmap(e)) => bail!("--mode sockmap: {}", e.why),
        Err(ServiceError::Kernel { source, .. }) => bail!("--mode dnat: {source}"),
        Err(e) => Err(e.into()),
    }
}
