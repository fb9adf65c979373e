//! `berth run`, `berth check`, `berth status` and `berth reload`: the service and its admin
//! commands.
use std::{path::PathBuf, process::ExitCode};

use berth::{
    service::{
        self, admin,
        config::{ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET},
        status,
    },
    sys,
};
use clap::Args;

/// The configuration file unless `--config` says otherwise.
const DEFAULT_CONFIG: &str = "/etc/berth/berth.toml";

#[derive(Debug, Args)]
#[command(after_help = "\
Signals: SIGHUP reloads the file (as `berth reload` does); SIGTERM or SIGINT stop accepting,
let open connections finish for [service] drain_timeout seconds, reset the rest, and exit 0.
Under systemd (Type=notify) berth reports READY=1, RELOADING=1, STOPPING=1 and STATUS=, feeds
the watchdog, and serves sockets passed by socket activation to the mappings of the same name.")]
pub(crate) struct RunArgs {
    /// The configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The admin socket, overriding the file's [admin] socket.
    #[arg(long, env = ADMIN_SOCKET_ENV)]
    admin_socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The configuration file to validate.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The admin socket of the berth to ask.
    #[arg(long, env = ADMIN_SOCKET_ENV, default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ReloadArgs {
    /// The admin socket of the berth to reload.
    #[arg(long, env = ADMIN_SOCKET_ENV, default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    sys::raise_nofile_limit();
    service::run(service::Options {
        config: args.config,
        admin_socket: args.admin_socket,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let config = service::check(&args.config)?;
    println!(
        "{}: valid, {} mapping(s)",
        args.config.display(),
        config.mappings.len()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let reply = admin::request(&args.admin_socket, "status").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply.mappings)?);
    } else {
        print!("{}", status::table(&reply.mappings));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn reload(args: &ReloadArgs) -> anyhow::Result<ExitCode> {
    let reply = admin::request(&args.admin_socket, "reload").await?;
    if reply.ok {
        println!("reloaded: {}", reply.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "berth: reload refused, the running configuration stays: {}",
            reply.message
        );
        Ok(ExitCode::FAILURE)
    }
}
