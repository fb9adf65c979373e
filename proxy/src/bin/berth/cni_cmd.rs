//! `berth cni install`: the CNI plugin into a node's directories, in place of portmap.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use berth::cni::install::{self, Change};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum CniCommand {
    /// Copy this binary to BIN_DIR/berth-cni and put berth-cni in place of portmap in every
    /// *.conflist of CONF_DIR (each original kept as .conflist.orig; lists without portmap
    /// are left alone). Safe to repeat.
    Install {
        /// The CNI plugin directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The admin socket the plugin should use, written into the lists [default: the
        /// plugin's own default, /run/berth/admin.sock].
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
}

pub(crate) fn run(cmd: CniCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CniCommand::Install {
            bin_dir,
            conf_dir,
            admin_socket,
        } => {
            let exe = std::env::current_exe().context("cannot find this binary")?;
            let changes = install::install(&exe, &bin_dir, &conf_dir, admin_socket.as_deref())?;
            println!("installed {}", bin_dir.join("berth-cni").display());
            for c in &changes {
                let (p, what) = match c {
                    Change::Replaced(p) => (p, "portmap replaced by berth-cni"),
                    Change::Present(p) => (p, "has berth-cni already"),
                    Change::Untouched(p) => (p, "no portmap, left alone"),
                };
                println!("{}: {what}", p.display());
            }
            if changes.is_empty() {
                println!(
                    "no *.conflist in {} yet: run again once the network plugin has written one",
                    conf_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
