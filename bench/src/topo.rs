//! The bench topology, inside a private "host" network namespace that this process unshared at
//! start: the walk-through bridge with a server container, plus an external-client namespace
//! on its own veth pair. iptables rules and sysctls live in the host namespace, so they vanish
//! with the process and the machine's own namespace is never touched.
//!
//! ```text
//!  ext ns (bx<pid>)            host ns (this process)                  container ns (bs<pid>)
//!  eth0 198.19.0.2/24 ──veth── bxh 198.19.0.1/24   bb<pid> 198.18.0.254/24 ──veth── eth0 198.18.0.1
//!  default via .1                proxies listen on 0.0.0.0:P                     load server :7000
//!  eth0 fd00:b2::2/64            bxh fd00:b2::1/64  bb<pid> fd00:b1::fe/64           eth0 fd00:b1::1
//! ```
//!
//! The IPv6 addresses serve the `ipv6` scenario (kernel mode's IPv6 path against direct,
//! ip6tables and a relay).
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use berth::net::{self, ContainerSpec, NetNs, Netlink, Topology};

/// The load server listens on one port per contender (7000 + index). Server-side TIME_WAIT
/// entries are keyed by the server port too, so one contender's connection churn can never
/// collide with another's: with a single shared port, kernel DNAT's masqueraded flows left
/// TIME_WAIT tuples that cut `direct`'s connection rate by 3x later in the same run.
pub(crate) const SERVER_PORT: u16 = 7000;
pub(crate) const HOST_EXT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const EXT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub(crate) const HOST_EXT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb2, 0, 0, 0, 0, 0, 1);
const EXT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb2, 0, 0, 0, 0, 0, 2);
const BRIDGE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb1, 0, 0, 0, 0, 0, 0xfe);
pub(crate) const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb1, 0, 0, 0, 0, 0, 1);
/// The host's end of the external client's veth pair.
pub(crate) const EXT_IFACE: &str = "bxh";
/// The bench's bridge, unique per run: its `berth net` record under /run is shared by all.
pub(crate) fn bridge() -> String {
    format!("bb{}", std::process::id())
}

/// The built topology. [`teardown`] removes the named namespaces; everything else is in
/// the host namespace and dies with this process.
#[derive(Debug)]
pub(crate) struct Topo {
    pub(crate) server_ns: NetNs,
    pub(crate) ext_ns: NetNs,
    pub(crate) server: SocketAddr,
}

impl Topo {
    /// The server address dedicated to contender number `index`.
    pub(crate) fn server_for(&self, index: u16) -> SocketAddr {
        SocketAddr::new(self.server.ip(), SERVER_PORT + index)
    }

    /// [`Topo::server_for`] on the server's IPv6 address.
    pub(crate) fn server6_for(&self, index: u16) -> SocketAddr {
        SocketAddr::from((SERVER_IP6, SERVER_PORT + index))
    }
}

/// Moves this (still single-threaded) process into a fresh network namespace.
pub(crate) fn enter_private_host_ns() -> anyhow::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET): the bench must run as root")
}

/// The bench's own cgroup (v2), a child of the hierarchy's root: berth-dnat's local-client
/// programs attach there, never to a cgroup of the machine's.
pub(crate) fn cgroup() -> std::path::PathBuf {
    let root = berth::dnat::cgroup2_root().unwrap_or_else(|_| "/sys/fs/cgroup".into());
    root.join(format!("berth-bench-{}", std::process::id()))
}

/// Where this process was before [`enter_bench_cgroup`], for [`leave_bench_cgroup`].
static ORIGIN: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Moves this process (and so every client it runs, and every contender it starts) into
/// the bench's cgroup.
pub(crate) fn enter_bench_cgroup() -> anyhow::Result<()> {
    let cg = cgroup();
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process is in no cgroup v2 hierarchy")?
        .trim_start_matches('/')
        .to_owned();
    let origin = cg.parent().context("cgroup root")?.join(rel);
    std::fs::create_dir(&cg).with_context(|| format!("failed to create {}", cg.display()))?;
    *ORIGIN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(origin);
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("failed to enter {}", cg.display()))
}

fn leave_bench_cgroup() {
    let origin = ORIGIN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(origin) = origin {
        let _ = std::fs::write(origin.join("cgroup.procs"), std::process::id().to_string());
        // Contenders are dead by now; their cgroup membership went with them.
        let _ = std::fs::remove_dir(cgroup());
    }
}

pub(crate) fn names() -> (String, String) {
    let pid = std::process::id();
    (format!("bs{pid}"), format!("bx{pid}"))
}

/// Removes what outlives the process: the named namespaces and `berth net`'s record of the
/// topology (the bridge itself dies with the private host namespace). Safe to call twice,
/// and from the Ctrl-C handler's thread.
pub(crate) fn teardown() {
    leave_bench_cgroup();
    let (server, ext) = names();
    if let (Ok(rt), Ok(bridge)) = (
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        bridge().parse(),
    ) {
        let _ = rt.block_on(net::down(&bridge, std::slice::from_ref(&server)));
    }
    for ns in [server, ext] {
        let _ = NetNs::named(&ns).delete();
    }
}

pub(crate) async fn build() -> anyhow::Result<Topo> {
    let nl = Netlink::connect()?;
    nl.set_up("lo").await?;
    let (server_name, ext_name) = names();
    let topo = Topology::resolve(
        Some(&bridge()),
        Some("198.18.0.0/24"),
        None,
        &[ContainerSpec {
            name: server_name.clone(),
            addr: None,
        }],
    )?;
    net::up(&topo).await?;
    let server = SocketAddr::from((topo.containers[0].addr, SERVER_PORT));

    // The external client: its own veth pair into the host, routed (not bridged).
    let ext_ns = NetNs::create(&ext_name)?;
    let (host_end, peer) = (EXT_IFACE.parse()?, "bxp".parse()?);
    nl.add_veth(&host_end, &peer).await?;
    nl.add_addr(EXT_IFACE, HOST_EXT_IP.into(), 24).await?;
    nl.set_up(EXT_IFACE).await?;
    nl.move_to_ns("bxp", &ext_ns.open()?).await?;
    ext_ns.run_async(|| async {
        let nl = Netlink::connect()?;
        nl.rename("bxp", "eth0").await?;
        nl.add_addr("eth0", EXT_IP.into(), 24).await?;
        nl.set_up("eth0").await?;
        nl.add_default_route(HOST_EXT_IP).await?;
        nl.add_addr("eth0", EXT_IP6.into(), 64).await?;
        nl.add_default_route(HOST_EXT_IP6).await
    })??;
    nl.add_addr(EXT_IFACE, HOST_EXT_IP6.into(), 64).await?;
    nl.add_addr(&bridge(), BRIDGE_IP6.into(), 64).await?;
    topo_ns(&server_name).run_async(|| async {
        let nl = Netlink::connect()?;
        nl.add_addr("eth0", SERVER_IP6.into(), 64).await?;
        nl.add_default_route(BRIDGE_IP6).await
    })??;

    // Host-namespace tuning, as a Docker host would have it: forwarding for routed clients
    // and DNAT, loopback DNAT for iptables' local clients, and room for connection churn.
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
        ("net/ipv4/tcp_tw_reuse", "1"),
        // Ephemeral ports above every port the bench listens on (10000–11999).
        ("net/ipv4/ip_local_port_range", "16384 65000"),
        ("net/core/somaxconn", "65535"),
        (
            &format!("net/ipv4/conf/{}/route_localnet", bridge()) as &str,
            "1",
        ),
    ] {
        sysctl(key, value)?;
    }
    for ns in [&topo_ns(&server_name), &ext_ns] {
        ns.run(|| {
            sysctl("net/core/somaxconn", "65535")?;
            sysctl("net/ipv4/ip_local_port_range", "16384 65000")
        })??;
    }
    // A redirect towards a neighbour that a veth cannot solicit yet (its link-local address
    // still tentative) loses the packet: wait for duplicate address detection everywhere.
    for ns in [None, Some(&ext_ns), Some(&topo_ns(&server_name))] {
        let tentative = || -> anyhow::Result<bool> {
            let table = std::fs::read_to_string("/proc/thread-self/net/if_inet6")?;
            Ok(table.lines().any(|l| {
                l.split_whitespace()
                    .nth(4)
                    .and_then(|f| u32::from_str_radix(f, 16).ok())
                    .is_some_and(|f| f & IFA_F_TENTATIVE != 0)
            }))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while match ns {
            None => tentative()?,
            Some(ns) => ns.run(tentative)??,
        } {
            anyhow::ensure!(Instant::now() < deadline, "IPv6 DAD did not finish in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Topo {
        server_ns: topo_ns(&server_name),
        ext_ns,
        server,
    })
}

/// `if_inet6`'s flag of an address still under duplicate address detection.
const IFA_F_TENTATIVE: u32 = 0x40;

fn topo_ns(name: &str) -> NetNs {
    NetNs::named(name)
}

/// Writes a sysctl of the calling thread's network namespace.
/// Linux's defaults for TIME_WAIT reuse (loopback only) and the ephemeral range in the host
/// namespace while it lives, instead of the run's tuning: a Docker host as it comes, for the
/// sequential scenario. The tuning is back on drop.
pub(crate) struct HostDefaults(());

impl HostDefaults {
    pub(crate) fn set() -> anyhow::Result<Self> {
        // The default range starts above every port the bench listens on, too.
        sysctl("net/ipv4/tcp_tw_reuse", "2")?;
        sysctl("net/ipv4/ip_local_port_range", "32768 60999")?;
        Ok(Self(()))
    }
}

impl Drop for HostDefaults {
    fn drop(&mut self) {
        let _ = sysctl("net/ipv4/tcp_tw_reuse", "1");
        let _ = sysctl("net/ipv4/ip_local_port_range", "16384 65000");
    }
}

fn sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).with_context(|| format!("failed to set {}", path.display()))
}

/// A bpffs of the run's own, for the restart scenario's pinned state: unmounted (with
/// whatever is still pinned in it) on drop.
pub(crate) struct BpfFs(std::path::PathBuf);

impl BpfFs {
    pub(crate) fn mount(at: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(at)?;
        nix::mount::mount(
            Some("bpffs"),
            at,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount bpffs at {}", at.display()))?;
        Ok(Self(at.to_owned()))
    }

    pub(crate) fn dir(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}
