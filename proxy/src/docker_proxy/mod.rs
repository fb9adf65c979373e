//! Drop-in compatibility with moby's `docker-proxy`: its single-dash flags, the fd 3 status pipe
//! and the listening socket that dockerd passes as fd 4 with `-use-listen-fd`.
//!
//! dockerd starts one proxy per published port and reads fd 3: `0\n` means "listening",
//! `1\n<message>` means it failed (and the proxy exits 1). With a berth daemon running, the
//! proxy hands the port to it and only waits ([`shim`]).

mod args;
pub mod shim;
mod status;

pub use args::{Args, ArgsError, Parsed, USAGE};
pub use status::{STATUS_FD, StatusPipe};

/// The fd on which dockerd passes the listening socket with `-use-listen-fd`.
pub const LISTEN_FD: i32 = 4;
