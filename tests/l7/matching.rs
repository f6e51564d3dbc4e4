//! Which route a request takes: weighted splits, header canaries, every
//! match type, and what happens when no route matches.

use std::time::Duration;

use mesh_tests::sys::wait_until;
use serde_json::json;

use super::*;

#[test]
fn weighted_split_and_header_matched_canary_with_request_telemetry() {
    let w = web_routes(
        "l7-split",
        json!([
            {"name": "canary-for-jason",
             "match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "web", "subset": "v2"}}]},
            {"name": "split",
             "route": [
                {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "web", "subset": "v2"}, "weight": 10},
             ]},
        ]),
        &[],
    );
    let n = 10_000;
    let split = w.many("/", n, &[]);
    let (v1, v2) = (
        answers(&split, "hello from v1"),
        answers(&split, "hello from v2"),
    );
    assert_eq!(
        v1 + v2,
        n as u64,
        "every request answered by v1 or v2: {split}"
    );
    within_4_sigma(v1, n as u64, 0.9, "90/10 split, to v1");
    assert_eq!(
        split["connections"], 1,
        "one keep-alive connection: {split}"
    );

    let jason = w.many("/", 200, &["end-user: jason"]);
    assert_eq!(answers(&jason, "hello from v2"), 200, "{jason}");
    let other = w.many("/", 200, &["end-user: other"]);
    within_4_sigma(
        answers(&other, "hello from v1"),
        200,
        0.9,
        "another user, to v1",
    );

    // Request telemetry with Istio's names and labels, per version.
    let served = |version: &str| {
        w.agent_a.metrics().try_value(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_service", "web.default.svc.cluster.local"),
                ("destination_version", version),
                ("request_protocol", "http"),
                ("response_code", "200"),
                ("response_flags", "-"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    let want_v2 = v2 + 200 + answers(&other, "hello from v2");
    let want_v1 = n as u64 + 400 - want_v2;
    assert!(
        wait_until(Duration::from_secs(5), || served("v1")
            == Ok(want_v1 as f64)
            && served("v2") == Ok(want_v2 as f64)),
        "istio_requests_total v1 {:?} (want {want_v1}), v2 {:?} (want {want_v2})",
        served("v1"),
        served("v2")
    );
    let m = w.agent_a.metrics();
    assert_eq!(
        m.value(
            "istio_request_duration_milliseconds_count",
            &[("destination_version", "v1")]
        ) as u64,
        want_v1
    );
    // Each response body is the server's greeting: tens of bytes.
    let sizes = m.value("istio_response_bytes_sum", &[]) / (n + 400) as f64;
    assert!((40.0..120.0).contains(&sizes), "mean response size {sizes}");
}

#[test]
fn every_match_type_takes_its_route_and_nothing_matched_is_404_nr() {
    let v2 = || to("v2");
    let w = web_routes(
        "l7-match",
        json!([
            {"name": "method", "match": [{"method": {"exact": "POST"}, "uri": {"prefix": "/m"}}], "route": v2()},
            {"name": "query", "match": [{"queryParams": {"canary": {"exact": "yes"}}}], "route": v2()},
            {"name": "case", "match": [{"uri": {"prefix": "/CaSe"}, "ignoreUriCase": true}], "route": v2()},
            {"name": "authority", "match": [{"authority": {"prefix": "web.example"}}], "route": v2()},
            {"name": "without", "match": [{"uri": {"prefix": "/w"}, "withoutHeaders": {"x-skip": {}}}], "route": v2()},
            {"name": "source", "match": [{"uri": {"prefix": "/src"}, "sourceLabels": {"app": "client"}, "sourceNamespace": "default"}], "route": v2()},
            {"name": "other-source", "match": [{"uri": {"prefix": "/src"}, "sourceLabels": {"app": "somebody-else"}}], "route": to("v1")},
            {"name": "header-regex", "match": [{"headers": {"x-user": {"regex": "user-[0-9]+"}}}], "route": v2()},
            {"name": "fallback", "match": [{"uri": {"prefix": "/v1"}}], "route": to("v1")},
        ]),
        &[],
    );
    let to_v2 = |path: &str, extra: &[&str]| answers(&w.one(path, extra), "hello from v2") == 1;
    assert!(to_v2("/m", &["--method=POST", "--body=x"]), "method");
    assert!(!to_v2("/m", &[]), "method: a GET is not a POST");
    assert!(to_v2("/anything?canary=yes", &[]), "query parameter");
    assert!(to_v2("/case/ANY", &[]), "ignoreUriCase");
    assert!(to_v2("/x", &["Host: web.example.com"]), "authority");
    assert!(to_v2("/w", &[]), "withoutHeaders, header absent");
    assert!(
        to_v2("/src", &[]),
        "sourceLabels and sourceNamespace of the client pod"
    );
    assert!(to_v2("/y", &["x-user: user-42"]), "header regex");
    assert_eq!(answers(&w.one("/v1", &[]), "hello from v1"), 1);

    // Nothing matched: 404 with NR, from the agent.
    let r = w.one("/w", &["x-skip: 1"]);
    assert_eq!(
        (status(&r), last_header(&r, "x-mesh-response-flags")),
        (404, "NR"),
        "{r}"
    );
}
