//! `berth net`: the container network from the command line.
use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use berth::net::{self, ContainerSpec, IfName, NetNs, Topology, TopologyFile};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub(crate) enum NetCommand {
    /// Create the bridge and the container namespaces.
    Up(UpArgs),
    /// Remove the containers and the bridge that `up` created.
    Down(TopologyArgs),
    /// Run a command inside a container's network namespace.
    Exec {
        /// The container (network namespace) name.
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    topology: TopologyArgs,
    /// Give the containers outbound access: source-NAT what they send beyond the host to the
    /// host's address (an nf_tables table `berth_BRIDGE`; turns on net.ipv4.ip_forward).
    #[arg(long)]
    masquerade: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TopologyArgs {
    /// Topology file (TOML: bridge, subnet, gateway, masquerade, [[container]] name/ip); flags
    /// override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bridge name [default: berth0].
    #[arg(long)]
    bridge: Option<String>,
    /// Container subnet [default: 172.16.0.0/16].
    #[arg(long)]
    subnet: Option<String>,
    /// Gateway address on the bridge [default: 172.16.1.254, or the subnet's last address].
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// A container as NAME or NAME=IP; repeat for more.
    #[arg(long = "container", value_name = "NAME[=IP]", value_parser = parse_container)]
    containers: Vec<ContainerSpec>,
}

fn parse_container(s: &str) -> Result<ContainerSpec, String> {
    s.parse().map_err(|e: net::NetError| e.to_string())
}

impl TopologyArgs {
    fn resolve(self, masquerade: bool) -> anyhow::Result<Topology> {
        let file = match &self.config {
            Some(path) => TopologyFile::load(path)?,
            None => TopologyFile::default(),
        };
        let mut containers = file.containers;
        containers.extend(self.containers);
        Ok(Topology::resolve(
            self.bridge.as_deref().or(file.bridge.as_deref()),
            self.subnet.as_deref().or(file.subnet.as_deref()),
            self.gateway.or(file.gateway),
            &containers,
        )?
        .with_masquerade(masquerade || file.masquerade))
    }
}

pub(crate) async fn run(cmd: NetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NetCommand::Up(args) => {
            let t = args.topology.resolve(args.masquerade)?;
            net::up(&t).await?;
            println!(
                "bridge {} {}/{} up",
                t.bridge,
                t.gateway,
                t.subnet.prefix_len()
            );
            if t.masquerade {
                println!(
                    "egress from {} masqueraded (nf_tables table ip {})",
                    t.subnet,
                    net::masquerade_table(&t.bridge)
                );
            }
            for c in &t.containers {
                println!(
                    "container {} eth0 {}/{} via {} (host side {})",
                    c.name,
                    c.addr,
                    t.subnet.prefix_len(),
                    t.gateway,
                    c.host_veth
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        NetCommand::Down(args) => {
            let t = args.resolve(false)?;
            let names: Vec<String> = t.containers.iter().map(|c| c.name.clone()).collect();
            let report = net::down(&t.bridge, &names).await?;
            for c in &report.containers {
                println!("container {c} removed");
            }
            if report.masquerade_removed {
                println!(
                    "egress table ip {} removed",
                    net::masquerade_table(&t.bridge)
                );
            }
            if report.forwarding_restored {
                println!("net.ipv4.ip_forward turned off again, as it was before `up`");
            }
            if report.bridge_removed {
                println!("bridge {} removed", t.bridge);
            } else if !report.foreign_ports.is_empty() {
                println!(
                    "bridge {} kept: other ports are attached ({})",
                    t.bridge,
                    report.foreign_ports.join(", ")
                );
            } else if report.containers.is_empty() {
                println!(
                    "nothing to remove: no bridge {} and no containers recorded for it",
                    t.bridge
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        NetCommand::Exec { name, command } => {
            let _valid: IfName = name.parse()?;
            let (program, rest) = command.split_first().context("no command given")?;
            // Replaced by the command, like `ip netns exec`: its exit status is ours, and a
            // signal to this process (the demo's teardown) reaches the command itself.
            let err = std::os::unix::process::CommandExt::exec(
                NetNs::named(&name).command(program)?.args(rest),
            );
            Err(anyhow::Error::new(err).context(format!("failed to run {program:?} in {name}")))
        }
    }
}
