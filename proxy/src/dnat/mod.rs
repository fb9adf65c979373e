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
//! - [`Dnat`]: the loaded programs and maps of this process, shared by its mappings.
//! - [`DnatMapping`]: one mapping's service entry; dropping it removes every trace of it.
//! - `host`: interfaces, routes, local addresses, cgroup v2 and netns, from the kernel.
//! - [`conntrack`]: when an entry expires.

pub mod conntrack;
mod host;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs::File,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType},
};
use berth_common::dnat::{
    self as shared, Addr, BACKEND_DRAINING, Backend, Config, Flow, FlowKey, Origin, PROTO_TCP,
    PROTO_UDP, ServiceKey, SockKey, Stats,
};
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use self::host::Iface;
pub use self::{conntrack::Timeouts, host::cgroup2_root};
use crate::{
    addr::Proto,
    ebpf::{DnatSizes, LoaderError},
    net::Netlink,
};

/// Kernel mode could not start, or could not map one mapping.
#[derive(Debug, thiserror::Error)]
pub enum DnatError {
    #[error(transparent)]
    Load(#[from] LoaderError),
    #[error("cannot load or attach {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interface {name}: {why}")]
    Interface { name: String, why: String },
    #[error("cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted (kernel mode's local clients need one)")]
    NoCgroup2,
    #[error("cannot read this network namespace's cookie (needs Linux 5.14): {0}")]
    Netns(#[source] std::io::Error),
    #[error("target: {0}")]
    Target(String),
    #[error("listen: {0}")]
    Listen(String),
    #[error("the kernel-mode service table is full ({0} mappings)")]
    Full(u32),
    #[error("{0} (kernel mode needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or root)")]
    Denied(Box<Self>),
}

impl DnatError {
    fn netlink(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Netlink {
            what,
            source: Box::new(e),
        }
    }

    /// Wraps a failure that the kernel refused for lack of privileges in [`Self::Denied`],
    /// which says what is missing.
    fn explain(self) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
            {
                return Self::Denied(Box::new(self));
            }
            cause = e.source();
        }
        self
    }
}

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

struct Inner {
    /// The programs and their attachments (links): dropping it detaches everything.
    ebpf: Ebpf,
    maps: Maps,
    /// Interfaces whose ingress runs the TC program.
    attached: BTreeMap<u32, String>,
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
    background: Vec<JoinHandle<()>>,
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
        for t in &self.background {
            t.abort();
        }
        info!("kernel mode unloaded: programs detached, maps freed");
    }
}

fn stats_err(call: &'static str, io_error: std::io::Error) -> DnatError {
    DnatError::Map {
        name: shared::STATS_MAP,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

/// The interface in front of a container, found by [`Dnat::route`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route(Iface);

fn map_err(name: &'static str) -> impl Fn(MapError) -> DnatError {
    move |source| DnatError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> DnatError {
    move |source| DnatError::Program { name, source }
}

impl Dnat {
    /// Loads the programs, attaches them (TC to the client-facing interfaces, sock_addr to
    /// the cgroup) and starts the conntrack sweeper and the local-address watcher. Needs a
    /// tokio runtime and CAP_BPF, CAP_PERFMON (the verifier forbids pointer arithmetic on
    /// packets without it) and CAP_NET_ADMIN, or root; runs in the host's namespace.
    pub async fn start(settings: Settings) -> Result<Arc<Self>, DnatError> {
        Self::load(settings).await.map_err(DnatError::explain)
    }

    async fn load(settings: Settings) -> Result<Arc<Self>, DnatError> {
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        let ifaces = match &settings.interfaces {
            None => host::default_interfaces(&nl).await?,
            Some(names) => {
                let mut v = Vec::new();
                for n in names {
                    v.push(host::interface(&nl, n).await?);
                }
                v
            }
        };
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

        let tc: &mut SchedClassifier = ebpf
            .program_mut(shared::TC_PROG)
            .ok_or(LoaderError::Missing(shared::TC_PROG))?
            .try_into()
            .map_err(prog_err(shared::TC_PROG))?;
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
            inner.attach_tc(i)?;
        }
        info!(
            interfaces = ?ifaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            cgroup = %cgroup.display(),
            conntrack = settings.conntrack_entries,
            "kernel mode loaded"
        );
        let dnat = Arc::new_cyclic(|weak: &std::sync::Weak<Self>| {
            let background = vec![
                tokio::spawn(sweeper(weak.clone(), settings.timeouts)),
                tokio::spawn(local_watcher(weak.clone())),
            ];
            Self {
                inner: Mutex::new(inner),
                next_id: AtomicU32::new(1),
                settings,
                cgroup,
                background,
            }
        });
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
        self.lock().attached.values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The interface the host reaches `target` through (its bridge), for [`Self::add`].
    pub async fn route(target: SocketAddr) -> Result<Route, DnatError> {
        check_target(target)?;
        let IpAddr::V4(ip) = target.ip() else {
            unreachable!("check_target accepts IPv4 only")
        };
        let nl = Netlink::connect().map_err(|e| DnatError::netlink("connect", e))?;
        Ok(Route(host::route_to(&nl, ip).await?))
    }

    /// Maps `proto` on `listen` to `target`, an IPv4 container reached through `via` (see
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
        let via = &via.0;
        let key = service_key(proto, listen);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let backend = Backend {
            addr: addr_of(target.ip()),
            port: target.port().to_be(),
            flags: 0,
            ifindex: via.index,
            id,
        };
        let mut inner = self.lock();
        inner.attach_tc(via)?;
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

    fn attach_tc(&mut self, iface: &Iface) -> Result<(), DnatError> {
        if self.attached.contains_key(&iface.index) {
            return Ok(());
        }
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(shared::TC_PROG)
            .ok_or(LoaderError::Missing(shared::TC_PROG))?
            .try_into()
            .map_err(prog_err(shared::TC_PROG))?;
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Before TCX the program hangs off a clsact qdisc (which then stays).
            let _ = aya::programs::tc::qdisc_add_clsact(&iface.name);
        }
        tc.attach(&iface.name, TcAttachType::Ingress)
            .map_err(|e| DnatError::Interface {
                name: iface.name.clone(),
                why: format!("cannot attach the TC program: {e}"),
            })?;
        debug!(interface = %iface.name, "TC program attached");
        self.attached.insert(iface.index, iface.name.clone());
        Ok(())
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
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(LoaderError::Missing(name))?
            .try_into()
            .map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))?;
        // A bpf link: other programs on the cgroup stay, and closing the link detaches.
        prog.attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| DnatError::Cgroup {
                path: cgroup.to_owned(),
                source: std::io::Error::other(format!("cannot attach {name}: {e}")),
            })?;
    }
    Ok(())
}

/// One kernel-mode mapping. Dropping it deletes its service entry, its conntrack and
/// local-socket entries and its counters.
pub struct DnatMapping {
    dnat: Arc<Dnat>,
    key: ServiceKey,
    backend: Backend,
}

impl std::fmt::Debug for DnatMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnatMapping")
            .field("id", &self.backend.id)
            .finish_non_exhaustive()
    }
}

impl DnatMapping {
    /// Stops mapping new flows and local connects; flows with a conntrack entry go on.
    pub fn drain(&self) {
        let mut inner = self.dnat.lock();
        if inner.owns(&self.key, self.backend.id) {
            let mut b = self.backend;
            b.flags |= BACKEND_DRAINING;
            let _ = inner.maps.services.insert(self.key, b, 0);
        }
    }

    /// The mapping's counters.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.dnat.lock();
        let mut s = Snapshot {
            conntrack_entries: inner.entries.get(&self.backend.id).copied().unwrap_or(0),
            ..Snapshot::default()
        };
        if let Ok(per_cpu) = inner.maps.stats.get(&self.backend.id, 0) {
            for c in per_cpu.iter() {
                s.flows += c.flows;
                s.local_rewrites += c.local_rewrites;
                s.packets_in += c.packets_in;
                s.bytes_in += c.bytes_in;
                s.packets_out += c.packets_out;
                s.bytes_out += c.bytes_out;
            }
        }
        s
    }
}

impl Drop for DnatMapping {
    fn drop(&mut self) {
        let id = self.backend.id;
        let mut inner = self.dnat.lock();
        if inner.owns(&self.key, id) {
            let _ = inner.maps.services.remove(&self.key);
        }
        for k in keys_where(&inner.maps.conntrack, |f: &Flow| f.id == id) {
            let _ = inner.maps.conntrack.remove(&k);
        }
        for k in keys_where(&inner.maps.revnat, |o: &Origin| o.id == id) {
            let _ = inner.maps.revnat.remove(&k);
        }
        let _ = inner.maps.stats.remove(&id);
        inner.entries.remove(&id);
        info!(id, "kernel-mode mapping removed");
    }
}

/// Whether kernel mode can map to `target`: an IPv4 address and an explicit port (the TC
/// path rewrites IPv4 only).
pub fn check_target(target: SocketAddr) -> Result<(), DnatError> {
    if !target.is_ipv4() {
        return Err(DnatError::Target(format!(
            "{target}: kernel mode maps to IPv4 containers (use a relay mode for IPv6 targets)"
        )));
    }
    if target.port() == 0 {
        return Err(DnatError::Target(format!(
            "{target}: kernel mode needs the container's port"
        )));
    }
    Ok(())
}

/// Whether kernel mode can map `listen`: it needs an explicit port (no socket of its own
/// gets one from the kernel).
pub fn check_listen(listen: SocketAddr) -> Result<(), DnatError> {
    if listen.port() == 0 {
        return Err(DnatError::Listen(format!(
            "{listen}: kernel mode needs an explicit port"
        )));
    }
    Ok(())
}

/// Keys of the entries of `map` whose value satisfies `pred` (collected first: deleting
/// while iterating would skip entries).
fn keys_where<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    pred: impl Fn(&V) -> bool,
) -> Vec<K> {
    map.iter()
        .flatten()
        .filter(|(_, v)| pred(v))
        .map(|(k, _)| k)
        .collect()
}

/// The service key of `proto` on `listen` (unspecified: the family's wildcard).
fn service_key(proto: Proto, listen: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_of(listen.ip()),
        port: listen.port().to_be(),
        proto: match proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

/// `ip` in the maps' 16-byte layout (IPv4 as IPv4-mapped; `0.0.0.0` becomes the IPv4
/// wildcard `::ffff:0.0.0.0`, `::` stays the IPv6 one).
pub(crate) fn addr_of(ip: IpAddr) -> Addr {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut a = [0u32; 4];
    for (i, w) in a.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([
            octets[i * 4],
            octets[i * 4 + 1],
            octets[i * 4 + 2],
            octets[i * 4 + 3],
        ]);
    }
    a
}

async fn sweeper(dnat: std::sync::Weak<Dnat>, timeouts: Timeouts) {
    let mut tick = tokio::time::interval(timeouts.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(d) = dnat.upgrade() else { return };
        let n = d.sweep(&timeouts);
        if n > 0 {
            debug!(expired = n, "conntrack entries swept");
        }
    }
}

/// Keeps the local-address map current: re-reads the local table whenever an address is
/// added or removed.
async fn local_watcher(dnat: std::sync::Weak<Dnat>) {
    use rtnetlink::MulticastGroup;
    let (conn, _handle, mut events) = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ]) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot watch address changes; local addresses stay as at start");
            return;
        }
    };
    let conn = tokio::spawn(conn);
    while events.next().await.is_some() {
        // Coalesce a burst (an interface going up brings several addresses).
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, events.next()).await {}
        let Some(d) = dnat.upgrade() else { break };
        if let Err(e) = d.refresh_local().await {
            warn!(error = %e, "cannot refresh local addresses");
        }
    }
    conn.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_ports_use_the_maps_layout() {
        let k = service_key(Proto::Tcp, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(k.addr, shared::v4_mapped([0; 4]));
        assert_eq!(k.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(k.proto, PROTO_TCP);
        let k = service_key(Proto::Udp, "[::]:53".parse().unwrap());
        assert_eq!(k.addr, [0; 4]);
        assert_eq!(k.proto, PROTO_UDP);
        assert_eq!(
            addr_of("10.1.2.3".parse().unwrap()),
            shared::v4_mapped([10, 1, 2, 3])
        );
    }
}
