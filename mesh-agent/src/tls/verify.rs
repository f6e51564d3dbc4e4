//! Certificate verification by SPIFFE identity, and why a handshake failed.
//!
//! Both sides verify the chain against the current trust bundle, then the
//! identity in the URI SAN: it must be in the mesh's trust domain, and a
//! client also checks it is the identity it expects for the destination.
//! Failures carry a short reason for metrics and logs.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{SharedBundle, cert_identity};
use crate::spiffe::SpiffeId;

/// Why a peer's certificate was refused after its chain checked out.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("certificate carries no SPIFFE ID")]
    NoIdentity,
    #[error("peer is {found}, from trust domain {found_domain}; this mesh is {want}")]
    WrongTrustDomain {
        found: String,
        found_domain: String,
        want: String,
    },
    #[error("peer is {found}, expected {want}")]
    WrongIdentity { found: String, want: String },
}

impl Rejection {
    fn reason(&self) -> &'static str {
        match self {
            Rejection::NoIdentity => "no_identity",
            Rejection::WrongTrustDomain { .. } => "wrong_trust_domain",
            Rejection::WrongIdentity { .. } => "wrong_identity",
        }
    }

    fn into_error(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// Every reason a handshake failure is counted under (both directions):
/// those [`failure_reason`] returns, plus `no_certificate` (our side had
/// none yet) and `timeout`. The metric exports each at 0 from the start.
pub const FAILURE_REASONS: [&str; 15] = [
    "connection_closed",
    "timeout",
    "io",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "no_identity",
    "wrong_trust_domain",
    "wrong_identity",
    "bad_certificate",
    "no_client_certificate",
    "rejected_by_peer",
    "protocol",
    "other",
    "no_certificate",
];

/// The short reason (a metric label) for a failed handshake, from the error
/// rustls or tokio-rustls returned.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(e) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "connection_closed"
            }
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match e {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Other(OtherError(o)) => o
                .downcast_ref::<Rejection>()
                .map_or("bad_certificate", Rejection::reason),
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::AlertReceived(_) => "rejected_by_peer",
        Error::PeerIncompatible(_)
        | Error::PeerMisbehaved(_)
        | Error::InappropriateHandshakeMessage { .. } => "protocol",
        _ => "other",
    }
}

/// A one-line account of a failed handshake for logs: the peer's identity
/// problem in words, or rustls's message.
pub fn failure_detail(err: &std::io::Error) -> String {
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(OtherError(o)))) => o.to_string(),
        Some(e) => e.to_string(),
        None => err.to_string(),
    }
}

fn check_identity(
    end_entity: &CertificateDer<'_>,
    trust_domain: &str,
    expected: Option<&SpiffeId>,
) -> Result<SpiffeId, Rejection> {
    let id = cert_identity(end_entity).ok_or(Rejection::NoIdentity)?;
    if id.trust_domain() != trust_domain {
        return Err(Rejection::WrongTrustDomain {
            found: id.to_string(),
            found_domain: id.trust_domain().into(),
            want: trust_domain.into(),
        });
    }
    if let Some(want) = expected
        && *want != id
    {
        return Err(Rejection::WrongIdentity {
            found: id.to_string(),
            want: want.to_string(),
        });
    }
    Ok(id)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The signature checks both verifiers share: rustls's, with the ring
/// provider's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Verifies a server: chain to the trust bundle, trust domain, and the
/// identity the client expects for the destination.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<SharedBundle>,
    trust_domain: String,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: Arc<SharedBundle>, expected: SpiffeId) -> Self {
        Self {
            bundle,
            trust_domain: expected.trust_domain().into(),
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let roots = self.bundle.get().roots.clone();
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        check_identity(end_entity, &self.trust_domain, Some(&self.expected))
            .map_err(Rejection::into_error)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Verifies a client: a certificate is required, chained to the trust
/// bundle, with an identity in the mesh's trust domain. Which identities
/// may do what is policy's business, not the handshake's.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<SharedBundle>,
    trust_domain: String,
    /// When false, a client without a certificate is let through (the CA
    /// also serves agents that authenticate with a token instead).
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: Arc<SharedBundle>, trust_domain: &str, mandatory: bool) -> Self {
        Self {
            bundle,
            trust_domain: trust_domain.into(),
            mandatory,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every workload holds exactly one certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // webpki's client verifier checks the chain and the clientAuth usage;
        // built per call because the bundle may have changed.
        let roots = self.bundle.get().roots.clone();
        let inner = WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
        inner.verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.trust_domain, None).map_err(Rejection::into_error)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
mod tests;
