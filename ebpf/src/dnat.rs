//! berth's kernel-mode port mapping: a TC program that DNATs remote clients' packets to the
//! container and reverse-NATs the replies, and cgroup `sock_addr` programs that point local
//! sockets at the container directly. Maps and layouts: `berth_common::dnat`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_check_mtu, bpf_csum_diff, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    macros::{cgroup_sock, cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{SockAddrContext, SockContext, TcContext},
};
use berth_common::dnat::{
    Addr, BACKEND_DRAINING, Backend, Config, DEFAULT_CONNTRACK, DEFAULT_FRAGS, DEFAULT_LOCAL_ADDRS,
    DEFAULT_SERVICES, Flow, FlowKey, FragKey, FragKey6, FragRoute, FragRoute6, NO_ADDR, Origin,
    PROTO_TCP, PROTO_UDP, SCRATCH_LEN, Scratch, ServiceKey, SockKey, Stats, is_v4_mapped,
    v4_mapped,
};

#[map(name = "BERTH_DNAT_SVC")]
static SERVICES: HashMap<ServiceKey, Backend> = HashMap::with_max_entries(DEFAULT_SERVICES, 0);

#[map(name = "BERTH_DNAT_CT")]
static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK, 0);

#[map(name = "BERTH_DNAT_REV")]
static REVNAT: LruHashMap<SockKey, Origin> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK, 0);

#[map(name = "BERTH_DNAT_LOCAL")]
static LOCAL: LpmTrie<Addr, u8> = LpmTrie::with_max_entries(DEFAULT_LOCAL_ADDRS, 0);

#[map(name = "BERTH_DNAT_STATS")]
static STATS: PerCpuHashMap<u32, Stats> = PerCpuHashMap::with_max_entries(DEFAULT_SERVICES, 0);

#[map(name = "BERTH_DNAT_CFG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "BERTH_DNAT_FRAG")]
static FRAGS: LruHashMap<FragKey, FragRoute> = LruHashMap::with_max_entries(DEFAULT_FRAGS, 0);

#[map(name = "BERTH_DNAT_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BERTH_DNAT_FRAG6")]
static FRAGS6: LruHashMap<FragKey6, FragRoute6> = LruHashMap::with_max_entries(DEFAULT_FRAGS, 0);

/// "Not mine": with TCX the next program runs (TC_ACT_OK would end the chain and hide the
/// packet from other programs, other berth processes included); with cls_bpf, the default.
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// The L4 header of an IPv6 packet without extension headers.
const L4_6: usize = ETH_HLEN + 40;
/// IPv6 extension headers skipped on the way to the L4 header: hop-by-hop and destination
/// options carry nothing the mapping changes, nor does a routing header with no segment
/// left (its destination is final, and the L4 checksum covers it); a fragment header is
/// followed (the first fragment is mapped and remembered, the later ones follow it, as for
/// IPv4). A routing header with segments left is not for a mapping: the destination is
/// the next hop of a source route, which the host's stack forwards.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_FRAGMENT: u8 = 44;
/// At most this many extension headers are skipped (a bounded loop for the verifier; more
/// than two option headers is unusual).
const IPV6_MAX_EXT: usize = 4;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const SOCK_DGRAM: u32 = 2;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 errors: destination unreachable (1), packet too big (2), time exceeded (3).
const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=3;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Destination unreachable's code for "fragmentation needed and DF set".
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// `BPF_MTU_CHK_RET_SUCCESS`: the packet fits the interface's MTU.
const MTU_FITS: i64 = 0;
/// The hop limit of the ICMP errors the program sends, as the host's own would have.
const ICMP_HOP_LIMIT: u8 = 64;

// === TC: remote clients ===

/// The parts of an IPv4 TCP/UDP packet the program reads, all as on the wire.
struct Packet {
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    /// Time to live, and the protocol beside it: one 16-bit word of the header checksum.
    ttl: u8,
    /// Don't fragment: a router that cannot forward the packet whole answers "fragmentation
    /// needed" rather than fragment it.
    df: bool,
    /// IP identification, and whether more fragments follow (the first of several).
    id: u16,
    more: bool,
    /// Offset of the L4 header from the start of the frame.
    l4: usize,
    len: u64,
}

/// A fragment after the first: no ports, only the IP header.
struct Fragment {
    key: FragKey,
    ttl: u8,
    more: bool,
    len: u64,
}

/// An ICMP error (destination unreachable, fragmentation needed included, or time
/// exceeded) and the TCP/UDP packet it quotes.
struct IcmpError {
    saddr: u32,
    daddr: u32,
    ttl: u8,
    len: u64,
    /// Offset of the ICMP header from the start of the frame.
    l4: usize,
    /// The quoted packet's protocol, addresses and ports, as on the wire.
    proto: u8,
    in_saddr: u32,
    in_daddr: u32,
    in_sport: u16,
    in_dport: u16,
}

enum Parsed {
    /// A whole datagram or segment, or the first fragment of one.
    Packet(Packet),
    Later(Fragment),
    Icmp(IcmpError),
}

#[classifier]
fn berth_dnat_tc(ctx: TcContext) -> i32 {
    if ctx.skb.protocol() == u32::from(ETH_P_IPV6.to_be()) {
        return tc6(&ctx).unwrap_or(TC_ACT_UNSPEC);
    }
    let pkt = match parse(&ctx) {
        Some(Parsed::Packet(p)) => p,
        Some(Parsed::Later(f)) => return later(&ctx, &f).unwrap_or(TC_ACT_UNSPEC),
        Some(Parsed::Icmp(e)) => {
            // SAFETY: reading a field of this program's own context.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            return icmp_error(&ctx, &e, ifindex).unwrap_or(TC_ACT_UNSPEC);
        }
        None => return TC_ACT_UNSPEC,
    };
    // SAFETY: reading a field of this program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(verdict) = reply(&ctx, &pkt, ifindex) {
        return verdict;
    }
    forward(&ctx, &pkt, ifindex).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Parsed> {
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return None;
    }
    // Headers of up to 60 + 14 bytes; most drivers deliver them linear, pull if not.
    if ctx.data() + ETH_HLEN + 20 > ctx.data_end() {
        ctx.pull_data((ETH_HLEN + 20) as u32).ok()?;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + 20 > end {
        return None;
    }
    let ip = data + ETH_HLEN;
    // SAFETY: bounds-checked against data_end above (the verifier checks it too).
    let (ver_ihl, id, frag, ttl, proto, saddr, daddr) = unsafe {
        (
            *(ip as *const u8),
            core::ptr::read_unaligned((ip + 4) as *const u16),
            u16::from_be(core::ptr::read_unaligned((ip + 6) as *const u16)),
            *((ip + 8) as *const u8),
            *((ip + 9) as *const u8),
            core::ptr::read_unaligned((ip + 12) as *const u32),
            core::ptr::read_unaligned((ip + 16) as *const u32),
        )
    };
    if ver_ihl >> 4 != 4 {
        return None;
    }
    if proto == PROTO_ICMP && frag & 0x3fff == 0 {
        let l4 = ETH_HLEN + usize::from(ver_ihl & 0x0f) * 4;
        return parse_icmp(ctx, l4, saddr, daddr, ttl).map(Parsed::Icmp);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let more = frag & 0x2000 != 0;
    // Later fragments carry no ports: they follow the first (see `later`).
    if frag & 0x1fff != 0 {
        return Some(Parsed::Later(Fragment {
            key: FragKey {
                saddr,
                daddr,
                id,
                proto,
                _pad: 0,
            },
            ttl,
            more,
            len: u64::from(ctx.len()),
        }));
    }
    let l4 = ETH_HLEN + usize::from(ver_ihl & 0x0f) * 4;
    if l4 < ETH_HLEN + 20 {
        return None;
    }
    // Variable offsets defeat the verifier's packet-range tracking: read the L4 fields with
    // bpf_skb_load_bytes, which also copes with non-linear data.
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
    };
    let (sport, dport) = (ports[0], ports[1]);
    Some(Parsed::Packet(Packet {
        proto,
        saddr,
        daddr,
        sport,
        dport,
        tcp_flags,
        ttl,
        df: frag & 0x4000 != 0,
        id,
        more,
        l4,
        len: u64::from(ctx.len()),
    }))
}

/// An ICMP error quoting a TCP or UDP packet (quoted without IP options, as hosts send
/// them); anything else is not berth's.
#[inline(always)]
fn parse_icmp(ctx: &TcContext, l4: usize, saddr: u32, daddr: u32, ttl: u8) -> Option<IcmpError> {
    if l4 < ETH_HLEN + 20 {
        return None;
    }
    let kind: u8 = ctx.load(l4).ok()?;
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner = l4 + 8;
    let ver_ihl: u8 = ctx.load(inner).ok()?;
    let proto: u8 = ctx.load(inner + 9).ok()?;
    if ver_ihl != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let addrs: [u32; 2] = ctx.load(inner + 12).ok()?;
    let ports: [u16; 2] = ctx.load(inner + 20).ok()?;
    Some(IcmpError {
        saddr,
        daddr,
        ttl,
        len: u64::from(ctx.len()),
        l4,
        proto,
        in_saddr: addrs[0],
        in_daddr: addrs[1],
        in_sport: ports[0],
        in_dport: ports[1],
    })
}

/// An ICMP error about a mapped flow, translated as the flow's packets are: about a
/// client's packet (from the container's side: port unreachable, fragmentation needed), the
/// quote's destination goes back to what the client dialled, and the error to the client;
/// about a reply (from the client's side), the quote's source goes to the container, and
/// the error to it. So that connected sockets see ECONNREFUSED and Path MTU discovery works
/// through a mapping. The quoted L4 checksum is left as is: receivers do not check it.
#[inline(always)]
fn icmp_error(ctx: &TcContext, e: &IcmpError, ifindex: u32) -> Option<i32> {
    let key = FlowKey::v4(e.in_daddr, e.in_saddr, e.in_dport, e.in_sport, e.proto);
    // SAFETY: a map value stays valid while the program runs (not copied: the stack is
    // tight).
    if let Some(flow) = unsafe { CONNTRACK.get(key) }
        && flow.backend_ifindex == ifindex
        && flow.hairpin_client == NO_ADDR
    {
        let orig = flow.orig[3];
        hop(ctx, e.ttl, PROTO_ICMP)?;
        quote_addr(ctx, e, 16, e.in_daddr, orig)?;
        quote_port(ctx, e, 2, e.in_dport, flow.orig_port)?;
        if e.saddr == e.in_daddr {
            // The container itself answered: as the address the client dialled.
            set_addr(ctx, 12, e.saddr, orig)?;
        }
        count(flow.id, |s| {
            s.packets_out += 1;
            s.bytes_out += e.len;
        });
        return Some(redirect(flow.client_ifindex));
    }
    let quoted_src = v4_mapped(e.in_saddr.to_ne_bytes());
    let backend = service(e.proto, &quoted_src, e.in_sport, v4_mapped([0; 4]))?;
    if !is_v4_mapped(&backend.addr) {
        return None;
    }
    let key = FlowKey::v4(
        backend.addr[3],
        e.in_daddr,
        backend.port,
        e.in_dport,
        e.proto,
    );
    // SAFETY: as above.
    let flow = unsafe { CONNTRACK.get(key) }?;
    if flow.client_ifindex != ifindex || flow.hairpin_client != NO_ADDR {
        return None;
    }
    let container = backend.addr[3];
    hop(ctx, e.ttl, PROTO_ICMP)?;
    quote_addr(ctx, e, 12, e.in_saddr, container)?;
    quote_port(ctx, e, 0, e.in_sport, backend.port)?;
    set_addr(ctx, 16, e.daddr, container)?;
    count(backend.id, |s| {
        s.packets_in += 1;
        s.bytes_in += e.len;
    });
    Some(redirect(backend.ifindex))
}

/// Replaces the quoted packet's address at `off` in its IP header, fixing the quoted header
/// checksum and the ICMP checksum (which covers the quote, that checksum included).
#[inline(always)]
fn quote_addr(ctx: &TcContext, e: &IcmpError, off: usize, old: u32, new: u32) -> Option<()> {
    let (icmp_sum, inner) = (e.l4 + 2, e.l4 + 8);
    let old_sum: u16 = ctx.load(inner + 10).ok()?;
    ctx.l3_csum_replace(inner + 10, u64::from(old), u64::from(new), 4)
        .ok()?;
    let new_sum: u16 = ctx.load(inner + 10).ok()?;
    ctx.store(inner + off, &new, 0).ok()?;
    ctx.l4_csum_replace(icmp_sum, u64::from(old), u64::from(new), 4)
        .ok()?;
    ctx.l4_csum_replace(icmp_sum, u64::from(old_sum), u64::from(new_sum), 2)
        .ok()
}

/// Replaces the quoted packet's port at `off` in its L4 header (0: source, 2: destination),
/// fixing the ICMP checksum.
#[inline(always)]
fn quote_port(ctx: &TcContext, e: &IcmpError, off: usize, old: u16, new: u16) -> Option<()> {
    ctx.store(e.l4 + 8 + 20 + off, &new, 0).ok()?;
    ctx.l4_csum_replace(e.l4 + 2, u64::from(old), u64::from(new), 2)
        .ok()
}

/// A later fragment of a datagram whose first fragment was mapped: the same address rewrite
/// (the L4 checksum, in the first fragment, was already fixed for the whole datagram), the
/// same interface. A fragment whose first was not mapped (not ours, or overtaken) goes to
/// the host's stack, which reassembles the datagram for the relay.
#[inline(always)]
fn later(ctx: &TcContext, f: &Fragment) -> Option<i32> {
    // SAFETY: a plain `repr(C)` value, copied out at once.
    let route = unsafe { FRAGS.get(f.key) }.copied()?;
    hop(ctx, f.ttl, f.key.proto)?;
    let ((off, old), (other_off, other_old)) = if route.to_backend != 0 {
        ((16, f.key.daddr), (12, f.key.saddr))
    } else {
        ((12, f.key.saddr), (16, f.key.daddr))
    };
    set_addr(ctx, off, old, route.addr)?;
    if route.other != 0 {
        set_addr(ctx, other_off, other_old, route.other)?;
    }
    if !f.more {
        let _ = FRAGS.remove(f.key);
    }
    count(route.stats_id, |s| {
        if route.to_backend != 0 {
            s.packets_in += 1;
            s.bytes_in += f.len;
        } else {
            s.packets_out += 1;
            s.bytes_out += f.len;
        }
    });
    Some(redirect(route.ifindex))
}

/// Replaces the IPv4 address at `off` in the IP header (header checksum only: a later
/// fragment has no L4 header).
#[inline(always)]
fn set_addr(ctx: &TcContext, off: usize, old: u32, new: u32) -> Option<()> {
    ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 4)
        .ok()?;
    ctx.store(ETH_HLEN + off, &new, 0).ok()
}

/// After the first fragment of a datagram was mapped: how to map the rest.
#[inline(always)]
fn remember(pkt: &Packet, addr: u32, other: u32, ifindex: u32, stats_id: u32, to_backend: bool) {
    if !pkt.more {
        return;
    }
    let key = FragKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: pkt.id,
        proto: pkt.proto,
        _pad: 0,
    };
    let route = FragRoute {
        addr,
        ifindex,
        stats_id,
        other,
        to_backend: u8::from(to_backend),
        _pad: [0; 3],
    };
    let _ = FRAGS.insert(key, route, 0);
}

/// Takes one hop off the packet, as the routing it stands in for would, fixing the header
/// checksum. A packet with no hop left (TTL 1 or 0) is not redirected: the host's stack gets
/// it (and its relay serves it, or routing answers with an ICMP error).
#[inline(always)]
fn hop(ctx: &TcContext, ttl: u8, proto: u8) -> Option<()> {
    if ttl <= 1 {
        return None;
    }
    // The word as it sits in the packet (TTL, then protocol), read as a native u16, like
    // the addresses and ports handed to the checksum helpers.
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 2)
        .ok()?;
    ctx.store(ETH_HLEN + 8, &(ttl - 1), 0).ok()
}

/// A reply from a backend: source back to what the client dialled, then out of the client's
/// interface.
#[inline(always)]
fn reply(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> Option<i32> {
    let key = FlowKey::v4(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let flow = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a map value stays valid while the program runs; the fields written here are
    // written by this direction only.
    let flow = unsafe { &mut *flow };
    if flow.backend_ifindex != ifindex {
        return None;
    }
    let (orig_ip, orig_port) = (flow.orig[3], flow.orig_port);
    let (client_ifindex, id, hairpin_client) = (flow.client_ifindex, flow.id, flow.hairpin_client);
    if let Some(mtu) = too_big(ctx, client_ifindex) {
        count(id, |s| s.too_big += 1);
        // Without DF a router would fragment it; the host's stack would not translate it
        // back: dropped, and counted.
        return Some(if pkt.df {
            frag_needed(ctx, pkt.l4, mtu, ifindex).unwrap_or(TC_ACT_SHOT)
        } else {
            TC_ACT_SHOT
        });
    }
    hop(ctx, pkt.ttl, pkt.proto)?;
    from_backend(flow, pkt.tcp_flags);
    rewrite(ctx, pkt, 12, pkt.saddr, orig_ip, 0, pkt.sport, orig_port).ok()?;
    // NO_ADDR's last word is 0, FragRoute's "unchanged".
    let hairpin_client = hairpin_client[3];
    if hairpin_client != 0 {
        // Back from the gateway's address to the container that dialled.
        rewrite(
            ctx,
            pkt,
            16,
            pkt.daddr,
            hairpin_client,
            2,
            pkt.dport,
            pkt.dport,
        )
        .ok()?;
    }
    remember(pkt, orig_ip, hairpin_client, client_ifindex, id, false);
    count(id, |s| {
        s.packets_out += 1;
        s.bytes_out += pkt.len;
    });
    Some(redirect(client_ifindex))
}

/// A client's packet to a mapped local address and port: destination to the backend, then
/// out of the backend's interface. A container dialling from the backend's own bridge
/// (hairpin) also gets the bridge's gateway address as its source, so that the reply comes
/// back through here.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> Option<i32> {
    let dst = v4_mapped(pkt.daddr.to_ne_bytes());
    let backend = service(pkt.proto, &dst, pkt.dport, v4_mapped([0; 4]))?;
    if !is_v4_mapped(&backend.addr) {
        return None;
    }
    let hairpin = backend.ifindex == ifindex;
    if hairpin && backend.hairpin_src == NO_ADDR {
        return None;
    }
    let client = if hairpin {
        backend.hairpin_src[3]
    } else {
        pkt.saddr
    };
    let key = FlowKey::v4(backend.addr[3], client, backend.port, pkt.sport, pkt.proto);
    // One lookup serves the drain check, the hairpin check and the tracking.
    let existing = CONNTRACK.get_ptr_mut(key);
    // A draining mapping carries on its flows but takes no new ones.
    if backend.flags & BACKEND_DRAINING != 0 && existing.is_none() {
        return None;
    }
    let container = v4_mapped(pkt.saddr.to_ne_bytes());
    if hairpin && !hairpin_may_use(existing, &container, pkt.proto, pkt.tcp_flags) {
        return None;
    }
    let (new_ip, new_port) = (backend.addr[3], backend.port);
    if let Some(mtu) = too_big(ctx, backend.ifindex) {
        count(backend.id, |s| s.too_big += 1);
        // Without DF, the host's stack and the relay fragment it, as routing would.
        return if pkt.df {
            frag_needed(ctx, pkt.l4, mtu, ifindex)
        } else {
            None
        };
    }
    hop(ctx, pkt.ttl, pkt.proto)?;
    rewrite(ctx, pkt, 16, pkt.daddr, new_ip, 2, pkt.dport, new_port).ok()?;
    if hairpin {
        rewrite(ctx, pkt, 12, pkt.saddr, client, 0, pkt.sport, pkt.sport).ok()?;
    }
    let hairpin_client = if hairpin { container } else { NO_ADDR };
    let gateway = if hairpin { client } else { 0 };
    remember(pkt, new_ip, gateway, backend.ifindex, backend.id, true);
    track(
        existing,
        &key,
        pkt.tcp_flags,
        pkt.dport,
        &backend,
        dst,
        ifindex,
        hairpin_client,
    );
    count(backend.id, |s| {
        s.packets_in += 1;
        s.bytes_in += pkt.len;
    });
    Some(redirect(backend.ifindex))
}

/// Whether a hairpin packet from `container` may take the flow entry `existing` (looked up
/// by the gateway's address and the container's source port), or start one.
#[inline(always)]
fn hairpin_may_use(
    existing: Option<*mut Flow>,
    container: &Addr,
    proto: u8,
    tcp_flags: u8,
) -> bool {
    match existing {
        // Two containers of the bridge with the same source port: the second one's flow
        // would share the first's key. The relay serves it.
        // SAFETY: see `reply`.
        Some(flow) => (unsafe { (*flow).hairpin_client }) == *container,
        // A connection the relay already serves (its SYN came while the key was taken)
        // stays with the relay: only a SYN starts a hairpin TCP flow.
        None => proto != PROTO_TCP || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
    }
}

/// Refreshes the flow's conntrack entry (`existing`, looked up by the caller) or creates it.
#[allow(clippy::too_many_arguments, reason = "one call site, all plain values")]
#[inline(always)]
fn track(
    existing: Option<*mut Flow>,
    key: &FlowKey,
    tcp_flags: u8,
    dport: u16,
    backend: &Backend,
    dst: Addr,
    ifindex: u32,
    hairpin_client: Addr,
) {
    let syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(flow) = existing {
        // SAFETY: see `reply`.
        let flow = unsafe { &mut *flow };
        if syn {
            // A new connection reusing the tuple: forget how the old one ended.
            flow.client_fin = 0;
            flow.backend_fin = 0;
            flow.client_rst = 0;
            flow.backend_rst = 0;
            flow.orig = dst;
            flow.orig_port = dport;
            flow.client_ifindex = ifindex;
            flow.hairpin_client = hairpin_client;
        }
        flow.last_seen = now();
        if tcp_flags & TCP_FIN != 0 {
            flow.client_fin = 1;
        }
        if tcp_flags & TCP_RST != 0 {
            flow.client_rst = 1;
        }
        return;
    }
    let flow = Flow {
        last_seen: now(),
        orig: dst,
        orig_port: dport,
        client_ifindex: ifindex,
        backend_ifindex: backend.ifindex,
        id: backend.id,
        client_fin: u8::from(tcp_flags & TCP_FIN != 0),
        client_rst: u8::from(tcp_flags & TCP_RST != 0),
        hairpin_client,
        ..Flow::default()
    };
    if CONNTRACK.insert(key, flow, 0).is_ok() {
        count(backend.id, |s| s.flows += 1);
    }
}

/// A backend's packet of `flow` went by: it is alive, and maybe closing.
#[inline(always)]
fn from_backend(flow: &mut Flow, tcp_flags: u8) {
    flow.last_seen = now();
    if tcp_flags & TCP_FIN != 0 {
        flow.backend_fin = 1;
    }
    if tcp_flags & TCP_RST != 0 {
        flow.backend_rst = 1;
    }
}

// === TC: IPv6 ===

/// The parts of an IPv6 TCP/UDP packet the program reads.
struct Packet6 {
    proto: u8,
    /// Where the TCP/UDP header starts, past any skipped extension headers.
    l4: usize,
    /// The first fragment of a datagram with more to come: its fragment header's
    /// identification, for the later fragments to follow.
    frag_id: Option<u32>,
    saddr: Addr,
    daddr: Addr,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    hop_limit: u8,
    len: u64,
}

/// IPv6: the same mapping as IPv4's, for IPv6 containers behind `[::]:P` or an IPv6
/// address. No header checksum; the L4 checksum's pseudo-header gets the 16-byte address
/// change as a `bpf_csum_diff`. Hop-by-hop and destination options headers are skipped,
/// fragment headers followed, routing headers with no segment left skipped, hairpin
/// source-NATed as for IPv4. Packets still on a source route go to the host's stack; IPv6
/// clients of IPv4 containers are the relay's.
#[inline(always)]
fn tc6(ctx: &TcContext) -> Option<i32> {
    let head: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
    if head[0] >> 4 != 6 {
        return None;
    }
    let (mut proto, mut l4) = (head[6], L4_6);
    let mut frag_id = None;
    for _ in 0..IPV6_MAX_EXT {
        if proto == IPV6_FRAGMENT {
            // Next header, reserved, offset (13 bits) and flags (M, the last), identification.
            let f: [u8; 8] = ctx.load(l4).ok()?;
            let offset_flags = u16::from_be_bytes([f[2], f[3]]);
            let id = u32::from_ne_bytes([f[4], f[5], f[6], f[7]]);
            let more = offset_flags & 1 != 0;
            if offset_flags >> 3 != 0 {
                return later6(ctx, f[0], id, more, head[7]);
            }
            if more {
                frag_id = Some(id);
            }
            proto = f[0];
            l4 += 8;
            continue;
        }
        if proto != IPV6_HOPOPTS && proto != IPV6_DSTOPTS && proto != IPV6_ROUTING {
            break;
        }
        // Next header, then the length in 8-byte units beyond the first 8; a routing
        // header's type and segments left.
        let ext: [u8; 4] = ctx.load(l4).ok()?;
        if proto == IPV6_ROUTING && ext[3] != 0 {
            return None;
        }
        proto = ext[0];
        l4 += (usize::from(ext[1]) + 1) * 8;
    }
    if proto == PROTO_ICMPV6 && l4 == L4_6 {
        return icmp6_error(ctx, head[7]);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let saddr: Addr = ctx.load(ETH_HLEN + 8).ok()?;
    let daddr: Addr = ctx.load(ETH_HLEN + 24).ok()?;
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
    };
    let pkt = Packet6 {
        proto,
        l4,
        frag_id,
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        hop_limit: head[7],
        len: u64::from(ctx.len()),
    };
    // SAFETY: reading a field of this program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(verdict) = reply6(ctx, &pkt, ifindex) {
        return Some(verdict);
    }
    forward6(ctx, &pkt, ifindex)
}

#[inline(always)]
fn reply6(ctx: &TcContext, pkt: &Packet6, ifindex: u32) -> Option<i32> {
    let key = FlowKey::new(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let flow = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: see `reply`.
    let flow = unsafe { &mut *flow };
    if flow.backend_ifindex != ifindex {
        return None;
    }
    let (orig, orig_port) = (flow.orig, flow.orig_port);
    let (client_ifindex, id, hairpin_client) = (flow.client_ifindex, flow.id, flow.hairpin_client);
    if let Some(mtu) = too_big(ctx, client_ifindex) {
        count(id, |s| s.too_big += 1);
        return Some(packet_too_big(ctx, pkt.l4, mtu, ifindex).unwrap_or(TC_ACT_SHOT));
    }
    hop6(ctx, pkt.hop_limit)?;
    from_backend(flow, pkt.tcp_flags);
    rewrite6(ctx, pkt, 8, &pkt.saddr, &orig, 0, pkt.sport, orig_port)?;
    if hairpin_client != NO_ADDR {
        // Back from the gateway's address to the container that dialled.
        rewrite6(
            ctx,
            pkt,
            24,
            &pkt.daddr,
            &hairpin_client,
            2,
            pkt.dport,
            pkt.dport,
        )?;
    }
    remember6(pkt, orig, hairpin_client, client_ifindex, id, false);
    count(id, |s| {
        s.packets_out += 1;
        s.bytes_out += pkt.len;
    });
    Some(redirect(client_ifindex))
}

#[inline(always)]
fn forward6(ctx: &TcContext, pkt: &Packet6, ifindex: u32) -> Option<i32> {
    let backend = service(pkt.proto, &pkt.daddr, pkt.dport, [0; 4])?;
    if is_v4_mapped(&backend.addr) {
        return None;
    }
    // A container of the backend's own bridge: hairpin, as in `forward`.
    let hairpin = backend.ifindex == ifindex;
    if hairpin && backend.hairpin_src == NO_ADDR {
        return None;
    }
    let client = if hairpin {
        backend.hairpin_src
    } else {
        pkt.saddr
    };
    let key = FlowKey::new(backend.addr, client, backend.port, pkt.sport, pkt.proto);
    let existing = CONNTRACK.get_ptr_mut(key);
    if backend.flags & BACKEND_DRAINING != 0 && existing.is_none() {
        return None;
    }
    if hairpin && !hairpin_may_use(existing, &pkt.saddr, pkt.proto, pkt.tcp_flags) {
        return None;
    }
    if let Some(mtu) = too_big(ctx, backend.ifindex) {
        count(backend.id, |s| s.too_big += 1);
        return packet_too_big(ctx, pkt.l4, mtu, ifindex);
    }
    hop6(ctx, pkt.hop_limit)?;
    rewrite6(
        ctx,
        pkt,
        24,
        &pkt.daddr,
        &backend.addr,
        2,
        pkt.dport,
        backend.port,
    )?;
    let (hairpin_client, gateway) = if hairpin {
        rewrite6(ctx, pkt, 8, &pkt.saddr, &client, 0, pkt.sport, pkt.sport)?;
        (pkt.saddr, client)
    } else {
        (NO_ADDR, NO_ADDR)
    };
    track(
        existing,
        &key,
        pkt.tcp_flags,
        pkt.dport,
        &backend,
        pkt.daddr,
        ifindex,
        hairpin_client,
    );
    remember6(
        pkt,
        backend.addr,
        gateway,
        backend.ifindex,
        backend.id,
        true,
    );
    count(backend.id, |s| {
        s.packets_in += 1;
        s.bytes_in += pkt.len;
    });
    Some(redirect(backend.ifindex))
}

/// After the first fragment of an IPv6 datagram was mapped: how to map the rest.
#[inline(always)]
fn remember6(
    pkt: &Packet6,
    addr: Addr,
    other: Addr,
    ifindex: u32,
    stats_id: u32,
    to_backend: bool,
) {
    let Some(id) = pkt.frag_id else {
        return;
    };
    let key = FragKey6 {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let route = FragRoute6 {
        addr,
        other,
        ifindex,
        stats_id,
        to_backend: u8::from(to_backend),
        _pad: [0; 3],
    };
    let _ = FRAGS6.insert(key, route, 0);
}

/// A later fragment of an IPv6 datagram whose first was mapped: the same address, the same
/// interface (no header checksum; the L4 checksum, in the first fragment, covers it all). One
/// whose first was not mapped goes to the host's stack, which reassembles it for the relay.
#[inline(always)]
fn later6(ctx: &TcContext, proto: u8, id: u32, more: bool, hop_limit: u8) -> Option<i32> {
    let key = FragKey6 {
        saddr: ctx.load(ETH_HLEN + 8).ok()?,
        daddr: ctx.load(ETH_HLEN + 24).ok()?,
        id,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: a plain `repr(C)` value, copied out at once.
    let route = unsafe { FRAGS6.get(key) }.copied()?;
    hop6(ctx, hop_limit)?;
    let (off, other_off) = if route.to_backend != 0 {
        (24, 8)
    } else {
        (8, 24)
    };
    ctx.store(ETH_HLEN + off, &route.addr, 0).ok()?;
    if route.other != NO_ADDR {
        ctx.store(ETH_HLEN + other_off, &route.other, 0).ok()?;
    }
    if !more {
        let _ = FRAGS6.remove(key);
    }
    let len = u64::from(ctx.len());
    count(route.stats_id, |s| {
        if route.to_backend != 0 {
            s.packets_in += 1;
            s.bytes_in += len;
        } else {
            s.packets_out += 1;
            s.bytes_out += len;
        }
    });
    Some(redirect(route.ifindex))
}

/// An ICMPv6 error about a mapped flow, translated as [`icmp_error`] does for IPv4 (Packet
/// Too Big included, on which IPv6 Path MTU discovery depends). The ICMPv6 checksum covers
/// a pseudo-header, so the outer address change enters it too.
#[inline(always)]
fn icmp6_error(ctx: &TcContext, hop_limit: u8) -> Option<i32> {
    let kind: u8 = ctx.load(L4_6).ok()?;
    if !ICMPV6_ERRORS.contains(&kind) {
        return None;
    }
    let inner = L4_6 + 8;
    let inner_head: [u8; 8] = ctx.load(inner).ok()?;
    let proto = inner_head[6];
    if inner_head[0] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let outer_src: Addr = ctx.load(ETH_HLEN + 8).ok()?;
    let outer_dst: Addr = ctx.load(ETH_HLEN + 24).ok()?;
    let in_src: Addr = ctx.load(inner + 8).ok()?;
    let in_dst: Addr = ctx.load(inner + 24).ok()?;
    let ports: [u16; 2] = ctx.load(inner + 40).ok()?;
    let (in_sport, in_dport) = (ports[0], ports[1]);
    // SAFETY: reading a field of this program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = u64::from(ctx.len());
    let key = FlowKey::new(in_dst, in_src, in_dport, in_sport, proto);
    // SAFETY: a map value stays valid while the program runs (not copied: the stack is
    // tight).
    if let Some(flow) = unsafe { CONNTRACK.get(key) }
        && flow.backend_ifindex == ifindex
        && flow.hairpin_client == NO_ADDR
    {
        // About a client's packet, from the container's side: to the client.
        hop6(ctx, hop_limit)?;
        quote6(ctx, inner + 24, &in_dst, &flow.orig)?;
        quote6_port(ctx, inner + 42, in_dport, flow.orig_port)?;
        if outer_src == in_dst {
            outer6(ctx, 8, &outer_src, &flow.orig)?;
        }
        count(flow.id, |s| {
            s.packets_out += 1;
            s.bytes_out += len;
        });
        return Some(redirect(flow.client_ifindex));
    }
    // About a reply, from the client's side: to the container.
    let backend = service(proto, &in_src, in_sport, [0; 4])?;
    if is_v4_mapped(&backend.addr) {
        return None;
    }
    let key = FlowKey::new(backend.addr, in_dst, backend.port, in_dport, proto);
    // SAFETY: as above.
    let flow = unsafe { CONNTRACK.get(key) }?;
    if flow.client_ifindex != ifindex || flow.hairpin_client != NO_ADDR {
        return None;
    }
    hop6(ctx, hop_limit)?;
    quote6(ctx, inner + 8, &in_src, &backend.addr)?;
    quote6_port(ctx, inner + 40, in_sport, backend.port)?;
    outer6(ctx, 24, &outer_dst, &backend.addr)?;
    count(backend.id, |s| {
        s.packets_in += 1;
        s.bytes_in += len;
    });
    Some(redirect(backend.ifindex))
}

/// The checksum difference of replacing 16 bytes `old` with `new`.
#[inline(always)]
fn diff16(old: &Addr, new: &Addr) -> Option<u64> {
    let (mut from, mut to) = (*old, *new);
    // SAFETY: two 16-byte buffers on this program's stack.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
    (diff >= 0).then_some(diff as u64)
}

/// Replaces a quoted IPv6 address at `at` (part of the ICMPv6 payload), fixing the ICMPv6
/// checksum.
#[inline(always)]
fn quote6(ctx: &TcContext, at: usize, old: &Addr, new: &Addr) -> Option<()> {
    let diff = diff16(old, new)?;
    ctx.l4_csum_replace(L4_6 + 2, 0, diff, 0).ok()?;
    ctx.store(at, new, 0).ok()
}

/// Replaces a quoted port at `at`, fixing the ICMPv6 checksum.
#[inline(always)]
fn quote6_port(ctx: &TcContext, at: usize, old: u16, new: u16) -> Option<()> {
    ctx.store(at, &new, 0).ok()?;
    ctx.l4_csum_replace(L4_6 + 2, u64::from(old), u64::from(new), 2)
        .ok()
}

/// Replaces the outer IPv6 address at `ip_off`, fixing the ICMPv6 checksum's pseudo-header.
#[inline(always)]
fn outer6(ctx: &TcContext, ip_off: usize, old: &Addr, new: &Addr) -> Option<()> {
    let diff = diff16(old, new)?;
    ctx.l4_csum_replace(L4_6 + 2, 0, diff, u64::from(BPF_F_PSEUDO_HDR))
        .ok()?;
    ctx.store(ETH_HLEN + ip_off, new, 0).ok()
}

/// One hop off an IPv6 packet (no header checksum); none left: the host's.
#[inline(always)]
fn hop6(ctx: &TcContext, hop_limit: u8) -> Option<()> {
    if hop_limit <= 1 {
        return None;
    }
    ctx.store(ETH_HLEN + 7, &(hop_limit - 1), 0).ok()
}

/// Replaces an IPv6 address (at `ip_off` in the header) and a port, fixing the TCP/UDP
/// checksum: the address change enters as a checksum difference over its 16 bytes.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per direction, all plain values"
)]
#[inline(always)]
fn rewrite6(
    ctx: &TcContext,
    pkt: &Packet6,
    ip_off: usize,
    old: &Addr,
    new: &Addr,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let csum = if pkt.proto == PROTO_TCP {
        pkt.l4 + 16
    } else {
        pkt.l4 + 6
    };
    // Size 0: `to` is a difference from bpf_csum_diff.
    ctx.l4_csum_replace(csum, 0, diff16(old, new)?, u64::from(BPF_F_PSEUDO_HDR))
        .ok()?;
    ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(new_port), 2)
        .ok()?;
    ctx.store(ETH_HLEN + ip_off, new, 0).ok()?;
    ctx.store(pkt.l4 + port_off, &new_port, 0).ok()
}

/// Replaces an IPv4 address (at `ip_off` in the IP header) and a port (at `port_off` in the
/// L4 header), fixing the IP checksum and the TCP/UDP checksum (pseudo-header included).
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per direction, all plain values"
)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    ip_off: usize,
    old_ip: u32,
    new_ip: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (csum, mangled) = if pkt.proto == PROTO_TCP {
        (pkt.l4 + 16, 0)
    } else {
        // UDP: a zero checksum means "none" and must stay zero.
        (pkt.l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    ctx.l4_csum_replace(
        csum,
        u64::from(old_ip),
        u64::from(new_ip),
        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
    )?;
    ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(new_port), mangled | 2)?;
    set_addr(ctx, ip_off, old_ip, new_ip).ok_or(-1)?;
    ctx.store(pkt.l4 + port_off, &new_port, 0)?;
    Ok(())
}

/// The MTU of `ifindex` if the packet (or, for a GRO aggregate, each of its segments) is
/// larger: `bpf_redirect_neigh` does not check, and the bridge would drop it silently.
#[inline(always)]
fn too_big(ctx: &TcContext, ifindex: u32) -> Option<u32> {
    let mut mtu = 0u32;
    // SAFETY: the program's own skb; `mtu` is a u32 on this stack (0: check the skb's length).
    let ret = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &mut mtu, 0, 0) };
    (ret != MTU_FITS && ret > 0).then_some(mtu)
}

/// The ones' complement checksum of `len` bytes (a multiple of 4) at `at` in the scratch
/// buffer, ready to store.
#[inline(always)]
fn checksum(buf: &mut Scratch, at: usize, len: usize) -> Option<u16> {
    if at + len > SCRATCH_LEN {
        return None;
    }
    // SAFETY: `len` bytes of the map value from `at`, checked above; no `from` buffer.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().add(at).cast(),
            len as u32,
            0,
        )
    };
    if sum < 0 {
        return None;
    }
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    Some(!(s as u16))
}

/// Writes 4 bytes at `at` in the scratch buffer.
#[inline(always)]
fn put(buf: &mut Scratch, at: usize, bytes: [u8; 4]) {
    if at + 4 <= SCRATCH_LEN {
        buf[at..at + 4].copy_from_slice(&bytes);
    }
}

/// Copies `len` bytes of the packet from `offset` to `at` in the scratch buffer (a constant
/// length: aya's `load_bytes` clamps it to the packet, which the verifier reads as possibly
/// zero).
#[inline(always)]
fn copy_in(ctx: &TcContext, offset: usize, buf: &mut Scratch, at: usize, len: usize) -> Option<()> {
    if at + len > SCRATCH_LEN {
        return None;
    }
    // SAFETY: `len` bytes of the map value from `at`, checked above.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            buf.as_mut_ptr().add(at).cast(),
            len as u32,
        )
    };
    (ret == 0).then_some(())
}

/// Shrinks the packet to `len` bytes from the start of its frame.
#[inline(always)]
fn truncate(ctx: &TcContext, len: usize) -> Option<()> {
    // SAFETY: the program's own skb.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), len as u32, 0) };
    (ret == 0).then_some(())
}

/// This CPU's scratch buffer.
#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's own copy, used by one program run at a time (TC programs do not
    // preempt each other on a CPU).
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Turns an IPv4 packet that does not fit the next link into the ICMP "fragmentation
/// needed" a router would answer, from the address it was sent to, quoting its header and
/// first 8 bytes, and sends it back out of `back` (the interface it came from). Packets with
/// IP options are left to the host (the quote assumes a 20-byte header).
#[inline(always)]
fn frag_needed(ctx: &TcContext, l4: usize, mtu: u32, back: u32) -> Option<i32> {
    if l4 != ETH_HLEN + 20 {
        return None;
    }
    let buf = scratch()?;
    // The IP header (20 bytes), the ICMP header (8), the quote (28).
    const ICMP: usize = 20;
    const LEN: usize = 20 + 8 + 28;
    copy_in(ctx, ETH_HLEN, buf, ICMP + 8, 28)?;
    let next_hop = (mtu.min(0xffff) as u16).to_be_bytes();
    put(buf, ICMP, [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]);
    put(buf, ICMP + 4, [0, 0, next_hop[0], next_hop[1]]);
    let sum = checksum(buf, ICMP, 8 + 28)?.to_ne_bytes();
    put(
        buf,
        ICMP,
        [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, sum[0], sum[1]],
    );
    let total = (LEN as u16).to_be_bytes();
    put(buf, 0, [0x45, 0xc0, total[0], total[1]]);
    put(buf, 4, [0; 4]);
    put(buf, 8, [ICMP_HOP_LIMIT, PROTO_ICMP, 0, 0]);
    // From the address the packet was sent to, to its sender.
    let addrs: [u32; 2] = ctx.load(ETH_HLEN + 12).ok()?;
    put(buf, 12, addrs[1].to_ne_bytes());
    put(buf, 16, addrs[0].to_ne_bytes());
    let sum = checksum(buf, 0, 20)?.to_ne_bytes();
    put(buf, 8, [ICMP_HOP_LIMIT, PROTO_ICMP, sum[0], sum[1]]);
    // The checksums are complete, whatever the skb's checksum state says: a packet left
    // for offload (CHECKSUM_PARTIAL) came from a local namespace and goes back to it, where
    // it is not checked again; one from a NIC never is.
    let out: &[u8; LEN] = buf[..LEN].try_into().ok()?;
    ctx.store(ETH_HLEN, out, 0).ok()?;
    truncate(ctx, ETH_HLEN + LEN)?;
    Some(redirect(back))
}

/// The IPv6 counterpart of [`frag_needed`]: ICMPv6 "packet too big" (routers never fragment
/// IPv6), quoting the IPv6 header and 8 bytes. Packets with extension headers are left to
/// the host (the quote would not reach their ports).
#[inline(always)]
fn packet_too_big(ctx: &TcContext, l4: usize, mtu: u32, back: u32) -> Option<i32> {
    if l4 != L4_6 {
        return None;
    }
    let buf = scratch()?;
    // The pseudo-header (source, destination, length, next header: 40 bytes) the checksum
    // covers, then the message: the ICMPv6 header (8) and the quote (48).
    const MSG: usize = 40;
    const MSG_LEN: usize = 8 + 48;
    copy_in(ctx, ETH_HLEN, buf, MSG + 8, 48)?;
    // From the address the packet was sent to, to its sender: the quote has both.
    buf.copy_within(MSG + 8 + 24..MSG + 8 + 40, 0);
    buf.copy_within(MSG + 8 + 8..MSG + 8 + 24, 16);
    put(buf, 32, (MSG_LEN as u32).to_be_bytes());
    put(buf, 36, [0, 0, 0, PROTO_ICMPV6]);
    put(buf, MSG, [ICMPV6_PACKET_TOO_BIG, 0, 0, 0]);
    put(buf, MSG + 4, mtu.to_be_bytes());
    let sum = checksum(buf, 0, MSG + MSG_LEN)?.to_ne_bytes();
    put(buf, MSG, [ICMPV6_PACKET_TOO_BIG, 0, sum[0], sum[1]]);
    let len = (MSG_LEN as u16).to_be_bytes();
    let ip: [u8; 8] = [0x60, 0, 0, 0, len[0], len[1], PROTO_ICMPV6, ICMP_HOP_LIMIT];
    ctx.store(ETH_HLEN, &ip, 0).ok()?;
    let addrs: &[u8; 32] = buf[..32].try_into().ok()?;
    ctx.store(ETH_HLEN + 8, addrs, 0).ok()?;
    let msg: &[u8; MSG_LEN] = buf[MSG..MSG + MSG_LEN].try_into().ok()?;
    ctx.store(L4_6, msg, 0).ok()?;
    truncate(ctx, L4_6 + MSG_LEN)?;
    Some(redirect(back))
}

#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: no neighbour parameters: the kernel looks the next hop up itself. The helper
    // returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the interface is gone.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

// === Shared lookups ===

/// The backend for `proto` to `addr:port`: an exact mapping, else a wildcard mapping of the
/// address's family if `addr` is one of the host's own addresses.
#[inline(always)]
fn service(proto: u8, addr: &Addr, port: u16, wildcard: Addr) -> Option<Backend> {
    let mut key = ServiceKey {
        addr: *addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: a plain `repr(C)` value, copied out at once.
    if let Some(b) = unsafe { SERVICES.get(key) } {
        return Some(*b);
    }
    key.addr = wildcard;
    // SAFETY: as above.
    let backend = unsafe { SERVICES.get(key) }.copied()?;
    LOCAL.get(Key::new(128, *addr))?;
    Some(backend)
}

#[inline(always)]
fn count(id: u32, f: impl FnOnce(&mut Stats)) {
    if let Some(s) = STATS.get_ptr_mut(id) {
        // SAFETY: this CPU's own copy of the value.
        f(unsafe { &mut *s });
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

// === cgroup sock_addr: local clients ===

/// True if the socket lives in the host's network namespace (a cgroup also holds the
/// processes of other namespaces, whose 127.0.0.1 is their own).
#[inline(always)]
fn in_host_ns(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    CONFIG.get(0).is_some_and(|c| c.host_netns == cookie)
}

#[inline(always)]
fn user_addr(sa: &bpf_sock_addr, v6: bool) -> Addr {
    if v6 {
        // Word by word: the verifier accepts 4-byte accesses to user_ip6 on every kernel,
        // and a plain array copy may be merged into wider loads.
        let mut a = [0u32; 4];
        for (i, w) in a.iter_mut().enumerate() {
            // SAFETY: an in-bounds field of the context.
            *w = unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) };
        }
        a
    } else {
        v4_mapped(sa.user_ip4.to_ne_bytes())
    }
}

#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, addr: &Addr) {
    for (i, w) in addr.iter().enumerate() {
        // SAFETY: an in-bounds field of the context; see `user_addr`.
        unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], *w) };
    }
}

/// Points a connect or unconnected send at the backend, and remembers what was dialled.
#[inline(always)]
fn dial(ctx: &SockAddrContext, v6: bool, udp_only: bool) {
    if !in_host_ns(ctx) {
        return;
    }
    // SAFETY: the context outlives the program; the verifier checks every field access.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if (proto != PROTO_TCP && proto != PROTO_UDP) || (udp_only && sa.type_ != SOCK_DGRAM) {
        return;
    }
    let dialled = user_addr(sa, v6);
    let port = sa.user_port as u16;
    let wildcard = if v6 { [0; 4] } else { v4_mapped([0; 4]) };
    let Some(backend) = service(proto, &dialled, port, wildcard) else {
        return;
    };
    if backend.flags & BACKEND_DRAINING != 0 {
        return;
    }
    if v6 {
        // An IPv4 backend is dialled as ::ffff:a.b.c.d, which the kernel connects over IPv4
        // (a V6ONLY socket gets ENETUNREACH instead: nothing is misrouted).
        set_user_ip6(sa, &backend.addr);
    } else if is_v4_mapped(&backend.addr) {
        sa.user_ip4 = backend.addr[3];
    } else {
        return;
    }
    sa.user_port = u32::from(backend.port);
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let origin = Origin {
        addr: dialled,
        port,
        _pad: 0,
        id: backend.id,
    };
    let _ = REVNAT.insert(key, origin, 0);
    count(backend.id, |s| s.local_rewrites += 1);
}

/// Shows a local socket's peer as what it dialled rather than the backend.
#[inline(always)]
fn undial(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: see `dial`.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockKey {
        cookie,
        addr: user_addr(sa, v6),
        port: sa.user_port as u16,
        _pad: [0; 6],
    };
    // SAFETY: a plain `repr(C)` value, copied out at once.
    let Some(origin) = (unsafe { REVNAT.get(key) }).copied() else {
        return;
    };
    if v6 {
        set_user_ip6(sa, &origin.addr);
    } else if is_v4_mapped(&origin.addr) {
        sa.user_ip4 = origin.addr[3];
    } else {
        return;
    }
    sa.user_port = u32::from(origin.port);
}

#[cgroup_sock_addr(connect4)]
fn berth_dnat_connect4(ctx: SockAddrContext) -> i32 {
    dial(&ctx, false, false);
    1
}

#[cgroup_sock_addr(connect6)]
fn berth_dnat_connect6(ctx: SockAddrContext) -> i32 {
    dial(&ctx, true, false);
    1
}

#[cgroup_sock_addr(sendmsg4)]
fn berth_dnat_sendmsg4(ctx: SockAddrContext) -> i32 {
    dial(&ctx, false, true);
    1
}

#[cgroup_sock_addr(sendmsg6)]
fn berth_dnat_sendmsg6(ctx: SockAddrContext) -> i32 {
    dial(&ctx, true, true);
    1
}

#[cgroup_sock_addr(recvmsg4)]
fn berth_dnat_recvmsg4(ctx: SockAddrContext) -> i32 {
    undial(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
fn berth_dnat_recvmsg6(ctx: SockAddrContext) -> i32 {
    undial(&ctx, true);
    1
}

#[cgroup_sock_addr(getpeername4)]
fn berth_dnat_getpeername4(ctx: SockAddrContext) -> i32 {
    undial(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
fn berth_dnat_getpeername6(ctx: SockAddrContext) -> i32 {
    undial(&ctx, true);
    1
}

/// `AF_INET6` (linux/socket.h).
const AF_INET6: u32 = 10;

/// A connected local socket's reverse-NAT entry, keyed by the backend it was pointed at
/// (its peer now), goes when the socket is released. Without it REVNAT keeps an entry per
/// local connection ever made, and once full its LRU evicts the entries of live sockets.
/// Unconnected UDP senders have no peer to find their entries by: theirs age out by LRU.
#[cgroup_sock(sock_release)]
fn berth_dnat_release(ctx: SockContext) -> i32 {
    // SAFETY: the context's socket, valid for the whole program.
    let sk: &bpf_sock = unsafe { &*ctx.sock };
    let addr = if sk.family == AF_INET6 {
        let mut a = [0u32; 4];
        for (i, w) in a.iter_mut().enumerate() {
            // SAFETY: an in-bounds field of the context, read a word at a time (see
            // `user_addr`).
            *w = unsafe { core::ptr::read_volatile(&sk.dst_ip6[i]) };
        }
        a
    } else {
        v4_mapped(sk.dst_ip4.to_ne_bytes())
    };
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let key = SockKey {
        cookie,
        addr,
        port: sk.dst_port,
        _pad: [0; 6],
    };
    let _ = REVNAT.remove(key);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
