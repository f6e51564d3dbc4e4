//! The node agent of the eBPF service mesh: captures pod traffic with the
//! programs in `mesh-ebpf` and carries it.
#![deny(unsafe_code)]

pub mod admin;
pub mod analyze;
pub mod app;
pub mod ca;
pub mod config;
pub mod discover;
pub mod documents;
pub mod handover;
pub mod identity;
pub mod istio;
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
