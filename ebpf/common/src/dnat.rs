//! Kernel-mode port mapping: a service table, a conntrack table, a reverse-NAT table for local
//! sockets, the host's local addresses and per-mapping counters.
//!
//! # Addresses and ports
//! Every address is 16 bytes laid out like `struct in6_addr`; IPv4 addresses are IPv4-mapped
//! (`::ffff:a.b.c.d`). One representation serves both families, and an IPv6 socket that dials
//! `::ffff:127.0.0.1` matches the same entries as an IPv4 socket dialling `127.0.0.1`. Ports are
//! stored as they appear on the wire (network byte order), so the programs never swap bytes.
//!
//! # Who writes what
//! User space writes [`SERVICES_MAP`], [`LOCAL_MAP`] and [`CONFIG_MAP`], and deletes expired
//! [`CONNTRACK_MAP`] entries. The TC program writes [`CONNTRACK_MAP`]; the cgroup programs write
//! [`REVNAT_MAP`]. Both count into [`STATS_MAP`] (per CPU, so without atomics).

/// The TC program (attached to ingress): DNAT of client packets, reverse NAT of replies.
pub const TC_PROG: &str = "berth_dnat_tc";
/// The cgroup `sock_addr` programs, by attach point.
pub const CONNECT4_PROG: &str = "berth_dnat_connect4";
pub const CONNECT6_PROG: &str = "berth_dnat_connect6";
pub const SENDMSG4_PROG: &str = "berth_dnat_sendmsg4";
pub const SENDMSG6_PROG: &str = "berth_dnat_sendmsg6";
pub const RECVMSG4_PROG: &str = "berth_dnat_recvmsg4";
pub const RECVMSG6_PROG: &str = "berth_dnat_recvmsg6";
pub const GETPEERNAME4_PROG: &str = "berth_dnat_getpeername4";
pub const GETPEERNAME6_PROG: &str = "berth_dnat_getpeername6";
/// cgroup `sock_release`: a local socket's reverse-NAT entry goes when the socket does.
pub const RELEASE_PROG: &str = "berth_dnat_release";

/// [`ServiceKey`] → [`Backend`].
pub const SERVICES_MAP: &str = "BERTH_DNAT_SVC";
/// [`FlowKey`] → [`Flow`], LRU: a full table evicts the least recently used flow.
pub const CONNTRACK_MAP: &str = "BERTH_DNAT_CT";
/// [`SockKey`] → [`Origin`], LRU: what a local socket dialled, for getpeername and recvmsg.
pub const REVNAT_MAP: &str = "BERTH_DNAT_REV";
/// LPM trie of the host's local addresses (the kernel's `local` routing table), value unused.
pub const LOCAL_MAP: &str = "BERTH_DNAT_LOCAL";
/// Mapping id (`u32`) → [`Stats`], per CPU.
pub const STATS_MAP: &str = "BERTH_DNAT_STATS";
/// One [`Config`] at index 0.
pub const CONFIG_MAP: &str = "BERTH_DNAT_CFG";
/// [`FragKey`] → [`FragRoute`], LRU: where the later fragments of a datagram go once its
/// first fragment (the only one with ports) was mapped. Kernel side only.
pub const FRAGS_MAP: &str = "BERTH_DNAT_FRAG";
/// [`FragKey6`] → [`FragRoute6`], LRU: the same for IPv6 datagrams. Kernel side only.
pub const FRAGS6_MAP: &str = "BERTH_DNAT_FRAG6";
/// One [`Scratch`] per CPU: where the TC program builds the ICMP errors it answers with (the
/// BPF stack is too small for them beside the rest). Kernel side only, never pinned: it
/// holds nothing between packets.
pub const SCRATCH_MAP: &str = "BERTH_DNAT_SCRATCH";
/// The scratch buffer's size in bytes.
pub const SCRATCH_LEN: usize = 128;
/// [`SCRATCH_MAP`]'s value.
pub type Scratch = [u8; SCRATCH_LEN];
/// Every map of the object that outlives a packet: what is pinned, and what a successor
/// must find to adopt.
pub const MAPS: [&str; 8] = [
    SERVICES_MAP,
    CONNTRACK_MAP,
    REVNAT_MAP,
    LOCAL_MAP,
    STATS_MAP,
    CONFIG_MAP,
    FRAGS_MAP,
    FRAGS6_MAP,
];
/// The cgroup programs, each with a link of its own.
pub const CGROUP_PROGS: [&str; 9] = [
    CONNECT4_PROG,
    CONNECT6_PROG,
    SENDMSG4_PROG,
    SENDMSG6_PROG,
    RECVMSG4_PROG,
    RECVMSG6_PROG,
    GETPEERNAME4_PROG,
    GETPEERNAME6_PROG,
    RELEASE_PROG,
];

/// Default sizes; user space sets the real ones at load time.
pub const DEFAULT_SERVICES: u32 = 4_096;
pub const DEFAULT_CONNTRACK: u32 = 65_536;
pub const DEFAULT_LOCAL_ADDRS: u32 = 1_024;
/// Fragmented datagrams in flight at once.
pub const DEFAULT_FRAGS: u32 = 4_096;

/// `IPPROTO_TCP` and `IPPROTO_UDP`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An address in `in6_addr` layout (IPv4 as `::ffff:a.b.c.d`), as four native `u32` words
/// holding the network-order bytes.
pub type Addr = [u32; 4];

/// A mapped host address and port. The wildcard address is `::ffff:0.0.0.0` for IPv4
/// mappings and `::` for IPv6 ones: it matches every local address of that family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Where a mapping sends its traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    /// [`BACKEND_DRAINING`] or 0.
    pub flags: u16,
    /// The interface that reaches the container (its bridge): client packets are redirected
    /// there, and replies are only recognised when they arrive from it.
    pub ifindex: u32,
    /// The mapping's id: the key of its [`Stats`].
    pub id: u32,
    /// The host's address on that interface (the bridge's gateway address), of the
    /// backend's family: the source given to a container's own hairpin traffic, so that the
    /// reply comes back through the host, as Docker's hairpin MASQUERADE does. [`NO_ADDR`]:
    /// no hairpin in the kernel.
    pub hairpin_src: Addr,
}

/// "No address" in the fields that may hold none (`::` is never a hairpin address).
pub const NO_ADDR: Addr = [0; 4];

/// The mapping is being removed: flows that have a conntrack entry go on, new ones (and new
/// local connects) are no longer mapped.
pub const BACKEND_DRAINING: u16 = 1;

/// A remote flow through the TC program, keyed as the *reply* looks: backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub backend: Addr,
    pub client: Addr,
    /// Network byte order.
    pub backend_port: u16,
    /// Network byte order.
    pub client_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of a flow, addresses in the maps' layout, ports in network byte order.
    pub const fn new(
        backend: Addr,
        client: Addr,
        backend_port: u16,
        client_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            backend,
            client,
            backend_port,
            client_port,
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of an IPv4 flow: addresses as network-order bytes in native words, ports in
    /// network byte order, as the TC program reads them from packets.
    pub const fn v4(
        backend: u32,
        client: u32,
        backend_port: u16,
        client_port: u16,
        proto: u8,
    ) -> Self {
        Self::new(
            v4_mapped(backend.to_ne_bytes()),
            v4_mapped(client.to_ne_bytes()),
            backend_port,
            client_port,
            proto,
        )
    }
}

/// What the reply must be rewritten to, and where the flow stands.
///
/// Each flag byte is written by one direction only, so the two directions, running on
/// different CPUs, never overwrite each other's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet in either direction.
    pub last_seen: u64,
    /// The address and port the client dialled (the reply's new source).
    pub orig: Addr,
    /// Network byte order.
    pub orig_port: u16,
    pub _pad: u16,
    /// The interface the client's packets arrive on: replies are redirected there.
    pub client_ifindex: u32,
    /// The interface replies must arrive from (the backend's).
    pub backend_ifindex: u32,
    /// The mapping's id.
    pub id: u32,
    /// Set when the client sent FIN.
    pub client_fin: u8,
    /// Set when the backend sent FIN.
    pub backend_fin: u8,
    /// Set when the client sent RST.
    pub client_rst: u8,
    /// Set when the backend sent RST.
    pub backend_rst: u8,
    pub _pad2: u32,
    /// For a hairpin flow (a container dialling a published port through the host from the
    /// backend's own bridge), the container's real address: the key's `client` is then the
    /// bridge's gateway address. [`NO_ADDR`] otherwise.
    pub hairpin_client: Addr,
}

/// A local socket and the backend address it was rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// What a local socket dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    /// The mapping's id.
    pub id: u32,
}

/// Per-mapping counters (per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Remote flows the TC program saw begin (new conntrack entries).
    pub flows: u64,
    /// Local connects and unconnected sends rewritten by the cgroup programs.
    pub local_rewrites: u64,
    /// Client → backend packets and bytes rewritten by the TC program.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend → client packets and bytes.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets of either direction larger than the next interface's MTU: answered with ICMP
    /// "fragmentation needed" / "packet too big" as a router would, or (IPv4 without DF, to
    /// the container) left to the host's stack and the relay, which fragment them.
    pub too_big: u64,
}

/// A fragmented IPv4 datagram as each of its fragments shows it on the wire (before any
/// rewrite): addresses as network-order bytes in native words, IP identification, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the first fragment of a datagram got, for the others.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragRoute {
    /// The new address: the container's for a client's datagram, the address the client
    /// dialled for a reply.
    pub addr: u32,
    /// The interface the first fragment was redirected to.
    pub ifindex: u32,
    /// The mapping the bytes count for.
    pub stats_id: u32,
    /// A hairpin flow's other address: the new source (the gateway's) of a container's
    /// datagram, the new destination (the container's) of a reply; 0: unchanged.
    pub other: u32,
    /// 1: the destination is rewritten (client → container); 0: the source (a reply).
    pub to_backend: u8,
    pub _pad: [u8; 3],
}

/// A fragmented IPv6 datagram as each of its fragments shows it (before any rewrite): the
/// fragment header's identification and the protocol after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: Addr,
    pub daddr: Addr,
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// What the first fragment of an IPv6 datagram got, for the others.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragRoute6 {
    /// The new destination (client → container) or source (a reply).
    pub addr: Addr,
    /// A hairpin flow's other address, as [`FragRoute::other`]; [`NO_ADDR`]: unchanged.
    pub other: Addr,
    pub ifindex: u32,
    pub stats_id: u32,
    /// 1: the destination is rewritten; 0: the source.
    pub to_backend: u8,
    pub _pad: [u8; 3],
}

/// Settings the programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Cookie of the host's network namespace: the cgroup programs act only on sockets there,
    /// since a cgroup also holds processes of other namespaces (containers).
    pub host_netns: u64,
    /// [`LAYOUT`] of the berth that wrote the maps: a successor adopts pinned maps only if it
    /// is its own.
    pub layout: u32,
    pub _pad: u32,
}

/// The meaning of the maps' entries. Sizes and map types are compared on their own when a
/// berth adopts pinned maps; bump this when an entry's meaning changes and its size does not.
/// 2: hairpin addresses became 16 bytes (IPv6 hairpin), so [`Backend`] and [`Flow`] grew,
/// and [`Stats`] counts packets too big for the next link.
pub const LAYOUT: u32 = 2;

/// The prefix length, in bits, of an IPv4-mapped address's IPv4 part inside an LPM key.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// `Addr` for an IPv4 address given as its four bytes.
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(octets),
    ]
}

/// True if `addr` is IPv4-mapped.
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod pod {
    use super::{Backend, Config, Flow, FlowKey, Origin, ServiceKey, SockKey, Stats};
    // SAFETY: (this and the impls below) `repr(C)` structs of integers whose explicit `_pad`
    // fields fill every gap (sizes 20, 44, 40, 64, 32, 24, 56, 16 bytes, checked by a test), so
    // there is no implicit padding and every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Flow {}
    // SAFETY: see above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Origin {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Stats {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<Backend>(), 44);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 64);
        assert_eq!(size_of::<SockKey>(), 32);
        assert_eq!(size_of::<Origin>(), 24);
        assert_eq!(size_of::<Stats>(), 56);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragRoute>(), 20);
        assert_eq!(size_of::<FragKey6>(), 40);
        assert_eq!(size_of::<FragRoute6>(), 44);
    }

    #[test]
    fn v4_mapped_matches_in6_addr_layout() {
        let a = v4_mapped([127, 0, 0, 1]);
        let mut bytes = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert!(is_v4_mapped(&a));
        assert!(!is_v4_mapped(&[0, 0, 0, 1]));
    }
}
