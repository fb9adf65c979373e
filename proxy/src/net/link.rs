//! rtnetlink operations on links, addresses and routes, in the namespace of the calling thread.
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};

use super::{IfName, NetError};

/// The errno inside a netlink error reply, if that is what `e` is.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// A route-netlink connection bound to the network namespace of the thread that opened it.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the current thread's namespace. Needs a tokio runtime.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::io("open a netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The underlying rtnetlink handle, for queries this type does not wrap.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetError::netlink(format!("look up link {name}"), e)),
        }
    }

    async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.link(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::Io {
                op: format!("find link {name}"),
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            })
    }

    /// True when `link` is a bridge device.
    pub fn is_bridge(link: &LinkMessage) -> bool {
        link.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))))
        })
    }

    /// Names of the links enslaved to the bridge with index `bridge`.
    pub async fn ports(&self, bridge: u32) -> Result<Vec<String>, NetError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list links", e))?;
        Ok(links
            .iter()
            .filter(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Controller(i) if *i == bridge))
            })
            .filter_map(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
            })
            .collect())
    }

    pub async fn add_bridge(&self, name: &IfName) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkBridge::new(name.as_str()).build())
            .execute()
            .await
            .map_err(|e| exists_or(e, "bridge", name, "create bridge"))
    }

    pub async fn add_veth(&self, name: &IfName, peer: &IfName) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkVeth::new(name.as_str(), peer.as_str()).build())
            .execute()
            .await
            .map_err(|e| exists_or(e, "interface", name, "create veth pair"))
    }

    /// Brings `name` up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.set(
            LinkUnspec::new_with_index(index).up().build(),
            format!("bring {name} up"),
        )
        .await
    }

    /// Enslaves `name` to the bridge `bridge`.
    pub async fn set_controller(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        let (index, br) = (self.index(name).await?, self.index(bridge).await?);
        self.set(
            LinkUnspec::new_with_index(index).controller(br).build(),
            format!("attach {name} to {bridge}"),
        )
        .await
    }

    /// Moves `name` into the namespace open as `ns_fd`.
    pub async fn move_to_ns(
        &self,
        name: &str,
        ns_fd: &std::os::fd::OwnedFd,
    ) -> Result<(), NetError> {
        use std::os::fd::AsRawFd as _;
        let index = self.index(name).await?;
        self.set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns_fd.as_raw_fd())
                .build(),
            format!("move {name} into its namespace"),
        )
        .await
    }

    /// Sets `name`'s MTU (the tests narrow a link to exercise path MTU discovery).
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.set(
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
            format!("set {name}'s MTU to {mtu}"),
        )
        .await
    }

    pub async fn rename(&self, name: &str, to: &str) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.set(
            LinkUnspec::new_with_index(index)
                .name(to.to_owned())
                .build(),
            format!("rename {name} to {to}"),
        )
        .await
    }

    async fn set(&self, msg: LinkMessage, op: String) -> Result<(), NetError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetError::netlink(op, e))
    }

    /// Adds `addr/prefix` to `name`; an address already there is fine. IPv6 addresses skip
    /// duplicate address detection (as Docker's do): berth owns the addresses it assigns, and
    /// a tentative address drops what is sent to it until DAD's work item has run.
    pub async fn add_addr(&self, name: &str, addr: IpAddr, prefix: u8) -> Result<(), NetError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
        let index = self.index(name).await?;
        let mut req = self.handle.address().add(index, addr, prefix);
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(NetError::netlink(
                format!("add {addr}/{prefix} to {name}"),
                e,
            )),
        }
    }

    /// A default route of `gateway`'s family via `gateway`; one already there is fine.
    pub async fn add_default_route(&self, gateway: impl Into<IpAddr>) -> Result<(), NetError> {
        let gateway = gateway.into();
        let route = match gateway {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new().gateway(v4).build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .gateway(v6)
                .build(),
        };
        match self.handle.route().add(route).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(NetError::netlink(
                format!("add default route via {gateway}"),
                e,
            )),
        }
    }

    /// Deletes `name`; a link that is already gone is fine.
    pub async fn delete(&self, name: &str) -> Result<(), NetError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(NetError::netlink(format!("delete {name}"), e)),
        }
    }
}

fn exists_or(e: rtnetlink::Error, what: &'static str, name: &IfName, op: &str) -> NetError {
    if errno(&e) == Some(libc::EEXIST) {
        NetError::AlreadyExists {
            what,
            name: name.to_string(),
        }
    } else {
        NetError::netlink(format!("{op} {name}"), e)
    }
}
