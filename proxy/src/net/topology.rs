//! `up` and `down`: build the whole topology, or remove everything `up` created.
use tracing::{debug, info, warn};

use super::{
    IfName, NetError, NetNs, Netlink, Topology, nft,
    spec::{Container, ContainerSpec},
    state::State,
};
use crate::caps::{self, Cap};

/// Builds the bridge and every container. All or nothing: on error, whatever this call created
/// is removed again. A bridge that already exists is adopted; an existing container is an error.
pub async fn up(t: &Topology) -> Result<(), NetError> {
    require_caps()?;
    let nl = Netlink::connect()?;
    for c in &t.containers {
        if NetNs::named(&c.name).path().exists() {
            return Err(NetError::AlreadyExists {
                what: "network namespace",
                name: c.name.clone(),
            });
        }
        for name in [&c.host_veth, &c.peer_tmp] {
            if nl.link(name.as_str()).await?.is_some() {
                return Err(NetError::AlreadyExists {
                    what: "interface",
                    name: name.to_string(),
                });
            }
        }
    }

    let bridge_created = match nl.link(t.bridge.as_str()).await? {
        Some(link) if Netlink::is_bridge(&link) => false,
        Some(_) => {
            return Err(NetError::NotABridge {
                name: t.bridge.to_string(),
            });
        }
        None => {
            nl.add_bridge(&t.bridge).await?;
            true
        }
    };
    let mut created: Vec<&Container> = Vec::new();
    let result = async {
        nl.add_addr(t.bridge.as_str(), t.gateway.into(), t.subnet.prefix_len())
            .await?;
        nl.set_up(t.bridge.as_str()).await?;
        for c in &t.containers {
            created.push(c);
            add_container(&nl, t, c).await?;
            info!(container = %c.name, addr = %c.addr, veth = %c.host_veth, "container up");
        }
        let mut state = State::load(&t.bridge);
        state.bridge_created |= bridge_created;
        if t.masquerade {
            state.enabled_forwarding |= forwarding::enable()?;
            nft::install(&t.bridge, t.subnet)?;
            state.masquerade = true;
            info!(bridge = %t.bridge, subnet = %t.subnet, table = %nft::table_name(&t.bridge), "container egress masqueraded");
        }
        state
            .containers
            .extend(t.containers.iter().map(|c| ContainerSpec {
                name: c.name.clone(),
                addr: Some(c.addr),
            }));
        state.save(&t.bridge)
    }
    .await;

    if let Err(e) = result {
        warn!(error = %e, "net up failed, removing what it created");
        if t.masquerade && !State::load(&t.bridge).masquerade {
            let _ = nft::remove(&t.bridge);
        }
        for c in created {
            let _ = remove_container(&nl, &c.name).await;
        }
        if bridge_created {
            let _ = nl.delete(t.bridge.as_str()).await;
        }
        return Err(e);
    }
    Ok(())
}

async fn add_container(nl: &Netlink, t: &Topology, c: &Container) -> Result<(), NetError> {
    let ns = NetNs::create(&c.name)?;
    nl.add_veth(&c.host_veth, &c.peer_tmp).await?;
    nl.set_controller(c.host_veth.as_str(), t.bridge.as_str())
        .await?;
    nl.set_up(c.host_veth.as_str()).await?;
    nl.move_to_ns(c.peer_tmp.as_str(), &ns.open()?).await?;

    let (peer, addr, prefix, gateway) =
        (c.peer_tmp.clone(), c.addr, t.subnet.prefix_len(), t.gateway);
    // The namespace's side is configured from a thread inside it; keep the runtime free meanwhile.
    tokio::task::spawn_blocking(move || {
        ns.run_async(|| async move {
            let nl = Netlink::connect()?;
            nl.rename(peer.as_str(), "eth0").await?;
            nl.add_addr("eth0", addr.into(), prefix).await?;
            nl.set_up("eth0").await?;
            nl.add_default_route(gateway).await
        })?
    })
    .await
    .map_err(|e| {
        NetError::io(
            "configure the container namespace",
            std::io::Error::other(e),
        )
    })?
}

/// Deletes a container's host veth (which takes its peer with it) and its namespace.
async fn remove_container(nl: &Netlink, name: &str) -> Result<(), NetError> {
    if let Ok(veth) = IfName::with_prefix("ve-", name) {
        nl.delete(veth.as_str()).await?;
    }
    if let Ok(peer) = IfName::with_prefix("vp-", name) {
        nl.delete(peer.as_str()).await?;
    }
    NetNs::named(name).delete()
}

/// What [`down`] removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub containers: Vec<String>,
    pub bridge_removed: bool,
    /// Ports still on the bridge that berth did not create; the bridge is kept for them.
    pub foreign_ports: Vec<String>,
    /// The egress (masquerade) table was deleted.
    pub masquerade_removed: bool,
    /// `net.ipv4.ip_forward` was turned off again, as it was before `up`.
    pub forwarding_restored: bool,
}

/// Removes the containers recorded for `bridge` plus `extra` ones, then the bridge itself if
/// no port is left on it. Missing pieces are skipped, so `down` can always be run again.
pub async fn down(bridge: &IfName, extra: &[String]) -> Result<DownReport, NetError> {
    require_caps()?;
    let nl = Netlink::connect()?;
    let state = State::load(bridge);
    let mut names: Vec<String> = state.containers.iter().map(|c| c.name.clone()).collect();
    for e in extra {
        if !names.contains(e) {
            names.push(e.clone());
        }
    }
    let mut report = DownReport::default();
    for name in names {
        remove_container(&nl, &name).await?;
        debug!(container = %name, "container removed");
        report.containers.push(name);
    }
    if let Some(link) = nl.link(bridge.as_str()).await?
        && Netlink::is_bridge(&link)
    {
        report.foreign_ports = nl.ports(link.header.index).await?;
        if report.foreign_ports.is_empty() {
            nl.delete(bridge.as_str()).await?;
            report.bridge_removed = true;
        }
    }
    if state.masquerade {
        nft::remove(bridge)?;
        report.masquerade_removed = true;
    }
    State::remove(bridge)?;
    if state.enabled_forwarding && !other_masquerading_bridge(&nl, bridge).await? {
        forwarding::restore()?;
        report.forwarding_restored = true;
    }
    Ok(report)
}

/// True when another bridge of this namespace still has berth's egress rule, so forwarding
/// must stay on. Records are per host, bridges per namespace: only live bridges count.
async fn other_masquerading_bridge(nl: &Netlink, bridge: &IfName) -> Result<bool, NetError> {
    for (name, state) in State::all() {
        if state.masquerade && name != bridge.as_str() && nl.link(&name).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `net.ipv4.ip_forward` of the calling thread's namespace, which egress needs on.
mod forwarding {
    use super::NetError;

    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";

    /// Turns forwarding on; true when it was off (so that `down` may turn it off again).
    pub(super) fn enable() -> Result<bool, NetError> {
        let was =
            std::fs::read_to_string(PATH).map_err(|e| NetError::io(format!("read {PATH}"), e))?;
        if was.trim() == "1" {
            return Ok(false);
        }
        write("1")?;
        Ok(true)
    }

    pub(super) fn restore() -> Result<(), NetError> {
        write("0")
    }

    fn write(v: &str) -> Result<(), NetError> {
        std::fs::write(PATH, v).map_err(|e| NetError::io(format!("write {v} to {PATH}"), e))
    }
}

fn require_caps() -> Result<(), NetError> {
    if caps::has(Cap::NetAdmin) && caps::has(Cap::SysAdmin) {
        Ok(())
    } else {
        Err(NetError::NotPermitted)
    }
}
