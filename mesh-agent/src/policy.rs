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
    /// `resource` is `Kind namespace/name`.
    #[error("{file}: {resource}: {field}: {reason}")]
    Invalid {
        file: std::path::PathBuf,
        resource: String,
        field: String,
        reason: String,
    },
}
