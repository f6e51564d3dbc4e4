//! What a route does to a request and its answer: redirects and direct
//! responses from the agent, rewrites, header operations, mirroring, CORS,
//! and the access log.

use std::time::Duration;

use serde_json::json;

use super::*;

#[test]
fn redirect_and_direct_response_are_answered_by_the_agent() {
    let w = web_routes(
        "l7-redirect",
        json!([
            {"name": "redirect", "match": [{"uri": {"exact": "/old"}}],
             "redirect": {"uri": "/new", "authority": "elsewhere.example"}},
            {"name": "direct", "match": prefix("/teapot"),
             "directResponse": {"status": 418, "body": {"string": "short and stout"}}},
            {"route": to("v1")},
        ]),
        &[],
    );
    let r = w.one("/old", &[]);
    assert_eq!(status(&r), 301, "{r}");
    assert_eq!(
        last_header(&r, "location"),
        "http://elsewhere.example/new",
        "{r}"
    );
    let r = w.one("/teapot", &[]);
    assert_eq!(
        (status(&r), r["last"]["body"].as_str()),
        (418, Some("short and stout")),
        "{r}"
    );
    // Neither reached the upstream.
    barrier(&w.c, &w.app1, "/after");
    assert_eq!(requests(&w.app1), ["GET /after HTTP/1.1"]);
}

#[test]
fn rewrites_replace_the_matched_prefix_the_authority_or_a_regex_match() {
    let w = web_routes(
        "l7-rewrite",
        json!([
            {"name": "rewrite", "match": prefix("/api/v1/"),
             "rewrite": {"uri": "/v2/", "authority": "web.internal"}, "route": to("v1")},
            {"name": "regex", "match": [{"uri": {"regex": "/users/[0-9]+/profile"}}],
             "rewrite": {"uriRegexRewrite": {"match": "^/users/([0-9]+)/profile$", "rewrite": "/profile/\\1"}},
             "route": to("v1")},
        ]),
        &[],
    );
    let r = w.one("/api/v1/items?page=2", &[]);
    assert_eq!(status(&r), 200, "{r}\n{}", w.agent_a.log());
    let seen = last_request(&w.app1);
    assert_eq!(seen["request"], "GET /v2/items?page=2 HTTP/1.1", "{seen}");
    assert_eq!(seen["headers"]["host"], "web.internal", "{seen}");
    assert_eq!(status(&w.one("/users/42/profile", &[])), 200);
    // Waited for: the app's output is read by another thread, and its
    // last line may not be in yet (`last_request` would see the first).
    w.app1.wait_for(
        |l| l["event"] == "http" && l["request"] == "GET /profile/42 HTTP/1.1",
        Duration::from_secs(5),
    );
}

#[test]
fn upstream_connections_are_shared_by_the_pods_client_connections() {
    let w = web_routes("l7-upstreams", json!([{"route": to("v1")}]), &[]);
    // 20 clients one after the other (each its own connection to the
    // agent): one upstream connection, reused.
    for _ in 0..20 {
        assert_eq!(answers(&w.one("/", &[]), "hello from v1"), 1);
    }
    let peers: std::collections::BTreeSet<String> = w
        .app1
        .lines()
        .iter()
        .filter(|l| l["event"] == "http")
        .filter_map(|l| l["peer"].as_str().map(String::from))
        .collect();
    assert_eq!(
        w.app1
            .lines()
            .iter()
            .filter(|l| l["event"] == "http")
            .count(),
        20
    );
    assert!(
        peers.len() <= 2,
        "20 clients used {} upstream connections: {peers:?}",
        peers.len()
    );
}

#[test]
fn header_operations_at_route_and_destination_level_both_ways() {
    let w = web_routes(
        "l7-headers",
        json!([
            {"name": "headers",
             "headers": {"request": {"set": {"x-route": "headers"}, "remove": ["x-secret"]},
                         "response": {"add": {"x-served-by": "mesh"}}},
             "route": [{"destination": {"host": "web", "subset": "v1"},
                        "headers": {"request": {"set": {"x-subset": "v1"}}}}]},
        ]),
        &[],
    );
    let r = w.one("/headers", &["x-secret: hunter2", "x-keep: yes"]);
    let seen = last_request(&w.app1);
    assert_eq!(seen["headers"]["x-route"], "headers", "{seen}");
    assert_eq!(seen["headers"]["x-subset"], "v1", "{seen}");
    assert_eq!(seen["headers"]["x-keep"], "yes", "{seen}");
    assert!(seen["headers"].get("x-secret").is_none(), "removed: {seen}");
    assert_eq!(last_header(&r, "x-served-by"), "mesh", "{r}");
}

#[test]
fn mirroring_sends_a_copy_the_client_never_sees() {
    let w = web_routes(
        "l7-mirror",
        json!([
            {"name": "mirror", "route": to("v1"),
             "mirror": {"host": "web", "subset": "v2"}, "mirrorPercentage": {"value": 100}},
        ]),
        &[],
    );
    let r = w.many("/mirror", 20, &[]);
    assert_eq!(answers(&r, "hello from v1"), 20, "{r}");
    // v2 gets a copy, its Host marked as Envoy marks shadows: `-shadow` on
    // the name, the port kept.
    let shadowed = w.app2.wait_for(
        |l| l["event"] == "http" && l["headers"]["host"] == "10.96.0.10-shadow:80",
        Duration::from_secs(5),
    );
    assert!(
        shadowed["request"]
            .as_str()
            .unwrap()
            .starts_with("GET /mirror"),
        "{shadowed}"
    );
}

#[test]
fn cors_preflights_are_answered_and_actual_requests_get_the_headers() {
    let w = web_routes(
        "l7-cors",
        json!([
            {"name": "cors", "route": to("v1"),
             "corsPolicy": {"allowOrigins": [{"exact": "https://app.example"}, {"regex": "https://.*[.]trusted[.]example"}],
                            "allowMethods": ["GET", "POST"], "allowHeaders": ["x-token"],
                            "exposeHeaders": ["x-served-by"], "maxAge": "1h", "allowCredentials": true}},
        ]),
        &[],
    );
    // A preflight from an allowed origin is answered by the agent.
    let r = w.one(
        "/cors",
        &[
            "--method=OPTIONS",
            "Origin: https://app.example",
            "Access-Control-Request-Method: POST",
        ],
    );
    assert_eq!(status(&r), 200, "{r}");
    for (h, want) in [
        ("access-control-allow-origin", "https://app.example"),
        ("access-control-allow-methods", "GET,POST"),
        ("access-control-allow-headers", "x-token"),
        ("access-control-max-age", "3600"),
        ("access-control-allow-credentials", "true"),
    ] {
        assert_eq!(last_header(&r, h), want, "{h}: {r}");
    }
    barrier(&w.c, &w.app1, "/after-preflight");
    assert_eq!(
        requests(&w.app1),
        ["GET /after-preflight HTTP/1.1"],
        "the preflight stayed in the agent"
    );
    // An actual request from an allowed origin gets the headers.
    let r = w.one("/cors", &["Origin: https://shop.trusted.example"]);
    assert_eq!(answers(&r, "hello from v1"), 1, "{r}");
    assert_eq!(
        last_header(&r, "access-control-allow-origin"),
        "https://shop.trusted.example"
    );
    assert_eq!(
        last_header(&r, "access-control-expose-headers"),
        "x-served-by"
    );
    // Another origin gets none.
    let r = w.one("/cors", &["Origin: https://evil.example"]);
    assert_eq!(answers(&r, "hello from v1"), 1, "{r}");
    assert_eq!(last_header(&r, "access-control-allow-origin"), "", "{r}");
}

#[test]
fn the_access_log_names_each_request_with_its_code_and_flags() {
    let w = web_routes(
        "l7-access-log",
        json!([
            {"name": "abort", "match": prefix("/abort"),
             "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}, "route": to("v1")},
            {"route": to("v1")},
        ]),
        &["--access-log"],
    );
    assert_eq!(status(&w.one("/abort", &[])), 503);
    assert_eq!(status(&w.one("/fine", &[])), 200);
    // Istio's default text format, on the agent's standard output.
    let line = |path: &str, code: &str, flags: &str, cluster: &str| {
        w.agent_a.log().lines().any(|l| {
            l.contains(&format!("\"GET {path} HTTP/1.1\" {code} {flags} "))
                && l.contains(&format!(" {cluster} "))
        })
    };
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(5), || line("/abort", "503", "FI", "-")
            && line(
                "/fine",
                "200",
                "-",
                "outbound|80|v1|web.default.svc.cluster.local"
            )),
        "no access log lines for the two requests:\n{}",
        w.agent_a.log()
    );
}
