//! What kernel mode needs to know about the host, asked over rtnetlink and procfs: which
//! interfaces face clients, which one reaches a container, which addresses are local, where
//! cgroup v2 is mounted and which network namespace this is.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use berth_common::dnat::{Addr, V4_MAPPED_PREFIX};
use futures::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        link::{LinkAttribute, LinkFlags, LinkLayerType},
        route::{RouteAddress, RouteAttribute, RouteType},
    },
};

use super::DnatError;
use crate::net::Netlink;

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

/// An interface, by index and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Iface {
    pub(crate) index: u32,
    pub(crate) name: String,
}

/// The default client-facing interfaces: every Ethernet-type interface that is not loopback
/// and not enslaved (bridge and bond ports carry no routed traffic of their own; the bridge
/// itself is included, for clients in other container networks).
pub(crate) async fn default_interfaces(nl: &Netlink) -> Result<Vec<Iface>, DnatError> {
    let mut links = nl.handle().link().get().execute();
    let mut out = Vec::new();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| DnatError::netlink("list interfaces", e))?
    {
        if link.header.flags.contains(LinkFlags::Loopback)
            || link.header.link_layer_type != LinkLayerType::Ether
        {
            continue;
        }
        let mut name = None;
        let mut enslaved = false;
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Controller(_) => enslaved = true,
                _ => {}
            }
        }
        if let (Some(name), false) = (name, enslaved) {
            out.push(Iface {
                index: link.header.index,
                name,
            });
        }
    }
    Ok(out)
}

/// The client-facing interfaces: those `names` lists (a missing one is an error unless
/// `missing_ok`), or by default [`default_interfaces`].
pub(crate) async fn client_interfaces(
    nl: &Netlink,
    names: Option<&[String]>,
    missing_ok: bool,
) -> Result<Vec<Iface>, DnatError> {
    let Some(names) = names else {
        return default_interfaces(nl).await;
    };
    let mut found = Vec::new();
    for n in names {
        match interface(nl, n).await {
            Ok(i) => found.push(i),
            Err(_) if missing_ok => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// The indexes of every interface there is now.
pub(crate) async fn interface_indexes(nl: &Netlink) -> Result<BTreeSet<u32>, DnatError> {
    Ok(interface_names(nl).await?.into_keys().collect())
}

/// Every interface's name, by index.
pub(crate) async fn interface_names(
    nl: &Netlink,
) -> Result<std::collections::BTreeMap<u32, String>, DnatError> {
    let mut links = nl.handle().link().get().execute();
    let mut out = std::collections::BTreeMap::new();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| DnatError::netlink("list interfaces", e))?
    {
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        out.insert(link.header.index, name.unwrap_or_default());
    }
    Ok(out)
}

/// The interface named `name`.
pub(crate) async fn interface(nl: &Netlink, name: &str) -> Result<Iface, DnatError> {
    match nl.link(name).await {
        Ok(Some(link)) => Ok(Iface {
            index: link.header.index,
            name: name.to_owned(),
        }),
        Ok(None) => Err(DnatError::Interface {
            name: name.to_owned(),
            why: "no such interface".into(),
        }),
        Err(e) => Err(DnatError::netlink("look up an interface", e)),
    }
}

/// The interface the host routes `target` through, and the source address the host uses
/// there (its address on the container's bridge). A local target (berth's own host) has no
/// interface in front of it: kernel mode needs a container behind one.
pub(crate) async fn route_to(
    nl: &Netlink,
    target: IpAddr,
) -> Result<(Iface, Option<IpAddr>), DnatError> {
    let msg = match target {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .build(),
    };
    let route = nl
        .handle()
        .route()
        .get(msg)
        .execute()
        .try_next()
        .await
        .map_err(|e| DnatError::Target(format!("no route to {target}: {e}")))?
        .ok_or_else(|| DnatError::Target(format!("no route to {target}")))?;
    if route.header.kind == RouteType::Local {
        return Err(DnatError::Target(format!(
            "{target} is an address of this host; kernel mode maps to a container behind an interface (use a relay mode for local targets)"
        )));
    }
    let index = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
        .ok_or_else(|| DnatError::Target(format!("the route to {target} has no interface")))?;
    let src = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let name = index_to_name(index).map_err(|e| DnatError::Interface {
        name: format!("#{index}"),
        why: e.to_string(),
    })?;
    Ok((Iface { index, name }, src))
}

/// The host's local addresses as LPM prefixes (IPv4 as IPv4-mapped): every `local` route of
/// the kernel's local table, which covers 127.0.0.0/8, every interface address and any
/// AnyIP range (`ip route add local …`).
pub(crate) async fn local_prefixes(nl: &Netlink) -> Result<BTreeSet<(u32, Addr)>, DnatError> {
    let mut out = BTreeSet::new();
    let dumps = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for msg in dumps {
        let mut routes = nl.handle().route().get(msg).execute();
        while let Some(r) = routes
            .try_next()
            .await
            .map_err(|e| DnatError::netlink("dump the local routing table", e))?
        {
            if r.header.table != RT_TABLE_LOCAL || r.header.kind != RouteType::Local {
                continue;
            }
            let dest = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if let Some(ip) = dest {
                out.insert(lpm_prefix(ip, r.header.destination_prefix_length));
            }
        }
    }
    Ok(out)
}

/// `ip/len` as an LPM key: IPv4 prefixes sit below the 96-bit IPv4-mapped prefix.
pub(crate) fn lpm_prefix(ip: IpAddr, len: u8) -> (u32, Addr) {
    match ip {
        IpAddr::V4(v4) => (
            V4_MAPPED_PREFIX + u32::from(len.min(32)),
            super::addr_of(IpAddr::V4(v4)),
        ),
        IpAddr::V6(_) => (u32::from(len.min(128)), super::addr_of(ip)),
    }
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified`
/// on a hybrid one).
pub fn cgroup2_root() -> Result<PathBuf, DnatError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| DnatError::Cgroup {
            path: "/proc/self/mountinfo".into(),
            source: e,
        })?;
    cgroup2_in(&mountinfo).ok_or(DnatError::NoCgroup2)
}

fn cgroup2_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <opts> [optional…] - <fstype> …"
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cookie of this thread's network namespace (as `bpf_get_netns_cookie` sees it).
pub(crate) fn netns_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: SO_NETNS_COOKIE fills a u64; zero is a valid u64.
    unsafe {
        crate::sys::sockopt::<u64>(
            std::os::fd::AsFd::as_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
        )
    }
}

fn index_to_name(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:23 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_in("22 1 0:5 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn ipv4_prefixes_sit_below_the_mapped_prefix() {
        let (len, addr) = lpm_prefix("127.0.0.0".parse().unwrap(), 8);
        assert_eq!(len, 104);
        assert_eq!(addr, berth_common::dnat::v4_mapped([127, 0, 0, 0]));
        let (len, _) = lpm_prefix("::1".parse().unwrap(), 128);
        assert_eq!(len, 128);
    }
}
