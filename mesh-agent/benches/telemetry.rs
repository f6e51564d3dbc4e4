//! Micro-benchmarks of what telemetry costs per request:
//! `cargo bench -p mesh-agent --bench telemetry`.
//!
//! - a span: the trace context read from a request and this hop's written
//!   back (W3C and B3), and a batch of 100 spans encoded as Zipkin JSON
//!   and as OTLP protobuf;
//! - an access-log record: Istio's default text line, its JSON labels, and
//!   a CEL filter evaluated on it.

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use mesh_agent::telemetry::{
    accesslog::{Format, HttpRecord, Mode, Record, filter::Filter},
    trace::{Span, context, export},
};

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    h.insert("user-agent", "curl/8.5".parse().unwrap());
    h.insert(
        "x-request-id",
        "6c1b8a3e-2b4f-4d0e-9c55-0d6a1c7e2f10".parse().unwrap(),
    );
    h
}

fn span() -> Span {
    let start = std::time::SystemTime::now();
    Span {
        ctx: context::child(&request_headers(), 100.0),
        name: "web.default.svc.cluster.local:80/*".into(),
        kind: Mode::Client,
        start,
        end: start + Duration::from_millis(3),
        service: "client.default".into(),
        local: Some("10.10.1.2:40000".parse().unwrap()),
        remote: Some("10.10.2.2:9000".parse().unwrap()),
        tags: [
            ("http.method", "GET"),
            ("http.url", "http://web.default:80/api/items?page=2"),
            ("http.protocol", "HTTP/1.1"),
            ("http.status_code", "200"),
            (
                "upstream_cluster",
                "outbound|80||web.default.svc.cluster.local",
            ),
            ("node_id", "mesh-agent~node-a~client.default"),
            ("guid:x-request-id", "6c1b8a3e-2b4f-4d0e-9c55-0d6a1c7e2f10"),
            ("istio.canonical_service", "client"),
            ("peer.identity", "spiffe://cluster.local/ns/default/sa/web"),
            ("component", "proxy"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        error: false,
    }
}

fn record() -> Record {
    let mut r = Record::new(
        Mode::Client,
        std::time::SystemTime::now(),
        "10.10.1.2:40000".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    let req = http::Request::get("http://web.default:80/api/items?page=2")
        .header("user-agent", "curl/8.5")
        .header("x-request-id", "6c1b8a3e-2b4f-4d0e-9c55-0d6a1c7e2f10")
        .body(())
        .unwrap();
    let mut h = HttpRecord::of_request(&req);
    h.code = 200;
    r.http = Some(Box::new(h));
    r.bytes_sent = 512;
    r.duration = Duration::from_millis(3);
    r.upstream_host = Some("10.10.2.2:9000".parse().unwrap());
    r.upstream_cluster = "outbound|80||web.default.svc.cluster.local".into();
    r
}

fn spans(c: &mut Criterion) {
    let headers = request_headers();
    c.bench_function("trace: context read and written back", |b| {
        b.iter(|| {
            let ctx = context::child(black_box(&headers), 100.0);
            let mut out = headers.clone();
            context::inject(&mut out, &ctx);
            black_box(out)
        })
    });
    let batch: Vec<Span> = (0..100).map(|_| span()).collect();
    c.bench_function("trace: Zipkin JSON, a batch of 100 spans", |b| {
        b.iter(|| black_box(export::zipkin(black_box(&batch), 256)))
    });
    c.bench_function("trace: OTLP protobuf, a batch of 100 spans", |b| {
        b.iter(|| black_box(export::otlp(black_box(&batch), 256)))
    });
}

fn access_log(c: &mut Criterion) {
    let r = record();
    let text = Format::istio_default(false);
    let json = Format::istio_default(true);
    let filter =
        Filter::compile("response.code >= 400 || request.headers['x-debug'] == 'true'").unwrap();
    c.bench_function("access log: Istio's text line", |b| {
        b.iter(|| black_box(text.render(black_box(&r), false)))
    });
    c.bench_function("access log: Istio's JSON labels", |b| {
        b.iter(|| black_box(json.render(black_box(&r), false)))
    });
    c.bench_function("access log: a CEL filter", |b| {
        b.iter(|| black_box(filter.accepts(black_box(&r))))
    });
}

criterion_group!(benches, spans, access_log);
criterion_main!(benches);
