//! Builds the kernel programs (`mesh-ebpf`) with the pinned nightly and
//! bpf-linker, and leaves the object in `OUT_DIR/mesh-ebpf` for
//! `include_bytes_aligned!`.
//!
//! Without bpf-linker on PATH the build still succeeds with an empty object,
//! so unit tests run on machines without the eBPF toolchain; the agent then
//! refuses to start with a message saying how to fix it. `cargo xtask setup`
//! installs the toolchain and every xtask command puts it on PATH.

use std::{env, fs, path::PathBuf};

/// Keep in step with mesh-ebpf/rust-toolchain.toml and xtask/src/setup.rs.
const NIGHTLY: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("workspace root");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=PATH");
    // The programs are compiled from mesh-common too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("mesh-common").display()
    );

    let linker = env::var_os("PATH")
        .into_iter()
        .flat_map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file());
    let object = out.join("mesh-ebpf");
    match linker {
        Some(linker) => {
            // A rebuilt linker (new nightly) must rebuild the object.
            println!("cargo:rerun-if-changed={}", linker.display());
            let ebpf_dir = root.join("mesh-ebpf");
            let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
            aya_build::build_ebpf(
                [aya_build::Package {
                    name: "mesh-ebpf",
                    root_dir: ebpf_dir,
                    ..Default::default()
                }],
                aya_build::Toolchain::Custom(NIGHTLY),
            )?;
        }
        None => {
            println!(
                "cargo:warning=bpf-linker is not on PATH: building mesh-agent without its eBPF \
                 programs (run `cargo xtask setup`, or use `cargo xtask build`)"
            );
            fs::write(&object, [])?;
        }
    }
    // AYA_BUILD_SKIP=1 (set by `cargo xtask lint`) builds nothing: embed an
    // empty object, which the agent refuses to run with.
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
