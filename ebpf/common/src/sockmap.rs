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
//! what the peer has taken since.

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
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes left in the socket's queue for user space (SK_PASS).
    pub passed: u64,
    /// Bytes redirected to the peer inside the kernel.
    pub redirected: u64,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, four u64s, a u32 and an explicit u32 pad: no implicit padding, and every
// bit pattern is valid.
unsafe impl aya::Pod for Peer {}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, two u64s: no padding, every bit pattern valid.
unsafe impl aya::Pod for Counters {}
