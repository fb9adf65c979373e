//! Addresses and keys in the maps' layout, and what kernel mode can map.
use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, MapData};
use berth_common::dnat::{Addr, NO_ADDR, PROTO_TCP, PROTO_UDP, ServiceKey};

use super::DnatError;
use crate::addr::Proto;

/// Whether kernel mode can map to `target`: an address of a container (IPv4 or IPv6) and an
/// explicit port.
pub fn check_target(target: SocketAddr) -> Result<(), DnatError> {
    let ip = target.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(DnatError::Target(format!(
            "{target}: kernel mode maps to a container's address"
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
pub(super) fn keys_where<K: aya::Pod, V: aya::Pod>(
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
pub(super) fn service_key(proto: Proto, listen: SocketAddr) -> ServiceKey {
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

/// The hairpin source of a mapping to `target`: `src`, the host's address towards the
/// target (its bridge's gateway), if it has the target's family; [`NO_ADDR`] (hairpin left
/// to the relay) if there is none.
pub(super) fn hairpin_src(target: IpAddr, src: Option<IpAddr>) -> Addr {
    match src {
        Some(src) if src.is_ipv4() == target.is_ipv4() && !src.is_unspecified() => addr_of(src),
        _ => NO_ADDR,
    }
}

/// The address of `addr` (the maps' 16-byte layout): IPv4 if IPv4-mapped.
pub(crate) fn ip_of(addr: &Addr) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
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

#[cfg(test)]
mod tests {
    use super::*;
    use berth_common::dnat as shared;

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

    #[test]
    fn the_hairpin_source_has_the_target_family_or_is_none() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            hairpin_src(ip("172.18.0.2"), Some(ip("172.18.0.1"))),
            shared::v4_mapped([172, 18, 0, 1])
        );
        let gw6 = hairpin_src(ip("fd00::2"), Some(ip("fd00::1")));
        assert_eq!(ip_of(&gw6), ip("fd00::1"));
        assert_eq!(hairpin_src(ip("fd00::2"), Some(ip("172.18.0.1"))), NO_ADDR);
        assert_eq!(hairpin_src(ip("172.18.0.2"), None), NO_ADDR);
        assert_eq!(hairpin_src(ip("fd00::2"), Some(ip("::"))), NO_ADDR);
    }
}
