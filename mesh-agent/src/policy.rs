//! Istio security policy the agent enforces. For now PeerAuthentication;
//! each policy is built from validated resources of the configuration
//! snapshot.

pub mod peer_auth;

pub use peer_auth::{MtlsMode, PeerAuthentications};
