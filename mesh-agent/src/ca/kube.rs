//! Node authentication in Kubernetes: the agent presents its (bound)
//! service-account token; the CA asks the API server about it with a
//! TokenReview and reads the node the token was bound to.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::Error;
use crate::tls;

/// The most one TokenReview may take.
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The extra field a bound service-account token carries (Kubernetes 1.30+).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Asks the API server who a token belongs to.
pub struct TokenReviewer {
    api: hyper::Uri,
    /// The CA's own token, read per request (kubelet rotates it).
    token_file: Option<PathBuf>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The service account node agents run as.
    agent_sa: String,
    audience: Option<String>,
}

impl TokenReviewer {
    pub fn new(
        api: &str,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        agent_sa: String,
        audience: Option<String>,
    ) -> Result<Self, Error> {
        let api: hyper::Uri = api
            .parse()
            .map_err(|e| Error::Kube(format!("--kube-api {api:?}: {e}")))?;
        let tls = match api.scheme_str() {
            Some("https") => {
                let mut roots = rustls::RootCertStore::empty();
                if let Some(f) = &ca_file {
                    for c in tls::certs_from_pem(&f.display().to_string(), &tls::read_pem(f)?)? {
                        roots.add(c).map_err(|e| Error::Kube(e.to_string()))?;
                    }
                }
                let c = rustls::ClientConfig::builder_with_provider(tls::provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(c))
            }
            Some("http") => None,
            _ => {
                return Err(Error::Kube(format!(
                    "--kube-api {api}: use http:// or https://"
                )));
            }
        };
        Ok(Self {
            api,
            token_file,
            tls,
            agent_sa,
            audience,
        })
    }

    /// The node an agent's token is bound to, or why it is refused.
    pub async fn node_of(&self, token: &str) -> Result<String, String> {
        let review = self
            .review(token)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = &review["status"];
        if status["authenticated"] != Value::Bool(true) {
            let why = status["error"].as_str().unwrap_or("not authenticated");
            return Err(format!("token rejected by the API server: {why}"));
        }
        let user = status["user"]["username"].as_str().unwrap_or_default();
        if user != self.agent_sa {
            return Err(format!(
                "token belongs to {user:?}, not the node agents' service account {:?}",
                self.agent_sa
            ));
        }
        status["user"]["extra"][NODE_NAME_EXTRA][0]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("token is not bound to a node (no {NODE_NAME_EXTRA})"))
    }

    /// One TokenReview, all of it (connect, TLS, request, answer) within
    /// [`REVIEW_TIMEOUT`]: a stuck API server fails the CSR, it does not
    /// hold it.
    async fn review(&self, token: &str) -> Result<Value, String> {
        tokio::time::timeout(REVIEW_TIMEOUT, self.review_unbounded(token))
            .await
            .map_err(|_| format!("no answer from the API server in {REVIEW_TIMEOUT:?}"))?
    }

    async fn review_unbounded(&self, token: &str) -> Result<Value, String> {
        let host = self.api.host().ok_or("no host in --kube-api")?.to_owned();
        let port = self
            .api
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": self.audience.iter().collect::<Vec<_>>()},
        });
        let mut req = Request::post(format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            self.api.to_string().trim_end_matches('/')
        ))
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(f) = &self.token_file {
            let own = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            req = req.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            );
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = match &self.tls {
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| e.to_string())?;
                let s = tokio_rustls::TlsConnector::from(c.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                send(TokioIo::new(s), req).await?
            }
            None => send(TokioIo::new(tcp), req).await?,
        };
        serde_json::from_slice(&resp).map_err(|e| format!("bad TokenReview response: {e}"))
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<Bytes, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body)
}
