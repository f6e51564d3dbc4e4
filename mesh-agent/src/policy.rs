//! Istio security policy the agent enforces. For now PeerAuthentication,
//! read from Istio YAML files (the full configuration pipeline comes later
//! and produces the same types).

pub mod peer_auth;

pub use peer_auth::{MtlsMode, PeerAuthentications};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {message}")]
    Syntax {
        file: std::path::PathBuf,
        message: String,
    },
    #[error("{file}: {kind} {namespace}/{name}: {field}: {reason}")]
    Invalid {
        file: std::path::PathBuf,
        kind: String,
        namespace: String,
        name: String,
        field: String,
        reason: String,
    },
}
