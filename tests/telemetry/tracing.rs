//! Tracing across two agents: one request yields one trace of two spans
//! (the source's CLIENT span, the destination's SERVER span as its
//! child) at an OTLP/HTTP collector and at a Zipkin one, decoded from the
//! wire; the application sees the same trace; sampling follows the
//! caller, the percentage, and `x-client-trace-id`.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value,
    trace::v1::span::SpanKind,
};
use prost::Message as _;

use super::*;

const COLLECTOR: &str = "10.255.0.254";

fn mesh_config(_: &std::path::Path) -> String {
    format!(
        "defaultProviders: {{tracing: [otel]}}
extensionProviders:
- name: otel
  opentelemetry: {{service: {COLLECTOR}, port: 4318, http: {{path: /v1/traces}}}}
- name: zipkin
  zipkin: {{service: {COLLECTOR}, port: 9411}}
"
    )
}

/// A span as the test reads it from either format.
#[derive(Debug, Clone)]
struct Got {
    trace: String,
    id: String,
    parent: String,
    name: String,
    kind: &'static str,
    service: String,
    tags: std::collections::BTreeMap<String, String>,
}

fn otlp_spans(dir: &std::path::Path) -> Vec<Got> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if !name.ends_with("_v1_traces") {
            continue;
        }
        let req = ExportTraceServiceRequest::decode(std::fs::read(f.path()).unwrap().as_slice())
            .unwrap_or_else(|e| panic!("{name}: not OTLP protobuf: {e}"));
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: if s.kind == SpanKind::Client as i32 {
                            "CLIENT"
                        } else if s.kind == SpanKind::Server as i32 {
                            "SERVER"
                        } else {
                            "?"
                        },
                        service: service.clone(),
                        tags: s
                            .attributes
                            .iter()
                            .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
                                any_value::Value::StringValue(v) => {
                                    Some((a.key.clone(), v.clone()))
                                }
                                _ => None,
                            })
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

fn zipkin_spans(dir: &std::path::Path) -> Vec<Got> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if !name.ends_with("_api_v2_spans") {
            continue;
        }
        let list: Vec<Value> = serde_json::from_slice(&std::fs::read(f.path()).unwrap())
            .unwrap_or_else(|e| panic!("{name}: not Zipkin JSON: {e}"));
        for s in list {
            let str = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            out.push(Got {
                trace: str("traceId"),
                id: str("id"),
                parent: str("parentId"),
                name: str("name"),
                kind: if s["kind"] == "CLIENT" {
                    "CLIENT"
                } else {
                    "SERVER"
                },
                service: s["localEndpoint"]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                tags: s["tags"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
            });
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The two spans of the request whose URL ends with `path`.
fn pair(spans: &[Got], path: &str) -> Option<(Got, Got)> {
    let of = |kind| {
        spans
            .iter()
            .find(|s| s.kind == kind && s.tags.get("http.url").is_some_and(|u| u.ends_with(path)))
            .cloned()
    };
    Some((of("CLIENT")?, of("SERVER")?))
}

#[test]
fn one_request_through_two_agents_is_one_trace_at_otlp_and_zipkin_collectors() {
    let m = Mesh::start("tel-tracing", &mesh_config, true);
    let fabric = mesh_tests::Pod {
        netns: m.c.fabric.clone(),
        ..m.c.client.clone()
    };
    let (otlp_dir, zipkin_dir) = (m.c.env.dir.join("otlp"), m.c.env.dir.join("zipkin"));
    std::fs::create_dir_all(&otlp_dir).unwrap();
    std::fs::create_dir_all(&zipkin_dir).unwrap();
    let _otlp = fabric.spawn_app_outside_cgroup(
        &m.c.env,
        &[
            "collector",
            &format!("{COLLECTOR}:4318"),
            otlp_dir.to_str().unwrap(),
        ],
    );
    let _zipkin = fabric.spawn_app_outside_cgroup(
        &m.c.env,
        &[
            "collector",
            &format!("{COLLECTOR}:9411"),
            zipkin_dir.to_str().unwrap(),
        ],
    );

    // Every request traced, to the default provider (OTLP).
    m.telemetry(&[telemetry(
        "istio-system/mesh-default",
        json!({"tracing": [{"randomSamplingPercentage": 100.0}]}),
    )]);
    assert_eq!(m.get("/traced", &["x-request-id: trace-req-1"]), 200);
    assert!(
        wait_until(Duration::from_secs(10), || pair(
            &otlp_spans(&otlp_dir),
            "/traced"
        )
        .is_some()),
        "no client and server span at the OTLP collector: {:#?}\n{}",
        otlp_spans(&otlp_dir),
        m.agent_a.log()
    );
    let (client, server) = pair(&otlp_spans(&otlp_dir), "/traced").unwrap();
    assert_eq!(client.trace, server.trace, "one trace");
    assert_eq!(
        server.parent, client.id,
        "the server span is the client's child"
    );
    assert_eq!(client.trace.len(), 32);
    assert_eq!(client.name, "web.default.svc.cluster.local:80/*");
    assert_eq!(client.service, "client.default");
    assert_eq!(server.service, "web.default");
    for (k, v) in [
        ("http.method", "GET"),
        ("http.status_code", "200"),
        ("http.protocol", "HTTP/1.1"),
        (
            "upstream_cluster",
            "outbound|80||web.default.svc.cluster.local",
        ),
        ("istio.canonical_service", "client"),
        ("component", "proxy"),
        ("guid:x-request-id", "trace-req-1"),
        ("response_flags", "-"),
        (
            "peer.identity",
            "spiffe://cluster.local/ns/default/sa/web-sa",
        ),
    ] {
        assert_eq!(
            client.tags.get(k).map(String::as_str),
            Some(v),
            "client {k}: {client:#?}"
        );
    }
    assert!(
        client.tags["node_id"].contains("client.default"),
        "{client:#?}"
    );
    for (k, v) in [
        ("http.status_code", "200"),
        ("upstream_cluster", "inbound|9000||"),
        ("istio.canonical_service", "web"),
        (
            "peer.identity",
            "spiffe://cluster.local/ns/default/sa/client-sa",
        ),
        ("guid:x-request-id", "trace-req-1"),
    ] {
        assert_eq!(
            server.tags.get(k).map(String::as_str),
            Some(v),
            "server {k}: {server:#?}"
        );
    }
    // The application got the trace, with the server span as its parent.
    let seen = m
        .web_app
        .lines()
        .into_iter()
        .find(|l| {
            l["event"] == "http" && l["request"].as_str().is_some_and(|r| r.contains("/traced"))
        })
        .expect("web's log of /traced");
    assert_eq!(
        seen["headers"]["traceparent"],
        format!("00-{}-{}-01", server.trace, server.id).as_str(),
        "{seen}"
    );
    assert_eq!(
        seen["headers"]["x-b3-traceid"],
        server.trace.as_str(),
        "{seen}"
    );

    // Zipkin for this namespace, with a custom tag; the caller's own trace
    // context is continued.
    m.telemetry(&[
        telemetry(
            "istio-system/mesh-default",
            json!({"tracing": [{"randomSamplingPercentage": 100.0}]}),
        ),
        telemetry(
            "default/zipkin",
            json!({"tracing": [{"providers": [{"name": "zipkin"}],
                                "customTags": {"team": {"literal": {"value": "mesh"}},
                                               "debug": {"header": {"name": "x-debug", "defaultValue": "none"}}}}]}),
        ),
    ]);
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let parent = format!("traceparent: 00-{caller_trace}-{caller_span}-01");
    assert_eq!(m.get("/zipkin", &[parent.as_str(), "x-debug: on"]), 200);
    assert!(
        wait_until(Duration::from_secs(10), || pair(
            &zipkin_spans(&zipkin_dir),
            "/zipkin"
        )
        .is_some()),
        "no spans at the Zipkin collector: {:#?}",
        zipkin_spans(&zipkin_dir)
    );
    let (client, server) = pair(&zipkin_spans(&zipkin_dir), "/zipkin").unwrap();
    assert_eq!(
        (client.trace.as_str(), client.parent.as_str()),
        (caller_trace, caller_span)
    );
    assert_eq!(
        (server.trace.as_str(), server.parent.as_str()),
        (caller_trace, client.id.as_str())
    );
    assert_eq!(client.tags.get("team").map(String::as_str), Some("mesh"));
    assert_eq!(client.tags.get("debug").map(String::as_str), Some("on"));
    assert!(
        pair(&otlp_spans(&otlp_dir), "/zipkin").is_none(),
        "the namespace's provider replaced the mesh's"
    );

    // The caller's "not sampled" holds even at 100 %; at 0 %,
    // x-client-trace-id forces a trace and nothing else is traced.
    let unsampled = format!("traceparent: 00-{caller_trace}-{caller_span}-00");
    assert_eq!(m.get("/unsampled", &[unsampled.as_str()]), 200);
    m.telemetry(&[telemetry(
        "istio-system/mesh-default",
        json!({"tracing": [{"randomSamplingPercentage": 0.0}]}),
    )]);
    assert_eq!(m.get("/not-sampled", &[]), 200);
    assert_eq!(m.get("/forced", &["x-client-trace-id: forced-1"]), 200);
    assert!(
        wait_until(Duration::from_secs(10), || pair(
            &otlp_spans(&otlp_dir),
            "/forced"
        )
        .is_some()),
        "x-client-trace-id did not force a trace"
    );
    let all = otlp_spans(&otlp_dir);
    assert!(
        !all.iter().chain(&zipkin_spans(&zipkin_dir)).any(|s| s
            .tags
            .get("http.url")
            .is_some_and(|u| u.ends_with("/not-sampled") || u.ends_with("/unsampled"))),
        "an unsampled request was exported"
    );
    let exported = |a: &Agent| {
        a.metrics()
            .value("mesh_trace_spans_total", &[("result", "exported")])
    };
    assert!(exported(&m.agent_a) >= 3.0 && exported(&m.agent_b) >= 3.0);
}
