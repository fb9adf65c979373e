//! The sockmap relay: a SOCKHASH of relayed sockets, a peer table and per-socket counters, all
//! keyed by socket cookie.
//!
//! Socket cookies are stable for a socket's lifetime and unique per boot, unlike ports, which
//! `__sk_buff` exposes in mixed byte orders and which repeat across namespaces.
//!
//! # Handing a stream over to the kernel without reordering it
//! Bytes that reach a socket before it is in the map (or while user space is not ready) sit in
//! its receive queue, where only user space can read them. The verdict program therefore
//! redirects a socket's bytes only when user space has *forwarded everything the program ever
//! passed to it*: [`Peer::acked`] (written by user space) equals [`Counters::passed`] (counted
//! by the program). Until then every segment is passed (and counted), user space reads and
//! forwards it, and acknowledges the new total. Redirected bytes can thus never overtake bytes
//! that user space still has to forward.
//!
//! # Bounding what the kernel holds
//! A redirected segment is taken off the socket's receive queue at once, so TCP keeps the
//! window open, and it waits in the peer's psock queue, which has no limit, until the peer's
//! send buffer has room. A client faster than the container could make the kernel hold
//! gigabytes. So the program redirects only up to [`Peer::limit`] bytes in all
//! ([`Counters::redirected`]); past it, it passes, which leaves the bytes on the receive
//! queue, charged to the socket, and closes the window. It reports on [`CREDITS_MAP`] when the
//! count crosses [`Peer::notify_at`] or hits the limit, and user space raises the limit by
//! what the peer's own peer has acknowledged since. (Passed bytes are charged only while the
//! socket's psock queue is empty; user space keeps it empty by never letting more through
//! than fits half the send buffer.)
//!
//! # Retransmitted bytes
//! TCP queues a segment that overlaps bytes it has already received (a retransmission cut
//! differently from the original, after a loss) with the overlap still in it; `recvmsg`
//! skips the overlap by sequence number, but the kernel hands the verdict program the whole
//! segment, so the overlap would reach the peer twice. The program therefore remembers
//! where the last segment ended ([`Counters::next_seq`]), reads each segment's sequence
//! numbers from its control block (where TCP keeps them), and cuts the overlap off before
//! deciding. Only the bytes it kept are counted, so `passed + redirected` never exceeds
//! what TCP received; user space checks that, and resets a connection where it does not.

/// Name of the `stream_verdict` program in the object file.
pub const VERDICT_PROG: &str = "berth_sk_verdict";
/// Name of the SOCKHASH holding every relayed socket, keyed by its own cookie (`u64`).
pub const SOCKS_MAP: &str = "BERTH_SOCKS";
/// Name of the hash map from a socket's cookie to its [`Peer`] (written by user space).
pub const PEERS_MAP: &str = "BERTH_PEERS";
/// Name of the hash map from a socket's cookie to its [`Counters`] (written by the program).
pub const COUNTERS_MAP: &str = "BERTH_COUNTERS";
/// Name of the ring buffer on which the program reports a socket whose redirect allowance
/// ran low or out (its cookie, a `u64`).
pub const CREDITS_MAP: &str = "BERTH_CREDITS";
/// Size of [`CREDITS_MAP`] in bytes: 16 per event, so 16,384 events can wait.
pub const CREDITS_BYTES: u32 = 256 * 1024;
/// Default capacity of the maps, in sockets (two per connection); user space sizes them.
pub const DEFAULT_MAX_ENTRIES: u32 = 65_536;

/// Where the bytes received on a socket go, and how far user space has caught up.
///
/// 40 bytes: four `u64`s, a `u32` and explicit padding, so both sides agree on every byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Cookie of the socket that receives this socket's bytes.
    pub cookie: u64,
    /// Bytes passed to user space that user space has forwarded to the peer.
    pub acked: u64,
    /// Redirect while [`Counters::redirected`] stays within this many bytes.
    pub limit: u64,
    /// Report the socket on [`CREDITS_MAP`] once [`Counters::redirected`] reaches this.
    pub notify_at: u64,
    /// Non-zero once both sockets are in the SOCKHASH: redirecting is allowed.
    pub ready: u32,
    pub _pad: u32,
}

/// What the verdict program did with a socket's bytes. Written only by the program (one
/// socket's segments are processed one at a time), read by user space.
///
/// 32 bytes: three `u64`s and two `u32`s, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes left in the socket's queue for user space (SK_PASS).
    pub passed: u64,
    /// Bytes redirected to the peer inside the kernel.
    pub redirected: u64,
    /// Bytes cut off the front of segments because the program had handled them already
    /// (see "Retransmitted bytes" above).
    pub trimmed: u64,
    /// The TCP sequence number just past the last payload byte handled, once
    /// [`SEQ_KNOWN`] is set.
    pub next_seq: u32,
    /// [`SEQ_KNOWN`], [`SEQ_UNCHECKED`], [`SEQ_BROKEN`].
    pub flags: u32,
}

/// [`Counters::next_seq`] holds a sequence number (set at the socket's first segment).
pub const SEQ_KNOWN: u32 = 1;
/// A segment's control block did not hold its sequence numbers (an unexpected kernel layout):
/// overlaps on this socket cannot be detected, only counted after the fact by user space.
pub const SEQ_UNCHECKED: u32 = 2;
/// An overlap could not be cut off: the program drops this socket's bytes from then on, and
/// user space must reset the connection.
pub const SEQ_BROKEN: u32 = 4;
/// The most bytes [`Counters::trimmed`] can take off one segment: `bpf_skb_adjust_room`
/// removes at most 4,095 bytes a call, and the program calls it at most 32 times.
pub const MAX_TRIM: u32 = 32 * TRIM_STEP;
/// The most bytes one `bpf_skb_adjust_room` call removes from an `sk_skb`.
pub const TRIM_STEP: u32 = 0xfff;

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, four u64s, a u32 and an explicit u32 pad: no implicit padding, and every
// bit pattern is valid.
unsafe impl aya::Pod for Peer {}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, three u64s then two u32s: no padding, every bit pattern valid.
unsafe impl aya::Pod for Counters {}
