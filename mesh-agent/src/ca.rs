//! The mesh's certificate authority (`mesh-agent ca …`): holds the root (or
//! an intermediate) and signs workload certificates for node agents, but
//! only for identities of pods scheduled on the asking node.

pub mod kube;
pub mod server;
pub mod signer;

use serde::{Deserialize, Serialize};

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
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
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

/// `POST /v1/certificates`: sign this CSR for this identity.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    pub identity: String,
    /// PKCS#10 request, PEM.
    pub csr: String,
    pub ttl_seconds: u64,
}

/// The signed chain (leaf first) and the roots to trust.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    pub cert_chain: Vec<String>,
    pub trust_bundle: Vec<String>,
}

/// `GET /v1/trust-bundle`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleResponse {
    pub trust_bundle: Vec<String>,
}

/// Any refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
