//! The certificates the agent holds for its pods' identities: made in
//! memory, signed by the mesh CA, renewed at half-life.

pub mod ca_client;
pub mod manager;

pub use manager::{CertDump, CertFor, IdentityManager};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{identity}: no certificate after {waited:?} (is the CA at {ca} reachable, and does it place this pod on this node?)"
    )]
    NotReady {
        identity: String,
        waited: std::time::Duration,
        ca: String,
    },
    #[error(
        "{identity}: its certificate expired at {at} and the CA at {ca} has not renewed it: \
         refused (fail closed)"
    )]
    Expired {
        identity: String,
        at: String,
        ca: String,
    },
    #[error("certificate authority: {0}")]
    Ca(#[from] ca_client::Error),
    #[error("generating a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the CA returned an unusable certificate: {0}")]
    BadCertificate(String),
}
