//! Golden tests for configuration validation: Istio YAML in the shapes of
//! Istio's published examples validates clean; broken files give exactly
//! the messages in their `.expected` file (file, line, resource, field).
//!
//! `MESH_BLESS=1 cargo test -p mesh-agent --test golden` rewrites the
//! `.expected` files; review the diff before committing it.

mod common;

use std::path::{Path, PathBuf};

use mesh_agent::{
    documents::{self as parse, check},
    istio::Severity,
};

fn corpus(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir)
}

/// Problems as `validate` prints them, with paths relative to the corpus.
fn render(problems: &[mesh_agent::istio::Problem], base: &Path) -> String {
    problems
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.file = p.file.strip_prefix(base).unwrap_or(&p.file).to_path_buf();
            format!("{p}\n")
        })
        .collect()
}

#[test]
fn documented_examples_validate_clean() {
    let dir = corpus("good");
    let report = check::paths(std::slice::from_ref(&dir));
    let errors: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .cloned()
        .collect();
    assert!(errors.is_empty(), "{}", render(&errors, &dir));
    assert_eq!(report.files, 10);
    assert!(report.documents >= 25, "{} documents", report.documents);
    // Nothing is dropped without a word: every Istio resource whose fields
    // the agent does not act on yet is reported as such.
    let notes = render(&report.problems, &dir);
    for expected in [
        "circuit-breaker.yaml:2: note: DestinationRule default/httpbin: spec: accepted, not yet enforced:",
        "trafficPolicy.connectionPool.http.idleTimeout",
        "trafficPolicy.connectionPool.tcp.tcpKeepalive",
        // Kinds the agent does not enforce at all: a warning naming the
        // consequence, for each resource.
        "gateway-and-sidecar.json:30: warning: Sidecar bookinfo/default: spec: this Sidecar is not enforced",
        // Telemetry: access logging is enforced, metrics and tracing not yet.
        "telemetry.yaml:13: note: Telemetry foo/errors-only: spec: accepted, not yet enforced: metrics.overrides",
        "gateway-and-sidecar.json:5: warning: Gateway bookinfo/bookinfo-gateway: spec: this Gateway is not enforced: nothing listens for its servers",
    ] {
        assert!(notes.contains(expected), "{expected:?} not in\n{notes}");
    }
    // Enforced whole by the destination's agent: RequestAuthentication and
    // AuthorizationPolicy (the JWT example) say nothing.
    assert!(!notes.contains("jwt.yaml"), "{notes}");
    // What L7 routing acts on is not listed: the header-match example
    // (matches, routes, mirror, CORS, retries, redirect…) is enforced whole.
    assert!(!notes.contains("header-match.yaml"), "{notes}");
    // Map keys (labels, ports by name) are data, not fields.
    assert!(!notes.contains("labels.app"), "{notes}");
}

#[test]
fn every_kind_and_version_of_the_corpus_is_typed() {
    let dir = corpus("good");
    let mut parsed = parse::Parsed::default();
    for (file, bytes) in mesh_agent::watch::read(&dir).unwrap() {
        parse::parse_file(&file, &bytes, &mut parsed);
    }
    let mut kinds: Vec<String> = parsed
        .documents
        .iter()
        .filter_map(|d| match d {
            parse::Document::Istio(r) => Some(format!("{} {}", r.api_version, r.kind().name())),
            _ => None,
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    for k in [
        "networking.istio.io/v1 VirtualService",
        "networking.istio.io/v1beta1 VirtualService",
        "networking.istio.io/v1 DestinationRule",
        "networking.istio.io/v1 Gateway",
        "networking.istio.io/v1 ServiceEntry",
        "networking.istio.io/v1 WorkloadEntry",
        "networking.istio.io/v1 Sidecar",
        "security.istio.io/v1 PeerAuthentication",
        "security.istio.io/v1beta1 PeerAuthentication",
        "security.istio.io/v1 RequestAuthentication",
        "security.istio.io/v1 AuthorizationPolicy",
        "telemetry.istio.io/v1 Telemetry",
        "telemetry.istio.io/v1alpha1 Telemetry",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    let kube = parsed
        .documents
        .iter()
        .filter(|d| matches!(d, parse::Document::Kube(..)))
        .count();
    assert_eq!(kube, 3, "Namespace, Service, EndpointSlice");
}

#[test]
fn broken_examples_give_the_expected_messages() {
    let dir = corpus("broken");
    let mut failures = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 7);
    for file in files {
        let report = check::paths(std::slice::from_ref(&file));
        let errors: Vec<_> = report
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .cloned()
            .collect();
        assert!(!errors.is_empty(), "{} validated clean", file.display());
        let got = render(&errors, &dir);
        common::compare_or_bless(&file.with_extension("expected"), &got, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
