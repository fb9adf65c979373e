//! Moving bytes between a client socket and a target socket until both directions are done.
//!
//! One state machine (`bidi`) drives two one-way pumps; the pump decides how bytes move:
//! `copy` through a userspace buffer, `splice` through a kernel pipe without copying.
//! Half-close is propagated (EOF on one side becomes `shutdown(SHUT_WR)` on the other) and a
//! failure on either side aborts both with a reset.

mod bidi;
mod copy;
pub mod promote;
mod splice;

use std::{
    fmt, io,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

pub use bidi::relay;
pub(crate) use bidi::{Failure, cut_or, drive, splice_promotable};
pub use promote::Threshold;

/// How one direction of a userspace relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// EOF from the source, passed on as a shutdown of the destination.
    Eof,
    /// Stopped with the source drained and the pipe empty, for the kernel relay to take
    /// over; nothing shut down.
    Promoted,
}

/// Closes `s` with a reset rather than a FIN, to tell its peer at once that the connection failed.
pub fn abort_stream(s: tokio::net::TcpStream) {
    bidi::abort(&s);
}

/// How [`relay`] moves bytes in user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// A userspace buffer per direction.
    Copy,
    /// splice(2) through a pipe per direction: no copy into userspace. Falls back to copy where
    /// the kernel refuses it.
    #[default]
    Splice,
}

impl Mode {
    pub const ALL: [Self; 2] = [Self::Copy, Self::Splice];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
        }
    }
}

/// How a mapping's connections are relayed, resolved when the mapping starts: the mode with
/// what it needs, so that the two cannot disagree.
#[derive(Clone, Debug)]
pub enum Pump {
    /// [`relay`] with [`Mode::Copy`].
    Copy,
    /// [`relay`] with [`Mode::Splice`].
    Splice,
    /// The kernel moves the bytes (a SOCKHASH and a stream-verdict program, see
    /// [`crate::sockmap`]); connections the maps cannot take are spliced.
    Sockmap(Arc<crate::sockmap::Sockmap>),
    /// `auto` where the sockmap programs loaded: splice, and the kernel relay for each
    /// connection once it passes the threshold ([`promote`]).
    Auto(Arc<crate::sockmap::Sockmap>, Threshold),
}

impl Pump {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
            Self::Sockmap(_) => "sockmap",
            Self::Auto(..) => "auto",
        }
    }
}

impl From<Mode> for Pump {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Copy => Self::Copy,
            Mode::Splice => Self::Splice,
        }
    }
}

/// Relays one connection with `pump` until both directions are done, one side fails, or `cut`
/// completes (then both are reset, so that a cut transfer never passes for a complete one).
/// The one entry point: every pump ends through `drive`, which cuts and aborts.
pub async fn run(
    client: tokio::net::TcpStream,
    target: tokio::net::TcpStream,
    pump: &Pump,
    meter: &Meter,
    cut: impl std::future::Future,
) -> Result<Transfer, RelayError> {
    match pump {
        Pump::Copy => cut_or(&client, &target, Mode::Copy, meter, cut).await,
        Pump::Splice => cut_or(&client, &target, Mode::Splice, meter, cut).await,
        // Boxed: the kernel relay's state is twice the splice relay's, and would size every
        // connection's task, spliced ones included.
        Pump::Sockmap(sm) => Box::pin(crate::sockmap::relay(client, target, sm, meter, cut)).await,
        Pump::Auto(sm, threshold) => {
            crate::sockmap::relay_auto(client, target, sm, *threshold, meter, cut).await
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown relay mode {s:?} (expected copy or splice)"))
    }
}

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to target (upload).
    ToTarget,
    /// Target to client (download).
    ToClient,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ToTarget => "client to target",
            Self::ToClient => "target to client",
        })
    }
}

/// Bytes moved so far in each direction by one connection, and optionally added to a
/// mapping's [`Totals`] as well. Updated as data moves, so that a long transfer shows progress
/// while it runs.
#[derive(Debug, Default)]
pub struct Meter {
    to_target: AtomicU64,
    to_client: AtomicU64,
    totals: Option<Arc<Totals>>,
}

impl Meter {
    /// A meter that also adds everything to `totals`.
    pub fn with_totals(totals: Arc<Totals>) -> Self {
        Self {
            totals: Some(totals),
            ..Self::default()
        }
    }

    pub(crate) fn add(&self, dir: Direction, n: usize) {
        let n = n as u64;
        match dir {
            Direction::ToTarget => self.to_target.fetch_add(n, Ordering::Relaxed),
            Direction::ToClient => self.to_client.fetch_add(n, Ordering::Relaxed),
        };
        if let Some(t) = &self.totals {
            t.add(dir, n);
        }
    }

    /// This connection was handed from splice to the kernel relay.
    pub(crate) fn promoted(&self) {
        if let Some(t) = &self.totals {
            t.promoted.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn transfer(&self) -> Transfer {
        Transfer {
            to_target: self.to_target.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
        }
    }

    /// A relay's result, with what it moved.
    pub(crate) fn outcome(&self, r: Result<(), Failure>) -> Result<Transfer, RelayError> {
        r.map(|()| self.transfer())
            .map_err(|(direction, source)| RelayError {
                direction,
                transfer: self.transfer(),
                source,
            })
    }
}

/// Bytes moved by all connections of a mapping, each direction, and how many of its
/// connections `auto` handed to the kernel relay.
#[derive(Debug, Default)]
pub struct Totals {
    to_target: AtomicU64,
    to_client: AtomicU64,
    promoted: AtomicU64,
}

impl Totals {
    fn add(&self, dir: Direction, n: u64) {
        match dir {
            Direction::ToTarget => self.to_target.fetch_add(n, Ordering::Relaxed),
            Direction::ToClient => self.to_client.fetch_add(n, Ordering::Relaxed),
        };
    }

    pub fn to_target(&self) -> u64 {
        self.to_target.load(Ordering::Relaxed)
    }

    pub fn to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }

    /// Connections promoted from splice to the kernel relay (`auto`).
    pub fn promoted(&self) -> u64 {
        self.promoted.load(Ordering::Relaxed)
    }
}

/// Byte counts of one relayed connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub to_target: u64,
    pub to_client: u64,
}

/// Why a relay ended abnormally. Both sockets have been set to reset on close.
#[derive(Debug, thiserror::Error)]
#[error("relay {direction} failed after {} B up / {} B down: {source}", .transfer.to_target, .transfer.to_client)]
pub struct RelayError {
    pub direction: Direction,
    pub transfer: Transfer,
    #[source]
    pub source: io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task holds this state, and tokio copies a task's whole state when
    /// it spawns and when it completes: nested `async fn`s once made it 5 KB (the kernel
    /// relay's states inline, every future argument kept twice), which cost more per
    /// connection in crr than any other user-space work.
    #[tokio::test]
    async fn a_connections_relay_state_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = l.accept().await.unwrap();
        let meter = Meter::default();
        // The size is the future type's: every pump's state is in it, auto's included.
        let pump = Pump::Splice;
        let relay = run(a, b, &pump, &meter, std::future::pending::<()>());
        let size = std::mem::size_of_val(&relay);
        eprintln!("relay state: {size} B");
        assert!(size <= 2048, "a connection's relay state grew to {size} B");
    }
}
