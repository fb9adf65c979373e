//! The sockmap relay: a SOCKHASH of relayed sockets and a peer table, both keyed by socket cookie.
//!
//! Socket cookies are stable for a socket's lifetime and unique per boot, unlike ports, which
//! `__sk_buff` exposes in mixed byte orders and which repeat across namespaces.

/// Name of the `stream_verdict` program in the object file.
pub const VERDICT_PROG: &str = "berth_sk_verdict";
/// Name of the SOCKHASH holding every relayed socket, keyed by its own cookie (`u64`).
pub const SOCKS_MAP: &str = "BERTH_SOCKS";
/// Name of the hash map from a socket's cookie to its [`Peer`].
pub const PEERS_MAP: &str = "BERTH_PEERS";
/// Default capacity of both maps; user space may resize them before loading.
pub const DEFAULT_MAX_ENTRIES: u32 = 65_536;

/// Where the bytes received on a socket go.
///
/// 8 bytes, one naturally aligned `u64`: no padding. Per-connection byte counts join it when the
/// sockmap mode lands (the bpfel target has no 64-bit `fetch_add` in `core`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Cookie of the socket that receives this socket's bytes.
    pub cookie: u64,
}

#[cfg(feature = "user")]
// SAFETY: `Peer` is `repr(C)`, made only of a `u64`, has no padding and every bit pattern is valid.
unsafe impl aya::Pod for Peer {}
