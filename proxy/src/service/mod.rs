//! `berth run`: one process serving every mapping of a configuration file, with live reload,
//! an admin socket, Prometheus metrics and systemd integration.
//!
//! - [`config`]: the file, validated as a whole before anything is bound.
//! - `mapping`: one running mapping (socket, task, counters).
//! - [`admin`]: the Unix socket behind `berth status` and `berth reload`.
//! - `metrics`: the `/metrics` endpoint.
//! - `systemd`: notify, watchdog and socket activation, as wire protocols.
//! - [`status`]: the status table.

pub mod admin;
pub mod config;
mod mapping;
mod metrics;
pub mod status;
mod systemd;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
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
    admin::{AdminError, Reply, Request},
    config::{Config, ConfigError, MappingSpec},
    mapping::{Bound, Running},
    status::Row,
    systemd::Notifier,
};
use crate::{
    dnat::{Dnat, Route},
    listen::ListenError,
    sockmap::Sockmap,
};

/// `berth run` could not start; nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mapping {name:?}: {source}")]
    Listen { name: String, source: ListenError },
    #[error("mapping {name:?}: {why}")]
    Socket { name: String, why: String },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
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
}

/// The mappings being served, and those retired by a reload that are still draining.
#[derive(Debug, Default)]
pub(crate) struct State {
    active: BTreeMap<String, Running>,
    retired: Vec<Running>,
    /// Kernel-mode mappings that could not start (a missing kernel feature, no route to
    /// the container), with the reason; retried at every reload. The others run on.
    failed: BTreeMap<String, (MappingSpec, String)>,
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
        let mut rows: Vec<Row> = self.all().map(Row::of).collect();
        rows.extend(
            self.failed
                .values()
                .map(|(spec, why)| Row::failed(spec, why)),
        );
        rows
    }

    /// Kernel-mode mappings that could not start, with the reason.
    pub(crate) fn failed(&self) -> impl Iterator<Item = &(MappingSpec, String)> {
        self.failed.values()
    }

    fn summary(&self) -> String {
        let tcp = self
            .active
            .values()
            .filter(|m| m.spec.proto == crate::addr::Proto::Tcp)
            .count();
        let udp = self.active.len() - tcp;
        let open: u64 = self.all().map(Running::active).sum();
        let mut s = format!(
            "{} mappings ({tcp} tcp, {udp} udp), {open} open",
            self.active.len()
        );
        if !self.retired.is_empty() {
            s.push_str(&format!(", {} draining", self.retired.len()));
        }
        if !self.failed.is_empty() {
            s.push_str(&format!(", {} failed", self.failed.len()));
        }
        s
    }
}

/// Serves `opts.config` until SIGTERM or SIGINT, then drains.
pub async fn run(opts: Options) -> Result<(), ServiceError> {
    let config = Config::load(&opts.config)?;
    let admin_path = opts
        .admin_socket
        .clone()
        .unwrap_or_else(|| config.admin_socket.clone());
    let notifier = Notifier::from_env();
    let mut inherited = systemd::listen_fds();
    if !inherited.is_empty() {
        let names: Vec<&String> = inherited.keys().collect();
        info!(sockets = ?names, "sockets passed by systemd");
    }
    // Everything is bound before anything starts: a bad mapping leaves nothing half-running.
    let specs: Vec<&MappingSpec> = config.mappings.iter().collect();
    let bound = bind_all(&specs, &mut inherited, &State::default())?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            Some(
                crate::listen::bind_tcp(addr.into()).map_err(|e| ServiceError::Metrics {
                    addr,
                    source: io::Error::other(e.to_string()),
                })?,
            )
        }
        None => None,
    };
    let admin_listener = admin::bind(&admin_path)?;
    let mut kernel = Kernel::default();
    kernel.ensure(&config)?;
    let routes = kernel.dnat_routes_for(&config).await;
    let mut hup = signal(SignalKind::hangup()).map_err(ServiceError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;

    let state = Arc::new(Mutex::new(State::default()));
    {
        let mut st = lock(&state);
        for (spec, b) in bound {
            let name = spec.name.clone();
            if let Some(running) = start_one(&mut st, spec, b, None, &kernel, &routes)? {
                st.active.insert(name, running);
            }
        }
    }
    // The mappings hold kernel mode now; with none, it unloads here.
    drop(routes);
    let mut background = tokio::task::JoinSet::new();
    if let Some(l) = metrics_listener {
        background.spawn(metrics::serve(l, metrics::registry(state.clone())));
    }
    let (requests, mut admin_rx) = mpsc::channel(16);
    background.spawn(admin::serve(admin_listener, requests));
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
    info!(config = %opts.config.display(), admin = %admin_path.display(), "berth running: {summary}");
    notifier.ready(&summary);

    let mut current = config;
    // Finished retired mappings are dropped promptly: a kernel-mode one holds the programs.
    let mut reap = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = reap.tick() => lock(&state).reap(),
            _ = hup.recv() => {
                let reply = reload(&opts.config, &mut current, &state, &mut inherited, &notifier, &mut kernel).await;
                log_reload(&reply);
            }
            Some(req) = admin_rx.recv() => match req {
                Request::Status(tx) => {
                    let rows = lock(&state).rows();
                    let _ = tx.send(Reply { ok: true, message: String::new(), mappings: rows });
                }
                Request::Reload(tx) => {
                    let reply = reload(&opts.config, &mut current, &state, &mut inherited, &notifier, &mut kernel).await;
                    log_reload(&reply);
                    let _ = tx.send(reply);
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    stop(&state, current.drain_timeout, &notifier).await;
    background.abort_all();
    let _ = std::fs::remove_file(&admin_path);
    info!("berth stopped");
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

/// Binds (or adopts) a socket for each of `specs`: a socket systemd passed under the
/// mapping's name, else a duplicate of the socket of a running mapping on the same address
/// (so that a replaced mapping never closes its port), else a fresh bind.
fn bind_all(
    specs: &[&MappingSpec],
    inherited: &mut HashMap<String, OwnedFd>,
    running: &State,
) -> Result<Vec<(MappingSpec, Bound)>, ServiceError> {
    let mut out = Vec::with_capacity(specs.len());
    for &spec in specs {
        let socket_err = |why: String| ServiceError::Socket {
            name: spec.name.clone(),
            why,
        };
        let bound = if let Some(fd) = inherited.remove(&spec.name) {
            Bound::adopt(fd, spec).map_err(socket_err)?
        } else if let Some(r) = running.active.values().find(|r| {
            // Port 0 means "any free port": only the same mapping's own socket fits.
            r.spec.proto == spec.proto
                && r.spec.listen == spec.listen
                && (spec.listen.get().port() != 0 || r.spec.name == spec.name)
        }) {
            let fd = r.handover().map_err(|e| socket_err(e.to_string()))?;
            Bound::adopt(fd, spec).map_err(socket_err)?
        } else {
            Bound::bind(spec).map_err(|source| ServiceError::Listen {
                name: spec.name.clone(),
                source,
            })?
        };
        out.push((spec.clone(), bound));
    }
    Ok(out)
}

/// Re-reads the file and applies the difference. Unchanged mappings are untouched; new and
/// changed ones start (a changed one on its predecessor's very socket); removed and replaced
/// ones stop accepting and drain without a deadline. An invalid file changes nothing.
async fn reload(
    path: &Path,
    current: &mut Config,
    state: &Mutex<State>,
    inherited: &mut HashMap<String, OwnedFd>,
    notifier: &Notifier,
    kernel: &mut Kernel,
) -> Reply {
    notifier.reloading();
    let result = apply(path, current, state, inherited, kernel).await;
    let mut st = lock(state);
    let rows = st.rows();
    let summary = st.summary();
    drop(st);
    notifier.ready(&summary);
    match result {
        Ok(message) => Reply {
            ok: true,
            message,
            mappings: rows,
        },
        Err(e) => Reply {
            ok: false,
            message: e.to_string(),
            mappings: rows,
        },
    }
}

async fn apply(
    path: &Path,
    current: &mut Config,
    state: &Mutex<State>,
    inherited: &mut HashMap<String, OwnedFd>,
    kernel: &mut Kernel,
) -> Result<String, ServiceError> {
    let new = Config::load(path)?;
    kernel.ensure(&new)?;
    // Kernel mode's netlink lookups are async: done before the state is locked.
    let routes = kernel.dnat_routes_for(&new).await;
    let mut st = lock(state);
    st.reap();
    st.failed.clear();
    let keep: HashSet<String> = new
        .mappings
        .iter()
        .filter(|m| st.active.get(&m.name).is_some_and(|r| r.spec == **m))
        .map(|m| m.name.clone())
        .collect();
    let start: Vec<&MappingSpec> = new
        .mappings
        .iter()
        .filter(|m| !keep.contains(&m.name))
        .collect();
    let bound = bind_all(&start, inherited, &st)?;
    let changed = start
        .iter()
        .filter(|m| st.active.contains_key(&m.name))
        .count();
    let retire: Vec<String> = st
        .active
        .keys()
        .filter(|n| !keep.contains(*n))
        .cloned()
        .collect();
    let removed = retire.len() - changed;
    let added = start.len() - changed;
    // Start the new ones first: a replaced mapping's socket is then served without a gap.
    let mut started = Vec::with_capacity(bound.len());
    for (spec, b) in bound {
        let reuse = st.active.get(&spec.name).map(|r| r.counters.clone());
        if let Some(r) = start_one(&mut st, spec, b, reuse, kernel, &routes)? {
            started.push(r);
        }
    }
    for name in retire {
        if let Some(mut r) = st.active.remove(&name) {
            r.drain();
            st.retired.push(r);
        }
    }
    for r in started {
        st.active.insert(r.spec.name.clone(), r);
    }
    if new.metrics_listen != current.metrics_listen || new.admin_socket != current.admin_socket {
        warn!("[metrics] and [admin] changes take effect at the next restart");
    }
    *current = new;
    Ok(format!(
        "{} unchanged, {added} added, {changed} changed, {removed} removed",
        keep.len()
    ))
}

/// Starts one bound mapping. A kernel-mode mapping that cannot start is recorded in
/// `st.failed` (and logged) instead: the other mappings run on.
fn start_one(
    st: &mut State,
    spec: MappingSpec,
    bound: Bound,
    reuse: Option<mapping::Counters>,
    kernel: &Kernel,
    routes: &DnatRoutes,
) -> Result<Option<Running>, ServiceError> {
    let name = spec.name.clone();
    if !spec.mode.is_kernel() {
        return Running::start(spec, bound, reuse, kernel.sockmap.as_ref(), None)
            .map(Some)
            .map_err(|e| ServiceError::Socket {
                name,
                why: e.to_string(),
            });
    }
    let started = match (&routes.dnat, routes.routes.get(&name)) {
        (Err(why), _) => Err(why.clone()),
        (Ok(_), None) => Err("no route was looked up".to_owned()),
        (Ok(_), Some(Err(why))) => Err(why.clone()),
        (Ok(dnat), Some(Ok(via))) => {
            Running::start(spec.clone(), bound, reuse, None, Some((dnat, via)))
                .map_err(|e| e.to_string())
        }
    };
    match started {
        Ok(r) => Ok(Some(r)),
        Err(why) => {
            error!(mapping = %name, reason = %why, "kernel-mode mapping not started; the others run on");
            st.failed.insert(name, (spec, why));
            Ok(None)
        }
    }
}

/// Kernel mode for one start or reload: the loaded programs (or why they are not), and the
/// route to each kernel-mode mapping's container.
struct DnatRoutes {
    dnat: Result<Arc<Dnat>, String>,
    routes: HashMap<String, Result<Route, String>>,
}

/// The kernel programs the mappings share, loaded on first need.
#[derive(Debug, Default)]
struct Kernel {
    sockmap: Option<Arc<Sockmap>>,
    /// Why loading failed, once tried: `auto` mappings then splice (logged once).
    sockmap_error: Option<String>,
    /// Kernel mode, while a mapping uses it: the mappings hold the strong handles, so the
    /// programs are detached as soon as the last kernel-mode mapping is gone.
    dnat: std::sync::Weak<Dnat>,
}

impl Kernel {
    /// Loads the sockmap programs if a TCP mapping of `config` asks for them; if they cannot
    /// load, that mapping is an error (with the reason) and nothing changes.
    fn ensure(&mut self, config: &Config) -> Result<(), ServiceError> {
        let tcp = || {
            config
                .mappings
                .iter()
                .filter(|m| m.proto == crate::addr::Proto::Tcp)
        };
        if self.sockmap.is_none()
            && self.sockmap_error.is_none()
            && tcp().any(|m| m.mode.wants_sockmap())
        {
            match Sockmap::load(config.sockmap) {
                Ok(sm) => {
                    info!(
                        max_entries = config.sockmap.max_entries,
                        send_buffer = config.sockmap.send_buffer,
                        "sockmap programs loaded"
                    );
                    self.sockmap = Some(sm);
                }
                Err(e) => {
                    warn!(reason = %e, "sockmap mode unavailable");
                    self.sockmap_error = Some(e.to_string());
                }
            }
        }
        if let (Some(why), Some(m)) = (
            &self.sockmap_error,
            tcp().find(|m| m.mode == config::ModeChoice::Sockmap),
        ) {
            return Err(ServiceError::Socket {
                name: m.name.clone(),
                why: format!("mode sockmap: {why}"),
            });
        }
        Ok(())
    }
}

impl Kernel {
    /// Loads kernel mode if a mapping of `config` asks for it, and looks up the route to each
    /// such mapping's container.
    async fn dnat_routes_for(&mut self, config: &Config) -> DnatRoutes {
        let wanted: Vec<&MappingSpec> = config
            .mappings
            .iter()
            .filter(|m| m.mode.is_kernel())
            .collect();
        let mut out = DnatRoutes {
            dnat: Err("not needed".into()),
            routes: HashMap::new(),
        };
        if wanted.is_empty() {
            return out;
        }
        out.dnat = match self.dnat.upgrade() {
            Some(d) => {
                if d.settings() != &config.dnat {
                    warn!(
                        "[dnat] changes take effect once no kernel-mode mapping is left, or at the next restart"
                    );
                }
                Ok(d)
            }
            None => match Dnat::start(config.dnat.clone()).await {
                Ok(d) => {
                    self.dnat = Arc::downgrade(&d);
                    Ok(d)
                }
                Err(e) => {
                    warn!(reason = %e, "kernel mode unavailable");
                    Err(format!("kernel mode unavailable: {e}"))
                }
            },
        };
        if out.dnat.is_ok() {
            for m in wanted {
                let route = Dnat::route(m.target.get()).await.map_err(|e| e.to_string());
                out.routes.insert(m.name.clone(), route);
            }
        }
        out
    }
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
