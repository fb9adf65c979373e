//! Batched datagram I/O: recvmmsg(2) and sendmmsg(2), with the packet-info control messages
//! (IP_PKTINFO / IPV6_PKTINFO) that tell which local address a client sent to, so that the
//! reply can leave from that same address, and UDP segmentation offload both ways (UDP_GRO on
//! receive, UDP_SEGMENT on send; which datagrams ride together is [`super::offload`]'s call).
//!
//! Buffers are plain owned memory (so a batch is `Send` and can be pooled); the kernel
//! structures that point into them are built on the stack for each call.
use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr,
};

use socket2::{SockAddr, SockAddrStorage};

use super::offload::{self, Cursor, Shape};

/// Room for the largest datagram: IPv4 carries at most 65,507 payload bytes and IPv6 (without
/// jumbograms) 65,527, so nothing that can arrive is ever truncated.
pub(super) const SLOT: usize = 65_535;
/// The most datagrams moved per system call.
pub(super) const MAX_BATCH: usize = 32;
/// Control buffer per datagram, in u64s so that it is aligned for `cmsghdr`. A packet-info
/// message needs up to CMSG_SPACE(20) = 40 bytes, a segment size CMSG_SPACE(4) = 24; the rest
/// is margin (a truncated control buffer is refused, see [`recv`]).
const CTRL_WORDS: usize = 16;

/// What arrived in one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) len: usize,
    pub(super) peer: SocketAddr,
    /// The local address the datagram was sent to, when packet info is enabled.
    pub(super) local: Option<IpAddr>,
    /// The datagram did not fit in its slot (only an IPv6 jumbogram can do that), or its
    /// control messages did not fit theirs (so whether GRO coalesced it is unknown).
    pub(super) truncated: bool,
    /// Set when GRO coalesced several datagrams of this size (the last maybe shorter) into
    /// the slot.
    pub(super) segment: Option<usize>,
}

impl Meta {
    pub(super) fn shape(&self) -> Shape {
        Shape {
            len: self.len,
            segment: self.segment,
        }
    }

    /// How many datagrams the slot holds.
    pub(super) fn datagrams(&self) -> usize {
        self.shape().datagrams()
    }
}

/// A batch of datagram buffers and what was received into them.
#[derive(Debug)]
pub(super) struct Batch {
    data: Box<[u8]>,
    meta: Vec<Meta>,
    /// What [`send`] plans its messages from, one per `meta` entry: made once per receive,
    /// not per send (a batch may take several sends, and a refused one is planned again).
    shapes: Vec<Shape>,
    slots: usize,
}

impl Batch {
    /// Room for `slots` (1 to [`MAX_BATCH`]) datagrams. The memory is zeroed lazily by the
    /// allocator, so pages that small datagrams never touch cost nothing.
    pub(super) fn new(slots: usize) -> Self {
        let slots = slots.clamp(1, MAX_BATCH);
        Self {
            data: vec![0u8; slots * SLOT].into_boxed_slice(),
            meta: Vec::with_capacity(slots),
            shapes: Vec::with_capacity(slots),
            slots,
        }
    }

    /// The datagrams received by the last [`recv`].
    pub(super) fn meta(&self) -> &[Meta] {
        &self.meta
    }

    /// The first message a [`send`] from `at` would make (what a failed send refused).
    pub(super) fn first_train(&self, at: Cursor, end: usize, limit: usize) -> offload::Train {
        offload::next_train(&self.shapes, at, end.min(self.shapes.len()), limit)
    }

    fn clear(&mut self) {
        self.meta.clear();
        self.shapes.clear();
    }

    fn push(&mut self, meta: Meta) {
        self.shapes.push(meta.shape());
        self.meta.push(meta);
    }

    /// The payload of datagram `i`.
    pub(super) fn payload(&self, i: usize) -> &[u8] {
        &self.data[i * SLOT..i * SLOT + self.meta[i].len]
    }
}

/// Receives up to a batch of datagrams without blocking; `WouldBlock` when there is none.
pub(super) fn recv(fd: BorrowedFd<'_>, batch: &mut Batch) -> io::Result<usize> {
    let n = batch.slots;
    let mut names: [SockAddrStorage; MAX_BATCH] =
        std::array::from_fn(|_| SockAddrStorage::zeroed());
    let mut ctrl = [[0u64; CTRL_WORDS]; MAX_BATCH];
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
    let base = batch.data.as_mut_ptr();
    for i in 0..n {
        // SAFETY: i < slots, so the slot lies inside `data`.
        iovs[i].iov_base = unsafe { base.add(i * SLOT) }.cast();
        iovs[i].iov_len = SLOT;
        let h = &mut hdrs[i].msg_hdr;
        h.msg_namelen = names[i].size_of();
        // SAFETY: the storage is a sockaddr_storage; the kernel writes at most msg_namelen.
        h.msg_name = ptr::from_mut(unsafe { names[i].view_as::<libc::sockaddr_storage>() }).cast();
        h.msg_iov = &raw mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = ctrl[i].as_mut_ptr().cast();
        h.msg_controllen = mem::size_of_val(&ctrl[i]);
    }
    // SAFETY: every header points at live, large-enough buffers owned by this frame or by
    // `batch`, and `n` does not exceed the number of headers.
    let got = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            ptr::null_mut(),
        )
    };
    let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    batch.clear();
    for (i, m) in hdrs.iter().take(got).enumerate() {
        let h = &m.msg_hdr;
        // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into names[i].
        let peer = unsafe {
            SockAddr::new(
                mem::replace(&mut names[i], SockAddrStorage::zeroed()),
                h.msg_namelen,
            )
        }
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
        // SAFETY: the header's control fields describe the kernel-filled ctrl[i].
        let (local, segment) = unsafe { read_control(h) };
        batch.push(Meta {
            len: (m.msg_len as usize).min(SLOT),
            peer,
            local,
            // Without the whole control buffer a coalesced slot would pass for one datagram.
            truncated: h.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
            segment,
        });
    }
    Ok(got)
}

/// The destination address from a received IP_PKTINFO or IPV6_PKTINFO message, and the
/// segment size from a UDP_GRO one.
///
/// # Safety
/// `h` must be a header filled by recvmsg/recvmmsg whose control buffer is still alive.
unsafe fn read_control(h: &libc::msghdr) -> (Option<IpAddr>, Option<usize>) {
    let (mut local, mut segment) = (None, None);
    // SAFETY: the caller guarantees a valid header; the CMSG_* walk stays inside its buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    // ipi_spec_dst is the local address to answer from; for unicast it equals
                    // the header's destination, for broadcast it is the interface's own address.
                    let a = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
                    local = Some(IpAddr::V4(a));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    let size = ptr::read_unaligned(data.cast::<libc::c_int>());
                    segment = usize::try_from(size).ok().filter(|&s| s > 0);
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    (local, segment)
}

/// Asks the kernel to hand over coalesced datagrams (UDP_GRO): a burst from one sender
/// arrives as one slot, and a segmented send's datagrams are not cut up on the way in.
pub(super) fn enable_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&raw const on).cast(),
            size_u32::<libc::c_int>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What one [`send`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Sent {
    /// Where the next send resumes.
    pub(super) next: Cursor,
    pub(super) datagrams: usize,
    pub(super) bytes: usize,
}

/// Sends the datagrams of `batch` from `at` up to slot `end` without blocking, all to `to`
/// (or to the connected peer when `None`) and, when `from` is set, from that local address.
/// Runs of equal datagrams go out as one segmented send where `limit` allows
/// ([`offload::next_train`]). Returns what was sent, which may be less than asked;
/// `WouldBlock` when nothing could be, and any other error is the first message's.
pub(super) fn send(
    fd: BorrowedFd<'_>,
    batch: &Batch,
    at: Cursor,
    end: usize,
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
    limit: usize,
) -> io::Result<Sent> {
    let shapes = &batch.shapes[..];
    let end = end.min(shapes.len());
    let name = to.map(SockAddr::from);
    let mut ctrl = [[0u64; CTRL_WORDS]; MAX_BATCH];
    // One iovec per slot a train touches: at most one per message plus one per slot boundary
    // crossed inside a train, so 2 × MAX_BATCH always suffice.
    // SAFETY: plain C structs for which all-zero bytes are a valid value.
    let mut iovs: [libc::iovec; 2 * MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
    let mut trains = [None; MAX_BATCH];
    let (mut n, mut used, mut cur) = (0, 0, at);
    while cur.slot < end && n < MAX_BATCH {
        let train = offload::next_train(shapes, cur, end, limit);
        let first_iov = used;
        let last = train.end.slot.min(end - 1);
        for (slot, shape) in shapes
            .iter()
            .enumerate()
            .take(last + 1)
            .skip(train.start.slot)
        {
            let from_byte = if slot == train.start.slot {
                train.start.offset
            } else {
                0
            };
            let to_byte = if slot == train.end.slot {
                train.end.offset
            } else {
                shape.len
            };
            if slot == train.end.slot && to_byte == 0 {
                break; // the train ends at this slot's start
            }
            let bytes = &batch.payload(slot)[from_byte..to_byte];
            // The kernel only reads through this pointer (sendmmsg).
            iovs[used].iov_base = bytes.as_ptr().cast_mut().cast();
            iovs[used].iov_len = bytes.len();
            used += 1;
        }
        let h = &mut hdrs[n].msg_hdr;
        if let Some(name) = &name {
            h.msg_name = name.as_ptr().cast_mut().cast();
            h.msg_namelen = name.len();
        }
        h.msg_iov = &raw mut iovs[first_iov];
        h.msg_iovlen = used - first_iov;
        if from.is_some() || train.segment.is_some() {
            h.msg_control = ctrl[n].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of_val(&ctrl[n]);
            // SAFETY: the control buffer is large enough and aligned for both messages.
            unsafe { put_control(h, from, train.segment) };
        }
        trains[n] = Some(train);
        n += 1;
        cur = train.end;
    }
    if n == 0 {
        return Ok(Sent {
            next: at,
            datagrams: 0,
            bytes: 0,
        });
    }
    // SAFETY: every header points at live buffers (the batch, this frame, `name`), and `n`
    // does not exceed the number of headers.
    let sent = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    let sent = usize::try_from(sent).map_err(|_| io::Error::last_os_error())?;
    let mut out = Sent {
        next: at,
        datagrams: 0,
        bytes: 0,
    };
    for t in trains.iter().take(sent).flatten() {
        out.next = t.end;
        out.datagrams += t.datagrams;
        out.bytes += t.bytes;
    }
    Ok(out)
}

/// Writes the control messages of one send: the source address (packet info) when `from` is
/// set, the segment size when `segment` is, and sets the header's control length to match.
///
/// # Safety
/// `h.msg_control` must point at an 8-byte-aligned, zeroed buffer of at least
/// `h.msg_controllen` bytes, large enough for CMSG_SPACE(sizeof(in6_pktinfo)) +
/// CMSG_SPACE(sizeof(u16)).
unsafe fn put_control(h: &mut libc::msghdr, from: Option<IpAddr>, segment: Option<u16>) {
    let base = h.msg_control.cast::<u8>();
    let mut used = 0usize;
    // SAFETY: the caller guarantees the buffer; each message starts at a CMSG_SPACE multiple
    // of 8 inside it.
    unsafe {
        if let Some(from) = from {
            used += put_source(base.cast(), from);
        }
        if let Some(size) = segment {
            let c = base.add(used).cast::<libc::cmsghdr>();
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_u32::<u16>()) as usize;
            ptr::write_unaligned(libc::CMSG_DATA(c).cast(), size);
            used += libc::CMSG_SPACE(size_u32::<u16>()) as usize;
        }
    }
    h.msg_controllen = used;
}

/// Writes one packet-info message asking the kernel to send from `from` at `c`, and returns
/// its CMSG_SPACE.
///
/// # Safety
/// `c` must point at an 8-byte-aligned buffer large enough for
/// CMSG_SPACE(sizeof(in6_pktinfo)).
unsafe fn put_source(c: *mut libc::cmsghdr, from: IpAddr) -> usize {
    // SAFETY: the caller guarantees the buffer.
    unsafe {
        let space = match from {
            IpAddr::V4(a) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_u32::<libc::in_pktinfo>()) as usize;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                libc::CMSG_SPACE(size_u32::<libc::in_pktinfo>())
            }
            IpAddr::V6(a) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_u32::<libc::in6_pktinfo>()) as usize;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                libc::CMSG_SPACE(size_u32::<libc::in6_pktinfo>())
            }
        };
        space as usize
    }
}

fn size_u32<T>() -> u32 {
    mem::size_of::<T>() as u32
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsFd as _};

    use super::*;

    #[test]
    fn a_batch_keeps_datagram_boundaries_and_sizes() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sizes = [1usize, 0, 1472, 65_507];
        for (k, &len) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..len).map(|i| (i + k) as u8).collect();
            tx.send_to(&payload, rx.local_addr().unwrap()).unwrap();
        }
        let mut batch = Batch::new(8);
        let got = recv(rx.as_fd(), &mut batch).unwrap();
        assert_eq!(got, sizes.len());
        for (k, &len) in sizes.iter().enumerate() {
            let m = batch.meta()[k];
            assert_eq!(
                (m.len, m.peer, m.truncated),
                (len, tx.local_addr().unwrap(), false)
            );
            assert!(
                batch
                    .payload(k)
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == (i + k) as u8)
            );
        }
        let err = recv(rx.as_fd(), &mut batch).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn sends_a_range_to_an_address_from_a_chosen_source() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap(); // hang guard
        let echo = UdpSocket::bind("0.0.0.0:0").unwrap();
        nix::sys::socket::setsockopt(&echo, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
            .unwrap();
        let port = echo.local_addr().unwrap().port();
        // Sent to 127.0.0.3: the reply must come from 127.0.0.3, not the routing default.
        for b in [7u8, 8, 9] {
            rx.send_to(&[b], ("127.0.0.3", port)).unwrap();
        }
        let mut batch = Batch::new(4);
        assert_eq!(recv(echo.as_fd(), &mut batch).unwrap(), 3);
        let local = batch.meta()[0].local;
        assert_eq!(local, Some("127.0.0.3".parse().unwrap()));
        let to = Some(rx.local_addr().unwrap());
        let sent = send(
            echo.as_fd(),
            &batch,
            Cursor::at(1),
            3,
            to,
            local,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(
            sent,
            Sent {
                next: Cursor::at(3),
                datagrams: 2,
                bytes: 2
            }
        );
        let mut buf = [0u8; 4];
        for want in [8u8, 9] {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&[want][..], SocketAddr::from(([127, 0, 0, 3], port)))
            );
        }
    }

    /// A segmented burst over loopback arrives as one coalesced slot at a GRO socket, and
    /// leaves as one segmented send that a plain socket receives datagram by datagram.
    #[test]
    fn coalesced_datagrams_arrive_as_one_slot_and_leave_as_one_send() {
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        plain
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap(); // hang guard
        let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(relay.as_fd()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(relay.local_addr().unwrap()).unwrap();
        // 5 × 1,000 + 300 in one UDP_SEGMENT send.
        let payload: Vec<u8> = (0..5300u32).map(|i| (i % 251) as u8).collect();
        let mut batch = Batch::new(4);
        batch.data[..payload.len()].copy_from_slice(&payload);
        batch.push(Meta {
            len: payload.len(),
            peer: relay.local_addr().unwrap(),
            local: None,
            truncated: false,
            segment: Some(1000),
        });
        let sent = send(tx.as_fd(), &batch, Cursor::at(0), 1, None, None, usize::MAX).unwrap();
        assert_eq!((sent.datagrams, sent.bytes), (6, 5300));
        let mut got = Batch::new(4);
        assert_eq!(
            recv(relay.as_fd(), &mut got).unwrap(),
            1,
            "one coalesced slot"
        );
        let m = got.meta()[0];
        assert_eq!((m.len, m.segment, m.datagrams()), (5300, Some(1000), 6));
        assert_eq!(got.payload(0), &payload[..]);
        // Out again, to a socket without GRO: six datagrams, in order.
        let to = Some(plain.local_addr().unwrap());
        let sent = send(relay.as_fd(), &got, Cursor::at(0), 1, to, None, usize::MAX).unwrap();
        assert_eq!((sent.next, sent.datagrams), (Cursor::at(1), 6));
        let mut buf = [0u8; 2000];
        for chunk in payload.chunks(1000) {
            let n = plain.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], chunk);
        }
        // Offload off (limit 0): the same slot goes one datagram per message.
        let sent = send(relay.as_fd(), &got, Cursor::at(0), 1, to, None, 0).unwrap();
        assert_eq!(sent.datagrams, 6);
        for chunk in payload.chunks(1000) {
            let n = plain.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], chunk);
        }
    }
}
