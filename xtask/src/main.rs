//! `cargo xtask`: the project's own commands. Each installs what it needs first.
mod bench;
mod demo;
mod exec;
mod fuzz;
mod install;
mod package;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "berth's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what a fresh machine lacks: rust-src for nightly, bpf-linker, apt packages.
    Setup,
    /// setup, then fmt check, clippy -D warnings, rustdoc -D warnings, every test
    /// (privileged ones included), and a short run of each fuzz target.
    Test {
        /// Skip the stress tier (tests named `stress_*`: multi-GiB transfers), to iterate in
        /// minutes; CI runs everything.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// setup, build, then show a port mapped into a container namespace, and tear it down.
    Demo,
    /// Run every fuzz target (fuzz/, cargo-fuzz on nightly) for a few minutes each.
    Fuzz(fuzz::FuzzArgs),
    /// Run berth under a mixed load in test namespaces for a while and fail if its memory,
    /// descriptors, threads, BPF map entries or socket memory keep growing.
    Soak(soak::SoakArgs),
    /// Install the contenders, build in release mode, and run the forwarding benchmark.
    Bench(bench::BenchArgs),
    /// Build in release mode and install the binaries, the systemd units and an example
    /// config (an existing /etc/berth/berth.toml is kept).
    Install(install::InstallArgs),
    /// Build the Debian package (target/package/berth_VERSION_ARCH.deb) and check it with
    /// lintian.
    Package(package::PackageArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test {
            quick,
            cargo_test_args,
        } => test::run(quick, &cargo_test_args),
        Command::Demo => demo::run(),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Install(args) => install::run(&args),
        Command::Package(args) => package::run(&args),
    }
}
