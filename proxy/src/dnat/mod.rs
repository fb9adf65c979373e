//! Kernel mode (`--mode dnat`): port mappings served by eBPF programs alone, with no process
//! in the data path.
//!
//! - Remote clients: a TC ingress program on the client-facing interfaces rewrites
//!   `host_ip:host_port` to `container_ip:container_port`, records the flow in an LRU
//!   conntrack map and hands the packet to the container's interface with
//!   `bpf_redirect_neigh`. The same program, on the container's interface, rewrites the
//!   replies' source back and redirects them to the client's interface. The container sees
//!   the client's real address.
//! - Local clients: cgroup `connect4/6` and `sendmsg4/6` programs point sockets of the host's
//!   namespace straight at the container; `getpeername4/6` and `recvmsg4/6` show the address
//!   that was dialled.
//!
//! Parts:
//! - [`Dnat`] (here): loading and attaching the programs, the maps of this process, shared by
//!   its mappings.
//! - `mapping`: [`DnatMapping`], one mapping's service entry; dropping it removes every trace
//!   of it.
//! - `keys`: addresses and keys in the maps' layout; what kernel mode can map.
//! - `background`: the conntrack sweeper and the watcher of addresses and interfaces.
//! - `host`: interfaces, routes, local addresses, cgroup v2 and netns, from the kernel.
//! - [`pin`]: the state pinned under bpffs so that flows outlive the process, and whether a
//!   successor can adopt it.
//! - [`conntrack`]: when an entry expires.
//! - `error`: [`DnatError`].

mod background;
pub mod conntrack;
mod error;
mod host;
mod keys;
mod mapping;
pub mod pin;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs::File,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
    },
};
use berth_common::dnat::{
    self as shared, Addr, Backend, Config, Flow, FlowKey, Origin, ServiceKey, SockKey, Stats,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub(crate) use self::keys::addr_of;
use self::{
    background::{host_watcher, sweeper},
    error::{map_err, prog_err, stats_err},
    keys::{hairpin_src, service_key},
};
pub use self::{
    conntrack::Timeouts,
    error::DnatError,
    host::cgroup2_root,
    keys::{check_listen, check_target},
    mapping::DnatMapping,
};
use self::{host::Iface, pin::PinDir};
use crate::{
    addr::Proto,
    ebpf::{DnatSizes, LoaderError},
    net::Netlink,
};

/// Where and how big.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Client-facing interfaces; `None`: every non-loopback Ethernet interface that is not a
    /// bridge or bond port. The containers' interfaces are added as mappings need them.
    pub interfaces: Option<Vec<String>>,
    /// The cgroup whose processes (and descendants') get local mapping; `None`: the root of
    /// the cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
    /// Conntrack entries (remote flows), and as many local-socket entries.
    pub conntrack_entries: u32,
    pub timeouts: Timeouts,
    /// Where the maps and links are pinned (a directory on bpffs, one per daemon), so that
    /// flows outlive the process and a successor adopts them; `None`: nothing is pinned.
    pub pin_dir: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interfaces: None,
            cgroup: None,
            conntrack_entries: shared::DEFAULT_CONNTRACK,
            timeouts: Timeouts::default(),
            pin_dir: None,
        }
    }
}

/// Mappings one process can hold.
const MAX_SERVICES: u32 = shared::DEFAULT_SERVICES;

/// A mapping's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Remote flows begun (conntrack entries created).
    pub flows: u64,
    /// Local connects and unconnected sends pointed at the container.
    pub local_rewrites: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets too big for the next link (see [`berth_common::dnat::Stats::too_big`]).
    pub too_big: u64,
    /// Conntrack entries at the last sweep.
    pub conntrack_entries: u64,
}

struct Maps {
    services: HashMap<MapData, ServiceKey, Backend>,
    conntrack: HashMap<MapData, FlowKey, Flow>,
    revnat: HashMap<MapData, SockKey, Origin>,
    local: LpmTrie<MapData, Addr, u8>,
    stats: PerCpuHashMap<MapData, u32, Stats>,
    /// Written once at start; held so that it is freed with the rest.
    _config: Array<MapData, Config>,
}

/// A TC attachment, held by the program (nothing pinned) or pinned.
enum TcLink {
    Owned(SchedClassifierLinkId),
    Pinned(PinnedLink),
}

/// One interface's TC attachment.
struct Attached {
    name: String,
    link: TcLink,
    /// Attached because a mapping's container is behind it (its bridge): kept while the
    /// interface exists, whatever the client-facing policy says.
    for_mapping: bool,
}

struct Inner {
    /// The programs and their attachments (links): dropping it detaches everything.
    ebpf: Ebpf,
    maps: Maps,
    /// Interfaces whose ingress runs the TC program, by index.
    attached: BTreeMap<u32, Attached>,
    local: BTreeSet<(u32, Addr)>,
    /// Conntrack entries per mapping id, as of the last sweep.
    entries: StdHashMap<u32, u64>,
    /// Where the maps and links are pinned, if they are.
    pins: Option<PinDir>,
    /// Service entries a predecessor left (adopted pinned state) that no mapping of this
    /// process has claimed yet; see [`Dnat::settle`].
    adopted: StdHashMap<ServiceKey, Backend>,
    /// Mapping ids of the predecessor's whose entries go at [`Dnat::settle`].
    orphans: Vec<u32>,
    /// Adopted mappings that a mapping of this process took over.
    claimed: usize,
    /// The TC program runs on TCX links (Linux 6.6), which can be pinned.
    tcx: bool,
}

/// The loaded kernel-mode programs and maps. Dropping the last handle detaches every
/// program and frees every map, pinned ones included. Only a process that ends without
/// dropping it (a crash), or one that hands over ([`Dnat::leave_pinned`]), leaves its pinned
/// state behind, for its successor to adopt.
pub struct Dnat {
    inner: Mutex<Inner>,
    next_id: AtomicU32,
    /// Set for a hand-over: nothing is deleted on the way out.
    leave: AtomicBool,
    settings: Settings,
    cgroup: PathBuf,
    /// The sweeper and the address watcher, started once the instance exists.
    background: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Dnat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dnat")
            .field("settings", &self.settings)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        let tasks = self
            .background
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for t in tasks.iter() {
            t.abort();
        }
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(pins) = &inner.pins {
            if self.leave.load(Ordering::Relaxed) {
                info!(dir = %pins.path().display(), "kernel mode left pinned for a successor");
                return;
            }
            // The pins go first; closing the links' descriptors (with `inner`) then detaches.
            if let Err(e) = pins.clear() {
                warn!(dir = %pins.path().display(), error = %e, "cannot remove the pinned kernel-mode state");
            }
        }
        info!("kernel mode unloaded: programs detached, maps freed");
    }
}

/// The interface in front of a container, and the host's address there, found by
/// [`Dnat::route`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    via: Iface,
    /// The source for hairpin flows (the bridge's gateway address); none: the relay serves
    /// hairpin traffic.
    src: Option<IpAddr>,
}

impl Dnat {
    /// Loads the programs, attaches them (TC to the client-facing interfaces, sock_addr to
    /// the cgroup) and starts the conntrack sweeper and the host watcher. Needs a
    /// tokio runtime and CAP_BPF, CAP_PERFMON (the verifier forbids pointer arithmetic on
    /// packets without it) and CAP_NET_ADMIN, or root; runs in the host's namespace.
    pub async fn start(settings: Settings) -> Result<Arc<Self>, DnatError> {
        Self::load(settings).await.map_err(DnatError::explain)
    }

    async fn load(settings: Settings) -> Result<Arc<Self>, DnatError> {
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        let ifaces = host::client_interfaces(&nl, settings.interfaces.as_deref(), false).await?;
        let cgroup = match &settings.cgroup {
            Some(p) => p.clone(),
            None => host::cgroup2_root()?,
        };
        let netns = host::netns_cookie().map_err(DnatError::Netns)?;
        let local = host::local_prefixes(&nl).await?;
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let sizes = DnatSizes {
            services: MAX_SERVICES,
            conntrack: settings.conntrack_entries.max(1),
            local_addrs: shared::DEFAULT_LOCAL_ADDRS,
        };
        let (pins, adopt) = pins_for(settings.pin_dir.as_deref(), tcx, sizes)?;

        let mut ebpf = crate::ebpf::load_dnat(sizes, pins.as_ref())?;
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DnatError::Load(LoaderError::Missing(name)))
        };
        let mut config: Array<MapData, Config> =
            Array::try_from(take(shared::CONFIG_MAP)?).map_err(map_err(shared::CONFIG_MAP))?;
        config
            .set(
                0,
                Config {
                    host_netns: netns,
                    layout: shared::LAYOUT,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(shared::CONFIG_MAP))?;
        let maps = Maps {
            services: HashMap::try_from(take(shared::SERVICES_MAP)?)
                .map_err(map_err(shared::SERVICES_MAP))?,
            conntrack: HashMap::try_from(take(shared::CONNTRACK_MAP)?)
                .map_err(map_err(shared::CONNTRACK_MAP))?,
            revnat: HashMap::try_from(take(shared::REVNAT_MAP)?)
                .map_err(map_err(shared::REVNAT_MAP))?,
            local: LpmTrie::try_from(take(shared::LOCAL_MAP)?)
                .map_err(map_err(shared::LOCAL_MAP))?,
            stats: PerCpuHashMap::try_from(take(shared::STATS_MAP)?)
                .map_err(map_err(shared::STATS_MAP))?,
            _config: config,
        };

        let tc: &mut SchedClassifier = crate::ebpf::program(&mut ebpf, shared::TC_PROG)?;
        tc.load().map_err(prog_err(shared::TC_PROG))?;
        attach_cgroup(&mut ebpf, &cgroup, pins.as_ref())?;

        let mut inner = Inner {
            ebpf,
            maps,
            attached: BTreeMap::new(),
            local: BTreeSet::new(),
            entries: StdHashMap::new(),
            pins,
            adopted: StdHashMap::new(),
            orphans: Vec::new(),
            claimed: 0,
            tcx,
        };
        let mut next_id = 1;
        if adopt {
            next_id = inner.adopt(&nl).await?;
        }
        inner.sync_local(local)?;
        for i in &ifaces {
            inner.attach_tc(i, false)?;
        }
        info!(
            interfaces = ?ifaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            cgroup = %cgroup.display(),
            conntrack = settings.conntrack_entries,
            pinned = ?inner.pins.as_ref().map(PinDir::path),
            "kernel mode loaded"
        );
        let timeouts = settings.timeouts;
        let dnat = Arc::new(Self {
            inner: Mutex::new(inner),
            next_id: AtomicU32::new(next_id),
            leave: AtomicBool::new(false),
            settings,
            cgroup,
            background: Mutex::new(Vec::new()),
        });
        // Spawned only now: a task spawned while the instance was being built (as with
        // `Arc::new_cyclic`) could run first, find no instance to upgrade to, and end for
        // good. That stopped the sweeper now and then: entries were never counted or expired.
        let weak = Arc::downgrade(&dnat);
        let tasks = vec![
            tokio::spawn(sweeper(weak.clone(), timeouts)),
            tokio::spawn(host_watcher(weak)),
        ];
        *dnat
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = tasks;
        Ok(dnat)
    }

    /// Ends the adoption of a predecessor's pinned state, once this process has added the
    /// mappings it serves: the predecessor's mappings that none of them claimed (same
    /// protocol, address, port and container) are deleted with their flows, and its TC links
    /// on interfaces that no longer need the program are detached. Nothing to do when nothing
    /// was adopted.
    pub async fn settle(&self) {
        let (claimed, dropped) = {
            let mut inner = self.lock();
            let adopted = std::mem::take(&mut inner.adopted);
            let mut ids = std::mem::take(&mut inner.orphans);
            let dropped = adopted.len() + ids.len();
            for (key, b) in adopted {
                if inner.owns(&key, b.id) {
                    let _ = inner.maps.services.remove(&key);
                }
                ids.push(b.id);
            }
            for id in ids {
                inner.forget(id);
            }
            (inner.claimed, dropped)
        };
        if let Err(e) = self.refresh_interfaces().await {
            warn!(error = %e, "cannot refresh the client-facing interfaces");
        }
        if claimed + dropped > 0 {
            info!(
                kept = claimed,
                dropped, "adopted kernel-mode state reconciled with the configuration"
            );
        }
    }

    /// Whether every pinned map and link stays in place when this instance goes, and each
    /// mapping's entries with them: for a successor that adopts them (a hand-over).
    pub fn leave_pinned(&self, leave: bool) {
        self.leave.store(leave, Ordering::Relaxed);
    }

    /// True if a hand-over asked to leave the state in place.
    fn leaving(&self) -> bool {
        self.leave.load(Ordering::Relaxed)
    }

    /// The settings this instance was started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The cgroup the local-client programs are attached to.
    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    /// Interfaces with the TC program, by name.
    pub fn interfaces(&self) -> Vec<String> {
        self.lock()
            .attached
            .values()
            .map(|a| a.name.clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The interface the host reaches `target` through (its bridge), for [`Self::add`].
    pub async fn route(target: SocketAddr) -> Result<Route, DnatError> {
        check_target(target)?;
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        let (via, src) = host::route_to(&nl, target.ip()).await?;
        Ok(Route { via, src })
    }

    /// Maps `proto` on `listen` to `target`, a container reached through `via` (see
    /// [`Self::route`]). An unspecified `listen` address covers every local address of its
    /// family. A mapping of the same `proto` and `listen` is replaced (a reload changing its
    /// target): the old handle then leaves the new entry alone.
    pub fn add(
        self: &Arc<Self>,
        proto: Proto,
        listen: SocketAddr,
        target: SocketAddr,
        via: &Route,
    ) -> Result<DnatMapping, DnatError> {
        check_listen(listen)?;
        check_target(target)?;
        let hairpin_src = hairpin_src(target.ip(), via.src);
        let via = &via.via;
        let key = service_key(proto, listen);
        let mut backend = Backend {
            addr: addr_of(target.ip()),
            port: target.port().to_be(),
            flags: 0,
            ifindex: via.index,
            id: 0,
            hairpin_src,
        };
        let mut inner = self.lock();
        inner.attach_tc(via, true)?;
        // A predecessor's mapping of the same port to the same container is taken over with
        // its id: its flows and counters go on as this mapping's.
        let claimed = match inner.adopted.remove(&key) {
            Some(old)
                if (old.addr, old.port, old.ifindex)
                    == (backend.addr, backend.port, backend.ifindex) =>
            {
                Some(old.id)
            }
            Some(old) => {
                inner.orphans.push(old.id);
                None
            }
            None => None,
        };
        if let Some(id) = claimed {
            backend.id = id;
            inner.claimed += 1;
        } else {
            backend.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| stats_err("nr_cpus", e))?;
            let zero = PerCpuValues::try_from(vec![Stats::default(); cpus])
                .map_err(|e| stats_err("per-cpu values", e))?;
            inner
                .maps
                .stats
                .insert(backend.id, zero, 0)
                .map_err(map_err(shared::STATS_MAP))?;
        }
        let id = backend.id;
        if let Err(e) = inner.maps.services.insert(key, backend, 0) {
            let _ = inner.maps.stats.remove(&id);
            return Err(
                if inner.maps.services.keys().count() >= MAX_SERVICES as usize {
                    DnatError::Full(MAX_SERVICES)
                } else {
                    map_err(shared::SERVICES_MAP)(e)
                },
            );
        }
        info!(%proto, %listen, %target, via = %via.name, id, adopted = claimed.is_some(), "kernel-mode mapping added");
        Ok(DnatMapping {
            dnat: self.clone(),
            key,
            backend,
        })
    }

    /// Deletes expired conntrack entries and recounts the rest per mapping.
    fn sweep(&self, timeouts: &Timeouts) -> usize {
        let now = conntrack::monotonic_ns();
        let mut inner = self.lock();
        let mut expired = Vec::new();
        let mut counts: StdHashMap<u32, u64> = StdHashMap::new();
        for (key, flow) in inner.maps.conntrack.iter().flatten() {
            if conntrack::expired(&flow, key.proto, now, timeouts) {
                expired.push(key);
            } else {
                *counts.entry(flow.id).or_default() += 1;
            }
        }
        for key in &expired {
            let _ = inner.maps.conntrack.remove(key);
        }
        inner.entries = counts;
        expired.len()
    }

    /// Brings the client-facing attachments in line with the host: the TC program goes on the
    /// interfaces that appeared since the last look (under the default policy every new one
    /// that qualifies; with a list, the listed names that exist now), comes off those that no
    /// longer qualify (a new veth that became a bridge port), and is forgotten on those that
    /// are gone (their TCX links went with them). An interface that cannot take the program
    /// is logged and skipped.
    async fn refresh_interfaces(&self) -> Result<(), DnatError> {
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        // A listed interface that is not there (now) is attached when it appears.
        let want = host::client_interfaces(&nl, self.settings.interfaces.as_deref(), true).await?;
        let present = host::interface_indexes(&nl).await?;
        let wanted: BTreeSet<u32> = want.iter().map(|i| i.index).collect();
        {
            let mut inner = self.lock();
            let stale: Vec<u32> = inner
                .attached
                .iter()
                .filter(|(i, a)| !present.contains(i) || (!a.for_mapping && !wanted.contains(i)))
                .map(|(i, _)| *i)
                .collect();
            for index in stale {
                inner.detach_tc(index);
            }
        }
        self.follow_containers(&nl, &present).await;
        let mut inner = self.lock();
        for iface in &want {
            if inner.attached.contains_key(&iface.index) {
                continue;
            }
            match inner.attach_tc(iface, false) {
                Ok(()) => {
                    info!(interface = %iface.name, "TC program attached to a new interface");
                }
                Err(e) => {
                    warn!(interface = %iface.name, error = %e, "cannot attach to a new interface");
                }
            }
        }
        Ok(())
    }

    /// Points the mappings whose container's interface is gone (its bridge deleted and made
    /// again: a new index) at the interface the route now goes through, their open flows
    /// included. A container with no route yet is looked for again at the next change.
    async fn follow_containers(&self, nl: &Netlink, present: &BTreeSet<u32>) {
        let lost: Vec<(ServiceKey, Backend)> = self
            .lock()
            .maps
            .services
            .iter()
            .flatten()
            .filter(|(_, b)| !present.contains(&b.ifindex))
            .collect();
        for (key, old) in lost {
            let target = keys::ip_of(&old.addr);
            let (via, src) = match host::route_to(nl, target).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(%target, error = %e, "a mapping's container is not reachable yet");
                    continue;
                }
            };
            self.follow(key, old, &via, src);
        }
    }

    /// [`Self::follow_containers`] for one mapping, now reached through `via`.
    fn follow(&self, key: ServiceKey, old: Backend, via: &Iface, src: Option<IpAddr>) {
        let target = keys::ip_of(&old.addr);
        {
            let mut inner = self.lock();
            if !inner.owns(&key, old.id) {
                return;
            }
            if let Err(e) = inner.attach_tc(via, true) {
                warn!(interface = %via.name, error = %e, "cannot follow a container to its new interface");
                return;
            }
            let mut b = inner.maps.services.get(&key, 0).unwrap_or(old);
            b.ifindex = via.index;
            b.hairpin_src = hairpin_src(target, src);
            if inner.maps.services.insert(key, b, 0).is_err() {
                return;
            }
            let flows: Vec<(FlowKey, Flow)> = inner
                .maps
                .conntrack
                .iter()
                .flatten()
                .filter(|(_, f)| f.id == old.id && f.backend_ifindex == old.ifindex)
                .collect();
            for (k, mut f) in flows {
                f.backend_ifindex = via.index;
                let _ = inner.maps.conntrack.insert(k, f, 0);
            }
        }
        info!(%target, id = old.id, interface = %via.name, "kernel-mode mapping follows its container to a new interface");
    }

    /// Re-reads the host's local addresses into the map.
    async fn refresh_local(&self) -> Result<(), DnatError> {
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        let now = host::local_prefixes(&nl).await?;
        self.lock().sync_local(now)
    }
}

impl Inner {
    /// Takes over what a predecessor pinned: its service entries wait for this process's
    /// mappings to claim them ([`Dnat::settle`] deletes the rest), its local-address entries
    /// are brought up to date by the next sync, and its TC links now run this process's
    /// program (replaced in place, atomically: no packet meets an interface without one).
    /// Returns the first free mapping id.
    async fn adopt(&mut self, nl: &Netlink) -> Result<u32, DnatError> {
        self.adopted = self.maps.services.iter().flatten().collect();
        let ids = self.maps.stats.keys().flatten();
        let next = ids
            .chain(self.adopted.values().map(|b| b.id))
            .max()
            .map_or(1, |m| m.saturating_add(1));
        self.local = self
            .maps
            .local
            .keys()
            .flatten()
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        let flows = self.maps.conntrack.keys().count();
        let names = host::interface_names(nl).await?;
        let Some(pins) = self.pins.clone() else {
            return Ok(next);
        };
        let tc: &mut SchedClassifier = crate::ebpf::program(&mut self.ebpf, shared::TC_PROG)?;
        for (index, path) in pins.tc_links() {
            let replaced = match names.get(&index) {
                Some(name) => replace_tc(tc, &path)
                    .map(|link| (name.clone(), link))
                    .map_err(|why| (name.clone(), why)),
                _ => Err((format!("#{index}"), "the interface is gone".to_owned())),
            };
            match replaced {
                Ok((name, link)) => {
                    self.attached.insert(
                        index,
                        Attached {
                            name,
                            link: TcLink::Pinned(link),
                            for_mapping: false,
                        },
                    );
                }
                Err((name, why)) => {
                    debug!(interface = %name, %why, "a predecessor's TC link is dropped");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        info!(
            dir = %pins.path().display(),
            mappings = self.adopted.len(),
            flows,
            interfaces = self.attached.len(),
            "pinned kernel-mode state adopted"
        );
        Ok(next)
    }

    /// Deletes mapping `id`'s flows, local-socket entries and counters.
    fn forget(&mut self, id: u32) {
        for k in keys::keys_where(&self.maps.conntrack, |f: &Flow| f.id == id) {
            let _ = self.maps.conntrack.remove(&k);
        }
        for k in keys::keys_where(&self.maps.revnat, |o: &Origin| o.id == id) {
            let _ = self.maps.revnat.remove(&k);
        }
        let _ = self.maps.stats.remove(&id);
        self.entries.remove(&id);
    }

    /// True if the service entry at `key` is still mapping `id` (not yet replaced).
    fn owns(&self, key: &ServiceKey, id: u32) -> bool {
        self.maps.services.get(key, 0).is_ok_and(|b| b.id == id)
    }

    fn attach_tc(&mut self, iface: &Iface, for_mapping: bool) -> Result<(), DnatError> {
        if let Some(a) = self.attached.get_mut(&iface.index) {
            a.for_mapping |= for_mapping;
            return Ok(());
        }
        let tc: &mut SchedClassifier = crate::ebpf::program(&mut self.ebpf, shared::TC_PROG)?;
        if !self.tcx {
            // Before TCX the program hangs off a clsact qdisc (which then stays).
            let _ = aya::programs::tc::qdisc_add_clsact(&iface.name);
        }
        let cannot = |why: String| DnatError::Interface {
            name: iface.name.clone(),
            why,
        };
        let id = tc
            .attach(&iface.name, TcAttachType::Ingress)
            .map_err(|e| cannot(format!("cannot attach the TC program: {e}")))?;
        let link = match &self.pins {
            None => TcLink::Owned(id),
            Some(pins) => {
                let fd = tc
                    .take_link(id)
                    .map_err(|e| cannot(format!("cannot take the TC link: {e}")))
                    .and_then(|l| {
                        FdLink::try_from(l).map_err(|e| cannot(format!("not a TCX link: {e}")))
                    })?;
                TcLink::Pinned(
                    fd.pin(pins.tc_link(iface.index))
                        .map_err(|e| cannot(format!("cannot pin the TC link: {e}")))?,
                )
            }
        };
        debug!(interface = %iface.name, "TC program attached");
        self.attached.insert(
            iface.index,
            Attached {
                name: iface.name.clone(),
                link,
                for_mapping,
            },
        );
        Ok(())
    }

    /// Takes the TC program off interface `index` (or, if it is gone, closes our handle on
    /// the link the kernel already ended).
    fn detach_tc(&mut self, index: u32) {
        let Some(a) = self.attached.remove(&index) else {
            return;
        };
        match a.link {
            TcLink::Owned(id) => {
                if let Ok(tc) =
                    crate::ebpf::program::<SchedClassifier>(&mut self.ebpf, shared::TC_PROG)
                {
                    let _ = tc.detach(id);
                }
            }
            // Unpinned and closed: the link detaches.
            TcLink::Pinned(p) => drop(p.unpin()),
        }
        debug!(interface = %a.name, "TC program detached");
    }

    fn sync_local(&mut self, now: BTreeSet<(u32, Addr)>) -> Result<(), DnatError> {
        for gone in self.local.difference(&now) {
            let _ = self.maps.local.remove(&Key::new(gone.0, gone.1));
        }
        for new in now.difference(&self.local) {
            self.maps
                .local
                .insert(&Key::new(new.0, new.1), 1, 0)
                .map_err(map_err(shared::LOCAL_MAP))?;
        }
        if now != self.local {
            debug!(prefixes = now.len(), "local addresses updated");
        }
        self.local = now;
        Ok(())
    }
}

/// The pin directory for `dir`, and whether it holds a predecessor's state to adopt. State
/// that cannot be adopted (another layout, other sizes) is removed, said once in the log:
/// its maps are replaced by empty ones (a flow of a mapping that stays goes on, as a new entry
/// at its next packet from the client). Without a usable directory nothing is pinned.
fn pins_for(
    dir: Option<&std::path::Path>,
    tcx: bool,
    sizes: DnatSizes,
) -> Result<(Option<PinDir>, bool), DnatError> {
    let Some(dir) = dir else {
        return Ok((None, false));
    };
    if !tcx {
        warn!(
            "kernel-mode state is not pinned: pinning the TC program needs TCX (Linux 6.6); kernel-mode flows end with the process"
        );
        return Ok((None, false));
    }
    let pins = match PinDir::prepare(dir) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "kernel-mode state is not pinned");
            return Ok((None, false));
        }
    };
    if pins.is_empty() {
        return Ok((Some(pins), false));
    }
    let why = if pins.has_maps() {
        match adoptable(&pins, sizes) {
            Ok(()) => return Ok((Some(pins), true)),
            Err(why) => why.to_string(),
        }
    } else {
        "it holds links without maps".to_owned()
    };
    warn!(
        dir = %dir.display(),
        reason = %why,
        "pinned kernel-mode state not adopted: it is removed and kernel mode starts with empty maps"
    );
    let gone = |source| {
        DnatError::Pin(pin::PinError::Io {
            path: dir.to_owned(),
            source,
        })
    };
    pins.clear().map_err(gone)?;
    Ok((Some(PinDir::prepare(dir).map_err(DnatError::Pin)?), false))
}

/// Whether the maps pinned in `pins` can serve this berth's programs as they are.
fn adoptable(pins: &PinDir, sizes: DnatSizes) -> Result<(), pin::Incompatible> {
    let unreadable = |name: &str, why: String| pin::Incompatible::Unreadable {
        name: name.to_owned(),
        why,
    };
    let wanted = crate::ebpf::dnat_layout(sizes).map_err(|e| unreadable("(object)", e.detail()))?;
    pin::compatible(&wanted, |name| crate::ebpf::pinned_layout(pins, name))?;
    let name = shared::CONFIG_MAP;
    let data = MapData::from_pin(pins.map(name)).map_err(|e| unreadable(name, e.to_string()))?;
    let config: Array<MapData, Config> = Array::try_from(aya::maps::Map::Array(data))
        .map_err(|e| unreadable(name, e.to_string()))?;
    let found = config
        .get(&0, 0)
        .map_err(|e| unreadable(name, e.to_string()))?
        .layout;
    if found != shared::LAYOUT {
        return Err(pin::Incompatible::Layout {
            found,
            wanted: shared::LAYOUT,
        });
    }
    Ok(())
}

/// Puts this process's TC program into the TCX link pinned at `path`, in place of the
/// predecessor's.
fn replace_tc(tc: &mut SchedClassifier, path: &std::path::Path) -> Result<PinnedLink, String> {
    let old = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| e.to_string())?;
    let id = tc.attach_to_link(link).map_err(|e| e.to_string())?;
    // The program's own handle is dropped; the pin keeps the link, reopened as ours.
    drop(tc.take_link(id));
    PinnedLink::from_pin(path).map_err(|e| e.to_string())
}

/// Attaches the cgroup programs. With `pins`, their links are pinned (the pins hold them, and
/// removing the pins detaches them), and links a
/// predecessor pinned are closed once the new ones are in place: for that moment both sets
/// run, which changes nothing, since a socket the first rewrote no longer matches a mapping.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    cgroup: &std::path::Path,
    pins: Option<&PinDir>,
) -> Result<(), DnatError> {
    let dir = File::open(cgroup).map_err(|source| DnatError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    for name in shared::CGROUP_PROGS {
        // A bpf link: other programs on the cgroup stay, and closing the link detaches.
        // Two program types, the same steps; with pins the link is taken out of the
        // program, to be pinned.
        macro_rules! attach {
            ($ty:ty) => {{
                let prog: &mut $ty = crate::ebpf::program(ebpf, name)?;
                prog.load().map_err(prog_err(name))?;
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(attach_err(cgroup, name))?;
                match pins {
                    None => None,
                    Some(_) => Some(
                        prog.take_link(id)
                            .map_err(attach_err(cgroup, name))
                            .and_then(|l| FdLink::try_from(l).map_err(link_err(cgroup, name)))?,
                    ),
                }
            }};
        }
        let fd: Option<FdLink> = if name == shared::RELEASE_PROG {
            attach!(CgroupSock)
        } else {
            attach!(CgroupSockAddr)
        };
        if let (Some(fd), Some(pins)) = (fd, pins) {
            let path = pins.prog_link(name);
            if let Ok(old) = PinnedLink::from_pin(&path) {
                drop(old.unpin());
            }
            fd.pin(&path).map_err(|e| {
                DnatError::Pin(pin::PinError::Io {
                    path,
                    source: std::io::Error::other(e.to_string()),
                })
            })?;
        }
    }
    Ok(())
}

fn link_err(
    cgroup: &std::path::Path,
    name: &'static str,
) -> impl FnOnce(aya::programs::links::LinkError) -> DnatError {
    move |e| DnatError::Cgroup {
        path: cgroup.to_owned(),
        source: std::io::Error::other(format!("cannot hold the link of {name}: {e}")),
    }
}

fn attach_err(
    cgroup: &std::path::Path,
    name: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DnatError {
    move |e| DnatError::Cgroup {
        path: cgroup.to_owned(),
        source: std::io::Error::other(format!("cannot attach {name}: {e}")),
    }
}
