//! What to build: the bridge, the subnet, the gateway and the containers, from flags or TOML.
use std::{collections::HashSet, net::Ipv4Addr, path::Path, str::FromStr};

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::{IfName, NetError};

pub const DEFAULT_BRIDGE: &str = "berth0";
pub const DEFAULT_SUBNET: &str = "172.16.0.0/16";
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 254);

/// One container as asked for: a name and, optionally, a fixed address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    #[serde(default, rename = "ip", skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
}

impl FromStr for ContainerSpec {
    type Err = NetError;

    /// `NAME` or `NAME=IP`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, addr) = match s.split_once('=') {
            Some((name, ip)) => {
                let ip = ip.parse().map_err(|_| NetError::InvalidContainer {
                    spec: s.to_owned(),
                    why: format!("{ip:?} is not an IPv4 address"),
                })?;
                (name, Some(ip))
            }
            None => (s, None),
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
        })
    }
}

/// The topology file: the same fields as the `berth net up` flags.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    pub bridge: Option<String>,
    pub subnet: Option<String>,
    pub gateway: Option<Ipv4Addr>,
    /// Source-NAT the containers' outbound traffic to the host's address (`--masquerade`).
    #[serde(default)]
    pub masquerade: bool,
    #[serde(default, rename = "container")]
    pub containers: Vec<ContainerSpec>,
}

impl TopologyFile {
    pub fn load(path: &Path) -> Result<Self, NetError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| NetError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// A container with everything resolved: its namespace, its veth names and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Name of the network namespace under /run/netns.
    pub name: String,
    /// The veth end that stays in the host namespace, enslaved to the bridge.
    pub host_veth: IfName,
    /// The other end's name until it is moved into the namespace and renamed `eth0`.
    pub peer_tmp: IfName,
    pub addr: Ipv4Addr,
}

impl Container {
    /// The names derived from a container name, which must itself be a valid interface name
    /// short enough to take a 3-byte prefix.
    pub fn named(name: &str, addr: Ipv4Addr) -> Result<Self, NetError> {
        let _valid: IfName = name.parse()?;
        Ok(Self {
            name: name.to_owned(),
            host_veth: IfName::with_prefix("ve-", name)?,
            peer_tmp: IfName::with_prefix("vp-", name)?,
            addr,
        })
    }
}

/// A validated topology, ready for [`super::up`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub bridge: IfName,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub containers: Vec<Container>,
    /// Give the containers outbound access: what leaves the host by any interface but the
    /// bridge is source-NATed to that interface's address, and forwarding is turned on.
    pub masquerade: bool,
}

impl Topology {
    /// Resolves defaults and addresses and checks everything before anything is created.
    ///
    /// Without `--subnet` the walk-through's 172.16.0.0/16 with gateway 172.16.1.254 is used;
    /// with a subnet but no gateway, the gateway is the subnet's last host address. Containers
    /// without a fixed address get the next free one counting from the gateway's /24 + 1
    /// (172.16.1.1, .2, …).
    pub fn resolve(
        bridge: Option<&str>,
        subnet: Option<&str>,
        gateway: Option<Ipv4Addr>,
        containers: &[ContainerSpec],
    ) -> Result<Self, NetError> {
        let bridge: IfName = bridge.unwrap_or(DEFAULT_BRIDGE).parse()?;
        let subnet_given = subnet.is_some();
        let subnet_text = subnet.unwrap_or(DEFAULT_SUBNET);
        let subnet: Ipv4Net = subnet_text
            .parse()
            .map_err(|_| NetError::InvalidSubnet(subnet_text.to_owned()))?;
        if subnet.prefix_len() > 30 {
            return Err(NetError::InvalidSubnet(subnet_text.to_owned()));
        }
        let gateway = match gateway {
            Some(gw) => gw,
            None if !subnet_given => DEFAULT_GATEWAY,
            None => Ipv4Addr::from(u32::from(subnet.broadcast()) - 1),
        };
        check_host(gateway, subnet)?;

        let mut taken: HashSet<Ipv4Addr> = HashSet::from([gateway]);
        let mut names = HashSet::new();
        for c in containers {
            if !names.insert(c.name.as_str()) {
                return Err(NetError::DuplicateContainer(c.name.clone()));
            }
            if let Some(addr) = c.addr {
                check_host(addr, subnet)?;
                if !taken.insert(addr) {
                    return Err(NetError::DuplicateAddress(addr));
                }
            }
        }

        let mut next = first_auto_addr(gateway, subnet);
        let mut resolved = Vec::with_capacity(containers.len());
        for c in containers {
            let addr = match c.addr {
                Some(addr) => addr,
                None => {
                    while taken.contains(&next) {
                        next = next_host(next, subnet).ok_or(NetError::SubnetFull(subnet))?;
                    }
                    taken.insert(next);
                    next
                }
            };
            resolved.push(Container::named(&c.name, addr)?);
        }
        Ok(Self {
            bridge,
            subnet,
            gateway,
            containers: resolved,
            masquerade: false,
        })
    }

    /// The same topology, with container egress (see [`Topology::masquerade`]) on or off.
    #[must_use]
    pub const fn with_masquerade(mut self, on: bool) -> Self {
        self.masquerade = on;
        self
    }

    pub fn container(&self, name: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == name)
    }
}

fn check_host(addr: Ipv4Addr, subnet: Ipv4Net) -> Result<(), NetError> {
    if subnet.contains(&addr) && addr != subnet.network() && addr != subnet.broadcast() {
        Ok(())
    } else {
        Err(NetError::OutsideSubnet { addr, subnet })
    }
}

fn first_auto_addr(gateway: Ipv4Addr, subnet: Ipv4Net) -> Ipv4Addr {
    let base = Ipv4Addr::from((u32::from(gateway) & !0xff) + 1);
    if subnet.contains(&base) && base != subnet.broadcast() {
        base
    } else {
        Ipv4Addr::from(u32::from(subnet.network()) + 1)
    }
}

fn next_host(addr: Ipv4Addr, subnet: Ipv4Net) -> Option<Ipv4Addr> {
    let next = Ipv4Addr::from(u32::from(addr).checked_add(1)?);
    (subnet.contains(&next) && next != subnet.broadcast()).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(list: &[&str]) -> Vec<ContainerSpec> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn defaults_follow_the_walk_through() {
        let t = Topology::resolve(None, None, None, &specs(&["c1", "c2"])).unwrap();
        assert_eq!(t.bridge.as_str(), "berth0");
        assert_eq!(t.subnet.to_string(), "172.16.0.0/16");
        assert_eq!(t.gateway, DEFAULT_GATEWAY);
        let addrs: Vec<_> = t.containers.iter().map(|c| c.addr.to_string()).collect();
        assert_eq!(addrs, ["172.16.1.1", "172.16.1.2"]);
        assert_eq!(t.containers[0].host_veth.as_str(), "ve-c1");
    }

    #[test]
    fn fixed_addresses_are_skipped_by_allocation() {
        let t = Topology::resolve(
            None,
            Some("10.9.0.0/24"),
            None,
            &specs(&["a=10.9.0.1", "b"]),
        )
        .unwrap();
        assert_eq!(t.gateway, Ipv4Addr::new(10, 9, 0, 254));
        assert_eq!(t.containers[1].addr, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn rejects_bad_input() {
        let bad = |subnet: Option<&str>, gw: Option<Ipv4Addr>, c: &[&str]| {
            Topology::resolve(None, subnet, gw, &specs(c))
                .unwrap_err()
                .to_string()
        };
        assert!(bad(Some("10.0.0.0/33"), None, &[]).contains("invalid subnet"));
        assert!(bad(Some("nonsense"), None, &[]).contains("invalid subnet"));
        assert!(
            bad(Some("10.0.0.0/24"), Some(Ipv4Addr::new(10, 0, 1, 1)), &[]).contains("not inside")
        );
        assert!(bad(None, None, &["a", "a"]).contains("listed twice"));
        assert!(bad(None, None, &["a=172.16.1.9", "b=172.16.1.9"]).contains("used twice"));
        assert!(bad(None, None, &["a=172.16.1.254"]).contains("used twice"));
        assert!(bad(None, None, &["averyveryverylongname"]).contains("longer than 15"));
        assert!(bad(None, None, &["thirteenchars"]).contains("shorter container name"));
        assert!(bad(Some("10.0.0.0/30"), None, &["a", "b"]).contains("no free address"));
        assert!(
            "a=1.2.3"
                .parse::<ContainerSpec>()
                .unwrap_err()
                .to_string()
                .contains("IPv4")
        );
    }

    #[test]
    fn parses_topology_file() {
        let f: TopologyFile = toml::from_str(
            "bridge = \"br9\"\nsubnet = \"10.1.0.0/16\"\n[[container]]\nname = \"web\"\nip = \"10.1.0.5\"\n",
        )
        .unwrap();
        assert_eq!(f.containers, specs(&["web=10.1.0.5"]));
        assert!(!f.masquerade, "egress is asked for, never implied");
        let f: TopologyFile = toml::from_str("masquerade = true\n").unwrap();
        assert!(f.masquerade);
        assert!(toml::from_str::<TopologyFile>("masquerade = \"yes\"").is_err());
        assert!(toml::from_str::<TopologyFile>("bogus = 1").is_err());
    }
}
