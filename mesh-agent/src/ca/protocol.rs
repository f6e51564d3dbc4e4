//! The CA's wire types: HTTPS + JSON over mutual TLS. The CA server and its
//! client (the node agent's identity manager) both use these and nothing
//! else of each other; this module depends on nothing in the crate.

use serde::{Deserialize, Serialize};

/// Where a node asks for a certificate.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// Where a node reads the roots to trust.
pub const TRUST_BUNDLE_PATH: &str = "/v1/trust-bundle";

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
