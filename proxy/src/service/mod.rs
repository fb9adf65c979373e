//! `berth run`: one process serving every mapping of the host: those of its configuration file
//! (with live reload) and those other programs add at run time through the admin socket
//! (Docker's shim, later CNI), with Prometheus metrics and systemd integration.
//!
//! - [`config`]: the file, validated as a whole before anything is bound.
//! - [`api`]: the admin socket's line protocol (status, reload, add, remove, list).
//! - [`admin`]: the admin socket itself, and its clients.
//! - `plan`: what a reload changes, decided without I/O.
//! - `persist`: the state file of persistent runtime mappings (the CNI plugin's).
//! - `metrics`: the `/metrics` endpoint.
//! - `systemd`: notify, watchdog and socket activation, as wire protocols.
//! - [`handover`]: `berth upgrade`, both sides; [`keeper`]: the unit's main process after it.
//! - [`status`]: the status table.
//!
//! Mappings themselves (spec, socket, start, drain) are [`crate::mapping`]'s.

pub mod admin;
pub mod api;
pub mod config;
pub mod handover;
pub mod keeper;
mod metrics;
pub use metrics::family_names;
mod persist;
pub(crate) mod plan;

pub(crate) use self::persist::forget_owner;
pub mod status;
mod systemd;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use self::{
    admin::{AdminError, Request},
    api::{CONFIG_OWNER, Call, Reply},
    config::{Config, ConfigError},
    handover::{Outgoing, Successor, TakeOver},
    persist::{Saved, Store},
    status::Row,
    systemd::Notifier,
};
use crate::{
    listen::ListenError,
    mapping::{
        AdoptError, Bound, Draft, Kernel, KernelModeError, Running, SockmapUnavailable, Spec,
        StartError,
    },
};

/// `berth run` (or `berth forward`) could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mapping {name:?}: {source}")]
    Listen { name: String, source: ListenError },
    #[error("mapping {name:?}: {source}")]
    Adopt { name: String, source: AdoptError },
    #[error("mapping {name:?}: {source}")]
    Start { name: String, source: StartError },
    #[error("mapping {name:?}: cannot hand its socket to its replacement: {source}")]
    Handover { name: String, source: io::Error },
    #[error("cannot take over from the running berth: {0}")]
    TakeOver(String),
    #[error(transparent)]
    Sockmap(#[from] SockmapUnavailable),
    #[error("mapping {name:?}: {why}")]
    Conflict { name: String, why: String },
    #[error("mapping {name:?}: {source}")]
    Kernel {
        name: String,
        source: KernelModeError,
    },
    #[error("cannot listen for metrics: {0}")]
    Metrics(#[source] ListenError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
}

/// How `berth run` was started.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Overrides the file's `[admin] socket`.
    pub admin_socket: Option<PathBuf>,
    /// Take every socket and kernel mode's state over from the berth serving the admin
    /// socket (an upgrade), instead of binding.
    pub take_over: bool,
}

/// The mappings being served, and those removed that are still draining.
#[derive(Debug, Default)]
pub(crate) struct State {
    active: BTreeMap<String, Running>,
    retired: Vec<Running>,
    /// Runtime mappings held by an admin connection: name → connection.
    leases: HashMap<String, u64>,
}

impl State {
    /// Every mapping, active ones first.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Running> {
        self.active.values().chain(&self.retired)
    }

    fn reap(&mut self) {
        self.retired.retain(|m| !m.is_finished());
    }

    fn rows(&mut self) -> Vec<Row> {
        self.reap();
        self.all().map(Row::of).collect()
    }

    fn runtime(&self) -> impl Iterator<Item = &Running> {
        self.active.values().filter(|m| m.owner != CONFIG_OWNER)
    }

    fn summary(&self) -> String {
        let tcp = self
            .active
            .values()
            .filter(|m| m.spec.proto == crate::addr::Proto::Tcp)
            .count();
        let udp = self.active.len() - tcp;
        let runtime = self.runtime().count();
        let open: u64 = self.all().map(Running::active).sum();
        let mut s = format!(
            "{} mappings ({tcp} tcp, {udp} udp; {runtime} added at run time), {open} open",
            self.active.len()
        );
        if !self.retired.is_empty() {
            s.push_str(&format!(", {} draining", self.retired.len()));
        }
        let degraded = self
            .active
            .values()
            .filter(|m| m.kernel_error.is_some())
            .count();
        if degraded > 0 {
            s.push_str(&format!(", {degraded} without kernel mode"));
        }
        s
    }

    /// Removes `name`: it stops accepting and drains; returns what resolves once its socket
    /// is closed.
    fn retire(&mut self, name: &str) -> Option<impl Future<Output = ()> + Send + use<>> {
        let mut m = self.active.remove(name)?;
        self.leases.remove(name);
        m.drain();
        let released = m.released();
        self.retired.push(m);
        Some(released)
    }
}

/// What keeps a runtime mapping: an admin connection (a lease), the state file, or nothing
/// but a `remove`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Lease(u64),
    Persist,
    None,
}

/// The daemon between requests.
struct Service {
    path: PathBuf,
    config: Config,
    state: Arc<Mutex<State>>,
    /// Sockets systemd passed, by mapping name, not yet used.
    inherited: HashMap<String, OwnedFd>,
    kernel: Kernel,
    /// The persistent runtime mappings, as written to the state file.
    store: Store,
    /// The admin socket this daemon serves (which names its kernel-mode pin directory).
    admin: PathBuf,
}

/// What the daemon starts from: everything `berth run` takes from its command line, its
/// file and its service manager, so that tests can start it in-process ([`serve`]).
#[derive(Debug)]
pub struct Start {
    /// The file that reloads re-read.
    pub config_path: PathBuf,
    /// Its contents, validated.
    pub config: Config,
    pub admin_socket: PathBuf,
    /// Sockets the service manager (or the predecessor, in a hand-over) passed, by mapping
    /// name; the predecessor's admin and metrics listeners under [`handover::ADMIN`] and
    /// [`handover::METRICS`].
    pub inherited: HashMap<String, OwnedFd>,
    /// The predecessor to tell once everything is served, in a hand-over.
    pub take_over: Option<TakeOver>,
    /// How `berth upgrade` starts this daemon's successor.
    pub successor: Successor,
}

impl Start {
    /// A start with nothing passed in: no sockets, no predecessor; `berth upgrade` would start
    /// the binary running now.
    pub fn new(config_path: PathBuf, config: Config, admin_socket: PathBuf) -> Self {
        Self {
            successor: Successor {
                exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("berth")),
                config: config_path.clone(),
                admin_socket: admin_socket.clone(),
            },
            config_path,
            config,
            admin_socket,
            inherited: HashMap::new(),
            take_over: None,
        }
    }
}

/// How a daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Stopped (SIGTERM, SIGINT): drained, nothing left behind.
    Stopped,
    /// Handed over to a successor and drained; under systemd ([`keeper::wanted`]) the
    /// process must now become the keeper rather than exit.
    HandedOver,
}

/// `berth run`: loads `opts.config`, takes systemd's sockets, and serves until SIGTERM or
/// SIGINT (SIGHUP reloads).
pub async fn run(opts: Options) -> Result<Ended, ServiceError> {
    let config = Config::load(&opts.config)?;
    let admin_socket = opts
        .admin_socket
        .clone()
        .unwrap_or_else(|| config.admin_socket.clone());
    let mut inherited = systemd::listen_fds();
    if !inherited.is_empty() {
        let names: Vec<&String> = inherited.keys().collect();
        info!(sockets = ?names, "sockets passed by systemd");
    }
    let take_over = if opts.take_over {
        let path = admin_socket.clone();
        let (t, sockets) = tokio::task::spawn_blocking(move || TakeOver::request(&path))
            .await
            .map_err(|e| ServiceError::TakeOver(e.to_string()))?
            .map_err(|e| ServiceError::TakeOver(e.to_string()))?;
        info!(sockets = sockets.len(), admin = %admin_socket.display(), "taking over from the running berth");
        inherited.extend(sockets);
        Some(t)
    } else {
        None
    };
    // Where this binary was started from: `berth upgrade` starts what is there then.
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("berth"));
    let mut hup = signal(SignalKind::hangup()).map_err(ServiceError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;
    let (reload_tx, reload) = mpsc::channel(1);
    let hups = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if reload_tx.send(()).await.is_err() {
                break;
            }
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let start = Start {
        successor: Successor {
            exe,
            config: opts.config.clone(),
            admin_socket: admin_socket.clone(),
        },
        config_path: opts.config,
        config,
        admin_socket,
        inherited,
        take_over,
    };
    if keeper::wanted(opts.take_over)
        && let Err(e) = keeper::become_subreaper()
    {
        warn!(error = %e, "cannot become a child subreaper: a second upgrade's successor would not be waited for");
    }
    let served = serve(start, reload, shutdown).await;
    hups.abort();
    served
}

/// Serves `start` and the runtime API, reloading the file at each message on `reload`, until
/// `shutdown` completes; then drains. Everything is bound before anything starts: a bad
/// mapping leaves nothing half-running.
pub async fn serve(
    start: Start,
    mut reload: mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, ServiceError> {
    let Start {
        config_path,
        config,
        admin_socket: admin_path,
        mut inherited,
        take_over,
        successor,
    } = start;
    let notifier = Notifier::from_env();
    let passed_metrics = inherited.remove(handover::METRICS);
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(metrics::listener(addr, passed_metrics).map_err(ServiceError::Metrics)?),
        None => None,
    };
    let admin_listener = match inherited.remove(handover::ADMIN) {
        Some(fd) => admin::adopt(fd, &admin_path)?,
        None => admin::bind(&admin_path)?,
    };
    // Copies for a successor: the tasks that serve them own the originals.
    let listeners = Listeners {
        admin: admin_listener.as_fd().try_clone_to_owned().ok(),
        metrics: metrics_listener
            .as_ref()
            .and_then(|l| l.as_fd().try_clone_to_owned().ok()),
    };
    let state_file = config
        .state_file
        .clone()
        .unwrap_or_else(|| config::default_state_file(&admin_path));

    let mut service = Service {
        store: Store::new(state_file),
        path: config_path.clone(),
        kernel: Kernel::new(config.sockmap, config.dnat_for(&admin_path)),
        admin: admin_path.clone(),
        config: Config {
            mappings: Vec::new(),
            ..config.clone()
        },
        state: Arc::new(Mutex::new(State::default())),
        inherited,
    };
    // Until the predecessor has handed over, its pinned state is not ours to remove.
    service.kernel.leave_pinned(take_over.is_some());
    // Everything is bound before anything starts: a bad mapping leaves nothing half-running.
    if let Err(e) = service.apply(config).await {
        if take_over.is_none() {
            let _ = std::fs::remove_file(&admin_path);
        }
        return Err(e);
    }
    service.restore().await;
    // Every mapping this process serves is back: what a crashed predecessor pinned and no
    // mapping took over goes now.
    service.kernel.settle().await;
    let mut background = tokio::task::JoinSet::new();
    if let Some(t) = take_over {
        // The predecessor's sockets that no mapping took close with it: their mappings are
        // gone from the configuration.
        let unused: Vec<String> = service.inherited.drain().map(|(name, _)| name).collect();
        if !unused.is_empty() {
            info!(sockets = ?unused, "sockets of mappings no longer configured are closed");
        }
        match tokio::task::spawn_blocking(move || t.ready()).await {
            Ok(Ok(())) => info!("took over from the previous berth"),
            Ok(Err(e)) => warn!(error = %e, "the previous berth did not confirm the hand-over"),
            Err(e) => warn!(error = %e, "the previous berth did not confirm the hand-over"),
        }
        service.kernel.leave_pinned(false);
    }
    let state = service.state.clone();
    if let Some(l) = metrics_listener {
        let registry = metrics::registry(state.clone(), service.config.dnat.conntrack_entries);
        background.spawn(metrics::serve(l, registry));
    }
    let (requests, mut admin_rx) = mpsc::channel(64);
    // Every runtime mapping may be held by a connection of its own (one per Docker shim).
    let max_conns = service.config.max_runtime_mappings + 64;
    let handed_over = Arc::new(tokio::sync::Notify::new());
    let mut admin_task = tokio::spawn(admin::serve(
        admin_listener,
        requests,
        max_conns,
        handed_over.clone(),
    ));
    if let Some(every) = systemd::watchdog_interval() {
        let dog = Notifier::from_env();
        background.spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                dog.notify("WATCHDOG=1");
            }
        });
    }
    let summary = lock(&state).summary();
    info!(config = %config_path.display(), admin = %admin_path.display(), "berth running: {summary}");
    notifier.ready(&summary);

    // Finished retired mappings are dropped promptly: a kernel-mode one holds the programs.
    let mut reap = tokio::time::interval(Duration::from_secs(1));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut outgoing = Outgoing::default();
    // Set once a successor serves everything: (its pid, the `berth upgrade` connection
    // still to be answered, and until when to wait for it to read the answer).
    let mut handed: Option<(Option<u32>, Option<u64>)> = None;
    let linger = tokio::time::sleep(Duration::ZERO);
    let mut linger = std::pin::pin!(linger);
    loop {
        tokio::select! {
            _ = reap.tick() => lock(&state).reap(),
            Some(()) = reload.recv(), if handed.is_none() => {
                let reply = service.reload(&notifier).await;
                log_reload(&reply);
            }
            Some(req) = admin_rx.recv() => match req {
                Request::Call { call, reply, conn, .. } if matches!(*call, Call::Upgrade) => {
                    outgoing.upgrade(&successor, reply, conn);
                }
                Request::Call { call, socket, conn, reply } => {
                    service.call(*call, socket, conn, reply, &notifier).await;
                }
                Request::Closed(conn) => {
                    if handed.is_some_and(|(_, c)| c == Some(conn)) {
                        break;
                    }
                    service.closed(conn);
                }
                Request::Handover { offer } => {
                    let _ = offer.send(outgoing.offer(service.handover_sockets(&listeners)));
                }
            },
            event = outgoing.next(), if outgoing.busy() => match event {
                handover::Event::Ready { pid, ack } => {
                    // The pinned state is the successor's from now on.
                    service.kernel.leave_pinned(true);
                    // The successor accepts admin and metrics connections from now on, and
                    // feeds the watchdog.
                    handed_over.notify_one();
                    background.abort_all();
                    let _ = ack.send(());
                    info!(successor = ?pid, "handed over: stopping accepting and draining");
                    let conn = outgoing.answer(Reply::ok(
                        format!("handed over to pid {}", pid.map_or("?".into(), |p| p.to_string())),
                        Vec::new(),
                    ));
                    handed = Some((pid, conn));
                    if conn.is_none() {
                        break;
                    }
                    // Long enough for `berth upgrade` to read its answer and hang up.
                    linger.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                handover::Event::Aborted(why) => {
                    warn!(reason = %why, "hand-over aborted; serving on");
                    outgoing.answer(Reply::error(format!("upgrade aborted: {why}")));
                }
            },
            () = &mut linger, if handed.is_some() => break,
            () = &mut shutdown, if handed.is_none() => break,
        }
    }

    // Admin connections close first: a Docker shim whose daemon goes away serves its port
    // itself, so its clients see no gap while this process drains.
    admin_task.abort();
    let _ = (&mut admin_task).await;
    if handed.is_none() {
        let _ = std::fs::remove_file(&admin_path);
    }
    drop(listeners);
    // After a hand-over systemd hears from the successor only: a STOPPING=1 from here would
    // read as the unit stopping.
    let notifier = if handed.is_some() {
        Notifier::none()
    } else {
        notifier
    };
    stop(&state, service.config.drain_timeout, &notifier).await;
    background.abort_all();
    info!("berth stopped");
    Ok(if handed.is_some() {
        Ended::HandedOver
    } else {
        Ended::Stopped
    })
}

/// Copies of the daemon's own listeners, for a successor.
struct Listeners {
    admin: Option<OwnedFd>,
    metrics: Option<OwnedFd>,
}

/// `berth forward` and a standalone `berth-docker-proxy`: serves one mapping on `bound` in
/// the foreground until `shutdown`, then drains for `drain` and resets the rest. Kernel mode
/// that cannot map the port is an error here.
pub async fn forward(
    spec: Spec,
    bound: Bound,
    mut kernel: Kernel,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let name = spec.name.clone();
    let prepared = kernel.prepare(&[&spec]).await?;
    let running =
        Running::start(spec, CONFIG_OWNER.into(), bound, None, &prepared).map_err(|source| {
            ServiceError::Start {
                name: name.clone(),
                source,
            }
        })?;
    drop(prepared);
    if let Some(source) = running.kernel_error.clone() {
        return Err(ServiceError::Kernel { name, source });
    }
    let mut state = State::default();
    state.active.insert(name, running);
    let state = Mutex::new(state);
    shutdown.await;
    stop(&state, drain, &Notifier::from_env()).await;
    Ok(())
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn log_reload(reply: &Reply) {
    if reply.ok {
        info!("reloaded: {}", reply.message);
    } else {
        error!(
            "reload refused, the running configuration stays: {}",
            reply.message
        );
    }
}

impl Service {
    /// What a successor takes over: the socket of every mapping this daemon binds (those of
    /// the file and the persistent runtime ones; a Docker shim's lease goes back to its
    /// shim when this daemon goes, and comes to the successor from there), and its own
    /// admin and metrics listeners.
    fn handover_sockets(&self, own: &Listeners) -> Vec<(String, OwnedFd)> {
        let st = lock(&self.state);
        let mut out: Vec<(String, OwnedFd)> = st
            .active
            .values()
            .filter(|r| !st.leases.contains_key(&r.spec.name))
            .filter_map(|r| Some((r.spec.name.clone(), r.handover().ok()?)))
            .collect();
        for (name, fd) in [
            (handover::ADMIN, &own.admin),
            (handover::METRICS, &own.metrics),
        ] {
            if let Some(fd) = fd.as_ref().and_then(|f| f.try_clone().ok()) {
                out.push((name.to_owned(), fd));
            }
        }
        out
    }

    /// Answers one admin request. Removal answers once the socket is closed, without holding
    /// up the loop.
    async fn call(
        &mut self,
        call: Call,
        socket: Option<OwnedFd>,
        conn: u64,
        reply: tokio::sync::oneshot::Sender<Reply>,
        notifier: &Notifier,
    ) {
        let answer = match call {
            Call::Status | Call::List => Reply::ok("", lock(&self.state).rows()),
            // The service loop and the connection take these before they come here.
            Call::Upgrade | Call::Handover => Reply::error("not here"),
            Call::Reload => {
                let r = self.reload(notifier).await;
                log_reload(&r);
                r
            }
            Call::Add {
                mapping,
                owner,
                lease,
                persist,
            } => {
                let owner = owner.unwrap_or_else(|| "api".into());
                let r = if persist && socket.is_some() {
                    Reply::error(
                        "socket: a persistent mapping takes no socket (the daemon binds it, \
                         now and after a restart)",
                    )
                } else {
                    let holder = if persist {
                        Holder::Persist
                    } else if lease {
                        Holder::Lease(conn)
                    } else {
                        Holder::None
                    };
                    self.add(mapping, owner, holder, socket).await
                };
                if !r.ok {
                    warn!(reason = %r.message, "runtime mapping refused");
                }
                r
            }
            Call::Remove {
                name: None,
                owner: Some(owner),
            } => {
                let gone = self.remove_owner(&owner);
                tokio::spawn(async move {
                    let n = gone.await;
                    info!(%owner, mappings = n, "runtime mappings of an owner removed");
                    let _ = reply.send(Reply::ok(
                        format!("removed {n} mapping(s) of {owner}; their connections, flows and conntrack entries are gone"),
                        Vec::new(),
                    ));
                });
                return;
            }
            Call::Remove {
                name: Some(_),
                owner: Some(_),
            }
            | Call::Remove {
                name: None,
                owner: None,
            } => Reply::error("remove: give a name or an owner, not both"),
            Call::Remove {
                name: Some(name),
                owner: None,
            } => match self.remove(&name) {
                Ok(released) => {
                    tokio::spawn(async move {
                        released.await;
                        info!(mapping = %name, "runtime mapping removed");
                        let _ = reply.send(Reply::ok(
                            format!("removed {name}; its socket is closed"),
                            Vec::new(),
                        ));
                    });
                    return;
                }
                Err(why) => Reply::error(why),
            },
        };
        let _ = reply.send(answer);
    }

    /// Serves the state file's persistent mappings again (after a restart). One that cannot
    /// start (its port taken meanwhile) is logged and forgotten; a file that does not parse
    /// is moved aside.
    async fn restore(&mut self) {
        let saved = match Store::load(self.store.path()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "persistent runtime mappings not restored");
                return;
            }
        };
        let n = saved.len();
        // The store starts as the file: restoring an entry then writes nothing, and the file
        // is written once, for the entries that could not be restored.
        self.store = Store::with(self.store.path().to_owned(), saved.clone());
        let mut forgotten = Vec::new();
        for Saved { owner, mapping } in saved {
            let name = mapping.name.clone().unwrap_or_default();
            let r = self
                .add(Box::new(mapping), owner.clone(), Holder::Persist, None)
                .await;
            if !r.ok {
                error!(mapping = %name, %owner, reason = %r.message, "persistent runtime mapping not restored; forgotten");
                forgotten.push(name);
            }
        }
        let restored = n - forgotten.len();
        if let Err(e) = self.store.remove(forgotten.iter().map(String::as_str)) {
            error!(error = %e, "the state file of persistent runtime mappings is not writable");
        }
        if n > 0 {
            info!(restored, of = n, file = %self.store.path().display(), "persistent runtime mappings restored");
        }
    }

    /// Adds a runtime mapping. A request that fails changes nothing.
    async fn add(
        &mut self,
        draft: Box<Draft>,
        owner: String,
        holder: Holder,
        socket: Option<OwnedFd>,
    ) -> Reply {
        let mut draft = *draft;
        if let Err(why) = api::check_owner(&owner) {
            return Reply::error(why);
        }
        if owner == CONFIG_OWNER {
            return Reply::error(format!(
                "owner {CONFIG_OWNER:?} is the configuration file's; pick another"
            ));
        }
        let spec = {
            let st = lock(&self.state);
            let count = st.runtime().count();
            if count >= self.config.max_runtime_mappings {
                return Reply::error(format!(
                    "the runtime API holds {count} mappings, the most [admin] max_runtime_mappings allows"
                ));
            }
            if draft.name.is_none()
                && let (Ok(proto), Some(Ok(listen))) = (
                    draft.proto.as_deref().unwrap_or("tcp").parse(),
                    draft.listen.as_deref().map(str::parse),
                )
            {
                draft.name = Some(api::generate_name(&owner, proto, listen, |n| {
                    st.active.contains_key(n)
                }));
            }
            let spec = match draft.resolve(&self.config.defaults) {
                Ok(s) => s,
                Err(e) => return Reply::error(format!("mapping: {e}")),
            };
            if st.active.contains_key(&spec.name) {
                return Reply::error(format!(
                    "mapping: name: a mapping named {:?} exists",
                    spec.name
                ));
            }
            let others = st.active.values().map(|m| &m.spec);
            if let Some(why) = config::clash(&spec, others, self.config.metrics_listen) {
                return Reply::error(format!("mapping: listen: {why}"));
            }
            spec
        };
        // A persistent mapping restored in a hand-over comes with its predecessor's socket.
        let socket = socket.or_else(|| {
            (holder == Holder::Persist)
                .then(|| self.inherited.remove(&spec.name))
                .flatten()
        });
        let bound = match socket {
            Some(fd) => Bound::adopt(fd, &spec).map_err(|e| format!("socket: {e}")),
            None => Bound::bind(&spec).map_err(|e| format!("mapping: listen: {e}")),
        };
        let bound = match bound {
            Ok(b) => b,
            Err(why) => return Reply::error(why),
        };
        let prepared = match self.kernel.prepare(&[&spec]).await {
            Ok(p) => p,
            Err(e) => return Reply::error(e.to_string()),
        };
        let name = spec.name.clone();
        let running = match Running::start(spec, owner.clone(), bound, None, &prepared) {
            Ok(r) => r,
            Err(e) => return Reply::error(format!("mapping {name:?}: {e}")),
        };
        if holder == Holder::Persist {
            let saved = Saved {
                owner: owner.clone(),
                mapping: Draft {
                    name: Some(name.clone()),
                    ..draft
                },
            };
            if let Err(e) = self.store.insert(name.clone(), saved) {
                // It would not survive a restart: refuse rather than promise that.
                drop(running);
                return Reply::error(format!("mapping {name:?}: {e}"));
            }
        }
        let row = Row::of(&running);
        let mut st = lock(&self.state);
        st.active.insert(name.clone(), running);
        if let Holder::Lease(conn) = holder {
            st.leases.insert(name.clone(), conn);
        }
        info!(mapping = %name, %owner, ?holder, "runtime mapping added");
        Reply::ok(format!("added {name}"), vec![row])
    }

    /// Removes every runtime mapping of `owner` at once, cutting what they still carry (the
    /// owner, a container, is gone). The future resolves, with how many there were, once
    /// their tasks have ended and their kernel-mode entries (conntrack included) are deleted.
    fn remove_owner(&mut self, owner: &str) -> impl Future<Output = usize> + Send + use<> {
        let mut st = lock(&self.state);
        let names: Vec<String> = st
            .runtime()
            .filter(|m| m.owner == owner)
            .map(|m| m.spec.name.clone())
            .collect();
        let mut gone: Vec<Running> = Vec::with_capacity(names.len());
        for name in &names {
            st.leases.remove(name);
            if let Some(mut m) = st.active.remove(name) {
                m.drain();
                m.cut();
                gone.push(m);
            }
        }
        drop(st);
        if let Err(e) = self.store.remove(names.iter().map(String::as_str)) {
            error!(error = %e, %owner, "removed mappings may come back after a restart");
        }
        async move {
            let n = gone.len();
            for m in &mut gone {
                m.finished().await;
            }
            // Dropping them deletes their kernel-mode entries.
            drop(gone);
            n
        }
    }

    /// Starts removing a runtime mapping; the future resolves once its socket is closed.
    fn remove(&mut self, name: &str) -> Result<impl Future<Output = ()> + Send + use<>, String> {
        let mut st = lock(&self.state);
        match st.active.get(name) {
            None => return Err(format!("no mapping named {name:?}")),
            Some(m) if m.owner == CONFIG_OWNER => {
                return Err(format!(
                    "mapping {name:?} comes from the configuration file: remove it there and reload"
                ));
            }
            Some(_) => {}
        }
        if let Err(e) = self.store.remove([name]) {
            error!(error = %e, mapping = %name, "the removed mapping may come back after a restart");
        }
        Ok(st.retire(name).expect("checked above"))
    }

    /// An admin connection closed: the mappings it held as leases go.
    fn closed(&mut self, conn: u64) {
        let mut st = lock(&self.state);
        let held: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, c)| **c == conn)
            .map(|(n, _)| n.clone())
            .collect();
        for name in held {
            info!(mapping = %name, "lease ended (its client went away); removing the mapping");
            drop(st.retire(&name));
        }
    }

    /// Re-reads the file and applies the difference; an invalid file changes nothing.
    async fn reload(&mut self, notifier: &Notifier) -> Reply {
        notifier.reloading();
        let result = match Config::load(&self.path) {
            Ok(new) => self.apply(new).await,
            Err(e) => Err(e.into()),
        };
        let mut st = lock(&self.state);
        let rows = st.rows();
        let summary = st.summary();
        drop(st);
        notifier.ready(&summary);
        match result {
            Ok(message) => Reply::ok(message, rows),
            Err(e) => Reply {
                mappings: rows,
                ..Reply::error(e.to_string())
            },
        }
    }

    /// Makes the file's mappings those of `new`. Unchanged ones are untouched; new and changed
    /// ones start (a changed one on its predecessor's very socket); removed and replaced ones
    /// stop accepting and drain without a deadline. Runtime mappings are left alone, and a
    /// file mapping that would clash with one is refused. A kernel-mode mapping that runs
    /// without kernel mode counts as changed: every reload tries again.
    async fn apply(&mut self, new: Config) -> Result<String, ServiceError> {
        {
            let st = lock(&self.state);
            for m in &new.mappings {
                let err = |why| ServiceError::Conflict {
                    name: m.name.clone(),
                    why,
                };
                if let Some(r) = st.runtime().find(|r| r.spec.name == m.name) {
                    return Err(err(format!(
                        "the name is taken by a mapping added at run time by {}",
                        r.owner
                    )));
                }
                if let Some(why) = config::clash(m, st.runtime().map(|r| &r.spec), None) {
                    return Err(err(format!("listen: {why} (added at run time)")));
                }
            }
        }
        self.kernel
            .configure(new.sockmap, new.dnat_for(&self.admin));
        let plan = {
            let st = lock(&self.state);
            plan::plan(
                st.active
                    .values()
                    .filter(|r| r.owner == CONFIG_OWNER)
                    .map(|r| plan::Current {
                        spec: &r.spec,
                        degraded: r.kernel_error.is_some(),
                    }),
                &new.mappings,
            )
        };
        let start = plan.starting();
        // Kernel mode's netlink lookups are async: done before the state is locked.
        let prepared = self.kernel.prepare(&start).await?;
        let mut st = lock(&self.state);
        st.reap();
        let bound = bind_all(&start, &mut self.inherited, &st)?;
        // Start the new ones first: a replaced mapping's socket is then served without a gap.
        let mut started = Vec::with_capacity(bound.len());
        for (spec, b) in bound {
            let reuse = st.active.get(&spec.name).map(|r| r.counters.clone());
            let name = spec.name.clone();
            let r = Running::start(spec, CONFIG_OWNER.into(), b, reuse, &prepared)
                .map_err(|source| ServiceError::Start { name, source })?;
            started.push(r);
        }
        drop(prepared);
        let replaced = plan.replace.iter().map(|s| s.name.as_str());
        for name in plan.retire.iter().map(String::as_str).chain(replaced) {
            drop(st.retire(name));
        }
        for r in started {
            st.active.insert(r.spec.name.clone(), r);
        }
        drop(st);
        let summary = plan.summary();
        if new.metrics_listen != self.config.metrics_listen
            || new.admin_socket != self.config.admin_socket
            || new.max_runtime_mappings != self.config.max_runtime_mappings
        {
            warn!("[metrics] and [admin] changes take effect at the next restart");
        }
        let (metrics, admin, max) = (
            self.config.metrics_listen,
            self.config.admin_socket.clone(),
            self.config.max_runtime_mappings,
        );
        self.config = Config {
            metrics_listen: metrics,
            admin_socket: admin,
            max_runtime_mappings: max,
            ..new
        };
        Ok(summary)
    }
}

/// Binds (or adopts) a socket for each of `specs`: a socket systemd passed under the
/// mapping's name, else a duplicate of the socket of a running file mapping on the same
/// address (so that a replaced mapping never closes its port), else a fresh bind.
fn bind_all(
    specs: &[&Spec],
    inherited: &mut HashMap<String, OwnedFd>,
    running: &State,
) -> Result<Vec<(Spec, Bound)>, ServiceError> {
    let mut out = Vec::with_capacity(specs.len());
    for &spec in specs {
        let name = spec.name.clone();
        let bound = if !spec.relay {
            Bound::KernelOnly
        } else if let Some(fd) = inherited.remove(&spec.name) {
            Bound::adopt(fd, spec).map_err(|source| ServiceError::Adopt { name, source })?
        } else if let Some(r) = running.active.values().find(|r| {
            // Port 0 means "any free port": only the same mapping's own socket fits.
            r.owner == CONFIG_OWNER
                && r.spec.proto == spec.proto
                && r.spec.listen == spec.listen
                && (spec.listen.get().port() != 0 || r.spec.name == spec.name)
        }) {
            let fd = r.handover().map_err(|source| ServiceError::Handover {
                name: name.clone(),
                source,
            })?;
            Bound::adopt(fd, spec).map_err(|source| ServiceError::Adopt { name, source })?
        } else {
            Bound::bind(spec).map_err(|source| ServiceError::Listen { name, source })?
        };
        out.push((spec.clone(), bound));
    }
    Ok(out)
}

/// The graceful stop: every mapping stops accepting, open connections get `drain` to finish,
/// and the rest are reset.
async fn stop(state: &Mutex<State>, drain: Duration, notifier: &Notifier) {
    let mut all: Vec<Running> = {
        let mut st = lock(state);
        let active = std::mem::take(&mut st.active);
        active
            .into_values()
            .chain(std::mem::take(&mut st.retired))
            .collect()
    };
    let open: u64 = all.iter().map(Running::active).sum();
    notifier.stopping(&format!("draining {open} connections"));
    info!(open, timeout = ?drain, "stopping: draining connections");
    for m in &mut all {
        m.drain();
    }
    let drained = tokio::time::timeout(drain, async {
        for m in &mut all {
            m.finished().await;
        }
    })
    .await;
    if drained.is_err() {
        let left: u64 = all.iter().map(Running::active).sum();
        warn!(
            left,
            "drain timeout reached, resetting the remaining connections"
        );
        for m in &all {
            m.cut();
        }
        for m in &mut all {
            m.finished().await;
        }
    }
}

/// Validates `file` as `berth run` would, without binding anything.
pub fn check(file: &Path) -> Result<Config, ConfigError> {
    Config::load(file)
}

/// The admin socket a program without flags (the Docker shim) uses: `$BERTH_ADMIN_SOCKET`,
/// else the default. `berth`'s subcommands read the same variable through their flags.
pub fn admin_socket() -> PathBuf {
    std::env::var_os(config::ADMIN_SOCKET_ENV)
        .map_or_else(|| config::DEFAULT_ADMIN_SOCKET.into(), PathBuf::from)
}
