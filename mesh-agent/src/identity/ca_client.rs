//! Talking to the mesh CA: HTTPS (TLS 1.3) with the node credential as the
//! client certificate, or a Kubernetes service-account token.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use crate::spiffe::SpiffeId;
use crate::{
    ca::protocol::{
        BundleResponse, CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorResponse,
        TRUST_BUNDLE_PATH,
    },
    tls::{self, SharedBundle, SpiffeServerVerifier},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the CA at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("TLS handshake with the CA at {addr} failed ({reason}): {detail}")]
    Handshake {
        addr: String,
        reason: &'static str,
        detail: String,
    },
    #[error("the CA refused ({status}): {reason}")]
    Refused { status: StatusCode, reason: String },
    #[error("bad answer from the CA: {0}")]
    BadResponse(String),
    #[error("node credential: {0}")]
    Credential(#[from] tls::Error),
}

/// How the agent proves which node it is.
pub enum CaAuth {
    /// A client certificate for `spiffe://<td>/mesh/node/<name>` and its key.
    NodeCredential { cert: PathBuf, key: PathBuf },
    /// A bound service-account token, re-read for every request.
    Token(PathBuf),
}

pub struct CaClient {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    token: Option<PathBuf>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl CaClient {
    /// A client for the CA at `addr` (`host:port`), verified against `bundle`
    /// as `spiffe://<trust_domain>/mesh/ca`.
    pub fn new(
        addr: &str,
        bundle: Arc<SharedBundle>,
        trust_domain: &str,
        auth: CaAuth,
    ) -> Result<Self, Error> {
        let verifier = Arc::new(SpiffeServerVerifier::new(
            bundle,
            SpiffeId::ca(trust_domain),
        ));
        let (resolver, token): (Arc<dyn rustls::client::ResolvesClientCert>, _) = match auth {
            CaAuth::NodeCredential { cert, key } => {
                let chain =
                    tls::certs_from_pem(&cert.display().to_string(), &tls::read_pem(&cert)?)?;
                let key = tls::key_from_pem(&key.display().to_string(), &tls::read_pem(&key)?)?;
                (
                    Arc::new(tls::FixedCert(tls::certified_key(
                        "node credential",
                        chain,
                        key,
                    )?)),
                    None,
                )
            }
            CaAuth::Token(path) => (Arc::new(tls::NoClientCert), Some(path)),
        };
        let tls = tls::client_config(verifier, resolver, &[b"http/1.1"])
            .map_err(|e| Error::BadResponse(e.to_string()))?;
        Ok(Self {
            addr: addr.into(),
            tls: Arc::new(tls),
            token,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Asks the CA to sign `csr_pem` for `id`.
    pub async fn sign(
        &self,
        id: &SpiffeId,
        csr_pem: String,
        ttl: Duration,
    ) -> Result<CertificateResponse, Error> {
        let body = CertificateRequest {
            identity: id.to_string(),
            csr: csr_pem,
            ttl_seconds: ttl.as_secs(),
        };
        self.call(hyper::Method::POST, CERTIFICATES_PATH, Some(&body))
            .await
    }

    /// The roots the CA says to trust now.
    pub async fn trust_bundle(&self) -> Result<Vec<String>, Error> {
        let r: BundleResponse = self
            .call::<(), _>(hyper::Method::GET, TRUST_BUNDLE_PATH, None)
            .await?;
        Ok(r.trust_bundle)
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, Error> {
        let unreachable = |reason: String| Error::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        // The CA is verified by its SPIFFE identity, so the name only has to parse.
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| unreachable(e.to_string()))?;
        let tls = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| Error::Handshake {
            addr: self.addr.clone(),
            reason: tls::failure_reason(&e),
            detail: tls::failure_detail(&e),
        })?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr);
        if let Some(t) = &self.token {
            let token = std::fs::read_to_string(t)
                .map_err(|e| unreachable(format!("{}: {e}", t.display())))?;
            req = req.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let payload = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b).map_err(|e| Error::BadResponse(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| Error::BadResponse(e.to_string()))?;
        let resp = tokio::time::timeout(TIMEOUT, tx.send_request(req))
            .await
            .map_err(|_| unreachable("no answer".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| Error::BadResponse(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let reason = serde_json::from_slice::<ErrorResponse>(&bytes).map_or_else(
                |_| String::from_utf8_lossy(&bytes).into_owned(),
                |e| e.error,
            );
            return Err(Error::Refused { status, reason });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::BadResponse(e.to_string()))
    }
}
