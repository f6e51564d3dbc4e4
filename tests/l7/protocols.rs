//! Protocols through the L7 path: malformed HTTP refused before the
//! upstream, request smuggling, WebSocket upgrades, h2c and gRPC, `tcp` and
//! `tls` routes, and protocol detection on undeclared ports.

use std::time::Duration;

use mesh_tests::{
    cluster::{service, write_yaml},
    sys::wait_until,
};
use serde_json::json;

use super::*;

/// `raw BYTES` from the client to `web`: what came back.
fn raw(w: &Web, bytes: &str) -> Value {
    w.c.client.run_app(&["raw", "10.96.0.10:80", bytes]).json()
}

#[test]
fn malformed_requests_are_refused_before_the_upstream() {
    let w = web_routes("l7-malformed", json!([{"route": to("v1")}]), &[]);
    // A good request first, so the path is known to work.
    let ok = raw(
        &w,
        "GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(ok["status"], 200, "{ok}");
    barrier(&w.c, &w.app1, "/before");
    let before = requests(&w.app1).len();

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
        let r = raw(&w, bytes);
        assert_eq!(r["status"].as_u64(), Some(want), "{what}: {r}");
    }
    // Every case was answered before the barrier was sent: had one reached
    // the upstream, it would be in its log before the barrier.
    barrier(&w.c, &w.app1, "/after");
    assert_eq!(
        requests(&w.app1)[before..],
        ["GET /after HTTP/1.1"],
        "a malformed request reached the upstream"
    );
}

#[test]
fn a_request_smuggled_behind_transfer_encoding_never_reaches_the_upstream() {
    let w = web_routes("l7-smuggle", json!([{"route": to("v1")}]), &[]);
    // Content-Length and Transfer-Encoding together, the classic way to
    // smuggle a second request past a proxy: the request is read by
    // Transfer-Encoding alone and the connection closed after it (RFC 9112
    // §6.1), so what follows is never taken for a request.
    let r = raw(
        &w,
        "POST /first HTTP/1.1\r\nHost: web\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    );
    let text = r["received"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        text.contains("connection: close") && text.matches("http/1.1 ").count() == 1,
        "{r}"
    );
    barrier(&w.c, &w.app1, "/after");
    assert_eq!(
        requests(&w.app1),
        ["POST /first HTTP/1.1", "GET /after HTTP/1.1"],
        "only the first request went upstream"
    );
}

#[test]
fn a_websocket_upgrade_joins_both_connections_through_both_agents() {
    let w = web_routes("l7-upgrade", json!([{"route": to("v1")}]), &[]);
    let r = w
        .c
        .client
        .run_app(&[
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
    w.app1
        .wait_for(|l| l["event"] == "upgraded", Duration::from_secs(5));
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
        agent_a.metrics().try_value(
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "0"),
            ],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || grpc_ok() == Ok(2.0)),
        "gRPC calls in istio_requests_total: {:?}",
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
