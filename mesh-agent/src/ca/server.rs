//! `mesh-agent ca run`: the CA's HTTPS endpoint.
//!
//! Node agents authenticate with their node credential (a client
//! certificate for `spiffe://<td>/mesh/node/<name>`) or, in Kubernetes,
//! with a service-account token checked by TokenReview. A node gets
//! certificates only for the identities of meshed pods the placement
//! schedules on it, and may renew its own node credential; anything else
//! is refused and logged with the reason. A node credential `ca revoke`
//! withdrew is refused on every request, and a renewal is recorded before
//! it is handed out (see `nodes`). The signing files are watched: a
//! rotation needs no restart.

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
use tokio_util::sync::CancellationToken;

use super::{
    Error,
    keys::{Current, EndpointCert},
    kube::TokenReviewer,
    nodes::{self, Revocations},
    placement,
    protocol::{self, BundleResponse, CertificateRequest, CertificateResponse, ErrorResponse},
    signer::{self, Usage},
};
use crate::{
    config::CaRunConfig,
    sources::{
        files::FileSource,
        kube::{self as kube_source, KubeSource},
    },
    spiffe::SpiffeId,
    tls::{self, SpiffeClientVerifier},
};

struct State {
    keys: Arc<Current>,
    dir: std::path::PathBuf,
    revocations: Revocations,
    trust_domain: String,
    placement: Arc<placement::Shared>,
    kube: Option<TokenReviewer>,
    max_ttl: Duration,
    max_node_ttl: Duration,
}

/// Who is asking.
enum Caller {
    /// A node credential: the node's name and the certificate's serial.
    Node { name: String, serial: String },
    /// A client without a node credential; it may still carry a token.
    Unauthenticated,
}

/// How often the CA files and the placement files are checked besides
/// inotify (which a ConfigMap or Secret volume's symlink swap can miss).
const RECHECK: Duration = Duration::from_millis(500);

/// A CA serving on `addr` until stopped.
pub struct Running {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and returns once the accept loop has ended.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Runs the CA until SIGTERM or SIGINT.
pub async fn run(cfg: CaRunConfig) -> Result<(), Error> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let ca = start(cfg).await?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    ca.stop().await;
    tracing::info!("certificate authority stopped");
    Ok(())
}

/// Loads the signing material and the placement, binds, and serves in
/// the background.
pub async fn start(cfg: CaRunConfig) -> Result<Running, Error> {
    let trust_domain = signer::trust_domain(&cfg.dir, cfg.trust_domain.as_deref())?;
    let keys = Arc::new(Current::load(&cfg.dir, &trust_domain)?);
    let revocations = Revocations::new(&cfg.dir)?;
    let (files, file_docs) = if cfg.config.is_empty() {
        (None, None)
    } else {
        let (f, docs) = FileSource::open(&cfg.config);
        (Some(f), Some(docs.map_err(Error::Placement)?))
    };
    let kube_pods = if cfg.kubernetes {
        Some(kube_placement().await?)
    } else {
        None
    };
    let placement = placement::of(
        file_docs
            .iter()
            .chain(kube_pods.as_ref().and_then(|k| k.docs()).as_ref()),
        &cfg.dataplane_mode_label,
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
    // Without Kubernetes, every caller must present a node credential.
    let verifier = Arc::new(SpiffeClientVerifier::new(
        keys.bundle.clone(),
        &trust_domain,
        kube.is_none(),
    ));
    let server = tls::server_config(
        verifier,
        Arc::new(EndpointCert(keys.clone())),
        &[b"http/1.1"],
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: cfg.listen,
        source,
    })?;
    tracing::info!(
        listen = %addr,
        trust_domain = %trust_domain,
        roots = keys.get().signer.bundle().len(),
        workloads = placement.len(),
        auth = if kube.is_some() { "node credential or Kubernetes token" } else { "node credential" },
        "certificate authority ready"
    );
    let state = Arc::new(State {
        keys: keys.clone(),
        dir: cfg.dir.clone(),
        revocations,
        trust_domain,
        placement: Arc::new(RwLock::new(Arc::new(placement))),
        kube,
        max_ttl: cfg.max_workload_cert_ttl,
        max_node_ttl: cfg.max_node_cert_ttl,
    });
    let stop = CancellationToken::new();
    let notifier = files.as_ref().and_then(|_| {
        crate::watch::Notifier::new(&cfg.config)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot watch the placement files; reading them every 500 ms"))
            .ok()
    });
    let watching = tokio::spawn(placement::watch(
        state.placement.clone(),
        files,
        file_docs,
        notifier,
        kube_pods,
        cfg.dataplane_mode_label.clone(),
    ));
    let reloading = tokio::spawn(watch_keys(keys, cfg.dir.clone()));
    let accepting = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = accepting.cancelled() => break,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let (acceptor, state) = (acceptor.clone(), state.clone());
            tokio::spawn(async move { serve_conn(acceptor, state, tcp, peer).await });
        }
        watching.abort();
        reloading.abort();
    });
    Ok(Running { addr, stop, task })
}

/// Every pod and its node, from the Kubernetes API (waiting for the first
/// list: refusing certificates for pods not listed yet would only make
/// every agent retry).
async fn kube_placement() -> Result<Arc<KubeSource>, Error> {
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
    while k.docs().is_none() {
        tracing::info!("waiting for the first list of pods from the Kubernetes API");
        tokio::select! {
            _ = k.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    Ok(Arc::new(k))
}

/// Re-reads the signing files when they change (inotify, and every
/// `RECHECK` as a safety net): a new root or signing certificate is in
/// force without a restart.
async fn watch_keys(keys: Arc<Current>, dir: std::path::PathBuf) {
    let notifier = crate::watch::Notifier::new(std::slice::from_ref(&dir))
        .inspect_err(|e| tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the CA files; reading them every 500 ms"))
        .ok();
    loop {
        let changed = async {
            match &notifier {
                Some(n) => n.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(RECHECK) => {}
            _ = changed => tokio::time::sleep(crate::watch::SETTLE).await,
        }
        match keys.reload() {
            Ok(false) => {}
            Ok(true) => {
                let k = keys.get();
                tracing::info!(dir = %dir.display(), roots = k.signer.bundle().len(), "CA files reloaded: new signing material in force");
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), "CA files changed but do not load; the previous ones keep signing: {e}")
            }
        }
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
        .and_then(|c| tls::cert_info(c).ok())
        .and_then(|info| {
            let id: SpiffeId = info.identity?.parse().ok()?;
            Some(Caller::Node {
                name: id.node_name()?.to_owned(),
                serial: info.serial,
            })
        })
        .unwrap_or(Caller::Unauthenticated);
    let caller = Arc::new(caller);
    let svc = service_fn(move |req| {
        let (state, caller) = (state.clone(), caller.clone());
        async move { Ok::<_, Infallible>(handle(&state, &caller, peer, req).await) }
    });
    // A client slow to send its request (or one that never does) is cut.
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
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
                trust_bundle: state.keys.get().signer.bundle().to_vec(),
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
    if let Caller::Node { name, serial } = caller {
        // Checked on every request, not at the handshake only: a
        // connection kept open must not outlive the revocation.
        if state.revocations.is_revoked(serial) {
            return Err(format!(
                "the node credential of {name} (serial {serial}) is revoked"
            ));
        }
        return Ok(name.clone());
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
    let id: SpiffeId = r
        .identity
        .parse()
        .map_err(|e: crate::spiffe::Error| (StatusCode::BAD_REQUEST, e.to_string()))?;
    if id.trust_domain() != state.trust_domain {
        return Err((
            StatusCode::FORBIDDEN,
            format!("{id} is not in trust domain {}", state.trust_domain),
        ));
    }
    let (usage, max) = match (id.workload_parts(), id.node_name()) {
        (Some((ns, sa)), _) => {
            let placement = state.placement.read().expect("placement lock").clone();
            let scheduled = placement.iter().any(|w| {
                w.node.as_deref() == Some(node) && w.namespace == ns && w.service_account == sa
            });
            if !scheduled {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!("no pod with identity {id} is scheduled on node {node}"),
                ));
            }
            (Usage::Workload, state.max_ttl)
        }
        // A node renewing its own credential.
        (None, Some(n)) if n == node => (Usage::Node, state.max_node_ttl),
        (None, Some(n)) => {
            return Err((
                StatusCode::FORBIDDEN,
                format!("node {node} may renew only its own credential, not {n}'s"),
            ));
        }
        (None, None) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("{id} is neither a workload nor a node identity"),
            ));
        }
    };
    let ttl = Duration::from_secs(r.ttl_seconds)
        .min(max)
        .max(Duration::from_secs(1));
    let keys = state.keys.get();
    let chain = keys
        .signer
        .sign_csr(&r.csr, &id, usage, ttl)
        .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let info = tls::certs_from_pem("leaf", &chain[0])
        .and_then(|d| tls::cert_info(&d[0]))
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Usage::Node = usage {
        // Recorded before it is handed out: `ca revoke` must find every
        // credential of the node, renewals included.
        nodes::add(
            &state.dir,
            nodes::Record::new(node, &info.serial, info.not_after, nodes::How::Renewal),
        )
        .map_err(|e| {
            tracing::error!(node, "CA: cannot record a renewed node credential: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot record the credential: {e}"),
            )
        })?;
    }
    tracing::info!(node, identity = %id, serial = %info.serial, ttl = ?ttl, "CA: issued");
    Ok(CertificateResponse {
        cert_chain: chain,
        trust_bundle: keys.signer.bundle().to_vec(),
    })
}

#[cfg(test)]
mod tests;
