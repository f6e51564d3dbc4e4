//! The agent's HTTP endpoints: admin (`/config_dump`, `/logging`) on
//! localhost, Prometheus metrics, and readiness — ztunnel's ports.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    telemetry::{logging::LogHandle, metrics::Metrics},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} for the {what} endpoint: {source}{hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the endpoints serve; the agent updates it as it runs.
pub struct AdminState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub log: Arc<LogHandle>,
    pub ready: AtomicBool,
    /// The `/config_dump` document, rebuilt by the agent on every change.
    pub dump: RwLock<serde_json::Value>,
    /// Certificates change on their own (renewal): read at request time.
    pub identities: Option<Arc<crate::identity::IdentityManager>>,
    /// The configuration snapshot in force, read at request time.
    pub store: Arc<crate::snapshot::Store>,
    /// The Kubernetes watches, when configured.
    pub kube: Option<Arc<crate::sources::kube::KubeSource>>,
    /// The shared maps, for the fast-path switch.
    pub maps: Arc<crate::ebpf::Maps>,
    /// The connections carried now.
    pub conns: Arc<crate::proxy::conn_table::ConnTable>,
}

impl AdminState {
    /// Ready once the pods are enrolled and each has its certificate:
    /// before that, mesh traffic to them would be refused.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            return Err("enrolling pods".into());
        }
        let pending = self
            .identities
            .as_ref()
            .map(|i| i.pending())
            .unwrap_or_default();
        if !pending.is_empty() {
            return Err(format!("no certificate yet for {}", pending.join(", ")));
        }
        Ok(())
    }
}

/// Which endpoint a listener serves.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Admin => "admin",
            Endpoint::Metrics => "metrics",
            Endpoint::Readiness => "readiness",
        }
    }
}

/// Binds an endpoint's listener, with a clear error if the port is taken.
pub async fn bind(addr: SocketAddr, ep: Endpoint) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        what: ep.name(),
        addr,
        hint: if source.kind() == std::io::ErrorKind::AddrInUse {
            " (is another mesh-agent running? choose another with --admin-addr/--metrics-addr/--readiness-addr)"
        } else {
            ""
        },
        source,
    })
}

/// An endpoint's listener handed over by the agent this one replaces.
pub fn adopt(
    l: std::net::TcpListener,
    addr: SocketAddr,
    ep: Endpoint,
) -> Result<TcpListener, Error> {
    TcpListener::from_std(l).map_err(|source| Error::Bind {
        what: ep.name(),
        addr,
        hint: " (handed over)",
        source,
    })
}

/// Serves `ep` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    ep: Endpoint,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, ep, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut b = body.into();
    b.push('\n');
    reply(status, "text/plain; charset=utf-8", b)
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => reply(StatusCode::OK, "application/json", b),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn route(state: &AdminState, ep: Endpoint, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match (ep, path) {
        (Endpoint::Metrics | Endpoint::Admin, "/metrics" | "/stats/prometheus") if get => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(),
        ),
        (Endpoint::Readiness | Endpoint::Admin, "/healthz/ready") if get => {
            match state.readiness() {
                Ok(()) => text(StatusCode::OK, "ready"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
            }
        }
        (Endpoint::Admin, "/config_dump") if get => {
            let mut dump = state.dump.read().expect("dump lock").clone();
            if let Some(i) = &state.identities {
                dump["certificates"] = serde_json::to_value(i.dump()).unwrap_or_default();
            }
            if let Some(k) = &state.kube {
                dump["sources"]["kubernetes"] = k.status();
            }
            dump["snapshot"] = serde_json::to_value(&*state.store.load()).unwrap_or_default();
            json(&dump)
        }
        (Endpoint::Admin, "/connections") if get => json(&state.conns.to_json()),
        (Endpoint::Admin, "/logging") => logging(state, &req),
        (Endpoint::Admin, "/fast_path") => fast_path(state, &req),
        (Endpoint::Admin, "/") if get => text(
            StatusCode::OK,
            "endpoints: /config_dump, /connections, /logging[?level=FILTER] (POST to change), \
             /fast_path[?enabled=true|false] (POST to change), /stats/prometheus, /healthz/ready",
        ),
        (
            _,
            "/metrics" | "/stats/prometheus" | "/healthz/ready" | "/config_dump" | "/connections"
            | "/",
        ) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} not allowed on {path}", req.method()),
        ),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// `GET /fast_path` shows whether the same-node fast path is on;
/// `POST /fast_path?enabled=true|false` switches it for new messages.
fn fast_path(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let enabled = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("enabled=")));
    let on = match (req.method(), enabled) {
        (&Method::GET, None) => state.maps.fast_path(),
        (&Method::POST | &Method::PUT, Some(v @ ("true" | "false"))) => {
            let on = v == "true";
            if let Err(e) = state.maps.set_fast_path(on) {
                let status = match e {
                    crate::ebpf::Error::FastPathUnavailable(_) => StatusCode::CONFLICT,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                return text(status, e.to_string());
            }
            tracing::info!(on, "fast path switched");
            on
        }
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "usage: GET /fast_path, POST /fast_path?enabled=true|false",
            );
        }
    };
    text(
        StatusCode::OK,
        format!("fast path: {}", if on { "on" } else { "off" }),
    )
}

/// `GET /logging` shows the filter; `POST /logging?level=<filter>` sets it.
fn logging(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let level = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(|v| v.replace("%2C", ",").replace("%3D", "="))
    });
    match (req.method(), level) {
        (&Method::GET, None) => text(StatusCode::OK, format!("level: {}", state.log.current())),
        (&Method::POST | &Method::PUT, Some(level)) => match state.log.set(&level) {
            Ok(()) => {
                tracing::info!(%level, "log filter changed");
                text(StatusCode::OK, format!("level: {level}"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
        },
        (&Method::GET, Some(_)) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST to change the level",
        ),
        _ => text(
            StatusCode::BAD_REQUEST,
            "usage: POST /logging?level=<filter>",
        ),
    }
}
