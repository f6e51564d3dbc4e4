//! Access logs: one record per HTTP request and per TCP connection, as
//! Envoy writes them, configured with Istio's Telemetry `accessLogging`
//! and MeshConfig's providers.
//!
//! The data path only fills a [`Record`] and queues it (bounded; what does
//! not fit is dropped and counted). A thread of its own evaluates the CEL
//! filters, renders the lines and writes them, so a slow disk or a
//! filter never holds a request.

pub mod filter;
pub mod format;
pub mod plan;
mod writer;

use std::{
    net::SocketAddr,
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use http::HeaderMap;
use prometheus::IntCounterVec;

pub use self::{
    format::Format,
    plan::{LogPlan, Providers, Resolved},
};

/// Records waiting to be written, at most.
pub const QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("access log format {format:?}: {reason}")]
    Format { format: String, reason: String },
    #[error("access log filter {expression:?}: {reason}")]
    Filter { expression: String, reason: String },
    #[error("access log provider {provider:?}: {reason}")]
    Provider { provider: String, reason: String },
}

/// Which side of a connection wrote the record, as Telemetry's
/// `match.mode` names them: the source pod's agent is the client, the
/// destination pod's agent the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Client,
    Server,
}

/// What happened on one request or connection.
#[derive(Debug, Clone)]
pub struct Record {
    pub start: SystemTime,
    pub mode: Mode,
    /// `Some` for an HTTP request; `None` for a TCP connection.
    pub http: Option<Box<HttpRecord>>,
    /// Envoy's response flags, empty when none.
    pub flags: String,
    pub code_details: String,
    pub termination_details: String,
    pub upstream_failure: String,
    /// From the client (request body, or the connection's upstream bytes).
    pub bytes_received: u64,
    /// To the client.
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    /// Istio's cluster names: `outbound|80||web.default.svc.cluster.local`,
    /// `inbound|8080||`, `PassthroughCluster`.
    pub upstream_cluster: String,
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub downstream_peer_san: String,
    pub downstream_local_san: String,
    pub upstream_peer_san: String,
    pub requested_server_name: String,
    pub route_name: String,
    pub connection_id: u64,
    /// The connection to the peer agent, or from it, was mutual TLS.
    pub mtls: bool,
}

/// The HTTP part of a record.
#[derive(Debug, Clone, Default)]
pub struct HttpRecord {
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    pub method: String,
    /// Path and query.
    pub path: String,
    pub authority: String,
    pub scheme: &'static str,
    pub request_headers: HeaderMap,
    /// 0 when no response was sent.
    pub code: u16,
    pub response_headers: HeaderMap,
    pub response_trailers: HeaderMap,
    pub grpc_status: Option<String>,
    pub request_duration: Option<Duration>,
    pub response_duration: Option<Duration>,
    pub attempts: u32,
}

impl Record {
    /// A record of `mode` that started at `start`, between these peers;
    /// the rest is filled in as the request or connection goes.
    pub fn new(mode: Mode, start: SystemTime, remote: SocketAddr, local: SocketAddr) -> Self {
        Self {
            start,
            mode,
            http: None,
            flags: String::new(),
            code_details: String::new(),
            termination_details: String::new(),
            upstream_failure: String::new(),
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_host: None,
            upstream_local: None,
            upstream_cluster: String::new(),
            downstream_remote: remote,
            downstream_local: local,
            downstream_peer_san: String::new(),
            downstream_local_san: String::new(),
            upstream_peer_san: String::new(),
            requested_server_name: String::new(),
            route_name: String::new(),
            connection_id: 0,
            mtls: false,
        }
    }
}

impl HttpRecord {
    /// The request's part, as it arrived (after `x-request-id` was added).
    pub fn of_request<B>(req: &http::Request<B>) -> Self {
        let uri = req.uri();
        Self {
            protocol: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            method: req.method().as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            authority: uri.authority().map_or_else(
                || {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                },
                |a| a.as_str().to_owned(),
            ),
            scheme: if uri.scheme_str() == Some("https") {
                "https"
            } else {
                "http"
            },
            request_headers: req.headers().clone(),
            attempts: 0,
            ..Default::default()
        }
    }

    /// A request header, pseudo-headers included (`:method`, `:path`,
    /// `:authority`, `:scheme`); `name` is lower-case.
    pub fn request_header(&self, name: &str) -> Option<&str> {
        match name {
            ":method" => Some(&self.method),
            ":path" => Some(&self.path),
            ":authority" | "host" => Some(self.authority.as_str()).filter(|a| !a.is_empty()),
            ":scheme" => Some(self.scheme),
            _ => self.request_headers.get(name).and_then(|v| v.to_str().ok()),
        }
    }
}

/// Every result is exported from the start, at zero.
fn touch(counts: &IntCounterVec) {
    for r in ["written", "filtered", "dropped", "failed"] {
        counts.with_label_values(&[r]);
    }
}

/// The node's access logger: the queue, and the providers in force.
pub struct AccessLog {
    tx: Option<mpsc::SyncSender<writer::Queued>>,
    providers: ArcSwap<Providers>,
    /// `mesh_access_log_records_total{result}`.
    counts: IntCounterVec,
}

impl AccessLog {
    /// Starts the writer thread with `providers`; `counts` is
    /// `mesh_access_log_records_total`.
    pub fn start(providers: Providers, counts: IntCounterVec) -> Self {
        touch(&counts);
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer = writer::Writer::new(counts.clone());
        let started = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(rx));
        if let Err(e) = &started {
            tracing::error!("access log: cannot start its writer thread: {e}; access logs are off");
        }
        Self {
            tx: started.is_ok().then_some(tx),
            providers: ArcSwap::from_pointee(providers),
            counts,
        }
    }

    /// Logs nothing (tests and tools).
    pub fn off(counts: IntCounterVec) -> Self {
        touch(&counts);
        Self {
            tx: None,
            providers: ArcSwap::from_pointee(Providers::default()),
            counts,
        }
    }

    /// Where a record of `mode` under `plan` goes; `None` when nowhere, so
    /// the data path builds no record.
    pub fn wants(&self, plan: &LogPlan, mode: Mode) -> Option<Arc<Resolved>> {
        self.tx.as_ref()?;
        let r = plan.resolve(&self.providers.load());
        (!r.side(mode).is_empty()).then_some(r)
    }

    /// Queues `record` for `to` (from [`Self::wants`]); never waits.
    pub fn log(&self, record: Record, to: Arc<Resolved>) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send((record, to)).is_err() {
            self.counts.with_label_values(&["dropped"]).inc();
        }
    }

    /// Replaces the providers (the MeshConfig changed).
    pub fn set_providers(&self, p: Providers) {
        self.providers.store(Arc::new(p));
    }

    pub fn providers(&self) -> Arc<Providers> {
        self.providers.load_full()
    }
}

#[cfg(test)]
impl Record {
    /// A request through the source agent, for tests.
    pub(crate) fn sample() -> Self {
        let mut request_headers = HeaderMap::new();
        request_headers.insert("user-agent", "curl/8".parse().unwrap());
        request_headers.insert("x-request-id", "r-1".parse().unwrap());
        request_headers.insert("x-debug", "true".parse().unwrap());
        Self {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            mode: Mode::Client,
            http: Some(Box::new(HttpRecord {
                protocol: "HTTP/1.1",
                method: "GET".into(),
                path: "/ratings/1?x=y".into(),
                authority: "ratings:9080".into(),
                scheme: "http",
                request_headers,
                code: 503,
                grpc_status: None,
                attempts: 1,
                ..Default::default()
            })),
            flags: "UF".into(),
            code_details: String::new(),
            termination_details: String::new(),
            upstream_failure: String::new(),
            bytes_received: 12,
            bytes_sent: 91,
            duration: Duration::from_millis(7),
            upstream_host: Some("10.10.2.2:9080".parse().unwrap()),
            upstream_local: None,
            upstream_cluster: "outbound|9080||ratings.default.svc.cluster.local".into(),
            downstream_remote: "10.10.1.2:40000".parse().unwrap(),
            downstream_local: "10.96.0.5:9080".parse().unwrap(),
            downstream_peer_san: String::new(),
            downstream_local_san: String::new(),
            upstream_peer_san: "spiffe://cluster.local/ns/default/sa/ratings".into(),
            requested_server_name: String::new(),
            route_name: "default".into(),
            connection_id: 42,
            mtls: true,
        }
    }
}
