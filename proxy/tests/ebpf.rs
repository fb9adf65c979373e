//! The eBPF pipeline: the program built by build.rs is embedded, loads, attaches to its
//! SOCKHASH, and really redirects bytes between two sockets inside the kernel.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the stack trace"
)]
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use berth::ebpf::SockmapRelay;
use berth_common::sockmap::{Counters, Peer, SEQ_KNOWN};

fn cookie(s: &TcpStream) -> u64 {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into the buffer whose size we pass.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

/// A connected loopback pair (outer end, inner end).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let outer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    (outer, l.accept().unwrap().0)
}

#[test]
fn sockmap_program_loads_attaches_and_redirects() {
    common::require_root();
    let relay = SockmapRelay::load(64).expect("load and attach the sk_skb verdict program");

    // client ⇄ a_in  [kernel redirect]  b_in ⇄ server
    let (mut client, a_in) = pair();
    let (mut server, b_in) = pair();
    let (ca, cb) = (cookie(&a_in), cookie(&b_in));
    {
        let mut counters = relay.counters.write().unwrap();
        counters.insert(ca, Counters::default(), 0).unwrap();
        counters.insert(cb, Counters::default(), 0).unwrap();
        let ready = |cookie| Peer {
            cookie,
            acked: 0,
            limit: u64::MAX,
            notify_at: u64::MAX,
            ready: 1,
            _pad: 0,
        };
        let mut peers = relay.peers.lock().unwrap();
        peers.insert(ca, ready(cb), 0).unwrap();
        peers.insert(cb, ready(ca), 0).unwrap();
    }
    {
        let mut socks = relay.socks.lock().unwrap();
        socks.insert(ca, a_in.as_raw_fd(), 0).unwrap();
        socks.insert(cb, b_in.as_raw_fd(), 0).unwrap();
    }
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let mut buf = [0u8; 11];
    client.write_all(b"to-server!!").unwrap();
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to-server!!");
    server.write_all(b"to-client!!").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to-client!!");

    // The program counted what it redirected, per socket, and found each segment's TCP
    // sequence numbers where it looks for them (its overlap trimming depends on that: an
    // unexpected layout would set SEQ_UNCHECKED instead).
    let counted = |c| relay.counters.read().unwrap().get(&c, 0).unwrap();
    for c in [ca, cb] {
        let got = counted(c);
        assert_eq!(
            (got.passed, got.redirected, got.trimmed, got.flags),
            (0, 11, 0, SEQ_KNOWN),
            "{got:?}"
        );
    }

    // Entries leave with the sockets' removal; nothing stays behind in the maps.
    relay.socks.lock().unwrap().remove(&ca).unwrap();
    relay.socks.lock().unwrap().remove(&cb).unwrap();
    relay.peers.lock().unwrap().remove(&ca).unwrap();
    relay.peers.lock().unwrap().remove(&cb).unwrap();
    relay.counters.write().unwrap().remove(&ca).unwrap();
    relay.counters.write().unwrap().remove(&cb).unwrap();
    assert_eq!(relay.peers.lock().unwrap().keys().count(), 0);
    assert_eq!(relay.counters.read().unwrap().keys().count(), 0);
    assert_eq!(relay.socks.lock().unwrap().keys().count(), 0);
}
