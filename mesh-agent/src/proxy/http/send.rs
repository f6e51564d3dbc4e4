//! One attempt of a request: the destination resolved, admitted under its
//! connection pool limits, an endpoint chosen, a connection to it (reused
//! from the pod's upstream pool, else opened over HBONE or directly), the
//! request sent, and the outcome recorded for outlier detection.

use std::{net::SocketAddr, time::Duration};

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    Body, Conn, LocalReply, Served, ServedSlot, metered, retry,
    upstreams::{self, Sender as Upstream},
};
use crate::{
    proxy::{
        Error, cluster,
        destination::Destination,
        upstream::{self, Via},
    },
    registry::Endpoint,
    snapshot::compile::CompiledDestination,
};

/// Why one attempt got no response.
pub(super) struct AttemptError {
    pub reply: LocalReply,
    /// Set when the failure may be retried (depending on the policy).
    pub failure: Option<retry::Failure>,
}

impl From<LocalReply> for AttemptError {
    fn from(reply: LocalReply) -> Self {
        Self {
            reply,
            failure: None,
        }
    }
}

impl Conn {
    /// One attempt: an endpoint of the destination, a connection to it,
    /// the request.
    pub(super) async fn send(
        &self,
        dest: &CompiledDestination,
        req: Request<Body>,
        client_h2: bool,
        served: Option<&ServedSlot>,
    ) -> Result<Response<Body>, AttemptError> {
        let d = Destination::resolve(
            &self.snap,
            &self.ctx.clusters,
            dest,
            self.port.port,
            Some(&self.svc),
        )
        .map_err(|e| LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "NC", e.to_string()))?;
        let (svc, port, policy, cluster) = (&d.service, &d.port, &d.policy, &d.cluster);
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
        let mut admission = cluster.admit(policy, !h2).await.map_err(|o| {
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UO",
                format!("upstream overflow ({o:?}): the DestinationRule's connection pool is full"),
            )
        })?;
        let candidates = d.candidates(self.client.ip());
        let input = cluster::HashInput {
            headers: req.headers(),
            query: req.uri().query(),
            client: crate::proxy::client_address(&self.pod, self.client),
            locality: &self.locality,
            client_labels: &self.pod.workload.labels,
        };
        let pick = cluster
            .pick(
                &candidates,
                policy,
                &input,
                self.dst.ip(),
                Some(&mut admission),
            )
            .ok_or_else(|| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    format!("no healthy upstream for {}", d.describe()),
                )
            })?;
        let ep = pick.endpoint;
        if let Some(slot) = served {
            let mut t = slot.lock().expect("served lock");
            t.served = Some(Served {
                via: Via::to(&self.ctx, &self.pod, ep.workload.as_ref().map(|w| &*w.0)),
                workload: ep.workload.as_ref().map(|w| w.0.clone()),
                service: svc.clone(),
            });
            t.cluster = format!("outbound|{}|{}|{}", port.port, dest.subset, svc.hostname);
            t.upstream = None;
            t.attempts += 1;
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
        let addr = match upstream::endpoint_addr(ep, port).await {
            Ok(a) => a,
            Err(e) => return Err(connect_failure(upstream_failure(&e))),
        };
        if let Some(slot) = served {
            slot.lock().expect("served lock").upstream = Some(addr);
        }
        let (mut sender, uses) = match self.sender(ep, addr, h2, policy.connect_timeout()).await {
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

    /// A ready sender to `addr`: the connection this client used last
    /// time, or a new one (over HBONE when the endpoint is meshed).
    async fn sender(
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
        let workload = ep.workload.as_ref().map(|w| &*w.0);
        let via = Via::to(&self.ctx, &self.pod, workload);
        let connect = upstream::open(&self.pod, &self.ctx, addr, workload, &via);
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

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
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
pub(in crate::proxy) fn prepare(req: Request<Body>, h2: bool) -> Request<Body> {
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
