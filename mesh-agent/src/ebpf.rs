//! The kernel side as the agent sees it: load the embedded programs, pin and
//! adopt maps, attach to pods, read what the programs recorded.
//!
//! With `sys`, the only module that uses `unsafe` (inside aya's macros).

mod attach;
mod features;
mod loader;
mod log;
mod maps;

use std::{io, path::PathBuf};

pub use attach::PodLinks;
pub use loader::{Loaded, ProgramInfo, Removed, remove_pins, uninstall};
pub use log::forward_logs;
pub use maps::{MapEntries, Maps, addr_from_map, map_addr};

/// The object built by `build.rs`; empty when bpf-linker was missing.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this mesh-agent was built without its eBPF programs (bpf-linker was not on PATH): \
         run `cargo xtask setup` and rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error(
        "{path} is not on a bpffs mount: mount one with `mount -t bpf bpf /sys/fs/bpf` \
         or point --bpffs-dir at a directory on bpffs"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} has a different layout (key {} B, value {} B, {} entries; this \
         agent needs {} B, {} B, {} entries): it belongs to an incompatible agent version; \
         remove it (or stop that agent) and start again",
        .found.0, .found.1, .found.2, .want.0, .want.1, .want.2
    )]
    IncompatiblePin {
        path: PathBuf,
        /// (key size, value size, max entries)
        found: (u32, u32, u32),
        want: (u32, u32, u32),
    },
    #[error(
        "the kernel refused to load the eBPF object: {} (needs BPF with BTF, cgroup sock_addr, \
         sock_ops and sk_lookup programs, Linux 5.15 or later)",
        chain(.0)
    )]
    Load(#[source] aya::EbpfError),
    /// A program the kernel refused for want of a feature it is too old
    /// for (or was built without).
    #[error("this kernel (Linux {release}) lacks {feature}, which eBPF program {program} needs")]
    Unsupported {
        program: &'static str,
        feature: features::Feature,
        release: String,
    },
    #[error("the same-node fast path is unavailable on this kernel: {0}")]
    FastPathUnavailable(String),
    /// `reason` is one line; the verifier's full log is logged at debug level.
    #[error("the kernel refused eBPF program {name}: {reason}")]
    Program { name: &'static str, reason: String },
    #[error("eBPF map {name}: {}", chain(.source))]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot attach {program} to {target}: {}", chain(.source))]
    Attach {
        program: &'static str,
        target: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot take the link of {program}: {}", chain(.source))]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One line out of a (possibly multi-line) program error: the syscall
/// failure plus the verifier's verdict, which is the last line that is not
/// a statistic.
fn summarize(err: &aya::programs::ProgramError) -> String {
    let full = err.to_string();
    let mut lines = full.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let first = first.split(". Verifier output").next().unwrap_or(first);
    let stats = [
        "verification time",
        "stack depth",
        "processed ",
        "max_states_per_insn",
    ];
    let verdict = full
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)) && *l != first);
    match verdict {
        Some(v) if full.lines().count() > 1 => format!("{first}: {v}"),
        _ => first.to_string(),
    }
}

/// An error and its sources on one line (aya's errors keep the OS error in
/// the source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}
