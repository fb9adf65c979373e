//! Batched datagram I/O: recvmmsg(2) and sendmmsg(2), with the packet-info control messages
//! (IP_PKTINFO / IPV6_PKTINFO) that tell which local address a client sent to, so that the
//! reply can leave from that same address.
//!
//! Buffers are plain owned memory (so a batch is `Send` and can be pooled); the kernel
//! structures that point into them are built on the stack for each call.
use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr,
};

use socket2::{SockAddr, SockAddrStorage};

/// Room for the largest datagram: IPv4 carries at most 65,507 payload bytes and IPv6 (without
/// jumbograms) 65,527, so nothing that can arrive is ever truncated.
pub(super) const SLOT: usize = 65_535;
/// The most datagrams moved per system call.
pub(super) const MAX_BATCH: usize = 32;
/// Control buffer per datagram, in u64s so that it is aligned for `cmsghdr`. One packet-info
/// message needs CMSG_SPACE(20) = 40 bytes.
const CTRL_WORDS: usize = 8;

/// What arrived in one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) len: usize,
    pub(super) peer: SocketAddr,
    /// The local address the datagram was sent to, when packet info is enabled.
    pub(super) local: Option<IpAddr>,
    /// The datagram did not fit in its slot (only an IPv6 jumbogram can do that).
    pub(super) truncated: bool,
}

/// A batch of datagram buffers and what was received into them.
#[derive(Debug)]
pub(super) struct Batch {
    data: Box<[u8]>,
    meta: Vec<Meta>,
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
            slots,
        }
    }

    /// The datagrams received by the last [`recv`].
    pub(super) fn meta(&self) -> &[Meta] {
        &self.meta
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
    batch.meta.clear();
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
        batch.meta.push(Meta {
            len: (m.msg_len as usize).min(SLOT),
            peer,
            // SAFETY: the header's control fields describe the kernel-filled ctrl[i].
            local: unsafe { local_addr(h) },
            truncated: h.msg_flags & libc::MSG_TRUNC != 0,
        });
    }
    Ok(got)
}

/// The destination address from a received IP_PKTINFO or IPV6_PKTINFO message.
///
/// # Safety
/// `h` must be a header filled by recvmsg/recvmmsg whose control buffer is still alive.
unsafe fn local_addr(h: &libc::msghdr) -> Option<IpAddr> {
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
                    return Some(IpAddr::V4(a));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => c = libc::CMSG_NXTHDR(h, c),
            }
        }
    }
    None
}

/// Sends datagrams `range` of `batch` without blocking, all to `to` (or to the connected
/// peer when `None`) and, when `from` is set, from that local address. Returns how many were
/// sent, which may be fewer than asked; `WouldBlock` when none could be.
pub(super) fn send(
    fd: BorrowedFd<'_>,
    batch: &Batch,
    range: Range<usize>,
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let n = range.len().min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let name = to.map(SockAddr::from);
    let mut ctrl = [[0u64; CTRL_WORDS]; MAX_BATCH];
    // SAFETY: plain C structs for which all-zero bytes are a valid value.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
    for (k, i) in range.take(n).enumerate() {
        let payload = batch.payload(i);
        // The kernel only reads through this pointer (sendmmsg).
        iovs[k].iov_base = payload.as_ptr().cast_mut().cast();
        iovs[k].iov_len = payload.len();
        let h = &mut hdrs[k].msg_hdr;
        if let Some(name) = &name {
            h.msg_name = name.as_ptr().cast_mut().cast();
            h.msg_namelen = name.len();
        }
        h.msg_iov = &raw mut iovs[k];
        h.msg_iovlen = 1;
        if let Some(from) = from {
            h.msg_control = ctrl[k].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of_val(&ctrl[k]);
            // SAFETY: the control buffer is large enough and aligned for one message.
            unsafe { put_source(h, from) };
        }
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
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// Writes one packet-info message asking the kernel to send from `from`, and sets the
/// header's control length to match.
///
/// # Safety
/// `h.msg_control` must point at an 8-byte-aligned buffer of at least `h.msg_controllen`
/// bytes, large enough for CMSG_SPACE(sizeof(in6_pktinfo)).
unsafe fn put_source(h: &mut libc::msghdr, from: IpAddr) {
    // SAFETY: the caller guarantees the buffer; CMSG_FIRSTHDR is non-null for it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
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
        h.msg_controllen = space as usize;
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
        assert_eq!(send(echo.as_fd(), &batch, 1..3, to, local).unwrap(), 2);
        let mut buf = [0u8; 4];
        for want in [8u8, 9] {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&[want][..], SocketAddr::from(([127, 0, 0, 3], port)))
            );
        }
    }
}
