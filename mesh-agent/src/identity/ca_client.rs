//! Talking to the mesh CA: HTTPS (TLS 1.3) with the node credential as the
//! client certificate, or a Kubernetes service-account token. The node
//! credential is renewed before it expires ([`CaClient::renew_node_credential`]).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

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
    #[error("node credential: {0}")]
    Key(#[from] rcgen::Error),
    #[error("--node-cert {path}: {why}")]
    WrongCredential { path: PathBuf, why: String },
    #[error("cannot write the renewed node credential to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// The node credential presented, when the agent has one.
    node: Option<Arc<NodeCredential>>,
}

/// The node credential the agent presents to the CA: swapped when renewed,
/// and written back to its files for the next start.
#[derive(Debug)]
struct NodeCredential {
    current: RwLock<(Arc<rustls::sign::CertifiedKey>, tls::CertInfo)>,
    cert: PathBuf,
    key: PathBuf,
}

impl rustls::client::ResolvesClientCert for NodeCredential {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("credential lock").0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// An error and its causes, as one line.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Writes a renewed credential file whole (see `sys::replace_file`).
fn replace_file(path: &Path, text: &str, private: bool) -> Result<(), Error> {
    crate::sys::replace_file(path, text.as_bytes(), private).map_err(|source| Error::Write {
        path: path.into(),
        source,
    })
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// The mesh's trust domain, from the node credential (what `ca join` wrote
/// is what the CA signs in), which `--trust-domain` must not contradict;
/// and the credential must be this node's. Checked at start: either
/// mistake would otherwise show only as refusals from the CA or its peers.
pub fn credential_trust_domain(
    cert: &Path,
    node_name: &str,
    flag: Option<&str>,
) -> Result<String, Error> {
    let wrong = |why: String| Error::WrongCredential {
        path: cert.into(),
        why,
    };
    let id = tls::read_pem(cert)
        .and_then(|pem| tls::certs_from_pem(&cert.display().to_string(), &pem))?
        .first()
        .and_then(tls::cert_identity)
        .ok_or_else(|| wrong("the certificate has no SPIFFE ID".into()))?;
    let Some(node) = id.node_name() else {
        return Err(wrong(format!(
            "{id} is not a node identity (make one with `mesh-agent ca join`)"
        )));
    };
    if node != node_name {
        return Err(wrong(format!(
            "it is the credential of node {node}, and this is node {node_name} (--node-name)"
        )));
    }
    match flag {
        Some(f) if f != id.trust_domain() => Err(wrong(format!(
            "it is for trust domain {}, and --trust-domain says {f} (leave the flag out)",
            id.trust_domain()
        ))),
        _ => Ok(id.trust_domain().to_owned()),
    }
}

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
        let (resolver, token, node): (Arc<dyn rustls::client::ResolvesClientCert>, _, _) =
            match auth {
                CaAuth::NodeCredential { cert, key } => {
                    let chain =
                        tls::certs_from_pem(&cert.display().to_string(), &tls::read_pem(&cert)?)?;
                    let info = tls::cert_info(&chain[0])?;
                    let private =
                        tls::key_from_pem(&key.display().to_string(), &tls::read_pem(&key)?)?;
                    let node = Arc::new(NodeCredential {
                        current: RwLock::new((
                            tls::certified_key("node credential", chain, private)?,
                            info,
                        )),
                        cert,
                        key,
                    });
                    (node.clone(), None, Some(node))
                }
                CaAuth::Token(path) => (Arc::new(tls::NoClientCert), Some(path), None),
            };
        let tls = tls::client_config(verifier, resolver, &[b"http/1.1"])
            .map_err(|e| Error::BadResponse(e.to_string()))?;
        Ok(Self {
            addr: addr.into(),
            tls: Arc::new(tls),
            token,
            node,
        })
    }

    /// The node credential in use: what it is and when it expires.
    pub fn node_credential(&self) -> Option<tls::CertInfo> {
        self.node
            .as_ref()
            .map(|n| n.current.read().expect("credential lock").1.clone())
    }

    /// When the node credential should be renewed: halfway through its
    /// lifetime (as workload certificates are), `None` without one.
    pub fn node_credential_due(&self) -> Option<SystemTime> {
        let info = self.node_credential()?;
        let life = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        Some(info.not_before + life / 2)
    }

    /// Renews the node credential: a new key, a CSR for the same node
    /// identity and lifetime, signed by the CA (which checks it is this
    /// node asking). The new credential is used from the next request on
    /// and written over the old files, so the next start uses it too.
    pub async fn renew_node_credential(&self) -> Result<tls::CertInfo, Error> {
        let Some(node) = &self.node else {
            return Err(Error::BadResponse("no node credential to renew".into()));
        };
        let old = node.current.read().expect("credential lock").1.clone();
        let id: SpiffeId = old
            .identity
            .as_deref()
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| Error::BadResponse("the node credential has no SPIFFE ID".into()))?;
        let life = old
            .not_after
            .duration_since(old.not_before)
            .unwrap_or(Duration::from_secs(3600));
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
        let csr = p.serialize_request(&key)?.pem()?;
        let resp = self.sign(&id, csr, life).await?;
        let pem = resp.cert_chain.concat();
        let chain = tls::certs_from_pem("renewed node credential", &pem)?;
        let info = tls::cert_info(&chain[0])?;
        if info.identity.as_deref() != Some(id.to_string().as_str()) {
            return Err(Error::BadResponse(format!(
                "asked to renew {id}, got {:?}",
                info.identity
            )));
        }
        let key_pem = key.serialize_pem();
        let private = tls::key_from_pem("renewed node credential", &key_pem)?;
        let certified = tls::certified_key("renewed node credential", chain, private)?;
        *node.current.write().expect("credential lock") = (certified, info.clone());
        // The key first: a start between the two renames fails with a
        // clear mismatch rather than presenting a certificate for a key it
        // does not have. Files that cannot be written (a read-only Secret)
        // leave the renewal in memory only.
        if let Err(e) = replace_file(&node.key, &key_pem, true)
            .and_then(|()| replace_file(&node.cert, &pem, false))
        {
            tracing::warn!("{e} (the renewed credential is used until the agent restarts)");
        }
        Ok(info)
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
            // With TLS 1.3 a refused client certificate shows only here, as
            // the CA's alert under hyper's error.
            .map_err(|e| unreachable(with_causes(&e)))?;
        let status = resp.status();
        let bytes =
            tokio::time::timeout(TIMEOUT, Limited::new(resp.into_body(), 1 << 20).collect())
                .await
                .map_err(|_| unreachable("no complete answer".into()))?
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Pki;

    #[test]
    fn the_trust_domain_comes_from_the_node_credential_and_the_flags_must_agree() {
        let pki = Pki::for_domain("foo.local");
        let (cert, _) = pki.node_credential("n1", Duration::from_secs(3600));
        assert_eq!(
            credential_trust_domain(&cert, "n1", None).unwrap(),
            "foo.local"
        );
        assert_eq!(
            credential_trust_domain(&cert, "n1", Some("foo.local")).unwrap(),
            "foo.local"
        );
        let e = credential_trust_domain(&cert, "n1", Some("cluster.local"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("for trust domain foo.local, and --trust-domain says cluster.local"),
            "{e}"
        );
        let e = credential_trust_domain(&cert, "n2", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("credential of node n1, and this is node n2"),
            "{e}"
        );
    }
}
