//! Harness for the namespaced tests and the demo: simulated nodes and pods
//! built from network namespaces, veth pairs, a bridge and cgroups, the
//! agent run as a real process inside a node, and guards that remove all of
//! it even when a test fails.
//!
//! Everything an `Env` creates carries its name (`mt-<pid>-<test>`), lives
//! in namespaces and cgroups it made, and is removed when it is dropped.
//! Leftovers of killed runs (owner PID gone) are swept on the next start.

pub mod agent;
pub mod ca;
pub mod cluster;
pub mod demo;
pub mod env;
pub mod fake_apiserver;
pub mod jwt;
pub mod pod;
pub mod prometheus;
pub mod sys;

pub use agent::{Agent, AgentOptions};
pub use env::Env;
pub use pod::{Node, Pod};
pub mod kernel;
pub mod pcap;
