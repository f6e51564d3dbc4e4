//! Micro-benchmarks of what the destination's agent decides per request
//! or connection: `cargo bench -p mesh-agent --bench policy`.
//!
//! - AuthorizationPolicy evaluation with 1, 100 and 1,000 rules, L7 (a
//!   request) and L4 (a connection), the request matching only the last
//!   rule (the worst case);
//! - JWT verification per algorithm with the key cached (inline JWKS): a
//!   token seen before (the verified-token cache) and first sight of each
//!   token (the signature checked).

use std::{hint::black_box, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::Algorithm;
use mesh_agent::{
    documents::{self as parse, Document},
    policy::{
        authz::{Attributes, HttpAttributes, Policy, WorkloadAuthz},
        jwks::JwksStore,
        jwt::Authenticator,
    },
    workload::Workload,
};
use mesh_tests::jwt::{self as mint, Key};

fn documents(yaml: &str) -> Vec<Document> {
    let mut parsed = parse::Parsed::default();
    parse::parse_file(Path::new("bench.yaml"), yaml.as_bytes(), &mut parsed);
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    parsed.documents
}

fn web() -> Workload {
    let docs = documents(
        "workloads:\n- {name: web, namespace: default, ips: [10.0.0.2], netns: /n, cgroup: /c, labels: {app: web}, node: a}\n",
    );
    match docs.into_iter().next() {
        Some(Document::Workloads(mut w, _)) => w.remove(0),
        _ => panic!("a workload"),
    }
}

/// Who a rule names.
#[derive(Clone, Copy)]
enum By {
    Principal,
    Namespace,
    /// A principal prefix: rules the index cannot narrow.
    PrincipalPrefix,
}

/// One ALLOW policy of `n` rules; rule `i` lets `team-i` in (as `by`
/// says), on its path (L7) or its port (L4).
fn plan(n: usize, l7: bool) -> WorkloadAuthz {
    plan_by(n, l7, By::Principal)
}

fn plan_by(n: usize, l7: bool, by: By) -> WorkloadAuthz {
    let rules: String = (0..n)
        .map(|i| {
            let from = match by {
                By::Principal => format!("{{principals: [cluster.local/ns/team-{i}/sa/app]}}"),
                By::Namespace => format!("{{namespaces: [team-{i}]}}"),
                By::PrincipalPrefix => {
                    format!("{{principals: [\"cluster.local/ns/team-{i}/*\"]}}")
                }
            };
            let to = if l7 {
                format!("{{paths: [\"/team-{i}/*\"], methods: [GET]}}")
            } else {
                format!("{{ports: [\"{}\"]}}", 8000 + i)
            };
            format!("  - from: [{{source: {from}}}]\n    to: [{{operation: {to}}}]\n")
        })
        .collect();
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  rules:\n{rules}"
    );
    let policies: Vec<Arc<Policy>> = documents(&yaml)
        .iter()
        .filter_map(|d| match d {
            Document::Istio(r) => Policy::from_resource(r).map(Arc::new),
            _ => None,
        })
        .collect();
    WorkloadAuthz::for_workload(&policies, &web(), "istio-system")
}

fn authorization(c: &mut Criterion) {
    let headers = http::HeaderMap::new();
    for n in [1usize, 100, 1000] {
        let last = n - 1;
        let principal = format!("cluster.local/ns/team-{last}/sa/app");
        let namespace = format!("team-{last}");
        let path = format!("/team-{last}/items");
        let l7 = plan(n, true);
        let h = HttpAttributes {
            method: "GET",
            authority: "web.default.svc.cluster.local",
            path: &path,
            headers: &headers,
            auth: None,
        };
        let request = Attributes {
            principal: Some(&principal),
            namespace: Some(&namespace),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "10.0.0.1".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            http: Some(&h),
        };
        assert!(l7.decide(&request).allowed);
        c.bench_function(&format!("authz L7: last of {n} rules"), |b| {
            b.iter(|| l7.decide(black_box(&request)).allowed)
        });
        let l4 = plan(n, false);
        let connection = Attributes {
            http: None,
            destination: SocketAddr::new("10.0.0.2".parse().unwrap(), 8000 + last as u16),
            ..request
        };
        assert!(l4.decide(&connection).allowed);
        c.bench_function(&format!("authz L4: last of {n} rules"), |b| {
            b.iter(|| l4.decide(black_box(&connection)).allowed)
        });
        for (by, what) in [
            (By::Namespace, "namespace rules"),
            (By::PrincipalPrefix, "principal-prefix rules (not indexed)"),
        ] {
            let p = plan_by(n, true, by);
            assert!(p.decide(&request).allowed);
            c.bench_function(&format!("authz L7: last of {n} {what}"), |b| {
                b.iter(|| p.decide(black_box(&request)).allowed)
            });
        }
    }
}

fn jwt(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = JwksStore::offline();
    for key in [
        Key::rsa("rs256", Algorithm::RS256),
        Key::rsa("ps256", Algorithm::PS256),
        Key::ec("es256", Algorithm::ES256),
        Key::ec("es384", Algorithm::ES384),
        Key::ed25519("eddsa"),
    ] {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: j, namespace: default}}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwks: '{}'\n    forwardOriginalToken: true\n",
            mint::jwks(&[&key])
        );
        let docs = documents(&yaml);
        let auth = Authenticator::from_resources(
            docs.iter().filter_map(|d| d.istio()),
            &store,
            Duration::from_secs(1),
        );
        let request = |token: &str| {
            http::Request::get("/")
                .header("authorization", format!("Bearer {token}"))
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        // A token seen before: the verified-token cache.
        let token = key.sign(&mint::claims("https://issuer", "user", "web"));
        let mut parts = request(&token);
        assert!(
            rt.block_on(auth.authenticate(&mut parts))
                .unwrap()
                .is_some()
        );
        c.bench_function(&format!("JWT {:?}: a token seen before", key.alg), |b| {
            b.iter(|| {
                rt.block_on(auth.authenticate(black_box(&mut parts)))
                    .is_ok()
            })
        });
        // First sight of each token (twice the cache's size, in turn): the
        // signature is checked every time.
        let mut fresh: Vec<_> = (0..2048)
            .map(|i| {
                let mut c = mint::claims("https://issuer", "user", "web");
                c["jti"] = i.into();
                request(&key.sign(&c))
            })
            .collect();
        let mut next = 0;
        c.bench_function(
            &format!("JWT {:?}: first sight (signature check)", key.alg),
            |b| {
                b.iter(|| {
                    next = (next + 1) % fresh.len();
                    rt.block_on(auth.authenticate(black_box(&mut fresh[next])))
                        .is_ok()
                })
            },
        );
    }
}

criterion_group!(benches, authorization, jwt);
criterion_main!(benches);
