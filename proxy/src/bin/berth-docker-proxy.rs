//! `berth-docker-proxy`: berth behind docker-proxy's command line, for dockerd's
//! `userland-proxy-path`.
use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    process::ExitCode,
};

use std::sync::Arc;

use berth::{
    addr::Proto,
    docker_proxy::{Args, LISTEN_FD, Parsed, StatusPipe, USAGE},
    forward, listen, sys, udp,
};
use socket2::Socket;
use tokio::net::{TcpListener, UdpSocket};

fn main() -> ExitCode {
    // Take fd 3 before anything (the runtime, the logger) can open a descriptor.
    let mut status = StatusPipe::take();
    // dockerd passes no log flag; BERTH_LOG (or RUST_LOG) is the way in.
    sys::init_logging(&std::env::var("BERTH_LOG").unwrap_or_else(|_| "warn".into()));
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
        Err(e) => return fail(&mut status, &e.to_string(), true),
    };
    // Claim fd 4 before the runtime opens its own descriptors, which could land on 4.
    let inherited = if args.use_listen_fd {
        match inherited_socket(args.proto) {
            Ok(sock) => Some(sock),
            Err(e) => return fail(&mut status, &e, false),
        }
    } else {
        None
    };
    sys::raise_nofile_limit();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &mut status,
                &format!("failed to start the runtime: {e}"),
                false,
            );
        }
    };
    rt.block_on(async {
        match args.proto {
            Proto::Tcp => serve_tcp(&args, inherited, &mut status).await,
            Proto::Udp => serve_udp(&args, inherited, &mut status).await,
        }
    })
}

async fn serve_tcp(args: &Args, inherited: Option<Socket>, status: &mut StatusPipe) -> ExitCode {
    let listener = match (inherited, args.listen) {
        (Some(sock), _) => TcpListener::from_std(sock.into()).map_err(|e| e.to_string()),
        (None, Some(addr)) => listen::bind_tcp(addr).map_err(|e| e.to_string()),
        (None, None) => Err("no listen address".to_owned()),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => return fail(status, &e, false),
    };
    let stop = sys::stop_signal();
    status.ok();
    let mut config = forward::Config::new(args.target);
    config.mode = args.mode;
    // docker-proxy closes everything at once on SIGTERM; dockerd expects exactly that.
    config.drain_timeout = std::time::Duration::ZERO;
    exit(forward::run(listener, config, stop).await)
}

async fn serve_udp(args: &Args, inherited: Option<Socket>, status: &mut StatusPipe) -> ExitCode {
    let socket = match (inherited, args.listen) {
        (Some(sock), _) => UdpSocket::from_std(sock.into()).map_err(|e| e.to_string()),
        (None, Some(addr)) => listen::bind_udp(addr).map_err(|e| e.to_string()),
        (None, None) => Err("no listen address".to_owned()),
    };
    let socket = match socket {
        Ok(s) => s,
        Err(e) => return fail(status, &e, false),
    };
    let stop = sys::stop_signal();
    status.ok();
    let stats = Arc::new(udp::Stats::default());
    let config = udp::Config::new(args.target);
    exit(udp::run(socket, config, stats, stop).await)
}

fn exit<E: std::fmt::Display>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "proxy stopped");
            ExitCode::FAILURE
        }
    }
}

/// The socket dockerd passed as fd 4 (a listening TCP socket or a bound UDP socket), checked
/// against `-proto` and made non-blocking.
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
    // dockerd binds and listens; listen() again is harmless and covers a merely bound socket.
    if proto == Proto::Tcp && !sock.is_listener().unwrap_or(false) {
        sock.listen(4096)
            .map_err(|e| format!("fd {LISTEN_FD}: listen failed: {e}"))?;
    }
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    sock.set_cloexec(true).map_err(|e| e.to_string())?;
    Ok(sock)
}

/// Reports a start-up failure the way docker-proxy does: on fd 3 when a parent listens,
/// otherwise on stderr; exit status 1 either way.
fn fail(status: &mut StatusPipe, message: &str, usage: bool) -> ExitCode {
    if status.is_attached() {
        status.fail(message);
    } else {
        eprintln!("berth-docker-proxy: {message}");
        if usage {
            eprintln!("{USAGE}");
        }
    }
    ExitCode::from(1)
}
