//! Builds the kernel programs (`mesh-ebpf`) with the pinned nightly and
//! bpf-linker, and leaves the object in `OUT_DIR/mesh-ebpf` for
//! `include_bytes_aligned!`.
//!
//! bpf-linker is taken from PATH, else from where `cargo xtask setup`
//! installs it (`~/.cache/mesh-dev/bpf-linker-<version>-<nightly>/bin`), so
//! a plain `cargo build --release -p mesh-agent` works after setup. Without
//! it the build fails at once with what to do — an agent without its
//! programs cannot run, so none is built — unless `AYA_BUILD_SKIP=1` asks
//! for a build without them (lints, unit tests on a machine without the
//! eBPF toolchain; that agent refuses to start and says why).

use std::{
    env, fs,
    path::{Path, PathBuf},
};

/// Keep in step with mesh-ebpf/rust-toolchain.toml and xtask/src/setup.rs.
const NIGHTLY: &str = "nightly-2026-05-20";
/// Keep in step with xtask/src/setup.rs.
const BPF_LINKER: &str = "0.13.0";

/// bpf-linker on PATH, else the one `cargo xtask setup` installed.
fn find_linker() -> Option<PathBuf> {
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file());
    on_path.or_else(|| {
        let home = env::var_os("HOME")?;
        let p = Path::new(&home)
            .join(".cache/mesh-dev")
            .join(format!("bpf-linker-{BPF_LINKER}-{NIGHTLY}"))
            .join("bin/bpf-linker");
        p.is_file().then_some(p)
    })
}

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("workspace root");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // The programs are compiled from mesh-common too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("mesh-common").display()
    );
    let object = out.join("mesh-ebpf");
    // AYA_BUILD_SKIP=1 builds nothing: an empty object, which the agent
    // refuses to run with.
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v != "0") {
        fs::write(&object, [])?;
        return Ok(());
    }
    let Some(linker) = find_linker() else {
        anyhow::bail!(
            "bpf-linker not found (on PATH or in ~/.cache/mesh-dev): run `cargo xtask setup` \
             once, then build again (or set AYA_BUILD_SKIP=1 for a build without the eBPF \
             programs, which cannot run the agent)"
        );
    };
    // A rebuilt linker (new nightly) must rebuild the object.
    println!("cargo:rerun-if-changed={}", linker.display());
    // aya-build runs `cargo build` for the programs, which needs the
    // linker on PATH.
    let dir = linker.parent().expect("the linker's directory");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(env::split_paths(&path));
    // SAFETY: a build script is single-threaded here; nothing else reads
    // the environment concurrently.
    unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
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
    if !object.exists() {
        anyhow::bail!("aya-build left no object at {}", object.display());
    }
    Ok(())
}
