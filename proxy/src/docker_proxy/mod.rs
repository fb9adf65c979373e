//! Drop-in compatibility with moby's `docker-proxy`: its single-dash flags, the fd 3 status pipe
//! and the listening socket that dockerd passes as fd 4 with `-use-listen-fd`.
//!
//! dockerd starts one proxy per published port and reads fd 3: `0\n` means "listening",
//! `1\n<message>` means it failed (and the proxy exits 1). With a berth daemon running, the
//! proxy hands the port to it and only waits ([`shim`]).

mod args;
pub mod shim;
mod status;

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    process::ExitCode,
};

use socket2::Socket;

pub use args::{Args, ArgsError, Parsed, USAGE};

use crate::addr::Proto;
pub use status::{STATUS_FD, StatusPipe};

/// The fd on which dockerd passes the listening socket with `-use-listen-fd`.
pub const LISTEN_FD: i32 = 4;

/// `berth-docker-proxy`'s whole life: parse docker-proxy's command line, take fd 3 and fd 4,
/// and run the shim. The `berth-docker-proxy` binary, and `berth` when invoked under that
/// name (the installed link), call only this.
pub fn main() -> ExitCode {
    // Take fd 3 before anything (the runtime, the logger) can open a descriptor.
    let mut status = StatusPipe::take();
    // dockerd passes no log flag; BERTH_LOG (or RUST_LOG) is the way in. Asked for, the
    // logger starts now; otherwise on first need (a waiting shim stays small).
    if std::env::var_os("BERTH_LOG").is_some() || std::env::var_os("RUST_LOG").is_some() {
        shim::logging();
    }
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!(
                "berth-docker-proxy (berth) version {}",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let code = shim::fail(&mut status, &e.to_string());
            if !status.is_attached() {
                eprintln!("{USAGE}");
            }
            return code;
        }
    };
    // Claim fd 4 before anything opens its own descriptors, which could land on 4.
    let inherited = if args.use_listen_fd {
        match inherited_socket(args.proto) {
            Ok(sock) => Some(sock),
            Err(e) => return shim::fail(&mut status, &e),
        }
    } else {
        None
    };
    shim::run(&args, inherited, &mut status)
}

/// The socket dockerd passed as fd 4 (a listening TCP socket or a bound UDP socket), checked
/// against `-proto`.
fn inherited_socket(proto: Proto) -> Result<Socket, String> {
    // SAFETY: F_GETFD only checks that the fd is open.
    if unsafe { libc::fcntl(LISTEN_FD, libc::F_GETFD) } == -1 {
        return Err(format!(
            "-use-listen-fd was given but fd {LISTEN_FD} is not open"
        ));
    }
    // SAFETY: fd 4 is open and, by docker-proxy's contract, ours alone.
    let sock = Socket::from(unsafe { OwnedFd::from_raw_fd(LISTEN_FD) });
    let (want, what) = match proto {
        Proto::Tcp => (socket2::Type::STREAM, "TCP"),
        Proto::Udp => (socket2::Type::DGRAM, "UDP"),
    };
    let wrong = || format!("fd {LISTEN_FD} is not a {what} socket (-proto {proto})");
    if sock.r#type().map_err(|_| wrong())? != want {
        return Err(wrong());
    }
    sock.set_cloexec(true).map_err(|e| e.to_string())?;
    Ok(sock)
}
