//! Carrying captured connections: outbound (app → agent in the source pod →
//! destination) and inbound plaintext (client → agent in the destination pod
//! → app).

pub mod app_stream;
pub mod cluster;
pub mod conn_log;
pub mod conn_table;
pub mod copy;
pub mod destination;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod pool;
pub mod prefixed;
pub mod sniff;
pub mod socket;
pub mod spans;
pub mod upstream;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    identity::IdentityManager,
    netns::Netns,
    snapshot::{Snapshot, Store},
    spiffe::SpiffeId,
    telemetry::metrics::Metrics,
    workload::Workload,
};

/// A TCP connection with no byte either way for this long is closed,
/// unless its DestinationRule says otherwise
/// (`connectionPool.tcp.idleTimeout`): Envoy's and Istio's default.
pub const TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no original destination recorded for the connection from {peer} (it did not pass \
         through the capture programs)"
    )]
    NoOriginalDst { peer: SocketAddr },
    #[error("refusing to connect to {dst}: it is one of the agent's own listeners")]
    Loop { dst: SocketAddr },
    #[error("connecting to {dst} timed out after {timeout:?}")]
    ConnectTimeout {
        dst: SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{what} {addr} in {pod}'s network namespace: {source}")]
    Socket {
        what: &'static str,
        addr: SocketAddr,
        pod: String,
        #[source]
        source: io::Error,
    },
    #[error("port {port} is already in use on {addr} in {pod}'s network namespace")]
    PortInUse {
        port: u16,
        addr: IpAddr,
        pod: String,
    },
    #[error("mTLS handshake with {peer} refused ({reason}): {detail}")]
    Tls {
        peer: SocketAddr,
        reason: &'static str,
        detail: String,
    },
    #[error("HBONE to {dst}: {reason}")]
    Hbone { dst: SocketAddr, reason: String },
    #[error("HBONE: HTTP/2 handshake failed: {0}")]
    HboneHandshake(String),
    #[error("HBONE to {dst}: the destination answered {status}")]
    HboneRefused {
        dst: SocketAddr,
        status: hyper::StatusCode,
    },
    #[error("{service} port {port}: no ready endpoint")]
    NoEndpoint { service: String, port: u16 },
    #[error(
        "{service}: connection refused by its DestinationRule's connectionPool.tcp.maxConnections"
    )]
    Overflow { service: String },
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("plaintext to port {port} refused: PeerAuthentication is STRICT for {pod}")]
    PlaintextRefused { port: u16, pod: String },
    #[error(
        "connection to {dst} of {pod} refused: over the local rate limit of EnvoyFilter {filter}"
    )]
    RateLimited {
        dst: SocketAddr,
        pod: String,
        filter: String,
    },
    #[error("connection to {dst} of {pod} denied by AuthorizationPolicy ({by})")]
    Denied {
        dst: SocketAddr,
        pod: String,
        by: String,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// Short reason for the `mesh_proxy_errors_total` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoOriginalDst { .. } => "no_original_destination",
            Error::Loop { .. } => "loop",
            Error::ConnectTimeout { .. } => "connect_timeout",
            Error::Connect { .. } => "connect_failed",
            Error::Socket { .. } | Error::PortInUse { .. } | Error::Netns(_) => "socket",
            Error::Tls { .. } => "tls_handshake",
            Error::Hbone { .. } | Error::HboneHandshake(_) => "hbone",
            Error::HboneRefused { .. } => "hbone_refused",
            Error::PlaintextRefused { .. } => "plaintext_refused",
            Error::Denied { .. } => "rbac_denied",
            Error::RateLimited { .. } => "rate_limited",
            Error::NoEndpoint { .. } => "no_healthy_upstream",
            Error::Overflow { .. } => "upstream_overflow",
            Error::Resolve { .. } => "dns",
            Error::Identity(_) => "no_certificate",
            Error::Io(_) => "io",
        }
    }
}

/// Where captured connections were going, as the capture programs recorded
/// it: the kernel's maps in the agent (see `app`), a table in in-process
/// tests.
pub trait OriginalDestinations: Send + Sync {
    /// The destination the application dialled, for the connection the
    /// agent accepted from `peer` on `local` in the pod whose network
    /// namespace cookie is `netns_cookie`.
    fn original_destination(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<SocketAddr>;
}

/// State every connection handler shares.
pub struct ProxyContext {
    pub config: Arc<Config>,
    pub capture: Arc<dyn OriginalDestinations>,
    pub metrics: Arc<Metrics>,
    /// The configuration in force; a connection takes it once, at its start.
    pub store: Arc<Store>,
    /// The pods enrolled on this node.
    pub local: LocalPods,
    /// Workload certificates; `None` when no CA is configured (no mTLS).
    pub identities: Option<Arc<IdentityManager>>,
    /// HBONE client connections (with `identities`).
    pub pool: Option<Arc<pool::Pool>>,
    /// Tracks connection tasks, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the agent stops accepting: HBONE connections are told
    /// GOAWAY, so peers open new ones (to the next agent).
    pub draining: CancellationToken,
    /// Cancelled when the drain period is over: open connections are cut.
    pub cut: CancellationToken,
    /// Load balancing, circuit breaking and outlier state per destination.
    pub clusters: cluster::Clusters,
    /// Upstream HTTP connections of each pod, for reuse.
    pub upstreams: Arc<http::upstreams::Upstreams>,
    /// Where audited requests and denials are written.
    pub audit: crate::telemetry::audit::Audit,
    /// Istio's MeshConfig (`--mesh-config`): the CUSTOM action's
    /// providers; replaced when the file changes.
    pub mesh: arc_swap::ArcSwap<crate::mesh_config::MeshConfig>,
    /// Where access-log records go (providers from the MeshConfig).
    pub access_log: crate::telemetry::accesslog::AccessLog,
    /// Where spans go (providers from the MeshConfig).
    pub tracer: crate::telemetry::trace::Tracer,
    /// The connections carried now (`/connections`).
    pub conns: Arc<conn_table::ConnTable>,
    /// Where the agent reports reads from applications' fast-path sockets;
    /// `None` where the fast path cannot run.
    pub fast_credit: Option<Arc<dyn app_stream::FastPathCredit>>,
    /// Connections and mirrors the agent may hold.
    pub limits: limits::Limits,
}

impl ProxyContext {
    /// A context with no pod enrolled and no connection yet.
    pub fn new(
        config: Arc<Config>,
        capture: Arc<dyn OriginalDestinations>,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
        identities: Option<Arc<IdentityManager>>,
        pool: Option<Arc<pool::Pool>>,
    ) -> Self {
        let audit =
            crate::telemetry::audit::Audit::new(config.audit_log.clone(), metrics.audit_dropped());
        let limits = limits::Limits::new(
            config.max_connections,
            config.max_connections_per_pod,
            metrics.clone(),
        );
        Self {
            limits,
            audit,
            mesh: Default::default(),
            access_log: crate::telemetry::accesslog::AccessLog::off(metrics.access_log_counts()),
            tracer: crate::telemetry::trace::Tracer::off(metrics.trace_span_counts()),
            conns: Arc::default(),
            fast_credit: None,
            config,
            capture,
            metrics,
            store,
            local: LocalPods::default(),
            identities,
            pool,
            connections: TaskTracker::new(),
            draining: CancellationToken::new(),
            cut: CancellationToken::new(),
            clusters: Default::default(),
            upstreams: Default::default(),
        }
    }

    /// Whether `dst` is one of the agent's own in-pod listeners, which a
    /// captured connection must never be sent to (it would loop).
    fn is_own_listener(&self, snap: &Snapshot, dst: SocketAddr) -> bool {
        let c = &self.config;
        [c.outbound_port, c.inbound_port, c.hbone_port].contains(&dst.port())
            && (dst.ip().is_loopback()
                || self.local.get(dst.ip()).is_some()
                || snap.registry.workload_at(dst.ip()).is_some())
    }
}

/// One enrolled pod, as its connection handlers see it.
pub struct PodContext {
    pub workload: Arc<Workload>,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
    /// Its SPIFFE ID, when mTLS is on.
    pub identity: Option<SpiffeId>,
    /// Its connections, counted against `--max-connections-per-pod`.
    pub connections: limits::PodLimit,
}

/// The client's address for consistent hashing on the source IP: the
/// application reached the agent over the pod's loopback, so the peer
/// address is 127.0.0.1 (or ::1) for every pod — the pod's own address of
/// that family is what Istio hashes on.
pub fn client_address(pod: &PodContext, peer: SocketAddr) -> IpAddr {
    if !peer.ip().is_loopback() {
        return peer.ip();
    }
    let ips = &pod.workload.ips;
    ips.iter()
        .find(|ip| ip.is_ipv4() == peer.is_ipv4())
        .or(ips.first())
        .copied()
        .unwrap_or(peer.ip())
}

/// Where a client pod runs, for locality-aware load balancing: its
/// `istio-locality` label, else the node's `--locality`.
pub fn client_locality(pod: &PodContext, ctx: &ProxyContext) -> crate::registry::Locality {
    match crate::registry::build::pod_locality(&pod.workload.labels, None) {
        l if l.region.is_empty() => crate::registry::Locality::parse(&ctx.config.locality),
        l => l,
    }
}

/// The pods enrolled on this node, by address (enrolment state, not
/// configuration: it changes as pods are enrolled, not with snapshots).
#[derive(Default)]
pub struct LocalPods {
    local: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
}

impl LocalPods {
    /// The pod enrolled on this node at `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        self.local.read().expect("index lock").get(&ip).cloned()
    }

    pub fn insert_local(&self, pod: &Arc<PodContext>) {
        let mut m = self.local.write().expect("index lock");
        for ip in &pod.workload.ips {
            m.insert(*ip, pod.clone());
        }
    }

    pub fn remove_local(&self, w: &Workload) {
        let mut m = self.local.write().expect("index lock");
        for ip in &w.ips {
            m.remove(ip);
        }
    }
}

/// Accepts until `stop`, running `handle` for each connection as a task the
/// drain can wait for and cut when the drain period ends.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(permit) = ctx.limits.admit(&pod.connections) else {
            tracing::debug!(pod = %pod.workload.key(), %peer, "connection limit reached: refused");
            socket::reset(&stream);
            continue;
        };
        let fut = handle(stream, peer);
        let cut = ctx.cut.clone();
        ctx.connections.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = fut => {}
            }
        });
    }
}
