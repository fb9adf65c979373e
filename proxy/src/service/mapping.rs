//! One running mapping of the service: its socket, its task and its counters.
use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
};

use socket2::Socket;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
    task::JoinHandle,
};
use tracing::{Instrument as _, error, info_span};

use super::config::MappingSpec;
use crate::{
    addr::Proto,
    dnat::{Dnat, DnatMapping, Route},
    forward::{self, Phase},
    listen::{self, ListenError},
    sockmap::Sockmap,
    udp,
};

/// A mapping's socket, bound (or inherited) but not yet served.
#[derive(Debug)]
pub(crate) enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
    /// Kernel mode: the port is held, never served (see [`listen::reserve`]).
    Reserved(Socket),
}

impl Bound {
    pub(crate) fn bind(spec: &MappingSpec) -> Result<Self, ListenError> {
        if spec.mode.is_kernel() {
            return Ok(Self::Reserved(listen::reserve(spec.proto, spec.listen)?));
        }
        Ok(match spec.proto {
            Proto::Tcp => Self::Tcp(listen::bind_tcp(spec.listen)?),
            Proto::Udp => Self::Udp(listen::bind_udp(spec.listen)?),
        })
    }

    /// Adopts a socket handed over by a running mapping or by systemd, after checking that it
    /// is the right kind and bound where `spec` says.
    pub(crate) fn adopt(fd: OwnedFd, spec: &MappingSpec) -> Result<Self, String> {
        let sock = Socket::from(fd);
        let (want, what) = match spec.proto {
            Proto::Tcp => (socket2::Type::STREAM, "a TCP"),
            Proto::Udp => (socket2::Type::DGRAM, "a UDP"),
        };
        if sock.r#type().ok() != Some(want) {
            return Err(format!("the inherited socket is not {what} socket"));
        }
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        if local != Some(spec.listen.get()) && spec.listen.get().port() != 0 {
            return Err(format!(
                "the inherited socket is bound to {}, the mapping says {}",
                local.map_or_else(|| "nothing".into(), |a| a.to_string()),
                spec.listen
            ));
        }
        let err = |e: io::Error| e.to_string();
        if spec.mode.is_kernel() {
            return Ok(Self::Reserved(sock));
        }
        if spec.proto == Proto::Tcp && !sock.is_listener().unwrap_or(false) {
            sock.listen(4096).map_err(err)?;
        }
        sock.set_nonblocking(true).map_err(err)?;
        sock.set_cloexec(true).map_err(err)?;
        Ok(match spec.proto {
            Proto::Tcp => Self::Tcp(TcpListener::from_std(sock.into()).map_err(err)?),
            Proto::Udp => Self::Udp(UdpSocket::from_std(sock.into()).map_err(err)?),
        })
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Udp(s) => s.local_addr().ok(),
            Self::Reserved(s) => s.local_addr().ok().and_then(|a| a.as_socket()),
        }
    }

    fn dup(&self) -> io::Result<OwnedFd> {
        match self {
            Self::Tcp(l) => l.as_fd().try_clone_to_owned(),
            Self::Udp(s) => s.as_fd().try_clone_to_owned(),
            Self::Reserved(s) => s.as_fd().try_clone_to_owned(),
        }
    }
}

/// A mapping's live counters.
#[derive(Clone, Debug)]
pub(crate) enum Counters {
    Tcp(Arc<forward::Stats>),
    Udp(Arc<udp::Stats>),
    /// Kernel mode: the counters live in the maps, under the mapping's id.
    Dnat(Arc<DnatMapping>),
}

/// A mapping being served (or, once retired by a reload, draining).
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) spec: MappingSpec,
    /// The mode in use (`auto` resolved): copy, splice, sockmap, or udp.
    pub(crate) mode: &'static str,
    /// Where the socket is bound (the port the kernel picked, for port 0).
    pub(crate) local: Option<std::net::SocketAddr>,
    pub(crate) counters: Counters,
    /// A duplicate of the socket, so that a reload can hand it to a replacement without ever
    /// closing the port (no connection is refused in between). Dropped on drain, so that a
    /// removed mapping's port really closes.
    socket: Option<OwnedFd>,
    phase: watch::Sender<Phase>,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts serving `bound`. `reuse` carries the counters of the mapping this one replaces,
    /// so that a reload does not reset the mapping's metrics.
    pub(crate) fn start(
        spec: MappingSpec,
        bound: Bound,
        reuse: Option<Counters>,
        sockmap: Option<&Arc<Sockmap>>,
        dnat: Option<(&Arc<Dnat>, &Route)>,
    ) -> io::Result<Self> {
        if let Bound::Reserved(reserved) = bound {
            let (dnat, via) =
                dnat.ok_or_else(|| io::Error::other("mode dnat, but kernel mode is not loaded"))?;
            return Self::start_dnat(spec, reserved, dnat, via);
        }
        let mode = match spec.proto {
            Proto::Tcp => spec.mode.tcp_mode(),
            Proto::Udp => crate::relay::Mode::Splice,
        };
        if mode == crate::relay::Mode::Sockmap && sockmap.is_none() {
            return Err(io::Error::other(
                "mode sockmap, but the sockmap programs are not loaded",
            ));
        }
        let mode_name = match spec.proto {
            Proto::Tcp => mode.as_str(),
            Proto::Udp => "udp",
        };
        let socket = bound.dup()?;
        let local = bound.local_addr();
        let (phase, rx) = watch::channel(Phase::Serve);
        let span = info_span!("mapping", name = %spec.name);
        let (counters, task) = match bound {
            Bound::Tcp(listener) => {
                let stats = match reuse {
                    Some(Counters::Tcp(s)) => s,
                    _ => Arc::default(),
                };
                let config = forward::Config {
                    target: spec.target,
                    mode,
                    connect_timeout: spec.connect_timeout,
                    max_connections: spec.max_connections,
                    drain_timeout: std::time::Duration::ZERO,
                    sockmap: sockmap.cloned(),
                };
                let serve = forward::serve(listener, config, stats.clone(), rx);
                (Counters::Tcp(stats), spawn_logged(serve, span))
            }
            Bound::Reserved(_) => unreachable!("handled above"),
            Bound::Udp(socket) => {
                let stats = match reuse {
                    Some(Counters::Udp(s)) => s,
                    _ => Arc::default(),
                };
                let config = udp::Config {
                    target: spec.target,
                    idle_timeout: spec.udp_idle_timeout,
                    max_flows: spec.max_flows,
                    batch: spec.udp_batch,
                };
                let mut rx = rx;
                let stop = async move {
                    let _ = rx.wait_for(|p| *p != Phase::Serve).await;
                };
                let run = udp::run(socket, config, stats.clone(), stop);
                (Counters::Udp(stats), spawn_logged(run, span))
            }
        };
        Ok(Self {
            spec,
            mode: mode_name,
            local,
            counters,
            socket: Some(socket),
            phase,
            task,
        })
    }

    /// Kernel mode: the programs serve the port; the task only holds the port until the
    /// mapping drains, then waits for its flows to end (or to be cut).
    fn start_dnat(
        spec: MappingSpec,
        reserved: Socket,
        dnat: &Arc<Dnat>,
        via: &Route,
    ) -> io::Result<Self> {
        let local = reserved.local_addr().ok().and_then(|a| a.as_socket());
        let socket = reserved.as_fd().try_clone_to_owned()?;
        let mapping = dnat
            .add(spec.proto, spec.listen.get(), spec.target.get(), via)
            .map(Arc::new)
            .map_err(io::Error::other)?;
        let (phase, mut rx) = watch::channel(Phase::Serve);
        let m = mapping.clone();
        let span = info_span!("mapping", name = %spec.name);
        let task = tokio::spawn(
            async move {
                let _ = rx.wait_for(|p| *p != Phase::Serve).await;
                m.drain();
                drop(reserved);
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
                loop {
                    tokio::select! {
                        _ = rx.wait_for(|p| *p == Phase::Cut) => break,
                        _ = tick.tick() => if m.snapshot().conntrack_entries == 0 { break },
                    }
                }
            }
            .instrument(span),
        );
        Ok(Self {
            spec,
            mode: "dnat",
            local,
            counters: Counters::Dnat(mapping),
            socket: Some(socket),
            phase,
            task,
        })
    }

    /// A duplicate of the mapping's socket, for its replacement.
    pub(crate) fn handover(&self) -> io::Result<OwnedFd> {
        match &self.socket {
            Some(s) => s.try_clone(),
            None => Err(io::Error::other(
                "the mapping is draining; its socket is closed",
            )),
        }
    }

    /// Stop accepting (the socket closes); established connections run on.
    pub(crate) fn drain(&mut self) {
        self.socket = None;
        self.phase.send_replace(Phase::Drain);
    }

    /// Reset whatever is still open.
    pub(crate) fn cut(&self) {
        self.phase.send_replace(Phase::Cut);
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub(crate) fn is_draining(&self) -> bool {
        *self.phase.borrow() != Phase::Serve
    }

    /// Open connections (TCP) or flows (UDP).
    pub(crate) fn active(&self) -> u64 {
        match &self.counters {
            Counters::Tcp(s) => s.snapshot().active,
            Counters::Udp(s) => s.snapshot().flows_active,
            Counters::Dnat(m) => m.snapshot().conntrack_entries,
        }
    }

    pub(crate) async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Runs a mapping's serving future in `span`; an error that stops it is logged.
fn spawn_logged<E: std::fmt::Display>(
    serve: impl Future<Output = Result<(), E>> + Send + 'static,
    span: tracing::Span,
) -> JoinHandle<()> {
    tokio::spawn(
        async move {
            if let Err(e) = serve.await {
                error!(error = %e, "mapping stopped");
            }
        }
        .instrument(span),
    )
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}
