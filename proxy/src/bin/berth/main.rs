//! `berth`: the command-line front end. It parses flags, binds, and hands over to the library.
mod forward_cmd;
mod net_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A port-forwarding proxy for containers, with an eBPF fast path.
#[derive(Debug, Parser)]
#[command(name = "berth", version, about, long_about = None)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info", env = "BERTH_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward a TCP or UDP port: accept on LISTEN, forward each client to TARGET.
    Forward(forward_cmd::ForwardArgs),
    /// Build, remove or enter the container network (bridge, namespaces, veth pairs).
    #[command(subcommand)]
    Net(net_cmd::NetCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    berth::sys::init_logging(&cli.log);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Forward(args) => forward_cmd::run(args).await,
            Command::Net(cmd) => net_cmd::run(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}
