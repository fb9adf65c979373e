//! Container egress: the one source-NAT rule Docker writes with iptables
//! (`-s SUBNET ! -o BRIDGE -j MASQUERADE`), written here as nf_tables messages over netlink.
//!
//! Everything lives in a table of berth's own per bridge (`ip berth_BRIDGE`), so it never
//! touches anyone else's rules; it is replaced in one atomic batch (create, delete, create) and
//! removed by deleting the table. Connection tracking is the kernel's: entries expire by its
//! per-namespace `nf_conntrack_*_timeout` settings.
use std::{io, net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

use super::{IfName, NetError};

// linux/netlink.h
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;
// linux/netfilter/nfnetlink.h
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
// linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_REG_1: u32 = 1;
// linux/netfilter.h
const NFPROTO_IPV4: u8 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NF_ACCEPT: u32 = 1;
const IFNAMSIZ: usize = 16;

const CHAIN: &str = "postrouting";
/// A reply that does not come within this is a kernel that does not answer nf_tables.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The table berth keeps `bridge`'s egress rule in.
pub fn table_name(bridge: &IfName) -> String {
    format!("berth_{bridge}")
}

/// Installs (or atomically replaces) the masquerade rule for `subnet` behind `bridge`: packets
/// from the subnet that leave by any other interface take that interface's address.
pub(crate) fn install(bridge: &IfName, subnet: Ipv4Net) -> Result<(), NetError> {
    Socket::open()?.transact(install_batch(bridge, subnet), "install the masquerade rule")
}

/// Deletes `bridge`'s table; one that is not there is fine.
pub(crate) fn remove(bridge: &IfName) -> Result<(), NetError> {
    let mut b = Batch::new();
    b.msg(NFT_MSG_DELTABLE, 0, "delete the table", |m| {
        m.str(NFTA_TABLE_NAME, &table_name(bridge));
    });
    match Socket::open()?.transact(b, "remove the masquerade rule") {
        Err(NetError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// True when the table for `bridge` exists in the calling thread's network namespace.
pub fn exists(bridge: &IfName) -> Result<bool, NetError> {
    let mut m = Msg::new(
        NFT_MSG_GETTABLE | (NFNL_SUBSYS_NFTABLES << 8),
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        NFPROTO_IPV4,
        0,
    );
    m.str(NFTA_TABLE_NAME, &table_name(bridge));
    let sock = Socket::open()?;
    sock.send(&m.finish())?;
    let mut found = false;
    loop {
        for reply in sock.recv()? {
            match reply {
                Reply::Ack { error: 0, .. } => return Ok(found),
                Reply::Ack { error, .. } if error == libc::ENOENT => return Ok(false),
                Reply::Ack { error, .. } => {
                    return Err(nft_error("look up the masquerade table", error));
                }
                Reply::Other { kind } if kind & 0xff == NFT_MSG_NEWTABLE => found = true,
                Reply::Other { .. } => {}
            }
        }
    }
}

/// The batch that replaces the table: creating it first makes the delete succeed whether or
/// not it existed, so the result is the same on a first `up` and on a repeated one.
fn install_batch(bridge: &IfName, subnet: Ipv4Net) -> Batch {
    let table = table_name(bridge);
    let mut b = Batch::new();
    for (kind, op) in [
        (NFT_MSG_NEWTABLE, "create the table"),
        (NFT_MSG_DELTABLE, "replace the table"),
        (NFT_MSG_NEWTABLE, "create the table"),
    ] {
        b.msg(kind, NLM_F_CREATE, op, |m| m.str(NFTA_TABLE_NAME, &table));
    }
    b.msg(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        "create the nat chain",
        |m| {
            m.str(NFTA_CHAIN_TABLE, &table);
            m.str(NFTA_CHAIN_NAME, CHAIN);
            m.nest(NFTA_CHAIN_HOOK, |h| {
                h.be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING);
                h.be32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_SRC.cast_unsigned());
            });
            m.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
            m.str(NFTA_CHAIN_TYPE, "nat");
        },
    );
    b.msg(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        "add the masquerade rule",
        |m| {
            m.str(NFTA_RULE_TABLE, &table);
            m.str(NFTA_RULE_CHAIN, CHAIN);
            m.nest(NFTA_RULE_EXPRESSIONS, |e| {
                masquerade_rule(e, bridge, subnet);
            });
        },
    );
    b
}

/// `ip saddr SUBNET oifname != BRIDGE masquerade`, as the expressions nft compiles it to.
fn masquerade_rule(e: &mut Msg, bridge: &IfName, subnet: Ipv4Net) {
    const IPV4_SADDR_OFFSET: u32 = 12;
    const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
    const NFT_META_OIFNAME: u32 = 7;
    const NFT_CMP_EQ: u32 = 0;
    const NFT_CMP_NEQ: u32 = 1;
    let mut ifname = [0u8; IFNAMSIZ];
    ifname[..bridge.as_str().len()].copy_from_slice(bridge.as_str().as_bytes());

    expr(e, "payload", |d| {
        d.be32(1, NFT_REG_1); // DREG
        d.be32(2, NFT_PAYLOAD_NETWORK_HEADER); // BASE
        d.be32(3, IPV4_SADDR_OFFSET); // OFFSET
        d.be32(4, 4); // LEN
    });
    expr(e, "bitwise", |d| {
        d.be32(1, NFT_REG_1); // SREG
        d.be32(2, NFT_REG_1); // DREG
        d.be32(3, 4); // LEN
        d.nest(4, |v| v.bytes(NFTA_DATA_VALUE, &subnet.netmask().octets())); // MASK
        d.nest(5, |v| {
            v.bytes(NFTA_DATA_VALUE, &Ipv4Addr::UNSPECIFIED.octets());
        }); // XOR
    });
    expr(e, "cmp", |d| {
        d.be32(1, NFT_REG_1); // SREG
        d.be32(2, NFT_CMP_EQ); // OP
        d.nest(3, |v| v.bytes(NFTA_DATA_VALUE, &subnet.network().octets())); // DATA
    });
    expr(e, "meta", |d| {
        d.be32(2, NFT_META_OIFNAME); // KEY
        d.be32(1, NFT_REG_1); // DREG
    });
    expr(e, "cmp", |d| {
        d.be32(1, NFT_REG_1);
        d.be32(2, NFT_CMP_NEQ);
        d.nest(3, |v| v.bytes(NFTA_DATA_VALUE, &ifname));
    });
    expr(e, "masq", |_| {});
}

fn expr(list: &mut Msg, name: &str, data: impl FnOnce(&mut Msg)) {
    list.nest(NFTA_LIST_ELEM, |el| {
        el.str(NFTA_EXPR_NAME, name);
        el.nest(NFTA_EXPR_DATA, data);
    });
}

/// One netlink message under construction: header, `nfgenmsg`, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(&[family, 0]); // nfgenmsg: family, NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn str(&mut self, kind: u16, s: &str) {
        let mut z = s.as_bytes().to_vec();
        z.push(0);
        self.attr(kind, &z);
    }

    fn be32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn bytes(&mut self, kind: u16, v: &[u8]) {
        self.attr(kind, v);
    }

    fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        inner(self);
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// An nf_tables transaction: the messages between a batch begin and end, each acknowledged.
struct Batch {
    bytes: Vec<u8>,
    /// What each acknowledged message does, by sequence number - 1, for error messages.
    ops: Vec<&'static str>,
}

impl Batch {
    fn new() -> Self {
        let begin = Msg::new(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        Self {
            bytes: begin.finish(),
            ops: Vec::new(),
        }
    }

    fn msg(&mut self, kind: u16, flags: u16, op: &'static str, attrs: impl FnOnce(&mut Msg)) {
        self.ops.push(op);
        let seq = u32::try_from(self.ops.len()).unwrap_or(u32::MAX);
        let mut m = Msg::new(
            kind | (NFNL_SUBSYS_NFTABLES << 8),
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_IPV4,
            0,
        );
        attrs(&mut m);
        self.bytes.extend_from_slice(&m.finish());
    }

    fn finish(mut self) -> Self {
        let seq = u32::try_from(self.ops.len() + 1).unwrap_or(u32::MAX);
        let end = Msg::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        self.bytes.extend_from_slice(&end.finish());
        self
    }
}

/// What the kernel answered to one message.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// An acknowledgement (`error == 0`) or an error (a positive errno) for message `seq`.
    Ack {
        seq: u32,
        error: i32,
    },
    Other {
        kind: u16,
    },
}

/// Splits a datagram of netlink messages into replies; a truncated tail is ignored.
fn parse_replies(mut buf: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let len = word(0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 + NLMSG_HDRLEN {
            let error = word(NLMSG_HDRLEN).cast_signed();
            let seq = word(NLMSG_HDRLEN + 4 + 8);
            out.push(Reply::Ack { seq, error: -error });
        } else {
            out.push(Reply::Other { kind });
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

fn nft_error(op: &str, errno: i32) -> NetError {
    let hint = match errno {
        libc::EPERM => return NetError::NotPermitted,
        libc::EOPNOTSUPP | libc::ENOENT | libc::EAFNOSUPPORT => {
            " (does the kernel have nf_tables with NAT and masquerade: CONFIG_NF_TABLES, CONFIG_NFT_NAT, CONFIG_NFT_MASQ?)"
        }
        _ => "",
    };
    NetError::Io {
        op: format!("{op} (nf_tables){hint}"),
        source: io::Error::from_raw_os_error(errno),
    }
}

/// A NETLINK_NETFILTER socket in the calling thread's network namespace.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn open() -> Result<Self, NetError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| NetError::io("open a netfilter netlink socket", e))?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 0),
        )
        .map_err(|e| NetError::io("bind a netfilter netlink socket", e))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(REPLY_TIMEOUT.as_secs().cast_signed(), 0),
        )
        .map_err(|e| NetError::io("set a netlink receive timeout", e))?;
        Ok(Self(fd))
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NetError> {
        let sent = send(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            bytes,
            MsgFlags::empty(),
        )
        .map_err(|e| NetError::io("send to nf_tables", e))?;
        if sent == bytes.len() {
            Ok(())
        } else {
            Err(NetError::io(
                "send to nf_tables",
                io::Error::other("short netlink send"),
            ))
        }
    }

    fn recv(&self) -> Result<Vec<Reply>, NetError> {
        let mut buf = vec![0u8; 65_536];
        let n = recv(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            &mut buf,
            MsgFlags::empty(),
        )
        .map_err(|e| match e {
            nix::errno::Errno::EAGAIN => NetError::io(
                "wait for nf_tables",
                io::Error::new(io::ErrorKind::TimedOut, "no reply"),
            ),
            e => NetError::io("receive from nf_tables", e),
        })?;
        Ok(parse_replies(&buf[..n]))
    }

    /// Ends `batch` and sends it, then waits until every message is acknowledged, or for the
    /// first error (after which the kernel has rolled the whole batch back). Without its end
    /// message, the kernel acknowledges every message and then silently aborts the batch.
    fn transact(&self, batch: Batch, what: &str) -> Result<(), NetError> {
        let batch = batch.finish();
        self.send(&batch.bytes)?;
        let mut pending = batch.ops.len();
        while pending > 0 {
            for reply in self.recv()? {
                match reply {
                    Reply::Ack { error: 0, .. } => pending = pending.saturating_sub(1),
                    Reply::Ack { seq, error } => {
                        let op = (seq as usize)
                            .checked_sub(1)
                            .and_then(|i| batch.ops.get(i))
                            .unwrap_or(&"commit");
                        return Err(nft_error(&format!("{what}: {op}"), error));
                    }
                    Reply::Other { .. } => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Attrs = Vec<(u16, Vec<u8>)>;

    /// Walks `buf` as netlink messages and returns (type, flags, seq, attribute bytes) of each.
    fn messages(mut buf: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
            assert!(len >= NLMSG_HDRLEN + 4 && len <= buf.len() && len.is_multiple_of(4));
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            let flags = u16::from_ne_bytes([buf[6], buf[7]]);
            let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
            out.push((kind, flags, seq, buf[NLMSG_HDRLEN + 4..len].to_vec()));
            buf = &buf[len..];
        }
        out
    }

    /// Attributes of one level, as (type without flags, payload); checks the lengths add up.
    fn attrs(mut buf: &[u8]) -> Attrs {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
            assert!(len >= 4 && len <= buf.len(), "attribute length {len}");
            out.push((kind, buf[4..len].to_vec()));
            buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        }
        out
    }

    #[test]
    fn the_install_batch_replaces_the_table_atomically() {
        let bridge: IfName = "br-test".parse().unwrap();
        let b = install_batch(&bridge, "10.77.0.0/24".parse().unwrap()).finish();
        let msgs = messages(&b.bytes);
        let kinds: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        let nft = |k: u16| k | (NFNL_SUBSYS_NFTABLES << 8);
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_DELTABLE),
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        // Every message in between asks for an acknowledgement, with its own sequence number.
        for (i, m) in msgs[1..6].iter().enumerate() {
            assert_ne!(m.1 & NLM_F_ACK, 0);
            assert_eq!(m.2 as usize, i + 1);
        }
        assert_eq!(b.ops.len(), 5);
        assert_eq!(
            attrs(&msgs[1].3),
            [(NFTA_TABLE_NAME, b"berth_br-test\0".to_vec())]
        );
    }

    #[test]
    fn the_rule_matches_the_subnet_and_any_other_interface() {
        let bridge: IfName = "br-test".parse().unwrap();
        let b = install_batch(&bridge, "10.77.0.0/24".parse().unwrap()).finish();
        let rule = &messages(&b.bytes)[5].3;
        let exprs = attrs(rule)
            .into_iter()
            .find(|(k, _)| *k == NFTA_RULE_EXPRESSIONS)
            .unwrap()
            .1;
        let list: Vec<(String, Attrs)> = attrs(&exprs)
            .into_iter()
            .map(|(_, el)| {
                let el = attrs(&el);
                let name = String::from_utf8(el[0].1.clone()).unwrap();
                (name.trim_end_matches('\0').to_owned(), attrs(&el[1].1))
            })
            .collect();
        let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["payload", "bitwise", "cmp", "meta", "cmp", "masq"]);
        let value = |a: &[(u16, Vec<u8>)], k: u16| {
            attrs(&a.iter().find(|x| x.0 == k).unwrap().1)[0].1.clone()
        };
        assert_eq!(value(&list[1].1, 4), [255, 255, 255, 0], "mask");
        assert_eq!(value(&list[2].1, 3), [10, 77, 0, 0], "network");
        let mut name = b"br-test".to_vec();
        name.resize(IFNAMSIZ, 0);
        assert_eq!(value(&list[4].1, 3), name, "bridge name, padded");
        assert_eq!(list[4].1[1], (2, 1u32.to_be_bytes().to_vec()), "!=");
    }

    #[test]
    fn replies_are_parsed_and_a_truncated_tail_ignored() {
        let mut buf = Vec::new();
        for (seq, err) in [(1u32, 0i32), (2, -libc::ENOENT)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&err.to_ne_bytes());
            buf.extend_from_slice(&[0; 8]);
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&[0; 4]);
        }
        buf.extend_from_slice(&[7; 9]);
        assert_eq!(
            parse_replies(&buf),
            [
                Reply::Ack { seq: 1, error: 0 },
                Reply::Ack {
                    seq: 2,
                    error: libc::ENOENT
                }
            ]
        );
        assert!(parse_replies(&[0xff; 40]).is_empty());
    }
}
