//! `cargo xtask fuzz`: runs every target in `fuzz/` (cargo-fuzz, nightly) for a while.
//! `cargo xtask test` runs each for a few seconds; this runs them longer.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

/// How long `cargo xtask test` runs each target.
pub(crate) const BOUNDED_SECS: u32 = 15;

#[derive(Debug, clap::Args)]
pub(crate) struct FuzzArgs {
    /// Minutes for each target.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1440))]
    minutes: u32,
    /// Only this target (see `fuzz/fuzz_targets/`).
    #[arg(long)]
    target: Option<String>,
    /// Merge the new inputs that add coverage into the kept corpus (`fuzz/corpus/`).
    #[arg(long)]
    keep_new: bool,
}

pub(crate) fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    setup::run()?;
    let targets = match &args.target {
        Some(t) => vec![t.clone()],
        None => targets()?,
    };
    build()?;
    for t in &targets {
        run_target(t, args.minutes * 60, args.keep_new)?;
    }
    Ok(())
}

/// Every target for [`BOUNDED_SECS`], for `cargo xtask test` (setup already ran).
pub(crate) fn bounded() -> anyhow::Result<()> {
    build()?;
    for t in targets()? {
        run_target(&t, BOUNDED_SECS, false)?;
    }
    Ok(())
}

fn fuzz_cmd(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    // No sanitizer: the targets reach only safe Rust (parsers and pure state machines), and
    // without ASan the build takes minutes less and each run executes several times more
    // inputs. Debug assertions (overflow checks) stay on.
    cmd.current_dir(fuzz_dir).args(["+nightly", "fuzz"]);
    cmd
}

fn targets() -> anyhow::Result<Vec<String>> {
    let fuzz = exec::root().join("fuzz");
    let out = exec::output(fuzz_cmd(&fuzz).arg("list"))?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)
        .context("cargo fuzz list")?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Builds every target first, so that a build failure (a full disk, a toolchain change) is
/// reported as one and not as a crash with an input to look for.
fn build() -> anyhow::Result<()> {
    let fuzz = exec::root().join("fuzz");
    exec::run(fuzz_cmd(&fuzz).args(["build", "--sanitizer", "none"])).context(
        "building the fuzz targets (`cargo +nightly fuzz build --sanitizer none` in fuzz/)",
    )
}

/// Runs `target` for `secs` from the kept corpus; new inputs go to a scratch directory (the
/// kept corpus changes only with `keep_new`). A crash fails with where its input is.
fn run_target(target: &str, secs: u32, keep_new: bool) -> anyhow::Result<()> {
    let fuzz = exec::root().join("fuzz");
    let kept = fuzz.join("corpus").join(target);
    let scratch = exec::root().join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&scratch)?;
    println!("xtask: fuzzing {target} for {secs} s");
    let ran = exec::run(
        fuzz_cmd(&fuzz)
            .args(["run", "--sanitizer", "none", target])
            .arg(&scratch)
            .arg(&kept)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            // Each target handles one small input in microseconds: a second is a hang.
            .args(["-timeout=10", "-rss_limit_mb=2048", "-max_len=65536"]),
    );
    if let Err(e) = ran {
        bail!(
            "fuzz target {target} failed ({e}): its input is in fuzz/artifacts/{target}/; once fixed, copy it into fuzz/corpus/{target}/ so that the unit test replays it"
        );
    }
    if keep_new {
        exec::run(
            fuzz_cmd(&fuzz)
                .args(["run", "--sanitizer", "none", target])
                .arg(&kept)
                .arg(&scratch)
                .args(["--", "-merge=1"]),
        )?;
    }
    Ok(())
}
