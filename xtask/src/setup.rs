//! Installs what the build and the tests need, idempotently: each step
//! checks first and does nothing when already done.
//!
//! Versions are those recorded in ../shared/EBPF-TOOLCHAIN.md.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Keep in step with mesh-ebpf/rust-toolchain.toml and mesh-agent/build.rs.
pub const NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER: &str = "0.13.0";
/// Debian packages the tests and the demo use.
const PACKAGES: [(&str, &str); 13] = [
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("tcpdump", "tcpdump"),
    // `cargo xtask bench`'s loads.
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("h2load", "nghttp2-client"),
    // `cargo xtask vm-test`: the guest and its init.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    // Debian's kernel modules are xz-compressed from 6.12 on.
    ("xz", "xz-utils"),
    // libFuzzer, built from source by libfuzzer-sys (`cargo xtask fuzz`).
    ("c++", "g++"),
    // The golden-signals test scrapes the agents with a real Prometheus
    // and lints their metrics with promtool.
    ("prometheus", "prometheus"),
];

/// Where the installed tools are.
pub struct Tools {
    linker_bin: PathBuf,
}

impl Tools {
    /// `cargo` in the workspace root, with bpf-linker on PATH.
    pub fn cargo(&self) -> Command {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.linker_bin.clone()];
        dirs.extend(std::env::split_paths(&path));
        c.env("PATH", std::env::join_paths(dirs).expect("PATH"));
        c.current_dir(super::root());
        c
    }
}

/// Keep in step with mesh-agent/fuzz/Cargo.toml's libfuzzer-sys.
const CARGO_FUZZ: &str = "0.13.1";

/// cargo-fuzz, installed under `~/.cache/mesh-dev` on first use (only
/// `cargo xtask fuzz` and the test command's short fuzzing need it);
/// returns its `bin` directory.
pub fn cargo_fuzz() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".cache/mesh-dev")
        .join(format!("cargo-fuzz-{CARGO_FUZZ}"));
    let bin = prefix.join("bin");
    if bin.join("cargo-fuzz").is_file() {
        return Ok(bin);
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ}");
    let s = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ,
            "--root",
        ])
        .arg(&prefix)
        .status()
        .context("cargo install cargo-fuzz")?;
    if !s.success() || !bin.join("cargo-fuzz").is_file() {
        bail!("could not install cargo-fuzz {CARGO_FUZZ}");
    }
    Ok(bin)
}

pub fn run() -> Result<Tools> {
    let t = Instant::now();
    stable_components()?;
    nightly()?;
    let linker_bin = bpf_linker()?;
    packages()?;
    bpffs()?;
    eprintln!("xtask: setup ok ({:.1}s)", t.elapsed().as_secs_f32());
    Ok(Tools { linker_bin })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn ok(c: &mut Command) -> bool {
    c.output().is_ok_and(|o| o.status.success())
}

fn sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .arg(format!("+{NIGHTLY}"))
        .args(["--print", "sysroot"])
        .output()?;
    if !out.status.success() {
        bail!("rustc +{NIGHTLY} failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// rustfmt and clippy for the stable toolchain that builds user space
/// (`cargo xtask lint`).
fn stable_components() -> Result<()> {
    let have = |tool: &str| ok(Command::new("cargo").args([tool, "--version"]));
    if have("fmt") && have("clippy") {
        return Ok(());
    }
    eprintln!("xtask: adding rustfmt and clippy");
    let s = Command::new("rustup")
        .args(["component", "add", "rustfmt", "clippy"])
        .current_dir(super::root())
        .status()?;
    if !s.success() {
        bail!("rustup component add rustfmt clippy failed");
    }
    Ok(())
}

/// The pinned nightly with `rust-src` (the kernel programs build `core`).
fn nightly() -> Result<()> {
    let has_src = || sysroot().is_ok_and(|s| s.join("lib/rustlib/src/rust/library/core").is_dir());
    if has_src() {
        return Ok(());
    }
    eprintln!("xtask: installing {NIGHTLY} with rust-src");
    let s = Command::new("rustup")
        .args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])
        .status()
        .context("rustup is needed to install the pinned nightly")?;
    if !s.success() || !has_src() {
        bail!("could not install {NIGHTLY} with rust-src");
    }
    Ok(())
}

/// bpf-linker built against the pinned nightly's own libLLVM, cached under
/// `~/.cache/mesh-dev` (its path names the nightly, so a new nightly gets a
/// new build).
fn bpf_linker() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".cache/mesh-dev")
        .join(format!("bpf-linker-{BPF_LINKER}-{NIGHTLY}"));
    let bin = prefix.join("bin");
    let linker = bin.join("bpf-linker");
    if ok(Command::new(&linker).arg("--version")) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER} against {NIGHTLY}'s LLVM (a few minutes, once)"
    );
    let lib = sysroot()?.join("lib");
    let so = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let llvm_lib = prefix.join("llvm/lib");
    std::fs::create_dir_all(&llvm_lib)?;
    for name in [so.as_str(), "libLLVM.so"] {
        let link = llvm_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&so), &link)?;
    }
    let s = Command::new("cargo")
        .arg(format!("+{NIGHTLY}"))
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--root",
        ])
        .arg(&prefix)
        .env("LLVM_PREFIX", prefix.join("llvm"))
        .status()?;
    if !s.success() || !ok(Command::new(&linker).arg("--version")) {
        bail!("building bpf-linker failed");
    }
    Ok(bin)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Debian packages, installed with apt, waiting for the dpkg lock if
/// another apt run holds it.
fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, pkg)| !installed(pkg))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    // Packages that ship a service (prometheus) must not start it: the
    // tests run their own, in their own namespaces. Debian's way is a
    // policy-rc.d that denies starts; one is put there for the install
    // unless the machine has its own.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let guard = !policy.exists();
    if guard {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = apt(&args);
    if guard {
        std::fs::remove_file(policy)?;
    }
    installed
}

fn apt(args: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=120"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("apt-get")?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        // The lists lock has no timeout option of its own: retry.
        if (err.contains("Could not get lock") || err.contains("Unable to lock"))
            && Instant::now() < deadline
        {
            eprintln!("xtask: apt is busy (another apt run holds its lock); waiting");
            std::thread::sleep(Duration::from_secs(5));
            continue;
        }
        bail!("apt-get {} failed:\n{err}", args.join(" "));
    }
}

/// bpffs at /sys/fs/bpf, where the agent pins maps and links.
fn bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")?.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf: run `cargo xtask setup` as root");
    }
    eprintln!("xtask: mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    let s = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if !s.success() {
        bail!("mount -t bpf bpf /sys/fs/bpf failed");
    }
    Ok(())
}
