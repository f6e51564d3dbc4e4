//! L7 routing in the node agent, through real captured connections: the
//! source pod's agent terminates HTTP on ports declared HTTP and routes each
//! request by the VirtualService and DestinationRule of the service's host,
//! then carries it over HBONE to the chosen endpoint.

use std::time::Duration;

use mesh_tests::{
    cluster::{Cluster, cluster, service, write_yaml},
    pod::App,
    sys::wait_until,
};
use serde_json::{Value, json};

/// Two versions of `web` on node b, a Service with an HTTP port, subsets
/// by version; the servers' request logs.
fn web(test: &str) -> (Cluster, App, App) {
    let c = cluster(
        test,
        &[
            ("web-v1", &[("app", "web"), ("version", "v1")]),
            ("web-v2", &[("app", "web"), ("version", "v2")]),
        ],
    );
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    let a1 = v1.spawn_app(&c.env, &["http", "v1", &v1.v4(9000)]);
    let a2 = v2.spawn_app(&c.env, &["http", "v2", &v2.v4(9000)]);
    (c, a1, a2)
}

fn destination_rule() -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"host": "web", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]},
    })
}

fn virtual_service(http: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"hosts": ["web"], "http": http},
    })
}

/// `http-count` from the client: answers by server, flags, connections.
fn count(c: &Cluster, url: &str, n: usize, headers: &[&str]) -> Value {
    let mut args = vec!["http-count", url];
    let n = n.to_string();
    args.push(&n);
    args.extend(headers);
    c.client.run_app(&args).json()
}

fn answers(v: &Value, name: &str) -> u64 {
    v["answers"][name].as_u64().unwrap_or(0)
}

#[test]
fn weighted_split_and_header_matched_canary() {
    let (c, _, _) = web("l7-split");
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("web", "10.96.0.10", "web", ("http", 80, 9000)),
            destination_rule(),
            virtual_service(json!([
                {"name": "canary-for-jason",
                 "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "web", "subset": "v2"}}]},
                {"name": "split",
                 "route": [
                    {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "web", "subset": "v2"}, "weight": 10},
                 ]},
            ])),
        ],
    );
    let (_ca, agent_a, agent_b) = c.mesh();
    let url = "http://10.96.0.10:80/";

    let n = 10_000;
    let split = count(&c, url, n, &[]);
    let (v1, v2) = (
        answers(&split, "hello from v1"),
        answers(&split, "hello from v2"),
    );
    assert_eq!(
        v1 + v2,
        n as u64,
        "every request answered by v1 or v2: {split}"
    );
    let share = v1 as f64 / n as f64;
    assert!(
        (0.88..=0.92).contains(&share),
        "90/10 split gave {:.2}% to v1: {split}\n{}\n{}",
        share * 100.0,
        agent_a.log(),
        agent_b.log()
    );
    assert_eq!(
        split["connections"], 1,
        "one keep-alive connection: {split}"
    );

    let jason = count(&c, url, 200, &["end-user: jason"]);
    assert_eq!(answers(&jason, "hello from v2"), 200, "{jason}");
    let other = count(&c, url, 200, &["end-user: other"]);
    assert!(answers(&other, "hello from v1") > 150, "{other}");

    // Request telemetry with Istio's names and labels, per version.
    let served = |version: &str| {
        agent_a.metrics().value(
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
        ) as u64
    };
    let total = n as u64 + 400;
    assert!(
        wait_until(Duration::from_secs(5), || served("v1") + served("v2")
            == total),
        "istio_requests_total v1 {} + v2 {} != {total}",
        served("v1"),
        served("v2")
    );
    assert_eq!(served("v2"), v2 + 200 + answers(&other, "hello from v2"));
    let m = agent_a.metrics();
    assert_eq!(
        m.value(
            "istio_request_duration_milliseconds_count",
            &[("destination_version", "v1")]
        ) as u64,
        served("v1")
    );
    // Each response body is the server's greeting: tens of bytes.
    let sizes = m.value("istio_response_bytes_sum", &[]) / total as f64;
    assert!((40.0..120.0).contains(&sizes), "mean response size {sizes}");
}

fn status(v: &Value) -> u64 {
    v["last"]["status"].as_u64().unwrap_or(0)
}

fn last_header<'a>(v: &'a Value, name: &str) -> &'a str {
    v["last"]["headers"][name].as_str().unwrap_or("")
}

/// The last request a server logged (path and headers as it saw them).
fn last_request(app: &App) -> Value {
    app.lines()
        .into_iter()
        .rev()
        .find(|l| l["event"] == "http")
        .expect("the server logged a request")
}

fn to(subset: &str) -> Value {
    json!([{"destination": {"host": "web", "subset": subset}}])
}

#[test]
fn matches_rewrites_redirects_headers_faults_retries_timeouts_mirrors() {
    let (c, app1, app2) = web("l7-actions");
    let prefix = |p: &str| json!([{"uri": {"prefix": p}}]);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("web", "10.96.0.10", "web", ("http-web", 80, 9000)),
            destination_rule(),
            virtual_service(json!([
                {"name": "redirect", "match": [{"uri": {"exact": "/old"}}],
                 "redirect": {"uri": "/new", "authority": "elsewhere.example"}},
                {"name": "direct", "match": prefix("/teapot"),
                 "directResponse": {"status": 418, "body": {"string": "short and stout"}}},
                {"name": "rewrite", "match": prefix("/api/v1/"),
                 "rewrite": {"uri": "/v2/", "authority": "web.internal"}, "route": to("v1")},
                {"name": "regex", "match": [{"uri": {"regex": "/users/[0-9]+/profile"}}],
                 "rewrite": {"uriRegexRewrite": {"match": "^/users/([0-9]+)/profile$", "rewrite": "/profile/\\1"}},
                 "route": to("v1")},
                {"name": "headers", "match": prefix("/headers"),
                 "headers": {"request": {"set": {"x-route": "headers"}, "remove": ["x-secret"]},
                             "response": {"add": {"x-served-by": "mesh"}}},
                 "route": [{"destination": {"host": "web", "subset": "v1"},
                            "headers": {"request": {"set": {"x-subset": "v1"}}}}]},
                {"name": "abort", "match": prefix("/abort"),
                 "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}}, "route": to("v1")},
                {"name": "delay", "match": prefix("/delay"),
                 "fault": {"delay": {"fixedDelay": "300ms", "percentage": {"value": 100}}}, "route": to("v1")},
                {"name": "delay-some", "match": prefix("/sometimes-late"),
                 "fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 30}}}, "route": to("v1")},
                {"name": "timeout", "match": prefix("/slow"), "timeout": "500ms", "route": to("v1")},
                {"name": "per-try", "match": prefix("/stuck"),
                 "retries": {"attempts": 2, "perTryTimeout": "200ms", "retryOn": "5xx"}, "route": to("v1")},
                {"name": "retry", "match": prefix("/flaky"),
                 "retries": {"attempts": 3, "retryOn": "5xx"}, "route": to("v1")},
                {"name": "default-retries", "match": prefix("/unconfigured"), "route": to("v1")},
                {"name": "mirror", "match": prefix("/mirror"), "route": to("v1"),
                 "mirror": {"host": "web", "subset": "v2"}, "mirrorPercentage": {"value": 100}},
                {"name": "method", "match": [{"method": {"exact": "POST"}, "uri": {"prefix": "/m"}}], "route": to("v2")},
                {"name": "query", "match": [{"queryParams": {"canary": {"exact": "yes"}}}], "route": to("v2")},
                {"name": "case", "match": [{"uri": {"prefix": "/CaSe"}, "ignoreUriCase": true}], "route": to("v2")},
                {"name": "authority", "match": [{"authority": {"prefix": "web.example"}}], "route": to("v2")},
                {"name": "without", "match": [{"uri": {"prefix": "/w"}, "withoutHeaders": {"x-skip": {}}}], "route": to("v2")},
                {"name": "source", "match": [{"uri": {"prefix": "/src"}, "sourceLabels": {"app": "client"}, "sourceNamespace": "default"}], "route": to("v2")},
                {"name": "cors", "match": prefix("/cors"), "route": to("v1"),
                 "corsPolicy": {"allowOrigins": [{"exact": "https://app.example"}, {"regex": "https://.*[.]trusted[.]example"}],
                                "allowMethods": ["GET", "POST"], "allowHeaders": ["x-token"],
                                "exposeHeaders": ["x-served-by"], "maxAge": "1h", "allowCredentials": true}},
                {"name": "other-source", "match": [{"uri": {"prefix": "/src"}, "sourceLabels": {"app": "somebody-else"}}], "route": to("v1")},
            ])),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh_with(&["--access-log"]);
    let base = "http://10.96.0.10:80";
    let one = |path: &str, extra: &[&str]| count(&c, &format!("{base}{path}"), 1, extra);
    let logs = || format!("agent a:\n{}", agent_a.log());

    // Redirect and direct response: answered by the agent.
    let r = one("/old", &[]);
    assert_eq!(status(&r), 301, "{r}");
    assert_eq!(
        last_header(&r, "location"),
        "http://elsewhere.example/new",
        "{r}"
    );
    let r = one("/teapot", &[]);
    assert_eq!(
        (status(&r), r["last"]["body"].as_str()),
        (418, Some("short and stout")),
        "{r}"
    );

    // Rewrites: the prefix the route matched, the authority, a regex.
    let r = one("/api/v1/items?page=2", &[]);
    assert_eq!(status(&r), 200, "{r} {}", logs());
    let seen = last_request(&app1);
    assert_eq!(seen["request"], "GET /v2/items?page=2 HTTP/1.1", "{seen}");
    assert_eq!(seen["headers"]["host"], "web.internal", "{seen}");
    one("/users/42/profile", &[]);
    assert_eq!(last_request(&app1)["request"], "GET /profile/42 HTTP/1.1");

    // Upstream connections are reused across the pod's client
    // connections: 20 clients one after the other, one upstream connection.
    let before = app1.lines().len();
    for _ in 0..20 {
        assert_eq!(answers(&one("/headers", &[]), "hello from v1"), 1);
    }
    let peers: std::collections::BTreeSet<String> = app1.lines()[before..]
        .iter()
        .filter(|l| l["event"] == "http")
        .filter_map(|l| l["peer"].as_str().map(String::from))
        .collect();
    assert!(
        peers.len() <= 2,
        "20 clients used {} upstream connections: {peers:?}",
        peers.len()
    );

    // Header operations, route and destination level, both directions.
    let r = one("/headers", &["x-secret: hunter2", "x-keep: yes"]);
    let seen = last_request(&app1);
    assert_eq!(seen["headers"]["x-route"], "headers", "{seen}");
    assert_eq!(seen["headers"]["x-subset"], "v1", "{seen}");
    assert_eq!(seen["headers"]["x-keep"], "yes", "{seen}");
    assert!(seen["headers"].get("x-secret").is_none(), "removed: {seen}");
    assert_eq!(last_header(&r, "x-served-by"), "mesh", "{r}");

    // Fault abort at 50 %: 2,000 requests, the share within ±10 points
    // (9 standard deviations), each flagged FI.
    let r = count(&c, &format!("{base}/abort"), 2000, &[]);
    let aborted = answers(&r, "HTTP 503");
    assert!((800..=1200).contains(&aborted), "{r}");
    assert_eq!(r["flags"]["FI"].as_u64(), Some(aborted), "{r}");
    assert_eq!(answers(&r, "hello from v1"), 2000 - aborted, "{r}");
    let fi = || {
        agent_a.metrics().value(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "FI")],
        ) as u64
    };
    assert!(
        wait_until(Duration::from_secs(5), || fi() == aborted),
        "FI in metrics: {}",
        fi()
    );

    // Fault delay: the answer comes, late, flagged DI.
    let r = one("/delay", &[]);
    assert_eq!(status(&r), 200, "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap() >= 300, "{r}");
    assert_eq!(last_header(&r, "x-mesh-response-flags"), "DI", "{r}");

    // Fault delay at 30 %: 600 requests, the delayed share within ±10
    // points (5 standard deviations).
    let r = count(&c, &format!("{base}/sometimes-late"), 600, &[]);
    let delayed = r["flags"]["DI"].as_u64().unwrap_or(0);
    assert!((120..=240).contains(&delayed), "{r}");
    assert_eq!(answers(&r, "hello from v1"), 600, "{r}");

    // Route timeout: 504 with UT, the slow upstream abandoned.
    let r = one("/slow", &["x-delay-ms: 3000"]);
    assert_eq!(
        (status(&r), last_header(&r, "x-mesh-response-flags")),
        (504, "UT"),
        "{r}"
    );
    // Per-try timeout: every try times out, retries run out (URX).
    let r = one("/stuck", &["x-delay-ms: 3000"]);
    assert_eq!(
        (status(&r), last_header(&r, "x-mesh-response-flags")),
        (504, "URX"),
        "{r}"
    );

    // Retries recover from an upstream failing every other request.
    let r = count(&c, &format!("{base}/flaky"), 200, &["x-fail-every: 2"]);
    assert_eq!(answers(&r, "hello from v1"), 200, "{r} {}", logs());
    // Configured retries apply to a POST as well.
    let r = count(
        &c,
        &format!("{base}/flaky"),
        50,
        &["x-fail-every: 2", "--method=POST", "--body=x"],
    );
    assert_eq!(answers(&r, "hello from v1"), 50, "{r}");
    // Istio's default policy retries a GET on 503 too, but never a POST
    // the application has seen.
    let r = count(
        &c,
        &format!("{base}/unconfigured"),
        100,
        &["x-fail-every: 2"],
    );
    assert_eq!(answers(&r, "hello from v1"), 100, "{r}");
    let r = count(
        &c,
        &format!("{base}/unconfigured"),
        100,
        &["x-fail-every: 2", "--method=POST", "--body=order"],
    );
    assert_eq!(
        answers(&r, "HTTP 503"),
        50,
        "every other POST fails, none retried: {r}"
    );

    // Mirror: the client sees v1 only; v2 gets a copy, Host marked -shadow.
    let r = count(&c, &format!("{base}/mirror"), 20, &[]);
    assert_eq!(answers(&r, "hello from v1"), 20, "{r}");
    let shadowed = app2.wait_for(
        // Envoy's shadow host: `-shadow` on the name, the port kept.
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

    // Each match type.
    let v2 = |r: &Value| answers(r, "hello from v2") == 1;
    assert!(v2(&one("/m", &["--method=POST", "--body=x"])), "method");
    assert!(v2(&one("/anything?canary=yes", &[])), "query parameter");
    assert!(v2(&one("/case/ANY", &[])), "ignoreUriCase");
    assert!(v2(&one("/x", &["Host: web.example.com"])), "authority");
    assert!(v2(&one("/w", &[])), "withoutHeaders, header absent");
    assert!(
        v2(&one("/src", &[])),
        "sourceLabels and sourceNamespace of the client pod"
    );

    // CORS: a preflight from an allowed origin is answered by the agent;
    // an actual request gets the headers; another origin gets none.
    let served_before = app1.lines().len();
    let r = one(
        "/cors",
        &[
            "--method=OPTIONS",
            "Origin: https://app.example",
            "Access-Control-Request-Method: POST",
        ],
    );
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        last_header(&r, "access-control-allow-origin"),
        "https://app.example",
        "{r}"
    );
    assert_eq!(
        last_header(&r, "access-control-allow-methods"),
        "GET,POST",
        "{r}"
    );
    assert_eq!(
        last_header(&r, "access-control-allow-headers"),
        "x-token",
        "{r}"
    );
    assert_eq!(last_header(&r, "access-control-max-age"), "3600", "{r}");
    assert_eq!(
        last_header(&r, "access-control-allow-credentials"),
        "true",
        "{r}"
    );
    assert_eq!(
        app1.lines().len(),
        served_before,
        "the preflight stayed in the agent"
    );
    let r = one("/cors", &["Origin: https://shop.trusted.example"]);
    assert_eq!(answers(&r, "hello from v1"), 1, "{r}");
    assert_eq!(
        last_header(&r, "access-control-allow-origin"),
        "https://shop.trusted.example"
    );
    assert_eq!(
        last_header(&r, "access-control-expose-headers"),
        "x-served-by"
    );
    let r = one("/cors", &["Origin: https://evil.example"]);
    assert_eq!(answers(&r, "hello from v1"), 1, "{r}");
    assert_eq!(last_header(&r, "access-control-allow-origin"), "", "{r}");

    // The access log names each request with its status and flags.
    let log = agent_a.log();
    assert!(
        log.lines().any(|l| l.contains("mesh::access")
            && l.contains("GET /abort HTTP/1.1")
            && l.contains("code=503")
            && l.contains("flags=FI")),
        "no access log line for an aborted request:\n{log}"
    );

    // Nothing matched: 404 with NR, from the agent.
    let r = one("/w", &["x-skip: 1"]);
    assert_eq!(
        (status(&r), last_header(&r, "x-mesh-response-flags")),
        (404, "NR"),
        "{r}"
    );
}

#[test]
fn malformed_requests_are_refused_before_the_upstream_and_upgrades_pass() {
    let (c, app1, _app2) = web("l7-malformed");
    write_yaml(
        &c.config.join("web.yaml"),
        &[service("web", "10.96.0.10", "web", ("http", 80, 9000))],
    );
    let (_ca, _agent_a, _agent_b) = c.mesh();
    let raw = |bytes: &str| c.client.run_app(&["raw", "10.96.0.10:80", bytes]).json();
    let served = || app1.lines().iter().filter(|l| l["event"] == "http").count();

    // A good request first, so the path is known to work.
    let ok = raw("GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    assert_eq!(ok["status"], 200, "{ok}");
    let before = served();

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let cases: [(&str, &str, u64); 6] = [
        (
            "space in a header name",
            "GET / HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n",
            400,
        ),
        (
            "control byte in a header value",
            "GET / HTTP/1.1\r\nHost: web\r\nX-A: a\u{1}b\r\n\r\n",
            400,
        ),
        ("not HTTP", "HELLO THERE\r\n\r\n", 400),
        ("oversized headers", &huge, 431),
        (
            "invalid chunk size",
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (
            "two different Content-Lengths",
            "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
            400,
        ),
    ];
    for (what, bytes, want) in cases {
        let r = raw(bytes);
        assert_eq!(r["status"].as_u64(), Some(want), "{what}: {r}");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        served(),
        before,
        "a malformed request reached the upstream: {:?}",
        app1.lines()
    );

    // Content-Length and Transfer-Encoding together, the classic way to
    // smuggle a second request past a proxy: the request is read by
    // Transfer-Encoding alone and the connection closed after it (RFC 9112
    // §6.1), so what follows is never taken for a request.
    let r = raw(
        "POST /first HTTP/1.1\r\nHost: web\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    );
    let text = r["received"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        text.contains("connection: close") && text.matches("http/1.1 ").count() == 1,
        "{r}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let requests: Vec<String> = app1
        .lines()
        .iter()
        .filter(|l| l["event"] == "http")
        .map(|l| l["request"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !requests.iter().any(|r| r.contains("smuggled")),
        "{requests:?}"
    );

    // A WebSocket upgrade passes: 101 from the server, then raw bytes both
    // ways on the same connection, through both agents.
    let r = c.client.run_app(&[
        "raw",
        "10.96.0.10:80",
        "GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes after the upgrade",
        "frames after the upgrade",
    ])
    .json();
    assert_eq!(r["status"], 101, "{r}");
    assert!(
        r["received"]
            .as_str()
            .unwrap()
            .ends_with("\r\n\r\nframes after the upgrade"),
        "{r}"
    );
    app1.wait_for(
        |l| l["event"] == "upgraded",
        std::time::Duration::from_secs(5),
    );
}

#[test]
fn http2_h2c_and_grpc_unary_and_streaming_follow_the_same_rules() {
    let (c, _app1, _app2) = web("l7-h2");
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    let g1 = v1.spawn_app(&c.env, &["h2", "v1", &v1.v4(9100)]);
    v2.spawn_app(&c.env, &["h2", "v2", &v2.v4(9100)]);
    let echo_dr = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {"host": "echo", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]},
    });
    let echo_vs = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {"hosts": ["echo"], "http": [
            {"match": [{"uri": {"prefix": "/api/"}}], "rewrite": {"uri": "/v2/"},
             "route": [{"destination": {"host": "echo", "subset": "v1"}}]},
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "echo", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "echo", "subset": "v1"}}]},
        ]},
    });
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("web", "10.96.0.10", "web", ("http", 80, 9000)),
            service("echo", "10.96.0.20", "web", ("grpc", 80, 9100)),
            echo_dr,
            echo_vs,
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();
    let h2 = |url: &str, n: &str, headers: &[&str]| {
        let mut args = vec!["h2-count", url, n];
        args.extend(headers);
        c.client.run_app(&args).json()
    };

    // h2c to a gRPC port: HTTP/2 end to end, routed by the same rules.
    let r = h2("http://10.96.0.20:80/", "100", &[]);
    assert_eq!(answers(&r, "hello from v1"), 100, "{r}\n{}", agent_a.log());
    let r = h2("http://10.96.0.20:80/", "100", &["end-user: jason"]);
    assert_eq!(answers(&r, "hello from v2"), 100, "{r}");
    assert!(
        g1.lines()
            .iter()
            .any(|l| l["event"] == "h2" && l["version"] == "HTTP/2.0"),
        "the upstream spoke HTTP/2"
    );

    // gRPC: a unary call, and a stream of 50 messages each echoed before
    // the next is sent (nothing buffered on the way), then the trailers.
    for n in ["1", "50"] {
        let r = c
            .client
            .run_app(&["grpc-call", "http://10.96.0.20:80/echo.Echo/Chat", n])
            .json();
        assert_eq!(r["echoed"].as_u64(), n.parse().ok(), "{r}");
        assert_eq!(r["grpc_status"], "0", "{r}");
    }
    assert!(
        g1.lines()
            .iter()
            .any(|l| l["event"] == "h2" && l["grpc"] == true && l["te"] == "trailers"),
        "gRPC servers need te: trailers: {:?}",
        g1.lines()
    );
    let grpc_ok = || {
        agent_a.metrics().value(
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "0"),
            ],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || grpc_ok() == 2.0),
        "gRPC calls in istio_requests_total: {}",
        grpc_ok()
    );

    // A rewrite on an HTTP/2 request keeps its authority.
    let r = h2("http://10.96.0.20:80/api/items", "1", &[]);
    assert_eq!(answers(&r, "hello from v1"), 1, "{r}\n{}", agent_a.log());
    assert!(
        wait_until(Duration::from_secs(5), || g1
            .lines()
            .iter()
            .any(|l| l["event"] == "h2" && l["path"] == "/v2/items")),
        "rewritten path at the server: {:?}",
        g1.lines()
    );

    // h2c from the client to an HTTP/1.1 port: translated, as Envoy does.
    let r = h2("http://10.96.0.10:80/", "20", &[]);
    assert_eq!(
        answers(&r, "hello from v1") + answers(&r, "hello from v2"),
        20,
        "{r}"
    );
}

/// A DestinationRule for `host` with this traffic policy.
fn traffic_policy(host: &str, policy: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": "default"},
        "spec": {"host": host, "trafficPolicy": policy},
    })
}

#[test]
fn destination_rules_hash_break_circuits_and_eject_outliers() {
    let (c, _app1, app2) = web("l7-dr");
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("by-header", "10.96.0.31", "web", ("http", 80, 9000)),
            traffic_policy(
                "by-header",
                json!({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}),
            ),
            service("sticky", "10.96.0.32", "web", ("http", 80, 9000)),
            traffic_policy(
                "sticky",
                json!({"loadBalancer": {"consistentHash": {"httpCookie": {"name": "session", "path": "/", "ttl": "60s"}, "maglev": {}}}}),
            ),
            service("guarded", "10.96.0.33", "web", ("http", 80, 9000)),
            traffic_policy(
                "guarded",
                json!({"connectionPool": {"tcp": {"maxConnections": 1},
                                          "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}}),
            ),
            service("ejecting", "10.96.0.34", "web", ("http", 80, 9000)),
            traffic_policy(
                "ejecting",
                json!({"outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s",
                                            "baseEjectionTime": "2s", "maxEjectionPercent": 100}}),
            ),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();
    let servers = |v: &Value| {
        v["answers"]
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };

    // Consistent hash on a header: each user always reaches one endpoint;
    // users spread over both.
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..12 {
        let h = format!("x-user: user-{user}");
        let r = count(&c, "http://10.96.0.31:80/", 20, &[&h]);
        let s = servers(&r);
        assert_eq!(
            s.len(),
            1,
            "user-{user} went to {s:?}: {r}\n{}",
            agent_a.log()
        );
        seen.extend(s);
    }
    assert_eq!(seen.len(), 2, "12 users all hashed to {seen:?}");

    // Sticky sessions by cookie (Maglev): the first answer sets the cookie
    // with its TTL; requests carrying it stay on one endpoint.
    let first = count(&c, "http://10.96.0.32:80/", 1, &[]);
    let cookie = last_header(&first, "set-cookie").to_owned();
    assert!(
        cookie.starts_with("session=") && cookie.contains("Max-Age=60"),
        "{first}"
    );
    let value = cookie.split(';').next().unwrap();
    for _ in 0..3 {
        let h = format!("Cookie: {value}");
        let r = count(&c, "http://10.96.0.32:80/", 20, &[&h]);
        assert_eq!(servers(&r).len(), 1, "{r}");
        assert_eq!(
            last_header(&r, "set-cookie"),
            "",
            "no new cookie once one is sent"
        );
    }

    // Circuit breaking: one connection, one pending request; the rest of a
    // burst of slow requests is refused at once with 503 UO.
    let r = c
        .client
        .run_app(&[
            "http-burst",
            "http://10.96.0.33:80/",
            "10",
            "x-delay-ms: 500",
        ])
        .json();
    let (ok, overflow) = (
        r["statuses"]["200"].as_u64().unwrap_or(0),
        r["flags"]["UO"].as_u64().unwrap_or(0),
    );
    assert!(ok >= 2 && overflow >= 5 && ok + overflow == 10, "{r}");
    assert_eq!(r["statuses"]["503"].as_u64(), Some(overflow), "{r}");

    // Outlier detection: v2 fails every request; after three in a row it
    // is ejected and gets nothing, then comes back after the ejection time.
    let to_v2 = || {
        app2.lines()
            .iter()
            .filter(|l| {
                l["event"] == "http" && l["request"].as_str().is_some_and(|r| r.contains("/od"))
            })
            .count()
    };
    let r = count(
        &c,
        "http://10.96.0.34:80/od",
        12,
        &["x-fail-on: v2", "--method=POST"],
    );
    assert!(answers(&r, "HTTP 503") >= 3, "{r}");
    let before = to_v2();
    let r = count(
        &c,
        "http://10.96.0.34:80/od",
        20,
        &["x-fail-on: v2", "--method=POST"],
    );
    assert_eq!(answers(&r, "hello from v1"), 20, "v2 ejected: {r}");
    assert_eq!(to_v2(), before, "an ejected endpoint got requests");
    // Back at the first sweep (every `interval`, 1 s) after 2 s.
    std::thread::sleep(Duration::from_millis(3500));
    let r = count(&c, "http://10.96.0.34:80/od", 20, &["--method=POST"]);
    assert!(
        answers(&r, "hello from v2") > 0,
        "v2 back after the ejection time: {r}"
    );
}

#[test]
fn locality_prefers_the_local_zone_and_fails_over() {
    let mut c = cluster(
        "l7-locality",
        &[
            ("web-z1", &[("app", "web"), ("istio-locality", "r1.z1")]),
            ("web-z2", &[("app", "web"), ("istio-locality", "r1.z2")]),
        ],
    );
    c.client
        .labels
        .push(("istio-locality".into(), "r1.z1".into()));
    let (z1, z2) = (&c.servers[0], &c.servers[1]);
    z1.spawn_app(&c.env, &["http", "z1", &z1.v4(9000)]);
    z2.spawn_app(&c.env, &["http", "z2", &z2.v4(9000)]);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("local", "10.96.0.41", "web", ("http", 80, 9000)),
            traffic_policy(
                "local",
                json!({"outlierDetection": {"consecutive5xxErrors": 2, "baseEjectionTime": "30s",
                                            "maxEjectionPercent": 100}}),
            ),
            service("split", "10.96.0.42", "web", ("http", 80, 9000)),
            traffic_policy(
                "split",
                json!({"loadBalancer": {"localityLbSetting": {"distribute": [
                    {"from": "r1/z1/*", "to": {"r1/z1/*": 20, "r1/z2/*": 80}}]}}}),
            ),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();

    // The client's own zone takes everything while it is healthy.
    let r = count(&c, "http://10.96.0.41:80/", 200, &[]);
    assert_eq!(answers(&r, "hello from z1"), 200, "{r}\n{}", agent_a.log());
    // It fails: ejected after two errors, traffic fails over to zone 2.
    let r = count(
        &c,
        "http://10.96.0.41:80/",
        4,
        &["x-fail-on: z1", "--method=POST"],
    );
    assert!(answers(&r, "HTTP 503") >= 2, "{r}");
    let r = count(
        &c,
        "http://10.96.0.41:80/",
        100,
        &["x-fail-on: z1", "--method=POST"],
    );
    assert_eq!(answers(&r, "hello from z2"), 100, "failed over: {r}");

    // distribute: 20/80 from zone 1, over 2,000 requests within ±5 points.
    let r = count(&c, "http://10.96.0.42:80/", 2000, &[]);
    let to_z2 = answers(&r, "hello from z2");
    assert!((1500..=1700).contains(&to_z2), "{r}");
}

#[test]
fn tcp_and_tls_routes_and_protocol_detection() {
    let (c, _app1, _app2) = web("l7-l4");
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    let e1 = v1.spawn_app(&c.env, &["echo", &v1.v4(9200)]);
    let e2 = v2.spawn_app(&c.env, &["echo", &v2.v4(9200)]);
    let vs = |host: &str, spec: Value| {
        let mut spec = spec;
        spec["hosts"] = json!([host]);
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": host, "namespace": "default"}, "spec": spec,
        })
    };
    let subsets = |host: &str| {
        let mut dr = destination_rule();
        dr["metadata"]["name"] = json!(host);
        dr["spec"]["host"] = json!(host);
        dr
    };
    let dest =
        |host: &str, subset: &str| json!([{"destination": {"host": host, "subset": subset}}]);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            // tcp route: everything on port 5000 to v2.
            service("db", "10.96.0.51", "web", ("tcp", 5000, 9000)),
            subsets("db"),
            vs(
                "db",
                json!({"tcp": [{"match": [{"port": 5000}], "route": dest("db", "v2")}]}),
            ),
            // tls routes by server name.
            service("secure", "10.96.0.52", "web", ("tls", 443, 9200)),
            subsets("secure"),
            vs(
                "secure",
                json!({"tls": [
                    {"match": [{"sniHosts": ["v1.example.com"]}], "route": dest("secure", "v1")},
                    {"match": [{"sniHosts": ["*.example.org"]}], "route": dest("secure", "v2")},
                ]}),
            ),
            // A port named without a protocol: HTTP is detected, so the
            // http route applies; anything else stays TCP.
            service("plain", "10.96.0.53", "web", ("web", 80, 9000)),
            subsets("plain"),
            vs(
                "plain",
                json!({"http": [
                    {"match": [{"headers": {"x-canary": {"exact": "1"}}}], "route": dest("plain", "v2")},
                    {"route": dest("plain", "v1")},
                ]}),
            ),
            service("opaque", "10.96.0.54", "web", ("data", 7000, 9200)),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();

    for _ in 0..4 {
        let body = mesh_tests::cluster::get(&c.client, "http://10.96.0.51:5000/");
        assert!(
            body.starts_with("hello from v2"),
            "tcp route: {body}\n{}",
            agent_a.log()
        );
    }

    let hello = |sni: &str| {
        c.client
            .run_app(&["tls-hello", "10.96.0.52:443", sni])
            .json()
    };
    let (n1, n2) = (e1.accepted().len(), e2.accepted().len());
    // The servers log each accept before echoing; their logs reach the
    // test through a reader thread, so wait for them.
    let accepted = |want: (usize, usize)| {
        wait_until(Duration::from_secs(5), || {
            (e1.accepted().len(), e2.accepted().len()) == want
        })
    };
    assert_eq!(hello("v1.example.com")["echoed"], true);
    assert!(accepted((n1 + 1, n2)), "SNI v1.example.com → v1");
    assert_eq!(hello("api.example.org")["echoed"], true);
    assert!(accepted((n1 + 1, n2 + 1)), "SNI *.example.org → v2");

    let r = count(&c, "http://10.96.0.53:80/", 20, &["x-canary: 1"]);
    assert_eq!(answers(&r, "hello from v2"), 20, "detected as HTTP: {r}");
    let r = count(&c, "http://10.96.0.53:80/", 20, &[]);
    assert_eq!(answers(&r, "hello from v1"), 20, "{r}");
    let r = c
        .client
        .run_app(&["connect", "10.96.0.54:7000", "not http at all"]);
    assert!(
        r.ok(),
        "non-HTTP on an undeclared port stays TCP: {}",
        r.describe()
    );
}
