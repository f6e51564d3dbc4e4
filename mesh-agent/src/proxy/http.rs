//! L7 outbound: a captured connection to a service port declared HTTP
//! (`http-*`, `http2-*`, `grpc-*` port names, `appProtocol`, ServiceEntry
//! protocol) is terminated here, in the source pod's agent, and every
//! request is routed on its own: the VirtualService for the service's host
//! (first matching route, weighted destinations), DestinationRule subsets,
//! then an endpoint, reached over HBONE (or directly when it is not
//! meshed). There is no waypoint hop.
//!
//! Responses the agent makes itself carry a plain-text body and an Envoy
//! response flag (`NR`, `NC`, `UH`, `UF`) in `x-mesh-response-flags`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{Error, PodContext, ProxyContext, outbound, socket};
use crate::{
    registry::{Endpoint, Service, ServicePort},
    snapshot::{
        Snapshot,
        compile::{CompiledDestination, RequestView},
    },
};

/// Bodies in both directions: streamed from the peer, or made here.
type Body = BoxBody<Bytes, hyper::Error>;

/// The header carrying the response flag of a response the agent made.
pub const FLAGS_HEADER: &str = "x-mesh-response-flags";

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one captured connection as HTTP until the client closes it.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    snap: Arc<Snapshot>,
    svc: Arc<Service>,
    port: ServicePort,
) {
    let conn = Arc::new(Conn {
        pod,
        ctx,
        snap,
        svc,
        port,
        client: peer,
        upstreams: Mutex::new(HashMap::new()),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.route(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
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
    upstreams: Mutex<HashMap<SocketAddr, Upstream>>,
}

/// A request sender on an upstream connection.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
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

impl Conn {
    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        match self.forward(req).await {
            Ok(r) => r,
            Err(reply) => {
                tracing::debug!(pod = %self.pod.workload.key(), flag = reply.flag, "http: {}", reply.message);
                reply.into_response()
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Body>, LocalReply> {
        let dest = self.decide(&req)?;
        let (svc, port) = self.destination_service(&dest)?;
        let labels = self.subset_labels(&dest)?;
        let ep = svc
            .pick_where(&port, self.client.ip(), |e| {
                labels
                    .iter()
                    .all(|(k, v)| e.labels.get(k.as_str()) == Some(v))
            })
            .ok_or_else(|| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    format!("no healthy upstream for {}", describe(&dest)),
                )
            })?;
        let addr = outbound::endpoint_addr(ep, &port)
            .await
            .map_err(|e| upstream_failure(&e))?;
        // HTTP/2 upstream for ports declared so (and gRPC), or when the
        // client spoke it; HTTP/1.1 otherwise.
        let h2 = matches!(
            port.protocol,
            crate::registry::Protocol::Http2 | crate::registry::Protocol::Grpc
        ) || req.version() == Version::HTTP_2;
        let mut sender = self.upstream(ep, addr, h2).await?;
        let req = prepare(req, h2);
        let result = match &mut sender {
            Upstream::H1(s) => s.send_request(req).await,
            Upstream::H2(s) => s.send_request(req).await,
        };
        match result {
            Ok(resp) => {
                self.upstreams
                    .lock()
                    .expect("upstreams lock")
                    .entry(addr)
                    .or_insert(sender);
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body.boxed()))
            }
            Err(e) => Err(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UC",
                format!("upstream connect error or disconnect/reset before headers: {e}"),
            )),
        }
    }

    /// The destination for `req`: the first VirtualService route that
    /// takes it, then a weighted draw among its destinations; without a
    /// VirtualService, the service itself.
    fn decide(&self, req: &Request<Incoming>) -> Result<CompiledDestination, LocalReply> {
        let vss: Vec<_> = self
            .snap
            .routes
            .virtual_services
            .get(&self.svc.hostname)
            .into_iter()
            .flatten()
            .filter(|vs| vs.for_mesh)
            .collect();
        if vss.is_empty() || vss.iter().all(|vs| vs.http.is_empty()) {
            return Ok(CompiledDestination {
                host: self.svc.hostname.clone(),
                subset: String::new(),
                port: None,
            });
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let view = RequestView {
            path: req.uri().path(),
            query: req.uri().query(),
            method: req.method().as_str(),
            authority,
            headers: req.headers(),
            port: self.port.port,
            source_labels: &self.pod.workload.labels,
            source_namespace: &self.pod.workload.namespace,
        };
        let route = vss
            .iter()
            .flat_map(|vs| vs.http.iter())
            .find(|r| r.takes(&view))
            .ok_or_else(|| LocalReply::new(StatusCode::NOT_FOUND, "NR", "no route matched"))?;
        let i = route
            .pick(fastrand::u32(0..100))
            .filter(|i| *i < route.destinations.len())
            .ok_or_else(|| {
                LocalReply::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "NR",
                    format!(
                        "route {:?} has no destination (redirect and direct responses are not supported yet)",
                        route.name
                    ),
                )
            })?;
        Ok(route.destinations[i].clone())
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
    ) -> Result<Upstream, LocalReply> {
        let cached = self.upstreams.lock().expect("upstreams lock").remove(&addr);
        if let Some(mut u) = cached {
            let ready = match &mut u {
                Upstream::H1(s) => s.ready().await.is_ok(),
                Upstream::H2(s) => s.ready().await.is_ok(),
            };
            if ready {
                return Ok(u);
            }
        }
        let io = self
            .connect(ep, addr)
            .await
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
            Ok(Upstream::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(fail)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, "http: upstream connection ended: {e}");
                }
            });
            Ok(Upstream::H1(sender))
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
fn prepare(req: Request<Incoming>, h2: bool) -> Request<Body> {
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
    strip_hop_by_hop(&mut parts.headers);
    if h2 {
        parts.version = Version::HTTP_2;
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
    Request::from_parts(parts, body.boxed())
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
