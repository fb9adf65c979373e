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
//! - [`conntrack`]: when an entry expires.
//! - `error`: [`DnatError`].

mod background;
pub mod conntrack;
mod error;
mod host;
mod keys;
mod mapping;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
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
        tc::SchedClassifierLinkId,
    },
};
use berth_common::dnat::{
    self as shared, Addr, Backend, Config, Flow, FlowKey, Origin, ServiceKey, SockKey, Stats,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use self::host::Iface;
pub(crate) use self::keys::addr_of;
use self::{
    background::{host_watcher, sweeper},
    error::{map_err, prog_err, stats_err},
    keys::service_key,
};
pub use self::{
    conntrack::Timeouts,
    error::DnatError,
    host::cgroup2_root,
    keys::{check_listen, check_target},
    mapping::DnatMapping,
};
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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interfaces: None,
            cgroup: None,
            conntrack_entries: shared::DEFAULT_CONNTRACK,
            timeouts: Timeouts::default(),
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

/// One interface's TC attachment.
struct Attached {
    name: String,
    link: SchedClassifierLinkId,
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
}

/// The loaded kernel-mode programs and maps. Dropping the last handle detaches every
/// program and frees every map: nothing is pinned, so nothing outlives the process (the
/// attachments are bpf links, tied to their file descriptors).
pub struct Dnat {
    inner: Mutex<Inner>,
    next_id: AtomicU32,
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
    src: Option<std::net::Ipv4Addr>,
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

        let mut ebpf = crate::ebpf::load_dnat(DnatSizes {
            services: MAX_SERVICES,
            conntrack: settings.conntrack_entries.max(1),
            local_addrs: shared::DEFAULT_LOCAL_ADDRS,
        })?;
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DnatError::Load(LoaderError::Missing(name)))
        };
        let mut config: Array<MapData, Config> =
            Array::try_from(take(shared::CONFIG_MAP)?).map_err(map_err(shared::CONFIG_MAP))?;
        config
            .set(0, Config { host_netns: netns }, 0)
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
        attach_cgroup(&mut ebpf, &cgroup)?;

        let mut inner = Inner {
            ebpf,
            maps,
            attached: BTreeMap::new(),
            local: BTreeSet::new(),
            entries: StdHashMap::new(),
        };
        inner.sync_local(local)?;
        for i in &ifaces {
            inner.attach_tc(i, false)?;
        }
        info!(
            interfaces = ?ifaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            cgroup = %cgroup.display(),
            conntrack = settings.conntrack_entries,
            "kernel mode loaded"
        );
        let timeouts = settings.timeouts;
        let dnat = Arc::new(Self {
            inner: Mutex::new(inner),
            next_id: AtomicU32::new(1),
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
        let hairpin_src = via.src.map_or(0, |a| u32::from_ne_bytes(a.octets()));
        let via = &via.via;
        let key = service_key(proto, listen);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let backend = Backend {
            addr: addr_of(target.ip()),
            port: target.port().to_be(),
            flags: 0,
            ifindex: via.index,
            id,
            hairpin_src,
        };
        let mut inner = self.lock();
        inner.attach_tc(via, true)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| stats_err("nr_cpus", e))?;
        let zero = PerCpuValues::try_from(vec![Stats::default(); cpus])
            .map_err(|e| stats_err("per-cpu values", e))?;
        inner
            .maps
            .stats
            .insert(id, zero, 0)
            .map_err(map_err(shared::STATS_MAP))?;
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
        info!(%proto, %listen, %target, via = %via.name, id, "kernel-mode mapping added");
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
        let mut inner = self.lock();
        let wanted: BTreeSet<u32> = want.iter().map(|i| i.index).collect();
        let stale: Vec<u32> = inner
            .attached
            .iter()
            .filter(|(i, a)| !present.contains(i) || (!a.for_mapping && !wanted.contains(i)))
            .map(|(i, _)| *i)
            .collect();
        for index in stale {
            inner.detach_tc(index);
        }
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

    /// Re-reads the host's local addresses into the map.
    async fn refresh_local(&self) -> Result<(), DnatError> {
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        let now = host::local_prefixes(&nl).await?;
        self.lock().sync_local(now)
    }
}

impl Inner {
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
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Before TCX the program hangs off a clsact qdisc (which then stays).
            let _ = aya::programs::tc::qdisc_add_clsact(&iface.name);
        }
        let link =
            tc.attach(&iface.name, TcAttachType::Ingress)
                .map_err(|e| DnatError::Interface {
                    name: iface.name.clone(),
                    why: format!("cannot attach the TC program: {e}"),
                })?;
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
        if let Ok(tc) = crate::ebpf::program::<SchedClassifier>(&mut self.ebpf, shared::TC_PROG) {
            let _ = tc.detach(a.link);
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

fn attach_cgroup(ebpf: &mut Ebpf, cgroup: &std::path::Path) -> Result<(), DnatError> {
    let dir = File::open(cgroup).map_err(|source| DnatError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    for name in [
        shared::CONNECT4_PROG,
        shared::CONNECT6_PROG,
        shared::SENDMSG4_PROG,
        shared::SENDMSG6_PROG,
        shared::RECVMSG4_PROG,
        shared::RECVMSG6_PROG,
        shared::GETPEERNAME4_PROG,
        shared::GETPEERNAME6_PROG,
    ] {
        let prog: &mut CgroupSockAddr = crate::ebpf::program(ebpf, name)?;
        prog.load().map_err(prog_err(name))?;
        // A bpf link: other programs on the cgroup stay, and closing the link detaches.
        prog.attach(&dir, CgroupAttachMode::Single)
            .map_err(attach_err(cgroup, name))?;
    }
    let name = shared::RELEASE_PROG;
    let release: &mut CgroupSock = crate::ebpf::program(ebpf, name)?;
    release.load().map_err(prog_err(name))?;
    release
        .attach(&dir, CgroupAttachMode::Single)
        .map_err(attach_err(cgroup, name))?;
    Ok(())
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
