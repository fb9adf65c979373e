//! One client's flow: a socket connected to the target, so that the kernel hands it exactly
//! that client's replies, and a task that carries those replies back to the client from the
//! local address the client sent to.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use socket2::{Domain, Socket, Type};
use tokio::{io::Interest, net::UdpSocket, task::AbortHandle, time::Instant};
use tracing::{debug, info};

use super::{
    Stats,
    batch::{self, Batch},
    offload::{Cursor, Offload, Refusal},
};
use crate::pool::Pool;

/// Idle batches kept for reuse. A batch is borrowed only while a socket has datagrams waiting,
/// so an idle flow holds no buffer; this bounds what busy moments leave behind.
static BATCHES: Pool<Batch> = Pool::new(8);

/// What every flow of one mapping shares.
#[derive(Debug)]
pub(super) struct Mapping {
    /// The listening socket: replies leave through it, so their source port is the mapped one.
    pub(super) listener: Arc<UdpSocket>,
    /// Bound to a wildcard address: replies need the address each client sent to.
    pub(super) wildcard: bool,
    pub(super) stats: Arc<Stats>,
    /// Datagrams per system call.
    pub(super) batch: usize,
    /// Receive coalesced datagrams (UDP_GRO) on flow sockets too: the listener took it.
    pub(super) gro: bool,
    /// Segmentation offload of the sends towards the target (flow sockets) and towards
    /// clients (the listener).
    pub(super) to_target: Offload,
    pub(super) to_clients: Offload,
    /// Zero point of the flows' millisecond timestamps.
    pub(super) epoch: Instant,
}

impl Mapping {
    pub(super) fn take_batch(&self) -> Batch {
        BATCHES
            .take(|| Ok(Batch::new(self.batch)))
            .unwrap_or_else(|_: io::Error| Batch::new(self.batch))
    }

    pub(super) fn give_batch(b: Batch) {
        BATCHES.give(b);
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

/// State the reply task updates and the flow table reads, without locks held across awaits.
#[derive(Debug)]
struct Shared {
    /// The local address replies leave from: where the client last sent to.
    local: Mutex<Option<IpAddr>>,
    /// When the target last replied, in ms after [`Mapping::epoch`], plus one (0: never).
    last_reply: AtomicU64,
}

/// An open flow. Dropping it stops its reply task and closes its socket.
#[derive(Debug)]
pub(super) struct Flow {
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    replies: AbortHandle,
}

impl Flow {
    /// Opens a socket connected to `target` and starts carrying its replies to `client`.
    pub(super) fn open(
        mapping: &Arc<Mapping>,
        target: SocketAddr,
        client: SocketAddr,
        local: Option<IpAddr>,
    ) -> io::Result<Self> {
        let sock = Socket::new(
            Domain::for_address(target),
            Type::DGRAM.nonblocking().cloexec(),
            None,
        )?;
        // connect() binds an ephemeral port and makes the kernel drop datagrams from anyone
        // but the target; it also routes ICMP errors for this flow to this socket.
        sock.connect(&target.into())?;
        if mapping.gro {
            // The listener took it, so this kernel has it; a refusal only costs batching.
            let _ = batch::enable_gro(std::os::fd::AsFd::as_fd(&sock));
        }
        let sock = Arc::new(UdpSocket::from_std(sock.into())?);
        let shared = Arc::new(Shared {
            local: Mutex::new(local),
            last_reply: AtomicU64::new(0),
        });
        let replies = tokio::spawn(carry_replies(
            sock.clone(),
            client,
            shared.clone(),
            mapping.clone(),
        ))
        .abort_handle();
        Ok(Self {
            sock,
            shared,
            replies,
        })
    }

    pub(super) fn socket(&self) -> &Arc<UdpSocket> {
        &self.sock
    }

    /// Replies from now on leave from `local` (the client sent to a different address).
    pub(super) fn set_local(&self, local: Option<IpAddr>) {
        let mut cur = self
            .shared
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *cur != local {
            *cur = local;
        }
    }

    /// When the target last replied, if it ever did.
    pub(super) fn last_reply(&self, mapping: &Mapping) -> Option<Instant> {
        match self.shared.last_reply.load(Relaxed) {
            0 => None,
            ms => Some(mapping.epoch + std::time::Duration::from_millis(ms - 1)),
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// The reply direction of one flow: target → flow socket → listener → client.
async fn carry_replies(
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    mapping: Arc<Mapping>,
) {
    loop {
        // ERROR too: an ICMP report on a connected UDP socket raises EPOLLERR without EPOLLIN.
        // (Waited for apart: tokio's readiness mask of READABLE | ERROR combined is empty.)
        let ready = tokio::select! {
            r = sock.readable() => r.map(|()| Interest::READABLE),
            r = sock.ready(Interest::ERROR) => r.map(|_| Interest::ERROR),
        };
        let interest = match ready {
            Ok(i) => i,
            Err(e) => {
                debug!(client.addr = %client, error = %e, "flow socket failed");
                return;
            }
        };
        let mut batch = mapping.take_batch();
        loop {
            match sock.try_io(interest, || batch::recv(sock.as_fd(), &mut batch)) {
                Ok(n) => {
                    let now = mapping.millis(Instant::now());
                    shared.last_reply.store(now.saturating_add(1), Relaxed);
                    let from = *shared.local.lock().unwrap_or_else(PoisonError::into_inner);
                    let to = Some(client);
                    let (sent, bytes) = send_all(
                        &mapping.listener,
                        &batch,
                        0..n,
                        (to, from),
                        &mapping.to_clients,
                        &mapping.stats,
                    )
                    .await;
                    mapping.stats.to_client(sent, bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_icmp_report(&e) => {
                    // Most often port unreachable: nothing listens on the target (yet). The
                    // kernel reports it once; the flow stays, as the target may come back.
                    debug!(client.addr = %client, error = %e, "target unreachable");
                    mapping.stats.unreachable();
                }
                Err(e) => {
                    debug!(client.addr = %client, error = %e, "flow socket error");
                    break;
                }
            }
        }
        Mapping::give_batch(batch);
    }
}

/// Sends datagrams `range` of `batch` to `to` from `from` (see [`batch::send`]), waiting while
/// the socket's buffer is full, and returns how many datagrams and payload bytes went out. A
/// segmented send the path refuses is sent again datagram by datagram (and `offload` learns
/// it); a send refused for a pending ICMP report (which the send consumed) is retried once;
/// any other refusal drops that message's datagrams, counted, and never holds up the rest.
pub(super) async fn send_all(
    sock: &UdpSocket,
    batch: &Batch,
    range: std::ops::Range<usize>,
    (to, from): (Option<SocketAddr>, Option<IpAddr>),
    offload: &Offload,
    stats: &Stats,
) -> (usize, usize) {
    let (mut datagrams, mut bytes) = (0, 0);
    let mut next = Cursor::at(range.start);
    let mut retried = false;
    while next.slot < range.end {
        let limit = offload.limit();
        let r = sock
            .async_io(Interest::WRITABLE, || {
                batch::send(sock.as_fd(), batch, next, range.end, to, from, limit)
            })
            .await;
        match r {
            Ok(sent) => {
                datagrams += sent.datagrams;
                bytes += sent.bytes;
                next = sent.next;
                retried = false;
            }
            Err(e) if is_icmp_report(&e) && !retried => {
                stats.unreachable();
                retried = true;
            }
            Err(e) => {
                let first = batch.first_train(next, range.end, limit);
                let errno = e.raw_os_error().unwrap_or(0);
                match first
                    .segment
                    .and_then(|s| offload.refused(usize::from(s), errno).map(|r| (s, r)))
                {
                    Some((segment, Refusal::Unsupported)) => {
                        info!(error = %e, segment, "UDP segmentation offload refused; sending datagrams one by one");
                        stats.offload_refused();
                    }
                    Some((segment, Refusal::TooBig)) => {
                        debug!(error = %e, segment, "segment too big for the path; sending such datagrams one by one");
                        stats.offload_refused();
                    }
                    None => {
                        debug!(error = %e, to = ?to, from = ?from, datagrams = first.datagrams, "datagrams dropped");
                        stats.dropped(first.datagrams);
                        next = first.end;
                        retried = false;
                    }
                }
            }
        }
    }
    (datagrams, bytes)
}

/// Errors that a connected UDP socket reports once, after an ICMP message.
fn is_icmp_report(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}
