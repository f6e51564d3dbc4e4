//! `mesh-agent ca run`: the CA's HTTPS endpoint.
//!
//! Node agents authenticate with their node credential (a client
//! certificate for `spiffe://<td>/mesh/node/<name>`) or, in Kubernetes,
//! with a service-account token checked by TokenReview. A node gets
//! certificates only for the identities of meshed pods the placement
//! (the same configuration the agents read: workload registries with
//! `node:` set, Kubernetes Pods with `spec.nodeName`) schedules on it;
//! anything else is refused and logged with the reason.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{SignalKind, signal};

use super::{
    Error,
    kube::TokenReviewer,
    protocol::{self, BundleResponse, CertificateRequest, CertificateResponse, ErrorResponse},
    signer::{Signer, Usage},
};
use crate::{
    config::CaRunConfig,
    registry,
    snapshot::SourceDocs,
    sources::{
        files::FileSource,
        kube::{self as kube_source, KubeSource},
    },
    spiffe::SpiffeId,
    tls::{self, FixedCert, SharedBundle, SpiffeClientVerifier},
    workload::Workload,
};

/// The meshed workloads of the configuration, with their nodes.
fn placement<'a>(sources: impl IntoIterator<Item = &'a SourceDocs>) -> Vec<Workload> {
    let settings = registry::Settings {
        cluster_domain: "cluster.local".into(),
    };
    registry::build(sources.into_iter().flat_map(|s| &s.documents), &settings)
        .workloads
        .iter()
        .map(|w| (**w).clone())
        .collect()
}

struct State {
    signer: Signer,
    trust_domain: String,
    placement: RwLock<Arc<Vec<Workload>>>,
    kube: Option<TokenReviewer>,
    max_ttl: Duration,
}

/// Who is asking.
enum Caller {
    Node(String),
    /// A client without a node credential; it may still carry a token.
    Unauthenticated,
}

/// Runs the CA until SIGTERM or SIGINT.
pub async fn run(cfg: CaRunConfig) -> Result<(), Error> {
    let signer = Signer::load(&cfg.dir, &cfg.trust_domain)?;
    let (files, file_docs) = if cfg.config.is_empty() {
        (None, None)
    } else {
        let (f, docs) = FileSource::open(&cfg.config);
        (Some(f), Some(docs.map_err(Error::Placement)?))
    };
    let kube_pods = if cfg.kubernetes {
        let client = kube_source::client()
            .await
            .map_err(|e| Error::Kube(e.to_string()))?;
        let metrics =
            crate::telemetry::metrics::Metrics::new().map_err(|e| Error::Kube(e.to_string()))?;
        let k = KubeSource::start(
            client,
            kube_source::Settings {
                node_name: None,
                remote_pods: false,
            },
            Arc::new(metrics),
        );
        // Refusing certificates for pods the CA has not listed yet would
        // only make every agent retry: wait for the first list.
        while k.docs().is_none() {
            tracing::info!("waiting for the first list of pods from the Kubernetes API");
            tokio::select! {
                _ = k.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        Some(Arc::new(k))
    } else {
        None
    };
    let placement = placement(
        file_docs
            .iter()
            .chain(kube_pods.as_ref().and_then(|k| k.docs()).as_ref()),
    );
    let kube = match &cfg.kube_api {
        Some(api) => Some(TokenReviewer::new(
            api,
            cfg.kube_token_file.clone(),
            cfg.kube_ca_file.clone(),
            cfg.kube_agent_sa.clone(),
            cfg.kube_audience.clone(),
        )?),
        None => None,
    };

    // The CA's own endpoint certificate, fresh at every start.
    let (chain, key) = signer.issue(
        &SpiffeId::ca(&cfg.trust_domain),
        Usage::Server,
        Duration::from_secs(365 * 86400),
        false,
    )?;
    let chain_der = chain
        .iter()
        .map(|p| tls::certs_from_pem("CA endpoint", p))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    let served = tls::certified_key(
        "CA endpoint",
        chain_der,
        tls::key_from_pem("CA endpoint key", &key)?,
    )?;
    let bundle = Arc::new(SharedBundle::new(tls::TrustBundle::from_pems(
        "root-cert.pem",
        signer.bundle(),
    )?));
    // Without Kubernetes, every caller must present a node credential.
    let verifier = Arc::new(SpiffeClientVerifier::new(
        bundle,
        &cfg.trust_domain,
        kube.is_none(),
    ));
    let server = tls::server_config(verifier, Arc::new(FixedCert(served)), &[b"http/1.1"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: cfg.listen,
            source,
        })?;
    tracing::info!(
        listen = %cfg.listen,
        trust_domain = %cfg.trust_domain,
        roots = signer.bundle().len(),
        workloads = placement.len(),
        auth = if kube.is_some() { "node credential or Kubernetes token" } else { "node credential" },
        "certificate authority ready"
    );
    let state = Arc::new(State {
        signer,
        trust_domain: cfg.trust_domain.clone(),
        placement: RwLock::new(Arc::new(placement)),
        kube,
        max_ttl: cfg.max_workload_cert_ttl,
    });
    let notifier = files.as_ref().and_then(|_| {
        crate::watch::Notifier::new(&cfg.config)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot watch the placement files; reading them every 500 ms"))
            .ok()
    });
    tokio::spawn(watch_placement(
        state.clone(),
        files,
        file_docs,
        notifier,
        kube_pods,
    ));

    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move { serve_conn(acceptor, state, tcp, peer).await });
    }
    tracing::info!("certificate authority stopped");
    Ok(())
}

/// Keeps the placement in step with the files and the API.
async fn watch_placement(
    state: Arc<State>,
    mut files: Option<FileSource>,
    mut file_docs: Option<SourceDocs>,
    notifier: Option<crate::watch::Notifier>,
    kube: Option<Arc<KubeSource>>,
) {
    loop {
        let files_changed = async {
            match &notifier {
                Some(n) => n.changed().await,
                None => std::future::pending().await,
            }
        };
        let kube_changed = async {
            match &kube {
                Some(k) => k.changed().await,
                None => std::future::pending().await,
            }
        };
        let file_event = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => true,
            _ = files_changed => {
                tokio::time::sleep(crate::watch::SETTLE).await;
                true
            }
            _ = kube_changed => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                false
            }
        };
        if file_event {
            match files.as_mut().and_then(FileSource::poll) {
                None => continue,
                Some(Ok(docs)) => file_docs = Some(docs),
                Some(Err(e)) => {
                    tracing::error!("placement rejected, keeping the previous one: {e}");
                    continue;
                }
            }
        }
        let kube_docs = kube.as_ref().and_then(|k| k.docs());
        let ws = placement(file_docs.iter().chain(kube_docs.as_ref()));
        tracing::info!(workloads = ws.len(), "placement reloaded");
        *state.placement.write().expect("placement lock") = Arc::new(ws);
    }
}

async fn serve_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%peer, reason = %tls::failure_reason(&e), "CA: TLS handshake refused: {}", tls::failure_detail(&e));
            return;
        }
        Err(_) => return,
    };
    let caller = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::cert_identity)
        .and_then(|id| id.node_name().map(str::to_owned))
        .map_or(Caller::Unauthenticated, Caller::Node);
    let caller = Arc::new(caller);
    let svc = service_fn(move |req| {
        let (state, caller) = (state.clone(), caller.clone());
        async move { Ok::<_, Infallible>(handle(&state, &caller, peer, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, error: String) -> Response<Full<Bytes>> {
    json(status, &ErrorResponse { error })
}

async fn handle(
    state: &State,
    caller: &Caller,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let node = match authenticate(state, caller, &req).await {
        Ok(n) => n,
        Err(why) => {
            tracing::warn!(%peer, "CA: refused an unauthenticated caller: {why}");
            return refuse(StatusCode::UNAUTHORIZED, why);
        }
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, protocol::TRUST_BUNDLE_PATH) => json(
            StatusCode::OK,
            &BundleResponse {
                trust_bundle: state.signer.bundle().to_vec(),
            },
        ),
        (&Method::POST, protocol::CERTIFICATES_PATH) => {
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            };
            let request: CertificateRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
            };
            match sign(state, &node, &request) {
                Ok(resp) => json(StatusCode::OK, &resp),
                Err((status, why)) => {
                    tracing::warn!(node = %node, identity = %request.identity, "CA: refused: {why}");
                    refuse(status, why)
                }
            }
        }
        _ => refuse(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {}", req.uri().path()),
        ),
    }
}

async fn authenticate(
    state: &State,
    caller: &Caller,
    req: &Request<Incoming>,
) -> Result<String, String> {
    if let Caller::Node(n) = caller {
        return Ok(n.clone());
    }
    let kube = state.kube.as_ref().ok_or("no node credential presented")?;
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("no node credential and no bearer token")?;
    kube.node_of(token.trim()).await
}

fn sign(
    state: &State,
    node: &str,
    r: &CertificateRequest,
) -> Result<CertificateResponse, (StatusCode, String)> {
    let id = SpiffeId::parse_workload(&r.identity)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    if id.trust_domain() != state.trust_domain {
        return Err((
            StatusCode::FORBIDDEN,
            format!("{id} is not in trust domain {}", state.trust_domain),
        ));
    }
    let (ns, sa) = id.workload_parts().expect("workload identity");
    let placement = state.placement.read().expect("placement lock").clone();
    let scheduled = placement
        .iter()
        .any(|w| w.node.as_deref() == Some(node) && w.namespace == ns && w.service_account == sa);
    if !scheduled {
        return Err((
            StatusCode::FORBIDDEN,
            format!("no pod with identity {id} is scheduled on node {node}"),
        ));
    }
    let ttl = Duration::from_secs(r.ttl_seconds)
        .min(state.max_ttl)
        .max(Duration::from_secs(1));
    let chain = state
        .signer
        .sign_csr(&r.csr, &id, ttl)
        .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let serial = tls::certs_from_pem("leaf", &chain[0])
        .ok()
        .and_then(|d| tls::cert_info(&d[0]).ok())
        .map(|i| i.serial);
    tracing::info!(node, identity = %id, serial = serial.as_deref().unwrap_or("?"), ttl = ?ttl, "CA: issued");
    Ok(CertificateResponse {
        cert_chain: chain,
        trust_bundle: state.signer.bundle().to_vec(),
    })
}
