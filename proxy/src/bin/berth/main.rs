//! `berth`: the command-line front end. It parses flags, binds, and hands over to the library.
mod cni_cmd;
mod docs_cmd;
mod forward_cmd;
mod net_cmd;
mod service_cmd;

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
    Forward(Box<forward_cmd::ForwardArgs>),
    /// Serve every mapping of a configuration file (the daemon).
    Run(service_cmd::RunArgs),
    /// Validate a configuration file without binding anything.
    Check(service_cmd::CheckArgs),
    /// Show the mappings of a running berth: addresses, mode, open connections, bytes, errors.
    Status(service_cmd::StatusArgs),
    /// Make a running berth re-read its configuration file (as SIGHUP does).
    Reload(service_cmd::ReloadArgs),
    /// Hand a running berth over to the binary now installed (an upgrade), without closing a
    /// port or ending a kernel-mode flow.
    Upgrade(service_cmd::UpgradeArgs),
    /// Build, remove or enter the container network (bridge, namespaces, veth pairs).
    #[command(subcommand)]
    Net(net_cmd::NetCommand),
    /// The CNI plugin (berth-cni, a name of this binary): install it on a node.
    #[command(subcommand)]
    Cni(cni_cmd::CniCommand),
    /// Print the shell completion script for SHELL.
    Completions(docs_cmd::CompletionsArgs),
    /// Write the manual pages (berth(1) and one per subcommand, berth-docker-proxy(1),
    /// berth.toml(5)).
    Man(docs_cmd::ManArgs),
}

fn main() -> ExitCode {
    // Installed as `berth-docker-proxy` and `berth-cni`, links to this binary: dockerd's
    // proxy and the CNI plugin. One binary for all lets a thousand shims share their code
    // pages with the daemon.
    let invoked = std::env::args_os().next().unwrap_or_default();
    match std::path::Path::new(&invoked)
        .file_name()
        .and_then(|n| n.to_str())
    {
        Some("berth-docker-proxy") => return berth::docker_proxy::main(),
        Some("berth-cni") => return berth::cni::main(),
        Some(berth::service::keeper::NAME) => return berth::service::keeper::main(),
        _ => {}
    }
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
            Command::Forward(args) => forward_cmd::run(*args).await,
            Command::Net(cmd) => net_cmd::run(cmd).await,
            Command::Cni(cmd) => cni_cmd::run(cmd),
            Command::Run(args) => service_cmd::run(args).await,
            Command::Check(args) => service_cmd::check(&args),
            Command::Status(args) => service_cmd::status(&args).await,
            Command::Reload(args) => service_cmd::reload(&args).await,
            Command::Upgrade(args) => service_cmd::upgrade(&args).await,
            Command::Completions(args) => Ok(docs_cmd::completions(&args)),
            Command::Man(args) => docs_cmd::man(&args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause added only if the message before does not already
/// say it (berth's errors usually name their cause in their own message).
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
