//! L7 outbound: a captured connection to a service port declared HTTP
//! (`http-*`, `http2-*`, `grpc-*` port names, `appProtocol`, ServiceEntry
//! protocol) is terminated here, in the source pod's agent, and every
//! request is routed on its own: the VirtualService for the service's host
//! (first matching route, weighted destinations), DestinationRule subsets,
//! then an endpoint, reached over HBONE (or directly when it is not
//! meshed). There is no waypoint hop.
//!
//! Responses the agent makes itself carry a plain-text body and an Envoy
//! response flag (`NR`, `NC`, `UH`, `UF`, `UO`, `UT`, `URX`, `FI`…) in
//! `x-mesh-response-flags`.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub(in crate::proxy) mod actions;
mod decide;
pub(in crate::proxy) mod drain;
pub(in crate::proxy) mod metered;
mod replay;
mod retry;
pub(in crate::proxy) mod send;
pub mod upstreams;

use super::{PodContext, ProxyContext, cluster, upstream::Via};
use crate::{
    registry::{Service, ServicePort},
    snapshot::{Snapshot, compile::CompiledDestination},
    telemetry::{
        accesslog::{HttpRecord, LogPlan, Mode, Record},
        metrics::{ConnLabels, Reporter, RequestOutcome},
    },
};
use replay::Replay;
use send::{AttemptError, strip_hop_by_hop};

/// Bodies in both directions: streamed from the peer, or made here.
pub(in crate::proxy) type Body = BoxBody<Bytes, hyper::Error>;

/// The header carrying the response flag of a response the agent made.
pub const FLAGS_HEADER: &str = "x-mesh-response-flags";

/// The most a mirrored request may take, answer included.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// The most header bytes a request may carry.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves one captured connection as HTTP until the client closes it.
#[allow(clippy::too_many_arguments)] // one captured connection's context
pub async fn serve(
    stream: super::app_stream::AppStream,
    peer: SocketAddr,
    dst: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    snap: Arc<Snapshot>,
    svc: Arc<Service>,
    port: ServicePort,
) {
    let locality = match crate::registry::build::pod_locality(&pod.workload.labels, None) {
        l if l.region.is_empty() => crate::registry::Locality::parse(&ctx.config.locality),
        l => l,
    };
    let pod_key = pod.workload.key().to_string();
    let log_plan = snap.access_logging(&pod.workload);
    let trace_plan = snap.tracing(&pod.workload);
    let _listed = ctx.conns.register(super::conn_table::ConnInfo {
        direction: "outbound",
        protocol: "http",
        pod: pod_key.clone(),
        source: SocketAddr::new(super::client_address(&pod, peer), peer.port()),
        destination: dst,
        source_identity: pod.identity.as_ref().map(|i| i.to_string()),
        destination_identity: None,
        started: std::time::SystemTime::now(),
        tally: None,
    });
    let (draining, header_timeout) = (ctx.draining.clone(), ctx.config.request_header_timeout);
    let conn = Arc::new(Conn {
        pod,
        ctx,
        snap,
        svc,
        port,
        client: peer,
        dst,
        locality,
        pod_key,
        log_plan,
        trace_plan,
    });
    let handle = move |req| conn.clone().route(req);
    if let Err(e) = drain::serve_http(stream, &draining, header_timeout, handle).await {
        tracing::debug!(%peer, "http: connection ended: {e}");
    }
}

/// The HTTP/1.1 and HTTP/2 server the agent terminates clients with (the
/// source's L7 path and the destination's per-request policy alike).
/// `header_timeout`: how long a client may take to send a request's head
/// (`--request-header-timeout`).
pub(in crate::proxy) fn server(
    header_timeout: Duration,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Requests with larger headers get 431 (Envoy's limit is 60 KiB).
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// The client's HTTP/1.1 upgrade (WebSocket), if it asks for one.
/// `Upgrade: h2c` is not passed on (as Envoy): the connection would leave
/// the agent's routing, and its checks, for good.
pub(in crate::proxy) fn client_upgrade(
    req: &mut Request<Incoming>,
    h2: bool,
) -> Option<hyper::upgrade::OnUpgrade> {
    if req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
    {
        req.headers_mut().remove(header::UPGRADE);
        req.headers_mut().remove("http2-settings");
    }
    (!h2 && req.headers().contains_key(header::UPGRADE)).then(|| hyper::upgrade::on(req))
}

/// One client connection: what decides its requests, and the upstream
/// connections it reuses (one per endpoint).
struct Conn {
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    snap: Arc<Snapshot>,
    svc: Arc<Service>,
    port: ServicePort,
    client: SocketAddr,
    /// The service address the client dialled.
    dst: SocketAddr,
    /// Where the client pod runs (its `istio-locality` label, else the
    /// node's `--locality`).
    locality: crate::registry::Locality,
    /// The client pod's name, which keys its upstream connections.
    pod_key: String,
    /// Its access logging and tracing.
    log_plan: Arc<LogPlan>,
    trace_plan: Arc<crate::telemetry::trace::TracePlan>,
}

/// Why the agent answered a request itself.
struct LocalReply {
    status: StatusCode,
    flag: &'static str,
    message: String,
}

impl LocalReply {
    fn new(status: StatusCode, flag: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            flag,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response<Body> {
        let mut r = Response::new(full(format!("{}\n", self.message)));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(FLAGS_HEADER, HeaderValue::from_static(self.flag));
        r
    }
}

pub(in crate::proxy) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Who served a request (the last attempt), for its metrics.
struct Served {
    service: Arc<Service>,
    workload: Option<Arc<crate::workload::Workload>>,
    via: Via,
}

/// What a request went through, for its metrics and access log.
#[derive(Default)]
struct Trail {
    served: Option<Served>,
    /// The route's name (`default` without a VirtualService route).
    route: String,
    /// Istio's name of the cluster of the last attempt.
    cluster: String,
    upstream: Option<SocketAddr>,
    attempts: u32,
}

type ServedSlot = Mutex<Trail>;

/// What every attempt of a request shares.
struct RequestHead {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The client spoke HTTP/2.
    client_h2: bool,
}

impl RequestHead {
    fn build(&self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        *r.version_mut() = if self.client_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        r
    }
}

impl Conn {
    async fn route(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let in_flight = retry::InFlight::start();
        let started = Instant::now();
        let start_time = std::time::SystemTime::now();
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        actions::ensure_request_id(req.headers_mut());
        let span = super::spans::begin(&self.ctx, &self.trace_plan, Mode::Client, &mut req);
        let served = ServedSlot::default();
        let request_bytes = Arc::new(AtomicU64::new(0));
        let log = self
            .ctx
            .access_log
            .wants(&self.log_plan, Mode::Client)
            .map(|to| (to, HttpRecord::of_request(&req)));
        let resp = match self.forward(req, &served, &request_bytes).await {
            Ok(r) => r,
            Err(reply) => {
                tracing::debug!(pod = %self.pod.workload.key(), flag = reply.flag, "http: {}", reply.message);
                reply.into_response()
            }
        };
        let trail = served.into_inner().unwrap_or_default();
        let log = log.map(|(to, mut h)| {
            h.response_headers = resp.headers().clone();
            (to, h)
        });
        let conn = self.clone();
        metered::when_done(resp, move |f| {
            drop(in_flight);
            let request_bytes = request_bytes.load(Ordering::Relaxed);
            if let Some((to, mut h)) = log {
                // The pod's address, not the loopback the capture connects from.
                let remote = SocketAddr::new(
                    crate::proxy::client_address(&conn.pod, conn.client),
                    conn.client.port(),
                );
                let mut r = Record::new(Mode::Client, start_time, remote, conn.dst);
                h.code = f.code;
                h.grpc_status = (f.grpc_status != "-").then(|| f.grpc_status.clone());
                h.attempts = trail.attempts;
                r.http = Some(Box::new(h));
                if f.flags != "-" {
                    r.flags = f.flags.clone();
                }
                r.bytes_received = request_bytes;
                r.bytes_sent = f.response_bytes;
                r.duration = started.elapsed();
                r.upstream_host = trail.upstream;
                r.upstream_cluster = trail.cluster.clone();
                r.route_name = trail.route.clone();
                if let Some(s) = &trail.served {
                    r.mtls = s.via.is_mtls();
                    if let Some((_, dst)) = s.via.principals() {
                        r.upstream_peer_san = dst;
                    }
                }
                conn.ctx.access_log.log(r, to);
            }
            if let Some(b) = span {
                let principals = trail.served.as_ref().and_then(|s| s.via.principals());
                super::spans::finish(
                    &conn.ctx,
                    b,
                    &conn.pod.workload,
                    Some(conn.client),
                    super::spans::Ended {
                        name: format!("{}:{}/*", conn.svc.hostname, conn.port.port),
                        code: f.code,
                        flags: &f.flags,
                        request_bytes,
                        response_bytes: f.response_bytes,
                        upstream_cluster: &trail.cluster,
                        upstream: trail.upstream,
                        peer: trail.upstream,
                        peer_identity: principals.as_ref().map(|p| p.1.as_str()),
                    },
                );
            }
            conn.record(trail.served, &f.outcome(grpc, started, request_bytes));
        })
    }

    /// Records a finished request with Istio's labels (reporter: source).
    fn record(&self, served: Option<Served>, outcome: &RequestOutcome<'_>) {
        let (service, workload, via) = match &served {
            Some(s) => (&s.service, s.workload.as_deref(), &s.via),
            None => (&self.svc, None, &Via::Direct),
        };
        let principals = via.principals();
        let labels = ConnLabels {
            reporter: Reporter::Source,
            source: Some(&self.pod.workload),
            destination: workload,
            service: Some(service),
            destination_addr: self.dst,
            cluster: &self.ctx.config.cluster_id,
            security_policy: via.security_policy(),
            source_principal: principals.as_ref().map(|p| p.0.as_str()),
            destination_principal: principals.as_ref().map(|p| p.1.as_str()),
        };
        self.ctx.metrics.request_done(&labels, outcome);
    }

    async fn forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        served: &ServedSlot,
        request_bytes: &Arc<AtomicU64>,
    ) -> Result<Response<Body>, LocalReply> {
        let decision = self.decide(&req)?;
        let route = decision.route;
        served.lock().expect("served lock").route = route
            .map(|r| r.spec.name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned();
        let mut delayed = false;
        let mut cors_headers = None;
        if let Some(r) = route {
            // Envoy's filter order: CORS, then faults, then the router.
            match actions::cors(r, req.method(), req.headers()) {
                Some(actions::Cors::Preflight(h)) => {
                    let mut resp = Response::new(full(Bytes::new()));
                    *resp.headers_mut() = h;
                    return Ok(resp);
                }
                Some(actions::Cors::Actual(h)) => cors_headers = Some(h),
                None => {}
            }
            let fault = actions::Fault::draw(r);
            if let Some(d) = fault.delay {
                tokio::time::sleep(d).await;
                delayed = true;
            }
            if let Some(status) = fault.abort {
                return Err(LocalReply::new(status, "FI", "fault filter abort"));
            }
            if let Some(rd) = &r.spec.redirect {
                let host = actions::authority(req.uri(), req.headers());
                let location = actions::redirect_location(rd, req.uri(), &host, self.port.port);
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = actions::redirect_status(rd);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return Ok(resp);
            }
            if let Some(d) = &r.spec.direct_response {
                let mut resp = Response::new(full(actions::direct_body(d)));
                *resp.status_mut() = u16::try_from(d.status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::OK);
                return Ok(resp);
            }
        }
        let Some((dest_index, dest)) = decision.dest else {
            return Err(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                "the route has no destination",
            ));
        };
        let client_h2 = req.version() == Version::HTTP_2;
        let mut req = req;
        // An HTTP/1.1 upgrade (WebSocket): once the upstream agrees, the
        // two connections are joined byte for byte.
        let client_upgrade = client_upgrade(&mut req, client_h2);
        let (mut parts, body) = req.into_parts();
        // HTTP/2 carries the authority in the URI: keep it as Host too, so
        // that a path rewrite (which leaves an origin-form URI) loses
        // nothing.
        if !parts.headers.contains_key(header::HOST)
            && let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
        let dest_headers = route
            .and_then(|r| r.spec.route.get(dest_index))
            .and_then(|d| d.headers.as_ref());
        if let Some(r) = route {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Some(new) = actions::rewrite(r, decision.matched, pq)
                && let Ok(u) = new.parse()
            {
                parts.uri = u;
            }
            if let Some(a) = r
                .spec
                .rewrite
                .as_ref()
                .map(|w| w.authority.as_str())
                .filter(|a| !a.is_empty())
                && let Ok(v) = HeaderValue::from_str(a)
            {
                actions::set_authority(&mut parts.uri, &mut parts.headers, v);
            }
            for h in [r.spec.headers.as_ref(), dest_headers]
                .into_iter()
                .flatten()
            {
                actions::apply_headers(&mut parts.headers, h.request.as_ref());
            }
        }
        let policy = retry::Policy::of(route);
        let mut body = Replay::new(body, request_bytes, !client_h2).await?;
        let head = RequestHead {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            client_h2,
        };
        if let Some(r) = route {
            for (m, pct) in &r.mirrors {
                if actions::chance(*pct)
                    && let Replay::Buffered(b) = &body
                {
                    self.mirror(m.clone(), &head, b.clone());
                }
            }
        }
        let overall = route
            .and_then(|r| r.spec.timeout.as_ref())
            .map(|d| d.get())
            .filter(|d| !d.is_zero());
        let attempts = self.attempts(&dest, &head, &mut body, &policy, served);
        let (resp, exhausted) = match overall {
            Some(t) => tokio::time::timeout(t, attempts).await.map_err(|_| {
                LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                )
            })??,
            None => tokio::time::timeout(self.ctx.config.stream_idle_timeout, attempts)
                .await
                .map_err(|_| {
                    LocalReply::new(StatusCode::GATEWAY_TIMEOUT, "SI", "stream timeout")
                })??,
        };
        let mut resp = resp;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(join_upgraded(client, upstream));
            return Ok(resp);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(r) = route {
            for h in [r.spec.headers.as_ref(), dest_headers]
                .into_iter()
                .flatten()
            {
                actions::apply_headers(&mut parts.headers, h.response.as_ref());
            }
        }
        if let Some(h) = cors_headers {
            parts.headers.extend(h);
        }
        let flags: Vec<&str> = [(delayed, "DI"), (exhausted, "URX")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| *f)
            .collect();
        if !flags.is_empty()
            && let Ok(v) = HeaderValue::from_str(&flags.join(","))
        {
            parts.headers.insert(FLAGS_HEADER, v);
        }
        Ok(Response::from_parts(parts, body))
    }

    /// Sends the request, retrying as `policy` allows. Returns the response
    /// and whether retries ran out on a retriable answer (flag `URX`).
    async fn attempts(
        &self,
        dest: &CompiledDestination,
        head: &RequestHead,
        body: &mut Replay,
        policy: &retry::Policy,
        served: &ServedSlot,
    ) -> Result<(Response<Body>, bool), LocalReply> {
        let mut tries = 0;
        let mut _permit = None;
        loop {
            let Some(b) = body.next() else {
                unreachable!("a streamed body is only sent once: retries need a replayable body")
            };
            let attempt = self.send(dest, head.build(b), head.client_h2, Some(served));
            let outcome = match policy.per_try_timeout {
                Some(t) => tokio::time::timeout(t, attempt).await.unwrap_or_else(|_| {
                    Err(AttemptError {
                        reply: LocalReply::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "UT",
                            "upstream request timeout (per try)",
                        ),
                        failure: Some(retry::Failure::PerTryTimeout),
                    })
                }),
                None => attempt.await,
            };
            let retriable = match &outcome {
                Ok(r) => policy.retries_response(&head.method, r.status(), r.headers()),
                Err(e) => e
                    .failure
                    .is_some_and(|f| policy.retries_failure(&head.method, f)),
            };
            let permit = (retriable && tries < policy.retries && body.replayable())
                .then(|| {
                    let port = dest.port.unwrap_or(self.port.port);
                    let rule = self.snap.routes.destination_rule_for(&dest.host);
                    let pool = cluster::Policy::of(rule, &dest.subset, port);
                    let c = self.ctx.clusters.get(&dest.host, &dest.subset, port);
                    retry::RetryPermit::take_for(&c, pool.max_retries())
                })
                .flatten();
            if permit.is_none() {
                let exhausted = retriable && tries > 0;
                return match outcome {
                    Ok(r) => Ok((r, exhausted)),
                    Err(mut e) => {
                        if exhausted {
                            e.reply.flag = "URX";
                        }
                        Err(e.reply)
                    }
                };
            }
            _permit = permit;
            tries += 1;
            tokio::time::sleep(policy.backoff(tries)).await;
        }
    }

    /// Sends a copy of the request to a mirror target and drops the answer
    /// (Envoy's shadowing: the Host gets `-shadow` appended). Bounded: at
    /// most `MAX_MIRRORS_IN_FLIGHT` at once (more are skipped and counted),
    /// each for at most `MIRROR_TIMEOUT`, the answer read and dropped as it
    /// streams, never collected.
    fn mirror(self: &Arc<Self>, dest: CompiledDestination, head: &RequestHead, body: Bytes) {
        let Some(permit) = self.ctx.limits.mirror() else {
            tracing::debug!(host = %dest.host, "http: mirror skipped: too many in flight");
            return;
        };
        let mut copy = RequestHead {
            method: head.method.clone(),
            uri: head.uri.clone(),
            headers: head.headers.clone(),
            client_h2: head.client_h2,
        };
        // Envoy's shadow host: `-shadow` after the name, before the port.
        let host = actions::authority(&copy.uri, &copy.headers);
        let shadow = match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() && !name.ends_with(']') => {
                format!("{name}-shadow:{port}")
            }
            _ => format!("{host}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            actions::set_authority(&mut copy.uri, &mut copy.headers, v);
        }
        let conn = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let req = copy.build(full(body));
            let mirrored = async {
                match conn.send(&dest, req, copy.client_h2, None).await {
                    Ok(resp) => {
                        // Read the answer, and drop it, so the connection
                        // can be reused.
                        let mut body = resp.into_body();
                        while let Some(Ok(_)) = body.frame().await {}
                    }
                    Err(e) => {
                        tracing::debug!(host = %dest.host, "http: mirror failed: {}", e.reply.message)
                    }
                }
            };
            if tokio::time::timeout(MIRROR_TIMEOUT, mirrored)
                .await
                .is_err()
            {
                tracing::debug!(host = %dest.host, "http: mirror timed out");
            }
        });
    }
}

/// Joins an upgraded client connection and its upstream until both ends
/// are closed.
async fn join_upgraded(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match futures::future::try_join(client, upstream).await {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!("http: upgraded connection ended: {e}");
            }
        }
        Err(e) => tracing::debug!("http: upgrade failed: {e}"),
    }
}

#[cfg(test)]
mod tests;
