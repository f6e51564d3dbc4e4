//! Micro-benchmarks of what the L7 path decides per request:
//! `cargo bench -p mesh-agent --bench decisions` (AYA_BUILD_SKIP=1 is
//! fine: no eBPF involved).
//!
//! - route matching: a request that only the last of 1,000 VirtualService
//!   routes takes (the worst case of first-match-wins);
//! - endpoint selection among 100 endpoints, per load-balancing algorithm;
//! - reading the server name from a TLS ClientHello (tls routes).

use std::{collections::BTreeMap, hint::black_box, net::IpAddr, path::Path, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_agent::{
    documents::{self as parse, Document},
    istio::{
        Resource,
        networking::{
            ConsistentHashLb, DestinationRule, LoadBalancerSettings, SimpleLb, TrafficPolicy,
        },
    },
    proxy::cluster::{Cluster, HashInput, Policy},
    registry::{Endpoint, Locality},
    snapshot::compile::{RequestView, Routes},
};

fn routes(n: usize) -> Routes {
    let http: String = (0..n)
        .map(|i| {
            format!(
                "    - match: [{{uri: {{prefix: /svc-{i}/}}, headers: {{x-tenant: {{exact: t{i}}}}}}}]\n      \
                 route: [{{destination: {{host: web, subset: v{}}}}}]\n",
                i % 3
            )
        })
        .collect();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  hosts: [web]\n  http:\n{http}"
    );
    let mut parsed = parse::Parsed::default();
    parse::parse_file(Path::new("bench.yaml"), yaml.as_bytes(), &mut parsed);
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let resources: Vec<Arc<Resource>> = parsed
        .documents
        .into_iter()
        .filter_map(|d| match d {
            Document::Istio(r) => Some(Arc::new(r)),
            _ => None,
        })
        .collect();
    Routes::new(&resources, "cluster.local")
}

fn route_matching(c: &mut Criterion) {
    let routes = routes(1000);
    let vs = routes.virtual_services_for("web.default.svc.cluster.local");
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", "t999".parse().unwrap());
    let labels = BTreeMap::new();
    let view = RequestView {
        path: "/svc-999/items",
        query: None,
        method: "GET",
        authority: "web",
        headers: &headers,
        port: 80,
        source_labels: &labels,
        source_namespace: "default",
    };
    c.bench_function("route: last of 1,000 http routes", |b| {
        b.iter(|| {
            vs.iter()
                .flat_map(|v| v.http.iter())
                .position(|r| r.takes(black_box(&view)))
        })
    });
}

fn endpoints(n: u8) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint::at(Some(IpAddr::from([10, 1, 0, i])), None))
        .collect()
}

fn endpoint_selection(c: &mut Criterion) {
    let eps = endpoints(100);
    let candidates: Vec<&Endpoint> = eps.iter().collect();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", "user-42".parse().unwrap());
    let labels = BTreeMap::new();
    let locality = Locality::default();
    let input = HashInput {
        headers: &headers,
        query: None,
        client: IpAddr::from([10, 0, 0, 1]),
        locality: &locality,
        client_labels: &labels,
    };
    let lb = |simple, hash: Option<ConsistentHashLb>| DestinationRule {
        host: "web".into(),
        traffic_policy: Some(TrafficPolicy {
            load_balancer: Some(LoadBalancerSettings {
                simple,
                consistent_hash: hash,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let header = |maglev: bool| ConsistentHashLb {
        http_header_name: "x-user".into(),
        maglev: maglev.then(Default::default),
        ..Default::default()
    };
    let cases = [
        ("round robin", lb(Some(SimpleLb::RoundRobin), None)),
        ("random", lb(Some(SimpleLb::Random), None)),
        ("least request", lb(Some(SimpleLb::LeastRequest), None)),
        ("ring hash on a header", lb(None, Some(header(false)))),
        ("maglev on a header", lb(None, Some(header(true)))),
    ];
    for (name, dr) in &cases {
        let policy = Policy::of(Some(dr), "", 80);
        let cluster = Cluster::default();
        c.bench_function(&format!("endpoint of 100: {name}"), |b| {
            b.iter(|| {
                cluster
                    .pick(
                        &candidates,
                        &policy,
                        black_box(&input),
                        IpAddr::from([0, 0, 0, 0]),
                        None,
                    )
                    .map(|p| p.endpoint.address)
            })
        });
    }
}

fn client_hello(c: &mut Criterion) {
    // A real ClientHello, as rustls writes it (TLS 1.3, its extensions).
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut rec = Vec::new();
    conn.write_tls(&mut rec).unwrap();
    assert_eq!(
        mesh_agent::proxy::sniff::parse_sni(&rec).as_deref(),
        Some("api.example.com")
    );
    c.bench_function("SNI from a ClientHello", |b| {
        b.iter(|| mesh_agent::proxy::sniff::parse_sni(black_box(&rec)))
    });
}

/// What every HTTP/1.1 request costs before routing: parsing its head (what
/// hyper does, with httparse) and the agent's own first-bytes check.
fn request_head(c: &mut Criterion) {
    let head = b"GET /api/v1/reviews/42?page=2 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\n\
User-Agent: wrk/4.2\r\nAccept: */*\r\nAccept-Encoding: gzip\r\nx-request-id: 0b7c3b9e-5e7a-4b8e-9d51-8f1c2a6b7d3e\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nend-user: jason\r\n\
x-canary: 1\r\nCookie: session=abc123; theme=dark\r\n\r\n";
    c.bench_function("HTTP/1.1 request head, 10 headers (httparse)", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(black_box(head)).unwrap().is_complete()
        })
    });
    c.bench_function("is it HTTP? (first bytes of a connection)", |b| {
        b.iter(|| mesh_agent::proxy::sniff::is_http(black_box(head)))
    });
}

criterion_group!(
    benches,
    route_matching,
    endpoint_selection,
    client_hello,
    request_head
);
criterion_main!(benches);
