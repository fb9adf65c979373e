//! What `berth-docker-proxy` does once its command line is parsed.
//!
//! - **Delegating**: a berth daemon answers on the admin socket. The shim hands it the
//!   listening socket (its own bind, or dockerd's fd 4) as a lease, reports `0` to dockerd
//!   only once the daemon accepted, and then waits as small as it can: no runtime, no relay
//!   buffers, one thread in `poll(2)` on a signalfd and the admin connection. On SIGINT or
//!   SIGTERM it removes the mapping, waits until the daemon has closed its copy of the
//!   socket, and exits 0.
//! - **Covering**: if the daemon goes away, the shim still holds the socket, so no client is
//!   refused: it serves the port itself (the standalone relay) until a daemon answers again,
//!   then hands the port back and lets its own connections finish.
//! - **Standalone**: no daemon answers at start: the shim is a docker-proxy, as before.
use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, Signal},
        signalfd::{SfdFlags, SignalFd},
    },
};
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use super::{Args, StatusPipe};
use crate::{
    addr::ListenAddr,
    listen,
    mapping::{Bound, Defaults, Draft, Kernel, ModeChoice, Prepared, Running, Spec},
    service::{
        self,
        admin::{Call, Client},
    },
    sys,
};

/// Who owns the mappings the shim adds.
const OWNER: &str = "docker";
/// How often a covering shim looks for a daemon to hand the port back to.
const RETRY: Duration = Duration::from_millis(200);

static LOGGING: std::sync::Once = std::sync::Once::new();

/// Installs the logger on first need (`BERTH_LOG`, default warn): a shim that only waits
/// never pays the heap it takes.
pub fn logging() {
    LOGGING.call_once(|| {
        sys::init_logging(&std::env::var("BERTH_LOG").unwrap_or_else(|_| "warn".into()));
    });
}

/// Runs the shim to its end. `inherited` is dockerd's fd 4, already checked.
pub fn run(args: &Args, inherited: Option<Socket>, status: &mut StatusPipe) -> ExitCode {
    let admin = service::admin_socket();
    match Client::connect(&admin) {
        Ok(client) => delegate(args, inherited, status, client, admin),
        Err(e) => {
            logging();
            info!(reason = %e, "no berth daemon answers; serving the port in this process");
            standalone(args, inherited, status)
        }
    }
}

/// A failure before `0` was reported: on fd 3 when dockerd listens, else on stderr; exit 1.
pub fn fail(status: &mut StatusPipe, message: &str) -> ExitCode {
    if status.is_attached() {
        status.fail(message);
    } else {
        eprintln!("berth-docker-proxy: {message}");
    }
    ExitCode::from(1)
}

fn delegate(
    args: &Args,
    inherited: Option<Socket>,
    status: &mut StatusPipe,
    mut client: Client,
    admin: PathBuf,
) -> ExitCode {
    // The shim's own copy: what keeps the port open while no daemon serves it.
    let socket = match inherited {
        Some(s) => s,
        None => match args.listen.map(|l| listen::bind_socket(args.proto, l)) {
            Some(Ok(s)) => s,
            Some(Err(e)) => return fail(status, &e.to_string()),
            None => return fail(status, "no listen address"),
        },
    };
    let Some(listen) = socket.local_addr().ok().and_then(|a| a.as_socket()) else {
        return fail(status, "the listening socket has no address");
    };
    let draft = args.draft(ListenAddr(listen));
    let local = match local_spec(&draft) {
        Ok(s) => s,
        Err(e) => return fail(status, &e),
    };
    // Blocked before `0` is reported: dockerd may stop the proxy the moment it reads it.
    let signals = match block_stop_signals() {
        Ok(s) => s,
        Err(e) => return fail(status, &format!("cannot set up signal handling: {e}")),
    };
    let add = Call::Add {
        mapping: Box::new(draft),
        owner: Some(OWNER.into()),
        lease: true,
        persist: false,
    };
    let name = match client.call(&add, Some(socket.as_fd())) {
        Ok(r) if r.ok => r.mappings.first().map(|m| m.name.clone()),
        Ok(r) => return fail(status, &r.message),
        Err(e) => {
            logging();
            warn!(reason = %e, "the berth daemon went away while adding the port; serving it here");
            None
        }
    };
    status.ok();
    if let Some(name) = name {
        info!(mapping = %name, daemon = %admin.display(), "port handed to the berth daemon");
        if let Woken::Stop = wait(&client, &signals) {
            return remove(&mut client, &name);
        }
    }
    drop(client);
    // From here on a runtime exists; it serves the port whenever no daemon does.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            logging();
            error!(error = %e, "cannot start a runtime to serve the port; exiting");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(cover(socket, local, add, signals, admin))
}

/// Waits, with no runtime, until a stop signal or until the daemon's connection ends.
fn wait(client: &Client, signals: &SignalFd) -> Woken {
    loop {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(client.fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                logging();
                error!(error = %e, "poll failed; treating the daemon as gone");
                return Woken::DaemonGone;
            }
        }
        if fds[0].any().unwrap_or(false) {
            let _ = signals.read_signal();
            return Woken::Stop;
        }
        if fds[1].any().unwrap_or(false) {
            logging();
            warn!("the berth daemon went away; serving the port in this process until it is back");
            return Woken::DaemonGone;
        }
    }
}

enum Woken {
    Stop,
    DaemonGone,
}

/// Removes the shim's mapping and exits once the daemon has closed its copy of the socket
/// (dockerd may publish the port again at once).
fn remove(client: &mut Client, name: &str) -> ExitCode {
    match client.call(
        &Call::Remove {
            name: Some(name.into()),
            owner: None,
        },
        None,
    ) {
        Ok(r) if r.ok => ExitCode::SUCCESS,
        Ok(r) => {
            logging();
            warn!(mapping = %name, reason = %r.message, "the daemon refused to remove the mapping");
            ExitCode::SUCCESS
        }
        // The daemon went away: its copy went with it.
        Err(e) => {
            logging();
            warn!(mapping = %name, reason = %e, "no answer to the removal");
            ExitCode::SUCCESS
        }
    }
}

/// Serves the port here while no daemon does, hands it back when one answers, and stops on
/// SIGINT/SIGTERM (resetting what is still open, as docker-proxy does).
async fn cover(
    socket: Socket,
    local: Spec,
    add: Call,
    signals: SignalFd,
    admin: PathBuf,
) -> ExitCode {
    logging();
    // Covering, the shim relays like berth forward: as many connections as the host allows.
    sys::raise_nofile_limit();
    // SAFETY: the AsyncFd owns the signalfd, so its descriptor stays open and the same.
    let signals = match unsafe { AsyncFd::register(signals) } {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot watch signals; exiting");
            return ExitCode::FAILURE;
        }
    };
    // The shim's own connections, draining after a hand-back.
    let mut finishing: Vec<Running> = Vec::new();
    let mut serving: Option<Running> = None;
    let mut delegated: Option<(Client, String)> = None;
    // A daemon that refuses the port is asked again every RETRY; said once per episode.
    let mut refused = false;
    loop {
        finishing.retain(|r| !r.is_finished());
        if let Some((client, name)) = delegated.take() {
            let gone = async {
                let Ok(fd) = client.fd().try_clone_to_owned() else {
                    return;
                };
                // SAFETY: the AsyncFd owns this duplicate and outlives no use of it.
                let Ok(fd) = (unsafe { AsyncFd::register(fd) }) else {
                    return;
                };
                let _ = fd.readable().await;
            };
            tokio::select! {
                _ = stop_signal(&signals) => {
                    let mut client = client;
                    let code = remove(&mut client, &name);
                    cut(finishing).await;
                    return code;
                }
                () = gone => {
                    warn!("the berth daemon went away; serving the port in this process until it is back");
                }
            }
            continue;
        }
        if serving.is_none() {
            serving = match serve_here(&socket, &local) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Clients wait in the backlog; retry rather than give the port up.
                    error!(error = %e, "cannot serve the port here");
                    None
                }
            };
        }
        tokio::select! {
            _ = stop_signal(&signals) => {
                finishing.extend(serving.take());
                cut(finishing).await;
                return ExitCode::SUCCESS;
            }
            () = tokio::time::sleep(RETRY) => {
                if let Some(back) = hand_back(&admin, &add, &socket, &mut refused) {
                    info!(mapping = %back.1, "the berth daemon is back; port handed to it");
                    if let Some(mut r) = serving.take() {
                        r.drain();
                        finishing.push(r);
                    }
                    delegated = Some(back);
                }
            }
        }
    }
}

/// Offers the port to a daemon at `admin`, if one answers. A refusal is logged once until a
/// daemon takes the port (`refused` remembers).
fn hand_back(
    admin: &Path,
    add: &Call,
    socket: &Socket,
    refused: &mut bool,
) -> Option<(Client, String)> {
    let mut client = Client::connect(admin).ok()?;
    match client.call(add, Some(socket.as_fd())) {
        Ok(r) if r.ok => {
            *refused = false;
            let name = r.mappings.first()?.name.clone();
            Some((client, name))
        }
        Ok(r) => {
            if !*refused {
                warn!(reason = %r.message, "the berth daemon refused the port; still serving it here");
                *refused = true;
            }
            None
        }
        Err(_) => None,
    }
}

fn serve_here(socket: &Socket, spec: &Spec) -> Result<Running, String> {
    let fd: OwnedFd = socket
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let bound = Bound::adopt(fd, spec).map_err(|e| e.to_string())?;
    Running::start(spec.clone(), OWNER.into(), bound, None, &Prepared::none())
        .map_err(|e| e.to_string())
}

async fn stop_signal(signals: &AsyncFd<SignalFd>) {
    loop {
        let Ok(mut guard) = signals.readable().await else {
            return std::future::pending().await;
        };
        match guard.get_inner().read_signal() {
            Ok(Some(_)) => return,
            Ok(None) => guard.clear_ready(),
            Err(_) => return,
        }
    }
}

/// Resets whatever the shim still relays (docker-proxy closes everything at once).
async fn cut(mut all: Vec<Running>) {
    for r in &mut all {
        r.drain();
        r.cut();
    }
    for r in &mut all {
        r.finished().await;
    }
}

/// The spec the shim serves by itself: the same mapping, relayed (kernel programs are the
/// daemon's; a shim never loads them).
fn local_spec(draft: &Draft) -> Result<Spec, String> {
    let mut d = draft.clone();
    d.name = Some(OWNER.into());
    if d.mode
        .as_deref()
        .is_some_and(|m| !matches!(m, "copy" | "splice"))
    {
        d.mode = None;
    }
    d.resolve(&Defaults::default()).map_err(|e| e.to_string())
}

/// Blocks SIGINT and SIGTERM and returns a signalfd that reads them.
fn block_stop_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// No daemon: serve the port in this process, as docker-proxy does.
fn standalone(args: &Args, inherited: Option<Socket>, status: &mut StatusPipe) -> ExitCode {
    logging();
    if let Some(m @ (ModeChoice::Sockmap | ModeChoice::Dnat)) = args.mode {
        return fail(
            status,
            &format!("-mode {m} needs a berth daemon, and none answers on its admin socket"),
        );
    }
    let listen = match (&inherited, args.listen) {
        (Some(s), _) => s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(ListenAddr),
        (None, l) => l,
    };
    let Some(listen) = listen else {
        return fail(status, "no listen address");
    };
    let mut draft = args.draft(listen);
    draft.name = Some(OWNER.into());
    let spec = match draft.resolve(&Defaults::default()) {
        Ok(s) => s,
        Err(e) => return fail(status, &e.to_string()),
    };
    sys::raise_nofile_limit();
    // One port, one thread: the process dockerd starts per port stays small (no workers).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(status, &format!("failed to start the runtime: {e}")),
    };
    rt.block_on(async {
        let bound = match inherited {
            Some(sock) => Bound::adopt(sock.into(), &spec).map_err(|e| e.to_string()),
            None => Bound::bind(&spec).map_err(|e| e.to_string()),
        };
        let bound = match bound {
            Ok(b) => b,
            Err(e) => return fail(status, &e),
        };
        let stop = sys::stop_signal();
        status.ok();
        let kernel = Kernel::new(Default::default(), Default::default()).relay_only();
        // docker-proxy closes everything at once on SIGTERM; dockerd expects exactly that.
        match service::forward(spec, bound, kernel, Duration::ZERO, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                logging();
                error!(error = %e, "proxy stopped");
                ExitCode::FAILURE
            }
        }
    })
}
