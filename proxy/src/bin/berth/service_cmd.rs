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
    /// Take over from the berth serving the admin socket (an upgrade): its listening sockets
    /// and kernel mode's pinned state come to this process, which starts serving them before
    /// the old one stops accepting; the old one then lets its connections finish and exits.
    /// `berth upgrade` does this from the running daemon, under systemd too.
    #[arg(long)]
    take_over: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
The running daemon starts the berth binary found at the path it was started from (the one a
package upgrade just replaced) as `berth run --take-over`, with its configuration file and
admin socket. The successor takes every listening socket and kernel mode's pinned state over,
serves them, and only then does the old daemon stop accepting, let its open connections finish
([service] drain_timeout) and exit. No port closes meanwhile, and kernel-mode flows go on.
Under systemd the old daemon, once drained, stays the unit's main process as `berth-keeper`,
which passes signals on and exits with the successor (the unit needs NotifyAccess=all, as the
shipped one has). If the successor fails to start, the old daemon serves on and this command
fails.")]
pub(crate) struct UpgradeArgs {
    /// The admin socket of the berth to upgrade.
    #[arg(long, env = ADMIN_SOCKET_ENV, default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The configuration file to validate.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print JSON instead of a table (with --watch: one line per sample, with the rates).
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 2), with per-second rates of connections, bytes
    /// each way and errors beside the totals; in place on a terminal. Ctrl-C stops.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2", value_parser = parse_interval)]
    watch: Option<f64>,
    /// With --watch: stop after this many samples.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
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
    let take_over = args.take_over;
    let ended = service::run(service::Options {
        config: args.config,
        admin_socket: args.admin_socket,
        take_over,
    })
    .await?;
    if ended == service::Ended::HandedOver && service::keeper::wanted(take_over) {
        // Returns only on failure; the successor serves on either way.
        let e = service::keeper::exec();
        anyhow::bail!("cannot become {}: {e}", service::keeper::NAME);
    }
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
    let Some(every) = args.watch else {
        let reply = admin::request(&args.admin_socket, "status").await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&reply.mappings)?);
        } else {
            print!("{}", status::table(&reply.mappings));
        }
        return Ok(ExitCode::SUCCESS);
    };
    watch(args, std::time::Duration::from_secs_f64(every)).await
}

/// `berth status --watch`: a sample every `every`, with the rates since the one before.
async fn watch(args: &StatusArgs, every: std::time::Duration) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal as _, Write as _};
    let terminal = std::io::stdout().is_terminal() && !args.json;
    let mut before: Option<(tokio::time::Instant, Vec<status::Row>)> = None;
    let mut tick = tokio::time::interval(every);
    let mut samples = 0;
    loop {
        tick.tick().await;
        let rows = admin::request(&args.admin_socket, "status").await?.mappings;
        let now = tokio::time::Instant::now();
        let rates = match &before {
            Some((at, rows_then)) => {
                status::rates(rows_then, &rows, now.duration_since(*at).as_secs_f64())
            }
            None => vec![None; rows.len()],
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            let sample = serde_json::json!({ "mappings": rows, "rates": rates });
            writeln!(out, "{sample}")?;
        } else {
            if terminal {
                // Home and clear: the table refreshes in place.
                write!(out, "\x1b[H\x1b[2J")?;
            } else if samples > 0 {
                writeln!(out)?;
            }
            write!(out, "{}", status::table_with_rates(&rows, &rates))?;
        }
        out.flush()?;
        before = Some((now, rows));
        samples += 1;
        if args.count.is_some_and(|n| samples >= n) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 3600")),
    }
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

pub(crate) async fn upgrade(args: &UpgradeArgs) -> anyhow::Result<ExitCode> {
    let reply = admin::request(&args.admin_socket, "upgrade").await?;
    if reply.ok {
        println!("upgraded: {}", reply.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("berth: {}; the running berth serves on", reply.message);
        Ok(ExitCode::FAILURE)
    }
}
