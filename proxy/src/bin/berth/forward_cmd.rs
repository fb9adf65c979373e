//! `berth forward`: one TCP or UDP mapping in the foreground.
use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::bail;
use berth::{
    addr::{ListenAddr, Proto, TargetAddr},
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
  berth forward --proto udp --udp-idle-timeout 30 0.0.0.0:5353 172.16.1.1:53")]
pub(crate) struct ForwardArgs {
    /// Transport protocol: tcp or udp.
    #[arg(long, default_value = "tcp")]
    proto: Proto,
    /// TCP: how bytes are carried. auto: the best reliable mode (splice for now). copy: a
    /// userspace buffer. splice: zero-copy through pipes. sockmap (experimental): the kernel
    /// moves the bytes; needs CAP_BPF and CAP_NET_ADMIN [default: auto].
    #[arg(long)]
    mode: Option<ModeChoice>,
    /// TCP: sockets the sockmap maps hold (two per connection); connections beyond fall back
    /// to splice.
    #[arg(long, default_value_t = sockmap::DEFAULT_MAX_ENTRIES, value_parser = parse_entries)]
    sockmap_entries: u32,
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
    match args.proto {
        Proto::Tcp => {
            let listener = listen::bind_tcp(args.listen)?;
            let choice = args.mode.unwrap_or_default();
            let sockmap = if choice.wants_sockmap() {
                match Sockmap::load(args.sockmap_entries) {
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
