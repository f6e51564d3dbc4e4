//! Sends finished spans to their providers in batches: Zipkin v2 JSON, or
//! OTLP/HTTP protobuf (OpenTelemetry's own message types). One task; a
//! batch is what arrived within a short window, up to a size, per
//! provider. A provider that fails loses that batch (counted): spans are
//! telemetry, not data, and a retry queue would hold memory for a
//! collector that may be gone.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Status, span::SpanKind, status::StatusCode},
};
use prometheus::IntCounterVec;
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;

use super::{
    Span,
    plan::{Protocol, Target},
};
use crate::telemetry::accesslog::Mode;

/// The most spans in one request to a provider.
const BATCH: usize = 512;
/// How long a batch waits for more spans.
const WINDOW: Duration = Duration::from_millis(200);

pub(super) async fn run(
    mut rx: mpsc::Receiver<(Span, Arc<Target>)>,
    counts: IntCounterVec,
    lookup: super::Lookup,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + WINDOW;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        // Grouped by provider (the same Arc while the MeshConfig stays).
        let mut by_target: HashMap<usize, (Arc<Target>, Vec<Span>)> = HashMap::new();
        for (span, target) in batch {
            by_target
                .entry(Arc::as_ptr(&target) as usize)
                .or_insert_with(|| (target.clone(), Vec::new()))
                .1
                .push(span);
        }
        for (_, (target, spans)) in by_target {
            let n = spans.len() as u64;
            let (body, content_type) = match target.protocol {
                Protocol::Zipkin => (zipkin(&spans, target.max_tag_length), "application/json"),
                Protocol::OtlpHttp => (
                    otlp(&spans, target.max_tag_length),
                    "application/x-protobuf",
                ),
            };
            match send(&target, body, content_type, &lookup).await {
                Ok(()) => counts.with_label_values(&["exported"]).inc_by(n),
                Err(e) => {
                    counts.with_label_values(&["failed"]).inc_by(n);
                    tracing::warn!(provider = %target.name, spans = n, "tracing: export failed: {e}");
                }
            }
        }
    }
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn micros(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn endpoint(service: &str, a: Option<SocketAddr>) -> serde_json::Value {
    let mut e = json!({"serviceName": service});
    if let Some(a) = a {
        let ip = if a.is_ipv4() { "ipv4" } else { "ipv6" };
        e[ip] = json!(a.ip().to_string());
        e["port"] = json!(a.port());
    }
    e
}

/// Zipkin v2 JSON: an array of spans (tags cut at `max_tag` bytes).
pub fn zipkin(spans: &[Span], max_tag: usize) -> Vec<u8> {
    let list: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut tags: serde_json::Map<String, serde_json::Value> = s
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), json!(cut(v, max_tag))))
                .collect();
            if s.error {
                tags.insert("error".into(), json!("true"));
            }
            let start = micros(s.start);
            let mut z = json!({
                "traceId": format!("{:032x}", s.ctx.trace_id),
                "id": format!("{:016x}", s.ctx.span_id),
                "name": s.name,
                "kind": match s.kind { Mode::Client => "CLIENT", Mode::Server => "SERVER" },
                "timestamp": start,
                "duration": micros(s.end).saturating_sub(start).max(1),
                "localEndpoint": endpoint(&s.service, s.local),
                "tags": tags,
            });
            if let Some(p) = s.ctx.parent_id {
                z["parentId"] = json!(format!("{p:016x}"));
            }
            if s.remote.is_some() {
                z["remoteEndpoint"] = endpoint("", s.remote);
            }
            z
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_owned())),
        }),
        ..Default::default()
    }
}

/// OTLP `ExportTraceServiceRequest`, one resource per service.
pub fn otlp(spans: &[Span], max_tag: usize) -> Vec<u8> {
    let mut by_service: std::collections::BTreeMap<&str, Vec<&Span>> = Default::default();
    for s in spans {
        by_service.entry(&s.service).or_default().push(s);
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mesh-agent".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans
                    .into_iter()
                    .map(|s| opentelemetry_proto::tonic::trace::v1::Span {
                        trace_id: s.ctx.trace_id.to_be_bytes().to_vec(),
                        span_id: s.ctx.span_id.to_be_bytes().to_vec(),
                        trace_state: s.ctx.trace_state.clone().unwrap_or_default(),
                        parent_span_id: s
                            .ctx
                            .parent_id
                            .map(|p| p.to_be_bytes().to_vec())
                            .unwrap_or_default(),
                        flags: u32::from(s.ctx.sampled),
                        name: s.name.clone(),
                        kind: i32::from(match s.kind {
                            Mode::Client => SpanKind::Client,
                            Mode::Server => SpanKind::Server,
                        }),
                        start_time_unix_nano: nanos(s.start),
                        end_time_unix_nano: nanos(s.end),
                        attributes: s.tags.iter().map(|(k, v)| kv(k, cut(v, max_tag))).collect(),
                        status: Some(Status {
                            code: i32::from(if s.error {
                                StatusCode::Error
                            } else {
                                StatusCode::Unset
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }.encode_to_vec()
}

/// Where a provider's `service` is: an address, a Service of the mesh (a
/// ready endpoint), or a DNS name.
async fn address(t: &Target, lookup: &super::Lookup) -> Result<SocketAddr, String> {
    if let Ok(ip) = t.service.parse() {
        return Ok(SocketAddr::new(ip, t.port));
    }
    if let Some(a) = lookup(&t.service, t.port) {
        return Ok(a);
    }
    tokio::net::lookup_host((t.service.as_str(), t.port))
        .await
        .map_err(|e| format!("resolving {}: {e}", t.service))?
        .next()
        .ok_or_else(|| format!("{} has no address", t.service))
}

async fn send(
    t: &Target,
    body: Vec<u8>,
    content_type: &str,
    lookup: &super::Lookup,
) -> Result<(), String> {
    let post = async {
        let addr = address(t, lookup).await?;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = http::Request::post(&t.path)
            .header(http::header::HOST, format!("{}:{}", t.service, t.port))
            .header(http::header::CONTENT_TYPE, content_type);
        for (k, v) in &t.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{addr}{}: {status}", t.path))
        }
    };
    tokio::time::timeout(t.timeout, post)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", t.timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::SpanContext;

    fn span() -> Span {
        let start = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        Span {
            ctx: SpanContext {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x00f067aa0ba902b7,
                parent_id: Some(0x1111),
                sampled: true,
                trace_state: Some("a=b".into()),
            },
            name: "web.default.svc.cluster.local:80/*".into(),
            kind: Mode::Client,
            start,
            end: start + Duration::from_micros(1500),
            service: "client.default".into(),
            local: Some("10.0.0.1:1234".parse().unwrap()),
            remote: Some("10.0.0.2:80".parse().unwrap()),
            tags: vec![("http.url".into(), "x".repeat(300))],
            error: true,
        }
    }

    #[test]
    fn zipkin_json_has_v2_fields_and_cut_tags() {
        let v: serde_json::Value = serde_json::from_slice(&zipkin(&[span()], 256)).unwrap();
        let s = &v[0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["id"], "00f067aa0ba902b7");
        assert_eq!(s["parentId"], "0000000000001111");
        assert_eq!(
            (s["kind"].as_str(), s["duration"].as_u64()),
            (Some("CLIENT"), Some(1500))
        );
        assert_eq!(s["timestamp"], 1_700_000_000_000_000u64);
        assert_eq!(s["localEndpoint"]["serviceName"], "client.default");
        assert_eq!(s["remoteEndpoint"]["ipv4"], "10.0.0.2");
        assert_eq!(s["tags"]["http.url"].as_str().unwrap().len(), 256);
        assert_eq!(s["tags"]["error"], "true");
    }

    #[test]
    fn otlp_round_trips_through_the_proto_types() {
        let req = ExportTraceServiceRequest::decode(otlp(&[span()], 256).as_slice()).unwrap();
        let rs = &req.resource_spans[0];
        let s = &rs.scope_spans[0].spans[0];
        assert_eq!(
            s.trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
        );
        assert_eq!(s.parent_span_id, 0x1111u64.to_be_bytes());
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(s.trace_state, "a=b");
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 1_500_000);
        assert_eq!(s.status.as_ref().unwrap().code, StatusCode::Error as i32);
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
    }
}
