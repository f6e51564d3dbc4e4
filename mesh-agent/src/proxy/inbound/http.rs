//! Inbound HTTP: a connection to a workload whose policies need the
//! request is served as HTTP/1.1 or HTTP/2 by the destination's agent,
//! and every request is decided on its own before it reaches the
//! application:
//!
//! 1. RequestAuthentication: a token that fails gets `401` (flag `UAEX`);
//! 2. AuthorizationPolicy, with the verified peer identity, the request
//!    and its token: a denial gets `403` `RBAC: access denied` (flag
//!    `RBAC`); gRPC clients get the same as `grpc-status` 16 and 7;
//! 3. the request goes to the application over one connection (HTTP/1.1
//!    or HTTP/2, as the client spoke), with the token removed unless the
//!    rule forwards it and the rule's claim headers added.
//!
//! Each request is counted in Istio's request metrics with reporter
//! `destination`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Arrival,
    authorize::{Peer, RequestInfo},
};
use crate::{
    policy::{
        authz::{HttpAttributes, matchers::normalize_path},
        ext_authz,
        rate_limit::{Admit, RequestFacts},
    },
    proxy::{
        ProxyContext,
        app_stream::AppStream,
        http::{
            Body, FLAGS_HEADER,
            drain::serve_http,
            full,
            metered::{self, Metered},
            send::prepare,
        },
    },
    registry::protocol::Protocol,
    snapshot::InboundPolicy,
    telemetry::{
        accesslog::{HttpRecord, Mode, Record, Resolved},
        metrics::RequestRecorder,
    },
};

/// The body Envoy's RBAC filter answers a denied request with.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Serves one inbound connection as HTTP until either side closes it.
pub async fn serve<C>(arrival: Arc<Arrival>, client: C, app: AppStream, ctx: Arc<ProxyContext>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (driver, driven) = tokio::sync::oneshot::channel::<AppDriver>();
    let _listed = arrival.list(&ctx, "http", None);
    let conn = Arc::new(Conn {
        peer: arrival.peer(),
        recorder: arrival.with_labels(&ctx, RequestRecorder::new),
        policy: std::sync::Mutex::new((arrival.snap.version, arrival.policy.clone())),
        arrival,
        ctx,
        app: tokio::sync::Mutex::new(App::Idle(Some(app))),
        driver: std::sync::Mutex::new(Some(driver)),
    });
    let (draining, header_timeout) = (
        conn.ctx.draining.clone(),
        conn.ctx.config.request_header_timeout,
    );
    let served = async {
        let handle = move |req| conn.clone().handle(req);
        if let Err(e) = serve_http(client, &draining, header_timeout, handle).await {
            tracing::debug!("inbound http: connection ended: {e}");
        }
    };
    // An HTTP/1.1 application connection is driven in this task, beside
    // the client's: one request at a time, its I/O wakes the task that
    // waits for the response rather than another one. It ends once the
    // client's side is done and drops its sender.
    let app_side = async {
        if let Ok(d) = driven.await {
            d.await
        }
    };
    tokio::join!(served, app_side);
}

/// What drives the application connection (hyper's client connection).
type AppDriver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The connection to the application, opened before the first request
/// and spoken as the client speaks.
enum App {
    Idle(Option<AppStream>),
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

struct Conn {
    arrival: Arc<Arrival>,
    ctx: Arc<ProxyContext>,
    peer: Peer,
    /// The workload's policy and the snapshot version it is from: looked
    /// up again only when the configuration changed.
    policy: std::sync::Mutex<(u64, InboundPolicy)>,
    app: tokio::sync::Mutex<App>,
    /// The connection's request series (its labels are fixed).
    recorder: RequestRecorder,
    /// Where the application connection's driver goes, once opened.
    driver: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<AppDriver>>>,
}

/// A response the agent makes itself.
struct LocalReply {
    status: StatusCode,
    flag: &'static str,
    message: String,
    /// More headers (an external authorizer's on a denial).
    headers: Vec<(http::HeaderName, HeaderValue)>,
    /// `message` is the body as it is (an external authorizer's), not a
    /// line of text.
    raw_body: bool,
}

impl LocalReply {
    fn new(status: StatusCode, flag: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            flag,
            message: message.into(),
            headers: vec![],
            raw_body: false,
        }
    }

    /// The reply, as a gRPC client expects it when `grpc` (HTTP 200 with
    /// `grpc-status`, trailers-only, as Envoy maps local replies).
    fn into_response(self, grpc: bool) -> Response<Body> {
        let mut r = if grpc {
            let mut r = Response::new(full(Bytes::new()));
            let code = match self.status {
                StatusCode::UNAUTHORIZED => "16",
                StatusCode::FORBIDDEN => "7",
                StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::BAD_GATEWAY
                | StatusCode::GATEWAY_TIMEOUT => "14",
                _ => "2",
            };
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(code));
            if let Ok(v) = HeaderValue::from_str(&self.message) {
                h.insert("grpc-message", v);
            }
            r
        } else if self.raw_body {
            let mut r = Response::new(full(self.message));
            *r.status_mut() = self.status;
            r
        } else {
            let mut r = Response::new(full(format!("{}\n", self.message)));
            *r.status_mut() = self.status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        };
        for (k, v) in self.headers {
            r.headers_mut().insert(k, v);
        }
        r.headers_mut()
            .insert(FLAGS_HEADER, HeaderValue::from_static(self.flag));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mesh\", error=\"invalid_token\""),
            );
        }
        r
    }
}

impl Conn {
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let h2 = req.version() == Version::HTTP_2;
        let client_upgrade = crate::proxy::http::client_upgrade(&mut req, h2);
        crate::proxy::http::actions::ensure_request_id(req.headers_mut());
        // The policy in force now, not when the connection opened: a
        // change applies to the next request.
        let policy = self.current_policy();
        let span = crate::proxy::spans::begin(&self.ctx, &policy.tracing, Mode::Server, &mut req);
        let log = self
            .ctx
            .access_log
            .wants(&policy.access_logging, Mode::Server)
            .map(|to| {
                let mut r = self.arrival.log_record(std::time::SystemTime::now());
                r.http = Some(Box::new(HttpRecord::of_request(&req)));
                r.upstream_host = Some(self.arrival.dst);
                r.route_name = "default".into();
                (to, r)
            });
        let request_bytes = Arc::new(AtomicU64::new(0));
        let resp = match self
            .decide_and_send(req, &policy, h2, client_upgrade, &request_bytes)
            .await
        {
            Ok(r) => r,
            Err(reply) => reply.into_response(grpc),
        };
        let log = log.map(|(to, mut r)| {
            if let Some(h) = &mut r.http {
                h.response_headers = resp.headers().clone();
            }
            (to, r)
        });
        self.metered(resp, grpc, started, request_bytes, log, span)
    }

    async fn decide_and_send(
        &self,
        req: Request<Incoming>,
        policy: &InboundPolicy,
        h2: bool,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        request_bytes: &Arc<AtomicU64>,
    ) -> Result<Response<Body>, LocalReply> {
        let (mut parts, body) = req.into_parts();
        // Policy sees the normalized path, and so does the application:
        // nothing it routes on can differ from what was decided. Before the
        // rate limits too, as Envoy normalizes before any filter: `/./x`
        // must not escape a limit on `/x`.
        let authority = one_authority(&parts)?;
        let path = normalize_path(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        if parts.uri.path() != path {
            let pq = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut u = parts.uri.clone().into_parts();
            u.path_and_query = pq.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(u) {
                parts.uri = uri;
            }
        }
        // Local rate limits first, as Istio inserts the filter first.
        let port = self.arrival.dst.port();
        let mut not_enforced_headers = Vec::new();
        let facts = RequestFacts {
            method: parts.method.as_str(),
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            authority: &authority,
            headers: &parts.headers,
            remote: self.arrival.peer.ip(),
            port,
        };
        for l in policy.request_limits(port) {
            match l.admit(&l.limit.request_descriptors(&facts)) {
                Admit::Yes => {}
                Admit::OverNotEnforced => {
                    self.ctx
                        .metrics
                        .rate_limited("requests", &l.filter, "over_not_enforced");
                    not_enforced_headers.extend(l.limit.request_headers_not_enforced.iter());
                }
                Admit::Refused => {
                    self.ctx
                        .metrics
                        .rate_limited("requests", &l.filter, "refused");
                    let status = StatusCode::from_u16(l.limit.status)
                        .unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                    let mut reply = LocalReply::new(status, "RL", "local_rate_limited");
                    reply.headers = l.limit.response_headers.clone();
                    return Err(reply);
                }
            }
        }
        for (k, v) in not_enforced_headers {
            parts.headers.append(k.clone(), v.clone());
        }
        let auth = match policy.request_authentication.authenticate(&mut parts).await {
            Ok(a) => a,
            Err(rejected) => {
                self.ctx.metrics.jwt_rejected(rejected.reason());
                tracing::debug!(pod = %self.arrival.pod.workload.key(), peer = %self.arrival.peer, "jwt: {rejected}");
                return Err(LocalReply::new(
                    StatusCode::UNAUTHORIZED,
                    "UAEX",
                    rejected.to_string(),
                ));
            }
        };
        let downstream = self
            .custom(policy, &mut parts, &authority, &path, auth.as_deref())
            .await?;
        let h = HttpAttributes {
            method: parts.method.as_str(),
            authority: &authority,
            path: &path,
            headers: &parts.headers,
            auth: auth.as_deref(),
        };
        let attrs = self.arrival.attributes(&self.peer, Some(&h));
        let verdict = policy.authorization.decide(&attrs);
        let info = RequestInfo {
            method: parts.method.as_str(),
            host: &authority,
            path: &path,
        };
        if !self
            .arrival
            .record(&self.ctx, &self.peer, &verdict, Some(&info))
        {
            return Err(LocalReply::new(StatusCode::FORBIDDEN, "RBAC", DENIED_BODY));
        }
        let body = Metered::counting(body.boxed(), request_bytes.clone()).boxed();
        // The application speaks what its port declares (HTTP/1.1 for
        // `http`, HTTP/2 for `http2` and `grpc`), else what the client
        // spoke, as Envoy's inbound clusters do.
        let app_h2 = match self
            .arrival
            .policy
            .port_protocols
            .get(&self.arrival.dst.port())
        {
            Some(Protocol::Http) => false,
            Some(Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb) => true,
            _ => h2,
        };
        let req = prepare(Request::from_parts(parts, body), app_h2);
        let mut resp = self.send(req, app_h2).await?;
        if let Some(client) = client_upgrade
            && !app_h2
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            let app = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(a)) = (client.await, app.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(a))
                            .await;
                }
            });
        }
        let mut resp = resp.map(|b| b.boxed());
        for (k, v) in downstream {
            resp.headers_mut().append(k, v);
        }
        Ok(resp)
    }

    /// The workload's policy in the snapshot in force.
    fn current_policy(&self) -> InboundPolicy {
        let snap = self.ctx.store.load();
        let mut p = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        if p.0 != snap.version {
            *p = (
                snap.version,
                snap.inbound_policy(&self.arrival.pod.workload),
            );
        }
        p.1.clone()
    }

    /// The CUSTOM action: asks the external authorizer when a CUSTOM
    /// policy matches; the headers for the response when it allows.
    async fn custom(
        &self,
        policy: &InboundPolicy,
        parts: &mut http::request::Parts,
        authority: &str,
        path: &str,
        auth: Option<&crate::policy::jwt::Authenticated>,
    ) -> Result<Vec<(http::HeaderName, HeaderValue)>, LocalReply> {
        let matched = {
            let h = HttpAttributes {
                method: parts.method.as_str(),
                authority,
                path,
                headers: &parts.headers,
                auth,
            };
            let attrs = self.arrival.attributes(&self.peer, Some(&h));
            policy
                .authorization
                .custom(&attrs)
                .map(|p| (p.id.clone(), p.provider.clone().unwrap_or_default()))
        };
        let Some((id, provider)) = matched else {
            return Ok(vec![]);
        };
        let info = RequestInfo {
            method: parts.method.as_str(),
            host: authority,
            path,
        };
        let deny = |status: StatusCode, message: String| {
            self.arrival
                .record_custom(&self.ctx, &self.peer, &id, false, Some(&info));
            LocalReply::new(status, "UAEX", message)
        };
        let mesh = self.ctx.mesh.load_full();
        let Some(p) = mesh.http_provider(&provider) else {
            tracing::warn!(policy = %id, %provider, "CUSTOM: no envoyExtAuthzHttp provider of that name in --mesh-config; denying");
            return Err(deny(
                StatusCode::FORBIDDEN,
                format!("external authorization provider {provider:?} is not configured"),
            ));
        };
        let registry = self.ctx.store.load();
        match p.check(parts, authority, &registry.registry).await {
            ext_authz::Outcome::Allow {
                upstream,
                downstream,
            } => {
                self.arrival
                    .record_custom(&self.ctx, &self.peer, &id, true, Some(&info));
                for (k, v) in upstream {
                    parts.headers.insert(k, v);
                }
                Ok(downstream)
            }
            ext_authz::Outcome::Deny {
                status,
                headers,
                body,
            } => {
                let mut reply = deny(status, String::from_utf8_lossy(&body).into_owned());
                reply.headers = headers;
                reply.raw_body = true;
                Err(reply)
            }
        }
    }

    /// Sends to the application, opening its connection as the client
    /// speaks on the first request.
    async fn send(&self, req: Request<Body>, h2: bool) -> Result<Response<Incoming>, LocalReply> {
        let failed = |e: String| {
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UC",
                format!("upstream connect error or disconnect/reset before headers: {e}"),
            )
        };
        let mut app = self.app.lock().await;
        if let App::Idle(stream) = &mut *app {
            let Some(stream) = stream.take() else {
                return Err(failed("the application connection is gone".into()));
            };
            let io = TokioIo::new(stream);
            *app = if h2 {
                let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                // Spawned: its streams are many, and a task of its own
                // lets them run beside the client's connection.
                tokio::spawn(c);
                App::H2(s)
            } else {
                let (s, c) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                self.drive(Box::pin(async move {
                    let _ = c.with_upgrades().await;
                }));
                App::H1(s)
            };
        }
        let sent = match &mut *app {
            App::H1(s) => {
                s.ready().await.map_err(|e| failed(e.to_string()))?;
                let f = s.send_request(req);
                drop(app);
                f.await
            }
            App::H2(s) => {
                let mut s = s.clone();
                drop(app);
                s.ready().await.map_err(|e| failed(e.to_string()))?;
                s.send_request(req).await
            }
            App::Idle(_) => unreachable!("opened above"),
        };
        sent.map_err(|e| failed(e.to_string()))
    }

    /// Hands the application connection's driver to the connection's
    /// task (spawned instead if that task no longer takes it).
    fn drive(&self, d: AppDriver) {
        let slot = self.driver.lock().unwrap_or_else(|e| e.into_inner()).take();
        match slot {
            Some(tx) => {
                if let Err(d) = tx.send(d) {
                    tokio::spawn(d);
                }
            }
            None => {
                tokio::spawn(d);
            }
        }
    }

    /// Records the request's metrics once its response body is done.
    fn metered(
        self: Arc<Self>,
        resp: Response<Body>,
        grpc: bool,
        started: Instant,
        request_bytes: Arc<AtomicU64>,
        log: Option<(Arc<Resolved>, Record)>,
        span: Option<crate::proxy::spans::Begun>,
    ) -> Response<Body> {
        metered::when_done(resp, move |f| {
            let outcome = f.outcome(grpc, started, request_bytes.load(Ordering::Relaxed));
            if let Some(b) = span {
                let (a, w) = (&self.arrival, &self.arrival.pod.workload);
                let identity = a.identity.as_ref().map(|i| i.to_string());
                crate::proxy::spans::finish(
                    &self.ctx,
                    b,
                    w,
                    Some(a.dst),
                    crate::proxy::spans::Ended {
                        name: format!(
                            "{}.{}.svc.{}:{}/*",
                            w.canonical_service(),
                            w.namespace,
                            self.ctx.config.cluster_domain,
                            a.dst.port()
                        ),
                        code: f.code,
                        flags: &f.flags,
                        request_bytes: outcome.request_bytes,
                        response_bytes: f.response_bytes,
                        upstream_cluster: &format!("inbound|{}||", a.dst.port()),
                        upstream: Some(a.dst),
                        peer: Some(a.peer),
                        peer_identity: identity.as_deref(),
                    },
                );
            }
            if let Some((to, mut r)) = log {
                if let Some(h) = &mut r.http {
                    h.code = f.code;
                    h.grpc_status = (f.grpc_status != "-").then(|| f.grpc_status.clone());
                    h.attempts = 1;
                }
                if f.flags != "-" {
                    r.flags = f.flags.clone();
                }
                r.bytes_received = outcome.request_bytes;
                r.bytes_sent = f.response_bytes;
                r.duration = outcome.duration;
                self.ctx.access_log.log(r, to);
            }
            self.ctx.metrics.request_done_on(&self.recorder, &outcome);
        })
    }
}

/// The request's authority: the URI's or the one `Host` header; a request
/// naming two (an absolute URI and another Host, or two Hosts) is refused,
/// so that policy decides on the name the application serves.
fn one_authority(parts: &http::request::Parts) -> Result<String, LocalReply> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next().map(|h| h.to_str().unwrap_or_default());
    let bad = |why: &str| LocalReply::new(StatusCode::BAD_REQUEST, "DPE", why.to_owned());
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    match (parts.uri.authority().map(|a| a.as_str()), host) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
            Err(bad("the request's authority and its Host header differ"))
        }
        (Some(a), _) => Ok(a.to_owned()),
        (None, Some(h)) => Ok(h.to_owned()),
        (None, None) => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, hosts: &[&str]) -> http::request::Parts {
        let mut b = Request::get(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_request_names_one_authority() {
        assert_eq!(
            one_authority(&parts("/x", &["web:80"])).ok().as_deref(),
            Some("web:80")
        );
        assert_eq!(
            one_authority(&parts("http://web:80/x", &["WEB:80"]))
                .ok()
                .as_deref(),
            Some("web:80")
        );
        assert_eq!(
            one_authority(&parts("http://web/x", &[])).ok().as_deref(),
            Some("web")
        );
        for (uri, hosts) in [
            ("http://allowed.example/admin", &["secret.internal"][..]),
            ("/x", &["a", "b"][..]),
        ] {
            let e = one_authority(&parts(uri, hosts)).expect_err("refused");
            assert_eq!((e.status, e.flag), (StatusCode::BAD_REQUEST, "DPE"));
        }
    }
}
