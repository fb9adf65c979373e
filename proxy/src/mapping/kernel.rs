//! The kernel programs that mappings share: the sockmap relay, loaded on first need and kept,
//! and kernel mode, loaded while a mapping uses it. One place loads both, whichever front end
//! started the mapping.
use std::{
    collections::HashMap,
    sync::{Arc, Weak},
};

use tracing::{info, warn};

use super::{ModeChoice, Spec};
use crate::{
    addr::Proto,
    dnat::{self, Dnat, DnatError, Route, pin::PinDir},
    sockmap::{self, Sockmap},
};

/// A mapping asked for a kernel feature by name and it is not there.
#[derive(Debug, thiserror::Error)]
#[error("mapping {name:?}: mode sockmap: {why}")]
pub struct SockmapUnavailable {
    pub name: String,
    pub why: String,
}

/// Kernel mode cannot map a mapping's port (its relay serves it). Shared: one failure to load
/// is every kernel-mode mapping's reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KernelModeError {
    #[error("kernel mode unavailable: {0}")]
    Unavailable(#[source] Arc<DnatError>),
    #[error(transparent)]
    Mapping(Arc<DnatError>),
    #[error("no route to the target was looked up")]
    NoRoute,
}

/// The kernel programs of one process.
#[derive(Debug)]
pub struct Kernel {
    sockmap_settings: sockmap::Settings,
    dnat_settings: dnat::Settings,
    sockmap: Option<Arc<Sockmap>>,
    /// Why loading failed, once tried (logged once; asked again only by a restart).
    sockmap_error: Option<String>,
    /// Kernel mode, while a mapping uses it: the mappings hold the strong handles, so the
    /// programs are detached as soon as the last kernel-mode mapping is gone.
    dnat: Weak<Dnat>,
    /// Kernel mode's pinned state stays when it goes (a hand-over under way).
    leave_pinned: bool,
}

/// What a batch of mappings about to start needs from the kernel, looked up before they start
/// (the netlink lookups are async; starting is not).
#[derive(Debug)]
pub struct Prepared {
    pub(crate) sockmap: Option<Arc<Sockmap>>,
    dnat: Result<Arc<Dnat>, KernelModeError>,
    routes: HashMap<String, Result<Route, KernelModeError>>,
}

impl Prepared {
    /// Kernel mode for `spec`: the programs and the route to its container, or why not.
    pub(crate) fn dnat_for(&self, spec: &Spec) -> Result<(&Arc<Dnat>, &Route), KernelModeError> {
        let dnat = self.dnat.as_ref().map_err(Clone::clone)?;
        match self.routes.get(&spec.name) {
            Some(Ok(route)) => Ok((dnat, route)),
            Some(Err(e)) => Err(e.clone()),
            None => Err(KernelModeError::NoRoute),
        }
    }

    /// Nothing loaded: what relay-only mappings need.
    pub fn none() -> Self {
        Self {
            sockmap: None,
            dnat: Err(KernelModeError::NoRoute),
            routes: HashMap::new(),
        }
    }
}

impl Kernel {
    pub fn new(sockmap_settings: sockmap::Settings, dnat_settings: dnat::Settings) -> Self {
        Self {
            sockmap_settings,
            dnat_settings,
            sockmap: None,
            sockmap_error: None,
            dnat: Weak::new(),
            leave_pinned: false,
        }
    }

    /// Never loads the sockmap programs: `auto` splices alone. For a standalone
    /// berth-docker-proxy, one process per published port, where a set of programs and maps
    /// per port would cost more than it saves; the daemon is where `auto` promotes.
    #[must_use]
    pub fn relay_only(mut self) -> Self {
        self.sockmap_error = Some("this process relays only (a standalone shim)".into());
        self
    }

    /// New settings (a reload). Loaded programs keep theirs: sockmap sizes apply at the next
    /// restart, kernel mode's once no kernel-mode mapping is left.
    pub fn configure(
        &mut self,
        sockmap_settings: sockmap::Settings,
        dnat_settings: dnat::Settings,
    ) {
        if self.sockmap.is_some() && sockmap_settings != self.sockmap_settings {
            warn!("sockmap size changes take effect at the next restart");
        }
        if self.dnat.strong_count() > 0 && dnat_settings != self.dnat_settings {
            warn!(
                "[dnat] changes take effect once no kernel-mode mapping is left, or at the next restart"
            );
        }
        self.sockmap_settings = sockmap_settings;
        self.dnat_settings = dnat_settings;
    }

    /// Whether kernel mode's pinned maps and links stay when it goes, with every mapping's
    /// entries: while a successor takes over from this process, or while this process takes
    /// over and its predecessor still counts on them.
    pub fn leave_pinned(&mut self, leave: bool) {
        self.leave_pinned = leave;
        if let Some(d) = self.dnat.upgrade() {
            d.leave_pinned(leave);
        }
    }

    /// Ends a start: kernel mode, if it adopted a predecessor's pinned state, deletes what no
    /// mapping took over; without kernel mode, pinned state left by a predecessor (which no
    /// mapping of this process wants) is removed, detaching its programs.
    pub async fn settle(&mut self) {
        if let Some(d) = self.dnat.upgrade() {
            d.settle().await;
            return;
        }
        let Some(pins) = self
            .dnat_settings
            .pin_dir
            .as_deref()
            .and_then(PinDir::existing)
        else {
            return;
        };
        if pins.is_empty() {
            let _ = pins.clear();
            return;
        }
        match pins.clear() {
            Ok(()) => info!(
                dir = %pins.path().display(),
                "pinned kernel-mode state of an earlier run removed: no kernel-mode mapping is configured"
            ),
            Err(e) => warn!(
                dir = %pins.path().display(),
                error = %e,
                "cannot remove the pinned kernel-mode state of an earlier run"
            ),
        }
    }

    /// Loads what `specs` need. A mapping that asks for sockmap by name when it cannot load is
    /// an error; kernel mode that cannot load is not (its mappings run on their relay, and
    /// the reason is shown).
    pub async fn prepare(&mut self, specs: &[&Spec]) -> Result<Prepared, SockmapUnavailable> {
        let sockmap = self.sockmap(specs)?;
        let wanted: Vec<&&Spec> = specs.iter().filter(|s| s.mode.is_kernel()).collect();
        let mut out = Prepared {
            sockmap,
            ..Prepared::none()
        };
        if wanted.is_empty() {
            return Ok(out);
        }
        out.dnat = match self.dnat.upgrade() {
            Some(d) => Ok(d),
            None => match Dnat::start(self.dnat_settings.clone()).await {
                Ok(d) => {
                    d.leave_pinned(self.leave_pinned);
                    self.dnat = Arc::downgrade(&d);
                    Ok(d)
                }
                Err(e) => {
                    warn!(reason = %e, "kernel mode unavailable; its mappings are served by the relay");
                    Err(KernelModeError::Unavailable(Arc::new(e)))
                }
            },
        };
        if out.dnat.is_ok() {
            for s in wanted {
                let route = Dnat::route(s.target.get())
                    .await
                    .map_err(|e| KernelModeError::Mapping(Arc::new(e)));
                out.routes.insert(s.name.clone(), route);
            }
        }
        Ok(out)
    }

    /// Loads the sockmap programs for mappings that ask for them by name (an error if they
    /// cannot load) or that are `auto` (which splices without them: said once, in the log).
    fn sockmap(&mut self, specs: &[&Spec]) -> Result<Option<Arc<Sockmap>>, SockmapUnavailable> {
        let wanting = || {
            specs
                .iter()
                .filter(|s| s.proto == Proto::Tcp && s.mode == ModeChoice::Sockmap)
        };
        let useful = || {
            specs
                .iter()
                .any(|s| s.proto == Proto::Tcp && s.mode == ModeChoice::Auto)
        };
        if self.sockmap.is_none()
            && self.sockmap_error.is_none()
            && (wanting().next().is_some() || useful())
        {
            match Sockmap::load(self.sockmap_settings) {
                Ok(sm) => {
                    info!(
                        max_entries = self.sockmap_settings.max_entries,
                        send_buffer = self.sockmap_settings.send_buffer,
                        "sockmap programs loaded"
                    );
                    self.sockmap = Some(sm);
                }
                Err(e) => {
                    let reason = e.detail();
                    // Only a mapping that asked for sockmap by name is failed by this; for
                    // `auto` it is the expected state of a host without the privileges (the
                    // hardened unit without its drop-in).
                    if wanting().next().is_some() {
                        warn!(%reason, "sockmap relay unavailable: sockmap mappings cannot start, auto ones relay by splice only");
                    } else {
                        info!(%reason, "sockmap relay unavailable: auto mappings relay by splice only");
                    }
                    self.sockmap_error = Some(reason);
                }
            }
        }
        if let (Some(why), Some(s)) = (&self.sockmap_error, wanting().next()) {
            return Err(SockmapUnavailable {
                name: s.name.clone(),
                why: why.clone(),
            });
        }
        Ok(self.sockmap.clone())
    }
}
