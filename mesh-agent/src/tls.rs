//! TLS for the mesh: rustls with the ring provider, TLS 1.3 only, SPIFFE
//! identities in URI SANs, and a trust bundle that can change at runtime
//! (root rotation).

pub mod verify;

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use serde::Serialize;

use crate::spiffe::SpiffeId;

pub use verify::{
    Rejection, SpiffeClientVerifier, SpiffeServerVerifier, failure_detail, failure_reason,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: no PEM {kind} found")]
    NoPem { what: String, kind: &'static str },
    #[error("{what}: bad PEM: {reason}")]
    BadPem { what: String, reason: String },
    #[error("{what}: {reason}")]
    BadCert { what: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// ALPN of HBONE (HTTP/2 over TLS).
pub const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider of the process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| Error::BadPem {
        what: what.into(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(Error::NoPem {
            what: what.into(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// The private key in a PEM text.
pub fn key_from_pem(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::BadPem {
        what: what.into(),
        reason: e.to_string(),
    })
}

/// Reads a PEM file.
pub fn read_pem(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

/// A chain and its key, ready for rustls.
pub fn certified_key(
    what: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, Error> {
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| Error::BadCert {
        what: what.into(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(ck))
}

/// What the agent shows about a certificate (never the key).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// The SPIFFE ID in its URI SAN, if any.
    pub identity: Option<String>,
    /// Hex serial number.
    pub serial: String,
    #[serde(with = "rfc3339")]
    pub not_before: SystemTime,
    #[serde(with = "rfc3339")]
    pub not_after: SystemTime,
    pub issuer: String,
}

/// Parses what the agent needs to know of a certificate.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, Error> {
    use x509_parser::prelude::*;
    let bad = |reason: String| Error::BadCert {
        what: "certificate".into(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let identity = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                _ => None,
            })
        });
    let to_time =
        |t: ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    Ok(CertInfo {
        identity,
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: to_time(cert.validity().not_before),
        not_after: to_time(cert.validity().not_after),
        issuer: cert.issuer().to_string(),
    })
}

/// The SPIFFE ID a certificate carries in its URI SAN.
pub fn cert_identity(der: &CertificateDer<'_>) -> Option<SpiffeId> {
    cert_info(der).ok()?.identity?.parse().ok()
}

/// The roots the mesh trusts. More than one during a root rotation.
#[derive(Debug)]
pub struct TrustBundle {
    pub roots: Arc<RootCertStore>,
    pems: Vec<String>,
}

impl TrustBundle {
    /// Builds a bundle from PEM certificates (one or more per text).
    pub fn from_pems(what: &str, pems: &[String]) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        let mut split = Vec::new();
        for p in pems {
            for der in certs_from_pem(what, p)? {
                roots.add(der.clone()).map_err(|e| Error::BadCert {
                    what: what.into(),
                    reason: e.to_string(),
                })?;
                split.push(pem_of(&der));
            }
        }
        if roots.is_empty() {
            return Err(Error::NoPem {
                what: what.into(),
                kind: "root certificate",
            });
        }
        Ok(Self {
            roots: Arc::new(roots),
            pems: split,
        })
    }

    /// One PEM text per root.
    pub fn pems(&self) -> &[String] {
        &self.pems
    }

    /// What `/config_dump` shows of each root.
    pub fn infos(&self) -> Vec<CertInfo> {
        self.pems
            .iter()
            .filter_map(|p| {
                certs_from_pem("root", p)
                    .ok()?
                    .first()
                    .and_then(|d| cert_info(d).ok())
            })
            .collect()
    }
}

/// The PEM text of one DER certificate.
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
}

/// A trust bundle that is replaced as a whole when the CA publishes a new one.
#[derive(Debug)]
pub struct SharedBundle {
    roots: RwLock<Arc<TrustBundle>>,
    /// The [`next_generation`] taken when these roots were installed.
    generation: std::sync::atomic::AtomicU64,
}

/// Credentials (certificates, trust bundles) are numbered from one counter,
/// so "dialled with generation g" compares across both: a connection older
/// than either the certificate or the roots in use now was dialled with
/// credentials since replaced.
pub fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl SharedBundle {
    pub fn new(b: TrustBundle) -> Self {
        Self {
            roots: RwLock::new(Arc::new(b)),
            generation: next_generation().into(),
        }
    }

    pub fn get(&self) -> Arc<TrustBundle> {
        self.roots.read().expect("bundle lock").clone()
    }

    /// The generation of the roots in use now.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Installs `pems` if they differ from the current roots; returns whether it changed.
    pub fn update(&self, pems: &[String]) -> Result<bool, Error> {
        let new = TrustBundle::from_pems("trust bundle", pems)?;
        let mut cur = self.roots.write().expect("bundle lock");
        if cur.pems == new.pems {
            return Ok(false);
        }
        *cur = Arc::new(new);
        self.generation
            .store(next_generation(), std::sync::atomic::Ordering::Release);
        Ok(true)
    }
}

/// RFC 3339 timestamps in JSON.
mod rfc3339 {
    pub fn serialize<S: serde::Serializer>(
        t: &std::time::SystemTime,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let dt = time::OffsetDateTime::from(*t);
        let f = dt
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_a_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://td/ns/a/sa/b".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let pem = pem_of(cert.der());
        let back = certs_from_pem("test", &pem).unwrap();
        assert_eq!(back[0].as_ref(), cert.der().as_ref());
        assert_eq!(
            cert_identity(&back[0]).unwrap().to_string(),
            "spiffe://td/ns/a/sa/b"
        );
    }
}

/// A client configuration for mesh mTLS: TLS 1.3 only, no session
/// resumption (a resumed session would skip the identity check), ALPN h2.
pub fn client_config(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    client_cert: Arc<dyn rustls::client::ResolvesClientCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(client_cert);
    c.resumption = rustls::client::Resumption::disabled();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// A server configuration for mesh mTLS: TLS 1.3 only, no tickets.
pub fn server_config(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    c.send_tls13_tickets = 0;
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// Always presents the same certificate (the CA's endpoint, a node
/// credential).
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents no client certificate (token authentication to the CA).
#[derive(Debug)]
pub struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}
