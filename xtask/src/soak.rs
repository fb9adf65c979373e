//! `cargo xtask soak`: berth under a mixed load for a while, failing if a resource keeps
//! growing once the load is steady (proxy/tests/soak.rs holds the load and the checks).
use std::process::Command;

use anyhow::bail;

use crate::{exec, setup};

#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long the load runs, in minutes (the first third is warm-up; CI runs 2).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1440))]
    minutes: u32,
}

pub(crate) fn run(args: &SoakArgs) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the soak runs in network namespaces it creates: run `sudo -E cargo xtask soak`");
    }
    let root = exec::root();
    let dir = root.join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let report = dir.join(format!("soak-{}min.json", args.minutes));
    let secs = u64::from(args.minutes) * 60;
    exec::run(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "test", "--locked", "-p", "berth", "--test", "soak", "--config",
            ])
            // As in `cargo xtask test`: a hang fails the run, 5 minutes past the load.
            .arg(format!(
                "target.'cfg(target_os = \"linux\")'.runner = ['timeout', '--kill-after=30', '{}']",
                secs + 300
            ))
            .args(["--", "--ignored", "--exact", "soak", "--nocapture"])
            .env("BERTH_SOAK_SECS", secs.to_string())
            .env("BERTH_SOAK_REPORT", &report),
    )?;
    println!("soak report: {}", report.display());
    Ok(())
}
