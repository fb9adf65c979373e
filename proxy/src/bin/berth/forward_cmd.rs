//! `berth forward`: one TCP mapping in the foreground.
use std::{process::ExitCode, time::Duration};

use berth::{
    addr::{ListenAddr, TargetAddr},
    forward::{self, Config},
    relay::Mode,
    sys,
};
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ForwardArgs {
    /// How bytes are carried: copy (userspace buffer) or splice (zero-copy through pipes).
    #[arg(long, default_value = "splice", value_parser = parse_mode)]
    mode: Mode,
    /// Seconds to wait for the target to accept a connection.
    #[arg(long, default_value_t = Config::DEFAULT_CONNECT_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    connect_timeout: f64,
    /// Connections relayed at once; further clients are reset at once.
    #[arg(long, default_value_t = Config::DEFAULT_MAX_CONNECTIONS, value_parser = parse_limit)]
    max_connections: usize,
    /// Seconds that open connections may still run after SIGINT/SIGTERM.
    #[arg(long, default_value_t = Config::DEFAULT_DRAIN_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    drain_timeout: f64,
    /// Address to accept on, e.g. 0.0.0.0:9090 or [::]:9090 (port 0 picks a free port).
    listen: ListenAddr,
    /// Address to connect to, e.g. 172.16.1.1:8080.
    target: TargetAddr,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number")),
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
    let listener = forward::bind_tcp(args.listen)?;
    let config = Config {
        target: args.target,
        mode: args.mode,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        max_connections: args.max_connections,
        drain_timeout: Duration::from_secs_f64(args.drain_timeout),
    };
    forward::run(listener, config, sys::stop_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
