//! The mesh's certificate authority (`mesh-agent ca …`): holds the root (or
//! an intermediate) and signs workload certificates for node agents, but
//! only for identities of pods scheduled on the asking node.

pub mod commands;
mod keys;
pub mod kube;
pub mod nodes;
mod placement;
pub mod protocol;
pub mod server;
pub mod signer;

/// Istio's default CA port.
pub const DEFAULT_PORT: u16 = 15012;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source} (create a CA with `mesh-agent ca init --dir …`)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists: refusing to overwrite a CA")]
    Exists { path: std::path::PathBuf },
    #[error("{0}")]
    Tls(#[from] crate::tls::Error),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the signing certificate {path} is not a CA certificate")]
    NotCa { path: std::path::PathBuf },
    #[error(
        "ca-key.pem is not the key of {path} (files of two CAs mixed, or a rotation half written)"
    )]
    KeyMismatch { path: std::path::PathBuf },
    #[error(
        "this CA was made for trust domain {stored} ({path}); --trust-domain {flag} contradicts it \
         (leave the flag out)"
    )]
    TrustDomainConflict {
        path: std::path::PathBuf,
        stored: String,
        flag: String,
    },
    #[error("{path}: {reason}")]
    NodeRecords {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("no node credential of {node} is recorded in {dir}")]
    UnknownNode {
        node: String,
        dir: std::path::PathBuf,
    },
    #[error("{0}")]
    Identity(#[from] crate::spiffe::Error),
    #[error("{0}")]
    Placement(crate::sources::Rejection),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("Kubernetes API: {0}")]
    Kube(String),
}
