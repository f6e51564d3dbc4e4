//! This hop's span of an HTTP request, for both sides: begun when the
//! request arrives (the caller's trace context continued and our own put
//! in its place, so the next hop is our child), finished when the response
//! is done, with the tags Envoy and Istio put on theirs.

use std::{net::SocketAddr, time::SystemTime};

use http::Request;

use super::ProxyContext;
use crate::{
    telemetry::{
        accesslog::Mode,
        trace::{self, Active, Span, TracePlan},
    },
    workload::Workload,
};

/// A traced request, from its arrival.
pub struct Begun {
    active: Active,
    mode: Mode,
    method: String,
    url: String,
    protocol: &'static str,
    request_id: String,
    user_agent: String,
    custom: Vec<(String, String)>,
}

/// Starts this hop's span of `req` when its workload is traced on side
/// `mode`, and makes it the parent the request carries on.
pub fn begin<B>(
    ctx: &ProxyContext,
    plan: &TracePlan,
    mode: Mode,
    req: &mut Request<B>,
) -> Option<Begun> {
    let active = ctx.tracer.begin(plan, mode, req.headers())?;
    trace::context::inject(req.headers_mut(), &active.ctx);
    let h = req.headers();
    let text = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| text("host"));
    Some(Begun {
        custom: trace::custom_tags(&active.how, h),
        mode,
        method: req.method().as_str().to_owned(),
        url: format!(
            "http://{authority}{}",
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        ),
        protocol: match req.version() {
            http::Version::HTTP_2 => "HTTP/2",
            _ => "HTTP/1.1",
        },
        request_id: text("x-request-id"),
        user_agent: text("user-agent"),
        active,
    })
}

/// How the request ended, for its span.
pub struct Ended<'a> {
    /// The span's name: `<host>:<port>/*`, as Istio names routes.
    pub name: String,
    pub code: u16,
    /// Envoy's response flags, `-` when none.
    pub flags: &'a str,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream_cluster: &'a str,
    pub upstream: Option<SocketAddr>,
    /// The other side: the client (server span) or the upstream (client span).
    pub peer: Option<SocketAddr>,
    /// The other side's SPIFFE ID, when mutual TLS proved it.
    pub peer_identity: Option<&'a str>,
}

/// `service.name` of a workload, as Istio names a proxy's service.
fn service_name(w: &Workload) -> String {
    let app = w.app();
    let app = if app == "unknown" || app.is_empty() {
        w.canonical_service()
    } else {
        app
    };
    format!("{app}.{}", w.namespace)
}

/// Finishes `b`'s span: queued for its provider if the trace is sampled.
pub fn finish(ctx: &ProxyContext, b: Begun, w: &Workload, local: Option<SocketAddr>, e: Ended<'_>) {
    let Begun {
        active,
        mode,
        method,
        url,
        protocol,
        request_id,
        user_agent,
        custom,
    } = b;
    if !active.ctx.sampled || !active.how.report {
        return;
    }
    let mut tags: Vec<(String, String)> = [
        ("component", "proxy".to_owned()),
        (
            "node_id",
            format!(
                "mesh-agent~{}~{}.{}",
                ctx.config.node_name, w.name, w.namespace
            ),
        ),
        ("guid:x-request-id", request_id),
        ("http.method", method),
        ("http.url", url),
        ("http.protocol", protocol.to_owned()),
        ("http.status_code", e.code.to_string()),
        ("user_agent", user_agent),
        ("request_size", e.request_bytes.to_string()),
        ("response_size", e.response_bytes.to_string()),
        ("response_flags", e.flags.to_owned()),
        ("upstream_cluster", e.upstream_cluster.to_owned()),
        ("upstream_cluster.name", e.upstream_cluster.to_owned()),
        ("downstream_cluster", "-".to_owned()),
        ("istio.canonical_service", w.canonical_service().to_owned()),
        (
            "istio.canonical_revision",
            w.canonical_revision().to_owned(),
        ),
        ("istio.namespace", w.namespace.clone()),
        ("istio.cluster_id", ctx.config.cluster_id.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(p) = e.peer {
        tags.push(("peer.address".into(), p.ip().to_string()));
    }
    if let Some(u) = e.upstream {
        tags.push(("upstream_address".into(), u.to_string()));
    }
    if let Some(id) = e.peer_identity {
        tags.push(("peer.identity".into(), id.to_owned()));
    }
    tags.extend(custom);
    let error = e.code == 0 || e.code >= 500;
    let span = Span {
        ctx: active.ctx,
        name: e.name,
        kind: mode,
        start: active.start,
        end: SystemTime::now(),
        service: service_name(w),
        local,
        remote: e.peer,
        tags,
        error,
    };
    ctx.tracer.finish(span, &active.how);
}
