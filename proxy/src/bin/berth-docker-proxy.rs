//! `berth-docker-proxy`: berth behind docker-proxy's command line, for dockerd's
//! `userland-proxy-path`. It hands the port to a running `berth run` when one answers, and
//! serves it itself otherwise (see `berth::docker_proxy::shim`).
use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    process::ExitCode,
};

use berth::{
    addr::Proto,
    docker_proxy::{Args, LISTEN_FD, Parsed, StatusPipe, USAGE, shim},
};
use socket2::Socket;

fn main() -> ExitCode {
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
