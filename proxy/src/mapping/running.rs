//! One mapping being served: its socket, its task, its counters, and the way it stops
//! (drain, then cut).
use std::{io, net::SocketAddr, os::fd::OwnedFd, sync::Arc, time::Duration};

use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{Instrument as _, error, info_span};

use super::{Bound, KernelModeError, ModeChoice, Prepared, Spec};
use crate::{
    addr::Proto,
    dnat::DnatMapping,
    forward::{self, Phase},
    relay::Pump,
    udp,
};

/// A mapping's relay counters.
#[derive(Clone, Debug)]
pub enum RelayCounters {
    Tcp(Arc<forward::Stats>),
    Udp(Arc<udp::Stats>),
}

/// A mapping's live counters: its relay's, and kernel mode's when it is mapped in the kernel.
#[derive(Clone, Debug)]
pub struct Counters {
    pub relay: RelayCounters,
    /// Kernel mode: the counters live in the maps, under the mapping's id.
    pub dnat: Option<Arc<DnatMapping>>,
}

/// A mapping could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("mode sockmap, but the sockmap programs are not loaded")]
    NoSockmap,
    #[error("cannot duplicate the mapping's socket: {0}")]
    Dup(#[source] io::Error),
    /// Without a relay, nothing would serve the port.
    #[error("kernel mode cannot map the port, and the mapping has no relay: {0}")]
    Kernel(#[source] KernelModeError),
}

/// A mapping being served (or, once removed, draining).
#[derive(Debug)]
pub struct Running {
    pub spec: Spec,
    /// Who added it: `config` for the file and `berth forward`, else what the runtime API
    /// client said (`docker`, ...).
    pub owner: String,
    /// How it is served: copy, splice, sockmap, udp, or dnat (kernel mode over a relay).
    pub mode: &'static str,
    /// Where the socket is bound (the port the kernel picked, for port 0).
    pub local: Option<SocketAddr>,
    pub counters: Counters,
    /// Kernel mode was asked for and could not map the port: why. The relay serves it.
    pub kernel_error: Option<KernelModeError>,
    /// A duplicate of the socket, so that a reload can hand it to a replacement without ever
    /// closing the port (no connection is refused in between). Dropped on drain, so that a
    /// removed mapping's port really closes.
    socket: Option<OwnedFd>,
    phase: watch::Sender<Phase>,
    /// Fires once the task has closed its socket (after a drain).
    released: Option<oneshot::Receiver<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts serving `bound`. `reuse` carries the counters of the mapping this one replaces,
    /// so that a reload does not reset the mapping's metrics.
    pub fn start(
        spec: Spec,
        owner: String,
        bound: Bound,
        reuse: Option<Counters>,
        kernel: &Prepared,
    ) -> Result<Self, StartError> {
        let pump = match (spec.proto, spec.mode.relay_mode()) {
            (Proto::Tcp, None) => {
                Pump::Sockmap(kernel.sockmap.clone().ok_or(StartError::NoSockmap)?)
            }
            (Proto::Tcp, Some(_)) if spec.mode == ModeChoice::Auto => match &kernel.sockmap {
                Some(sm) => Pump::Auto(sm.clone(), sm.promote()),
                None => Pump::Splice,
            },
            (_, Some(mode)) => Pump::from(mode),
            (Proto::Udp, None) => Pump::Splice,
        };
        let (dnat, kernel_error) = if spec.mode.is_kernel() {
            let added = kernel.dnat_for(&spec).and_then(|(d, via)| {
                let m = d
                    .add(spec.proto, spec.listen.get(), spec.target.get(), via)
                    .map_err(|e| KernelModeError::Mapping(Arc::new(e)))?;
                tracing::info!(
                    mapping = %spec.name,
                    proto = %spec.proto,
                    listen = %spec.listen,
                    target = %spec.target,
                    interfaces = ?d.interfaces(),
                    cgroup = %d.cgroup().display(),
                    "mapped in kernel mode; the relay serves only what the programs pass through"
                );
                Ok(Arc::new(m))
            });
            match added {
                Ok(m) => (Some(m), None),
                Err(why) if !spec.relay => return Err(StartError::Kernel(why)),
                Err(why) => {
                    error!(mapping = %spec.name, reason = %why, "kernel mode cannot map this port; the relay serves it");
                    (None, Some(why))
                }
            }
        } else {
            (None, None)
        };
        let mode = match (&dnat, spec.proto) {
            (Some(_), _) => "dnat",
            (None, Proto::Udp) => "udp",
            (None, Proto::Tcp) => pump.name(),
        };
        let socket = bound.dup().map_err(StartError::Dup)?;
        let local = bound.local_addr();
        let (phase, rx) = watch::channel(Phase::Serve);
        let (released_tx, released) = oneshot::channel();
        let span = info_span!("mapping", name = %spec.name);
        // One task per mapping, its future allocated once (a thousand mappings each hold one).
        let kernel_part = dnat.clone().map(|m| (m, rx.clone()));
        let (relay_counters, task) = match bound {
            Bound::Tcp(listener) => {
                let stats = match reuse.map(|c| c.relay) {
                    Some(RelayCounters::Tcp(s)) => s,
                    _ => Arc::default(),
                };
                let config = forward::Config {
                    target: spec.target,
                    pump,
                    connect_timeout: spec.connect_timeout,
                    max_connections: spec.max_connections,
                    max_connections_per_client: spec.max_connections_per_client,
                    idle_timeout: spec.tcp_idle_timeout,
                    drain_timeout: Duration::ZERO,
                };
                let release = move || {
                    let _ = released_tx.send(());
                };
                let serve = forward::serve(listener, config, stats.clone(), rx.clone(), release);
                let task = spawn_serving(logged(serve), kernel_part, span);
                (RelayCounters::Tcp(stats), task)
            }
            Bound::Udp(socket) => {
                let stats = match reuse.map(|c| c.relay) {
                    Some(RelayCounters::Udp(s)) => s,
                    _ => Arc::default(),
                };
                let config = udp::Config {
                    target: spec.target,
                    idle_timeout: spec.udp_idle_timeout,
                    max_flows: spec.max_flows,
                    batch: spec.udp_batch,
                    offload: spec.udp_offload,
                };
                let mut stop = rx.clone();
                let stop = async move {
                    let _ = stop.wait_for(|p| *p != Phase::Serve).await;
                };
                let run = udp::run(socket, config, stats.clone(), stop);
                let serve = async move {
                    logged(run).await;
                    let _ = released_tx.send(());
                };
                let task = spawn_serving(serve, kernel_part, span);
                (RelayCounters::Udp(stats), task)
            }
            Bound::KernelOnly => {
                // No relay: the counters stay at zero, the task is kernel mode's drain.
                let counters = match (reuse.map(|c| c.relay), spec.proto) {
                    (Some(c), _) => c,
                    (None, Proto::Tcp) => RelayCounters::Tcp(Arc::default()),
                    (None, Proto::Udp) => RelayCounters::Udp(Arc::default()),
                };
                let mut stop = rx.clone();
                let serve = async move {
                    let _ = stop.wait_for(|p| *p != Phase::Serve).await;
                    let _ = released_tx.send(());
                };
                (counters, spawn_serving(serve, kernel_part, span))
            }
        };
        Ok(Self {
            spec,
            owner,
            mode,
            local,
            counters: Counters {
                relay: relay_counters,
                dnat,
            },
            kernel_error,
            socket,
            phase,
            released: Some(released),
            task,
        })
    }

    /// A duplicate of the mapping's socket, for its replacement.
    pub fn handover(&self) -> io::Result<OwnedFd> {
        match &self.socket {
            Some(s) => s.try_clone(),
            None if !self.spec.relay => Err(io::Error::other("the mapping has no socket")),
            None => Err(io::Error::other(
                "the mapping is draining; its socket is closed",
            )),
        }
    }

    /// Stop accepting (the socket closes); established connections run on.
    pub fn drain(&mut self) {
        self.socket = None;
        self.phase.send_replace(Phase::Drain);
    }

    /// Reset whatever is still open.
    pub fn cut(&self) {
        self.phase.send_replace(Phase::Cut);
    }

    /// Resolves once the mapping has closed its socket (after [`Self::drain`]); the port is
    /// then free unless another process holds the same socket.
    pub fn released(&mut self) -> impl Future<Output = ()> + Send + use<> {
        let rx = self.released.take();
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() != Phase::Serve
    }

    /// Open connections (TCP) or flows (UDP), plus kernel mode's conntrack entries.
    pub fn active(&self) -> u64 {
        let relay = match &self.counters.relay {
            RelayCounters::Tcp(s) => s.snapshot().active,
            RelayCounters::Udp(s) => s.snapshot().flows_active,
        };
        relay
            + self
                .counters
                .dnat
                .as_ref()
                .map_or(0, |m| m.snapshot().conntrack_entries)
    }

    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Spawns a mapping's task: its relay, and kernel mode's drain beside it when it has one.
fn spawn_serving(
    serve: impl Future<Output = ()> + Send + 'static,
    kernel: Option<(Arc<DnatMapping>, watch::Receiver<Phase>)>,
    span: tracing::Span,
) -> JoinHandle<()> {
    match kernel {
        None => tokio::spawn(serve.instrument(span)),
        Some((m, rx)) => tokio::spawn(
            async move {
                tokio::join!(serve, drain_kernel(m, rx));
            }
            .instrument(span),
        ),
    }
}

/// Kernel mode's part of a drain: new flows stop being mapped, and the task waits until the
/// mapped ones have ended (or are cut).
async fn drain_kernel(m: Arc<DnatMapping>, mut rx: watch::Receiver<Phase>) {
    let _ = rx.wait_for(|p| *p != Phase::Serve).await;
    m.drain();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = rx.wait_for(|p| *p == Phase::Cut) => break,
            _ = tick.tick() => if m.snapshot().conntrack_entries == 0 { break },
        }
    }
}

/// Runs a mapping's serving future; an error that stops it is logged.
async fn logged<E: std::fmt::Display>(serve: impl Future<Output = Result<(), E>>) {
    if let Err(e) = serve.await {
        error!(error = %e, "mapping stopped");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}
