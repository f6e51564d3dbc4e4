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
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

mod actions;
pub mod cluster;
mod locality;
mod metered;
mod retry;
pub mod upstreams;

use super::{Error, PodContext, ProxyContext, outbound, socket};
use crate::{
    registry::{Endpoint, Service, ServicePort},
    snapshot::{
        Snapshot,
        compile::{CompiledDestination, CompiledHttpRoute, RequestView},
    },
    telemetry::metrics::{ConnLabels, Reporter, RequestOutcome},
};
use upstreams::Sender as Upstream;

/// Bodies in both directions: streamed from the peer, or made here.
type Body = BoxBody<Bytes, hyper::Error>;

/// The header carrying the response flag of a response the agent made.
pub const FLAGS_HEADER: &str = "x-mesh-response-flags";

/// The most header bytes a request may carry.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one captured connection as HTTP until the client closes it.
#[allow(clippy::too_many_arguments)] // one captured connection's context
pub async fn serve(
    stream: TcpStream,
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
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.route(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Requests with larger headers get 431 (Envoy's limit is 60 KiB).
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, "http: connection ended: {e}");
    }
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

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Where `decide` sends a request.
struct Decision<'a> {
    /// The VirtualService route that took it (`None`: no VirtualService,
    /// the service's default route).
    route: Option<&'a CompiledHttpRoute>,
    /// Which of the route's match blocks matched.
    matched: Option<usize>,
    /// The destination drawn by weight, and its index in the route.
    dest: Option<(usize, CompiledDestination)>,
}

/// Why one attempt got no response.
struct AttemptError {
    reply: LocalReply,
    /// Set when the failure may be retried (depending on the policy).
    failure: Option<retry::Failure>,
}

impl From<LocalReply> for AttemptError {
    fn from(reply: LocalReply) -> Self {
        Self {
            reply,
            failure: None,
        }
    }
}

/// How long an HTTP/1.1 chunked request body may be held back to be read
/// (and checked) before anything goes upstream.
const CHUNKED_HOLD: Duration = Duration::from_millis(50);

/// Request bodies up to this size are kept so that a retry or a mirror
/// can send them again; larger or unsized bodies stream once.
const MAX_REPLAY: u64 = 64 * 1024;

/// A request body that can be sent more than once when it was small.
enum Replay {
    Buffered(Bytes),
    Stream(Option<Body>),
}

/// Who served a request (the last attempt), for its metrics.
struct Served {
    service: Arc<Service>,
    workload: Option<Arc<crate::workload::Workload>>,
    mtls: bool,
}

type ServedSlot = Mutex<Option<Served>>;

impl Replay {
    /// Reads a small body now; `bytes` gets the body's size either way.
    /// An HTTP/1.1 body of unknown length (chunked) is read up to
    /// `MAX_REPLAY`, for at most `CHUNKED_HOLD`, before anything goes
    /// upstream, so that bad chunking early in it is refused here; HTTP/2
    /// bodies of unknown length (gRPC streams) are never held back.
    async fn new(body: Incoming, bytes: &Arc<AtomicU64>, h1: bool) -> Result<Self, LocalReply> {
        let bad_body = |e: hyper::Error| {
            LocalReply::new(
                StatusCode::BAD_REQUEST,
                "DPE",
                format!("invalid request body: {e}"),
            )
        };
        let hint = hyper::body::Body::size_hint(&body);
        if h1 && hint.upper().is_none() {
            let mut body = body;
            let mut buf = bytes::BytesMut::new();
            // A client that streams slowly (or waits for the response
            // before finishing) is not held back for longer than this.
            let deadline = tokio::time::Instant::now() + CHUNKED_HOLD;
            loop {
                let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(f) => f,
                    Err(_) => {
                        let head = futures::stream::once(std::future::ready(
                            Ok::<_, hyper::Error>(hyper::body::Frame::data(buf.freeze())),
                        ));
                        let rest = http_body_util::BodyStream::new(metered::Metered::counting(
                            body.boxed(),
                            bytes.clone(),
                        ));
                        return Ok(Self::Stream(Some(
                            http_body_util::StreamBody::new(futures::StreamExt::chain(head, rest))
                                .boxed(),
                        )));
                    }
                };
                match frame {
                    None => {
                        bytes.store(buf.len() as u64, Ordering::Relaxed);
                        return Ok(Self::Buffered(buf.freeze()));
                    }
                    Some(Err(e)) => return Err(bad_body(e)),
                    Some(Ok(frame)) => {
                        // Trailers of a chunked request are not forwarded.
                        if let Ok(d) = frame.into_data() {
                            buf.extend_from_slice(&d);
                        }
                        if buf.len() as u64 > MAX_REPLAY {
                            bytes.store(buf.len() as u64, Ordering::Relaxed);
                            let head =
                                futures::stream::once(std::future::ready(Ok::<_, hyper::Error>(
                                    hyper::body::Frame::data(buf.freeze()),
                                )));
                            let rest = http_body_util::BodyStream::new(metered::Metered::counting(
                                body.boxed(),
                                bytes.clone(),
                            ));
                            let stream = futures::StreamExt::chain(head, rest);
                            return Ok(Self::Stream(Some(
                                http_body_util::StreamBody::new(stream).boxed(),
                            )));
                        }
                    }
                }
            }
        }
        if hint.upper().is_some_and(|u| u <= MAX_REPLAY) {
            // Bounded by the declared length, which hyper enforces.
            let b = body.collect().await.map_err(bad_body)?;
            let b = b.to_bytes();
            bytes.store(b.len() as u64, Ordering::Relaxed);
            return Ok(Self::Buffered(b));
        }
        Ok(Self::Stream(Some(
            metered::Metered::counting(body.boxed(), bytes.clone()).boxed(),
        )))
    }

    /// The body for the next attempt (`None`: already streamed away).
    fn next(&mut self) -> Option<Body> {
        match self {
            Self::Buffered(b) => Some(full(b.clone())),
            Self::Stream(s) => s.take(),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }
}

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
    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let in_flight = retry::InFlight::start();
        let started = Instant::now();
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let served = ServedSlot::default();
        let request_bytes = Arc::new(AtomicU64::new(0));
        let line = self.ctx.config.access_log.then(|| {
            format!(
                "{} {} {:?} authority={}",
                req.method(),
                req.uri().path_and_query().map_or("/", |p| p.as_str()),
                req.version(),
                actions::authority(req.uri(), req.headers()),
            )
        });
        let resp = match self.forward(req, &served, &request_bytes).await {
            Ok(r) => r,
            Err(reply) => {
                tracing::debug!(pod = %self.pod.workload.key(), flag = reply.flag, "http: {}", reply.message);
                reply.into_response()
            }
        };
        let (parts, body) = resp.into_parts();
        let code = parts.status.as_u16();
        let text = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let (flags, grpc_status) = (text(FLAGS_HEADER), text("grpc-status"));
        let served = served.into_inner().unwrap_or_default();
        let conn = self.clone();
        let body = metered::Metered::recording(body, move |response_bytes, trailer_status| {
            drop(in_flight);
            // gRPC puts its status in the trailers, or in the headers of a
            // trailers-only response.
            let grpc_status = trailer_status.unwrap_or(grpc_status);
            if let Some(line) = line {
                // Envoy's default access log fields, as one line.
                tracing::info!(
                    target: "mesh::access",
                    pod = %conn.pod.workload.key(),
                    code,
                    flags = %flags,
                    duration_ms = started.elapsed().as_millis() as u64,
                    upstream = served.as_ref().map_or("-", |s| s.service.hostname.as_str()),
                    bytes_received = request_bytes.load(Ordering::Relaxed),
                    bytes_sent = response_bytes,
                    "{line}"
                );
            }
            conn.record(
                served,
                &RequestOutcome {
                    protocol: if grpc { "grpc" } else { "http" },
                    code,
                    grpc_status: if grpc { &grpc_status } else { "-" },
                    flags: &flags,
                    duration: started.elapsed(),
                    request_bytes: request_bytes.load(Ordering::Relaxed),
                    response_bytes,
                },
            );
        });
        Response::from_parts(parts, body.boxed())
    }

    /// Records a finished request with Istio's labels (reporter: source).
    fn record(&self, served: Option<Served>, outcome: &RequestOutcome<'_>) {
        let (service, workload, mtls) = match &served {
            Some(s) => (&s.service, s.workload.as_deref(), s.mtls),
            None => (&self.svc, None, false),
        };
        let trust_domain = self
            .pod
            .identity
            .as_ref()
            .map(|i| i.trust_domain().to_owned());
        let source_principal = self.pod.identity.as_ref().map(ToString::to_string);
        let destination_principal = workload
            .zip(trust_domain.as_deref())
            .map(|(w, td)| w.identity(td).to_string());
        let labels = ConnLabels {
            reporter: Reporter::Source,
            source: Some(&self.pod.workload),
            destination: workload,
            service: Some(service),
            destination_addr: self.dst,
            cluster: &self.ctx.config.cluster_id,
            security_policy: if mtls { "mutual_tls" } else { "unknown" },
            source_principal: source_principal.as_deref().filter(|_| mtls),
            destination_principal: destination_principal.as_deref().filter(|_| mtls),
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
        // `Upgrade: h2c` is not passed on (as Envoy): the connection would
        // leave the agent's routing for good.
        if req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        {
            req.headers_mut().remove(header::UPGRADE);
            req.headers_mut().remove("http2-settings");
        }
        let client_upgrade = (!client_h2 && req.headers().contains_key(header::UPGRADE))
            .then(|| hyper::upgrade::on(&mut req));
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
            None => attempts.await?,
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
                    let pool =
                        cluster::Policy::of(self.destination_rule(&dest.host), &dest.subset, port);
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
    /// (Envoy's shadowing: the Host gets `-shadow` appended).
    fn mirror(self: &Arc<Self>, dest: CompiledDestination, head: &RequestHead, body: Bytes) {
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
            let req = copy.build(full(body));
            match conn.send(&dest, req, copy.client_h2, None).await {
                Ok(resp) => {
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => {
                    tracing::debug!(host = %dest.host, "http: mirror failed: {}", e.reply.message)
                }
            }
        });
    }

    /// One attempt: an endpoint of the destination, a connection to it,
    /// the request.
    async fn send(
        &self,
        dest: &CompiledDestination,
        req: Request<Body>,
        client_h2: bool,
        served: Option<&ServedSlot>,
    ) -> Result<Response<Body>, AttemptError> {
        let (svc, port) = self.destination_service(dest)?;
        let labels = self.subset_labels(dest)?;
        let dr = self.destination_rule(&dest.host);
        let policy = cluster::Policy::of(dr, &dest.subset, port.port);
        // HTTP/2 upstream for ports declared so (and gRPC); HTTP/1.1 for
        // `http` ports whatever the client spoke, as Envoy does unless a
        // DestinationRule says `useClientProtocol`.
        let use_client = policy
            .connection_pool
            .and_then(|c| c.http.as_ref())
            .is_some_and(|h| h.use_client_protocol == Some(true));
        let h2 = matches!(
            port.protocol,
            crate::registry::Protocol::Http2 | crate::registry::Protocol::Grpc
        ) || (use_client && client_h2);
        let cluster = self.ctx.clusters.get(&dest.host, &dest.subset, port.port);
        let mut admission = cluster.admit(&policy, !h2).await.map_err(|o| {
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UO",
                format!("upstream overflow ({o:?}): the DestinationRule's connection pool is full"),
            )
        })?;
        let candidates = svc.candidates(&port, self.client.ip(), |e| {
            labels
                .iter()
                .all(|(k, v)| e.labels.get(k.as_str()) == Some(v))
        });
        let input = cluster::HashInput {
            headers: req.headers(),
            query: req.uri().query(),
            client: self.client.ip(),
            locality: &self.locality,
            client_labels: &self.pod.workload.labels,
        };
        let pick = cluster
            .pick(
                &candidates,
                &policy,
                &input,
                self.dst.ip(),
                Some(&mut admission),
            )
            .ok_or_else(|| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    format!("no healthy upstream for {}", describe(dest)),
                )
            })?;
        let ep = pick.endpoint;
        if let Some(slot) = served {
            let workload = ep.workload.as_ref().map(|w| w.0.clone());
            *slot.lock().expect("served lock") = Some(Served {
                mtls: workload.is_some()
                    && self.ctx.identities.is_some()
                    && self.pod.identity.is_some(),
                workload,
                service: svc.clone(),
            });
        }
        let od = policy.outlier_detection;
        let hosts = candidates.len();
        let connect_failure = |reply| {
            cluster.record(&pick.key, cluster::Outcome::LocalFailure, od, hosts);
            AttemptError {
                reply,
                failure: Some(retry::Failure::Connect),
            }
        };
        let addr = match outbound::endpoint_addr(ep, &port).await {
            Ok(a) => a,
            Err(e) => return Err(connect_failure(upstream_failure(&e))),
        };
        let (mut sender, uses) = match self.upstream(ep, addr, h2, policy.connect_timeout()).await {
            Ok(u) => u,
            Err(reply) => return Err(connect_failure(reply)),
        };
        let req = prepare(req, h2);
        let result = match &mut sender {
            Upstream::H1(s) => s.send_request(req).await,
            Upstream::H2(s) => s.send_request(req).await,
        };
        match result {
            Ok(mut resp) => {
                cluster.record(
                    &pick.key,
                    cluster::Outcome::Status(resp.status().as_u16()),
                    od,
                    hosts,
                );
                // `maxRequestsPerConnection`: a connection that carried
                // its share is not reused.
                let reuse = policy
                    .max_requests_per_connection()
                    .is_none_or(|max| uses + 1 < max);
                // An HTTP/2 connection serves other requests at once; an
                // HTTP/1.1 one only once this response's body is done.
                let pod = self.pod_key.clone();
                let give_back = match sender {
                    Upstream::H2(s) => {
                        if reuse {
                            self.ctx
                                .upstreams
                                .put(&pod, addr, Upstream::H2(s), uses + 1);
                        }
                        None
                    }
                    Upstream::H1(s) => reuse.then(|| upstreams::GiveBack {
                        pool: self.ctx.upstreams.clone(),
                        pod,
                        addr,
                        sender: Some((Upstream::H1(s), uses + 1)),
                    }),
                };
                if let Some(c) = pick.set_cookie
                    && let Ok(v) = HeaderValue::from_str(&c)
                {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
                // The pool slot, the request count and the host's load last
                // as long as the response body.
                let guard = (admission, give_back);
                Ok(resp.map(|b| metered::Metered::guarding(b.boxed(), guard).boxed()))
            }
            Err(e) => {
                cluster.record(&pick.key, cluster::Outcome::LocalFailure, od, hosts);
                Err(AttemptError {
                    failure: Some(if refused_stream(&e) {
                        retry::Failure::RefusedStream
                    } else {
                        retry::Failure::Reset
                    }),
                    reply: LocalReply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UC",
                        format!("upstream connect error or disconnect/reset before headers: {e}"),
                    ),
                })
            }
        }
    }

    /// The DestinationRule for `host`, if any.
    fn destination_rule(&self, host: &str) -> Option<&crate::istio::networking::DestinationRule> {
        self.snap
            .routes
            .destination_rules
            .get(host)
            .and_then(|r| match &r.spec {
                crate::istio::Spec::DestinationRule(dr) => Some(dr),
                _ => None,
            })
    }

    /// Where `req` goes: the first VirtualService route that takes it,
    /// then a weighted draw among its destinations; without a
    /// VirtualService, the service itself.
    fn decide(&self, req: &Request<Incoming>) -> Result<Decision<'_>, LocalReply> {
        let vss = self.snap.routes.virtual_services_for(&self.svc.hostname);
        if vss.iter().all(|vs| vs.http.is_empty()) {
            return Ok(Decision {
                route: None,
                matched: None,
                dest: Some((
                    0,
                    CompiledDestination {
                        host: self.svc.hostname.clone(),
                        subset: String::new(),
                        port: None,
                    },
                )),
            });
        }
        let authority = actions::authority(req.uri(), req.headers());
        let view = RequestView {
            path: req.uri().path(),
            query: req.uri().query(),
            method: req.method().as_str(),
            authority: &authority,
            headers: req.headers(),
            port: self.port.port,
            source_labels: &self.pod.workload.labels,
            source_namespace: &self.pod.workload.namespace,
        };
        let (route, matched) = vss
            .iter()
            .flat_map(|vs| vs.http.iter())
            .find_map(|r| {
                if r.matches.is_empty() {
                    return Some((r, None));
                }
                r.matches
                    .iter()
                    .position(|m| m.matches(&view))
                    .map(|i| (r, Some(i)))
            })
            .ok_or_else(|| LocalReply::new(StatusCode::NOT_FOUND, "NR", "no route matched"))?;
        let dest = route
            .pick(fastrand::u32(0..100))
            .and_then(|i| Some((i, route.destinations.get(i)?.clone())));
        Ok(Decision {
            route: Some(route),
            matched,
            dest,
        })
    }

    /// The service and port a destination names.
    fn destination_service(
        &self,
        dest: &CompiledDestination,
    ) -> Result<(Arc<Service>, ServicePort), LocalReply> {
        let svc = if dest.host == self.svc.hostname {
            self.svc.clone()
        } else {
            self.snap
                .registry
                .services_for_host(&dest.host)
                .first()
                .cloned()
                .ok_or_else(|| {
                    LocalReply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "NC",
                        format!("no service for host {}", dest.host),
                    )
                })?
        };
        let number = dest.port.unwrap_or(self.port.port);
        let port = svc
            .port(number)
            .or_else(|| (svc.ports.len() == 1).then(|| &svc.ports[0]))
            .cloned()
            .ok_or_else(|| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NC",
                    format!("{} has no port {number}", svc.hostname),
                )
            })?;
        Ok((svc, port))
    }

    /// The labels of the destination's subset (none without a subset).
    fn subset_labels(
        &self,
        dest: &CompiledDestination,
    ) -> Result<Vec<(String, String)>, LocalReply> {
        if dest.subset.is_empty() {
            return Ok(Vec::new());
        }
        self.snap
            .routes
            .subsets
            .get(&dest.host)
            .and_then(|s| s.get(&dest.subset))
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .ok_or_else(|| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NC",
                    format!(
                        "subset {} of {} is not defined by a DestinationRule",
                        dest.subset, dest.host
                    ),
                )
            })
    }

    /// A ready sender to `addr`: the connection this client used last
    /// time, or a new one (over HBONE when the endpoint is meshed).
    async fn upstream(
        &self,
        ep: &Endpoint,
        addr: SocketAddr,
        h2: bool,
        connect_timeout: Option<Duration>,
    ) -> Result<(Upstream, usize), LocalReply> {
        let pod = &self.pod_key;
        while let Some((mut u, uses)) = self.ctx.upstreams.take(pod, addr, h2) {
            let ready = match &mut u {
                Upstream::H1(s) => s.ready().await.is_ok(),
                Upstream::H2(s) => s.ready().await.is_ok(),
            };
            if ready {
                return Ok((u, uses));
            }
            if h2 {
                break;
            }
        }
        let connect = self.connect(ep, addr);
        let io = match connect_timeout {
            Some(t) => tokio::time::timeout(t, connect).await.map_err(|_| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UF",
                    format!("upstream connect error: {addr} did not answer within {t:?} (connectTimeout)"),
                )
            })?,
            None => connect.await,
        }
        .map_err(|e| upstream_failure(&e))?;
        let fail = |e: hyper::Error| {
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UF",
                format!("upstream connect error: HTTP handshake with {addr}: {e}"),
            )
        };
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .map_err(fail)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, "http: upstream connection ended: {e}");
                }
            });
            Ok((Upstream::H2(sender), 0))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(fail)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, "http: upstream connection ended: {e}");
                }
            });
            Ok((Upstream::H1(sender), 0))
        }
    }

    /// A byte stream to the endpoint: an HBONE tunnel to a meshed
    /// workload (mutual TLS, its identity expected), a TCP connection from
    /// the pod otherwise.
    async fn connect(&self, ep: &Endpoint, addr: SocketAddr) -> Result<UpstreamIo, Error> {
        let (pod, ctx) = (&self.pod, &self.ctx);
        if let (Some(_), Some(src_id), Some(w)) = (&ctx.identities, &pod.identity, &ep.workload) {
            let dst_id = w.0.identity(src_id.trust_domain());
            let t = outbound::open_tunnel(pod, ctx, addr, &w.0, &dst_id, src_id).await?;
            return Ok(UpstreamIo::Tunnel(Box::new(t)));
        }
        let name = pod.workload.key().to_string();
        let s = socket::connect(&pod.netns, &name, addr, socket::Source::Pod, &ctx.config).await?;
        s.set_nodelay(true)?;
        Ok(UpstreamIo::Tcp(s))
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

/// Whether the upstream refused an HTTP/2 stream (REFUSED_STREAM: it did
/// not process the request). Read from the error chain's text: the `h2`
/// error type is not ours to depend on.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string().contains("refused stream") {
            return true;
        }
        source = s.source();
    }
    false
}

fn upstream_failure(e: &Error) -> LocalReply {
    LocalReply::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "UF",
        format!("upstream connect error: {e}"),
    )
}

fn describe(d: &CompiledDestination) -> String {
    if d.subset.is_empty() {
        d.host.clone()
    } else {
        format!("{} (subset {})", d.host, d.subset)
    }
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| n != header::UPGRADE)
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// The request as the upstream gets it: origin-form for HTTP/1.1 (Host
/// kept), absolute for HTTP/2 (`:authority` from Host).
fn prepare(req: Request<Body>, h2: bool) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let upgrade = parts.headers.contains_key(header::UPGRADE);
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC servers
    // require it.
    let te_trailers = parts
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut parts.headers);
    if h2 {
        parts.version = Version::HTTP_2;
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        parts.headers.remove(header::HOST);
        parts.headers.remove(header::UPGRADE);
        if let Ok(u) = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
        {
            parts.uri = u;
        }
    } else {
        parts.version = Version::HTTP_11;
        if let Ok(u) = path.parse() {
            parts.uri = u;
        }
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(header::HOST, v);
        }
        if upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    Request::from_parts(parts, body)
}

/// What an upstream HTTP connection runs on.
enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<super::pool::Tunnel>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}
