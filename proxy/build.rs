//! Builds the kernel programs in `ebpf/` and leaves the object in OUT_DIR for `include_bytes!`.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("proxy/ has no parent"))?
        .join("ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("berth-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("common").display()
    );

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // clippy/doc-only builds: an empty object makes the loader report "built without eBPF".
        for object in [&object, &out_dir.join("berth-dnat")] {
            if !object.exists() {
                fs::write(object, []).context("failed to write placeholder eBPF object")?;
            }
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package {
            name: "berth-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "failed to build the eBPF programs (run `cargo xtask setup` for rust-src and bpf-linker)",
    )
}
