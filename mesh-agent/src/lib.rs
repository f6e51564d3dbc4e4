//! The node agent of the eBPF service mesh: captures pod traffic with the
//! programs in `mesh-ebpf` and carries it.
#![deny(unsafe_code)]

/// This build of the agent: the package version, and `+second` for the
/// second build the upgrade test replaces agents with (feature
/// `second-build`, otherwise the same source). Logged at start-up, said in
/// the hand-over's greeting, shown by `--version` and `/config_dump`.
#[cfg(not(feature = "second-build"))]
pub const BUILD: &str = env!("CARGO_PKG_VERSION");
#[cfg(feature = "second-build")]
pub const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "+second");

pub mod admin;
pub mod analyze;
pub mod app;
pub mod ca;
pub mod cel_expr;
pub mod cni;
pub mod config;
pub mod discover;
pub mod documents;
pub mod handover;
pub mod identity;
pub mod inspect;
pub mod istio;
pub mod mesh_config;
pub mod netns;
pub mod pod;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod snapshot;
pub mod sources;
pub mod spiffe;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
pub mod watch;
pub mod workload;

#[allow(unsafe_code, reason = "aya's include_bytes_aligned! and map Pod types")]
pub mod ebpf;
#[allow(unsafe_code, reason = "raw system calls without a safe wrapper")]
pub mod sys;
