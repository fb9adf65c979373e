//! `berth-docker-proxy`: berth behind docker-proxy's command line, for dockerd's
//! `userland-proxy-path`. It hands the port to a running `berth run` when one answers, and
//! serves it itself otherwise (see `berth::docker_proxy::shim`). The installed one is a link
//! to `berth`, which dispatches on its name; this binary is the same code on its own.
use std::process::ExitCode;

fn main() -> ExitCode {
    berth::docker_proxy::main()
}
