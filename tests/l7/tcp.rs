//! Plain TCP and TLS services: `tcp` and `tls` routes, protocol detection,
//! and DestinationRules acting on TCP as they do in Istio (load balancing,
//! `connectionPool.tcp`, outlier detection on connect failures) and
//! ServiceEntry endpoint weights.

use std::time::Duration;

use mesh_tests::{
    cluster::{Cluster, service, write_yaml},
    pod::App,
    sys::wait_until,
};
use serde_json::json;

use super::*;

/// Echo servers on port 9200 of web-v1 and web-v2.
fn echoes(c: &Cluster) -> (App, App) {
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    (
        v1.spawn_app(&c.env, &["echo", &v1.v4(9200)]),
        v2.spawn_app(&c.env, &["echo", &v2.v4(9200)]),
    )
}

fn vs(host: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["hosts"] = json!([host]);
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": host, "namespace": "default"}, "spec": spec,
    })
}

fn subsets(host: &str) -> Value {
    let mut dr = destination_rule();
    dr["metadata"]["name"] = json!(host);
    dr["spec"]["host"] = json!(host);
    dr
}

fn dest(host: &str, subset: &str) -> Value {
    json!([{"destination": {"host": host, "subset": subset}}])
}

/// `n` echo round trips to `addr`, each on a new connection: how many
/// succeeded.
fn connects(c: &Cluster, addr: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| c.client.run_app(&["connect", addr, "ping"]).ok())
        .count()
}

/// Waits until the two echo servers have accepted `want` connections.
fn accepted(e1: &App, e2: &App, want: (usize, usize)) -> bool {
    // The servers log each accept before echoing; their logs reach the
    // test through a reader thread.
    wait_until(Duration::from_secs(5), || {
        (e1.accepted().len(), e2.accepted().len()) == want
    })
}

#[test]
fn a_tcp_route_sends_every_connection_to_its_subset() {
    let (c, _app1, _app2) = web("l7-tcp-route");
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("db", "10.96.0.51", "web", ("tcp", 5000, 9000)),
            subsets("db"),
            vs(
                "db",
                json!({"tcp": [{"match": [{"port": 5000}], "route": dest("db", "v2")}]}),
            ),
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
}

#[test]
fn tls_routes_choose_by_the_client_hellos_server_name() {
    let (c, _app1, _app2) = web("l7-tls-route");
    let (e1, e2) = echoes(&c);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("secure", "10.96.0.52", "web", ("tls", 443, 9200)),
            subsets("secure"),
            vs(
                "secure",
                json!({"tls": [
                    {"match": [{"sniHosts": ["v1.example.com"]}], "route": dest("secure", "v1")},
                    {"match": [{"sniHosts": ["*.example.org"]}], "route": dest("secure", "v2")},
                ]}),
            ),
        ],
    );
    let (_ca, _agent_a, _agent_b) = c.mesh();
    let hello = |sni: &str| {
        c.client
            .run_app(&["tls-hello", "10.96.0.52:443", sni])
            .json()
    };
    assert_eq!(hello("v1.example.com")["echoed"], true);
    assert!(accepted(&e1, &e2, (1, 0)), "SNI v1.example.com → v1");
    assert_eq!(hello("api.example.org")["echoed"], true);
    assert!(accepted(&e1, &e2, (1, 1)), "SNI *.example.org → v2");
}

#[test]
fn http_is_detected_on_an_undeclared_port_and_anything_else_stays_tcp() {
    let (c, _app1, _app2) = web("l7-detect");
    let (_e1, _e2) = echoes(&c);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
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
    let (_ca, _agent_a, _agent_b) = c.mesh();
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

#[test]
fn a_tcp_service_is_balanced_round_robin_or_by_source_ip_as_its_rule_says() {
    let (c, _app1, _app2) = web("l7-tcp-lb");
    let (e1, e2) = echoes(&c);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("rr", "10.96.0.61", "web", ("tcp", 7000, 9200)),
            service("sticky", "10.96.0.62", "web", ("tcp", 7000, 9200)),
            traffic_policy(
                "sticky",
                json!({"loadBalancer": {"consistentHash": {"useSourceIp": true}}}),
            ),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();
    // Round robin (no rule): ten each.
    assert_eq!(connects(&c, "10.96.0.61:7000", 20), 20, "{}", agent_a.log());
    assert!(
        accepted(&e1, &e2, (10, 10)),
        "round robin: {} and {}",
        e1.accepted().len(),
        e2.accepted().len()
    );
    // Consistent hash on the client's address: all twenty to one.
    assert_eq!(connects(&c, "10.96.0.62:7000", 20), 20);
    assert!(
        accepted(&e1, &e2, (30, 10)) || accepted(&e1, &e2, (10, 30)),
        "by source address: {} and {}",
        e1.accepted().len(),
        e2.accepted().len()
    );
}

#[test]
fn tcp_max_connections_refuses_the_connection_over_the_limit() {
    let (c, _app1, _app2) = web("l7-tcp-max");
    let (_e1, _e2) = echoes(&c);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("limited", "10.96.0.63", "web", ("tcp", 7000, 9200)),
            traffic_policy(
                "limited",
                json!({"connectionPool": {"tcp": {"maxConnections": 1}}}),
            ),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();
    let overflow = || {
        agent_a.metrics().try_value(
            "mesh_proxy_errors_total",
            &[("direction", "outbound"), ("reason", "upstream_overflow")],
        )
    };
    // One connection held open takes the only place.
    let _held = c
        .client
        .spawn_app(&c.env, &["hold", "10.96.0.63:7000", "3"]);
    let r = c.client.run_app(&["connect", "10.96.0.63:7000", "x"]);
    assert!(!r.ok(), "a second connection got through: {}", r.describe());
    assert!(
        wait_until(Duration::from_secs(5), || overflow() == Ok(1.0)),
        "overflow not counted: {:?}",
        overflow()
    );
    // Once it closes, the next one is let through.
    assert!(
        wait_until(Duration::from_secs(10), || connects(
            &c,
            "10.96.0.63:7000",
            1
        ) == 1),
        "the place was never given back"
    );
}

#[test]
fn tcp_connect_timeout_bounds_the_wait_for_an_endpoint() {
    let (c, _app1, _app2) = web("l7-tcp-timeout");
    // An endpoint nobody answers for: an unused address on the fabric
    // (the connect would fail only when address resolution gives up).
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "silent", "namespace": "default"},
                "spec": {
                    "hosts": ["silent.example.internal"], "addresses": ["10.96.0.64"],
                    "ports": [{"number": 7000, "name": "tcp", "protocol": "TCP"}],
                    "location": "MESH_EXTERNAL", "resolution": "STATIC",
                    "endpoints": [{"address": "10.255.0.200"}],
                },
            }),
            traffic_policy(
                "silent.example.internal",
                json!({"connectionPool": {"tcp": {"connectTimeout": "300ms"}}}),
            ),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();
    let r = c.client.run_app(&["connect", "10.96.0.64:7000", "x"]);
    assert!(!r.ok(), "{}", r.describe());
    let reason = |why: &str| {
        agent_a.metrics().try_value(
            "mesh_proxy_errors_total",
            &[("direction", "outbound"), ("reason", why)],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || reason("connect_timeout")
            == Ok(1.0)),
        "not cut by connectTimeout: {}",
        agent_a.metrics().0
    );
    assert!(
        agent_a.log().contains("timed out after 300ms"),
        "{}",
        agent_a.log()
    );
}

#[test]
fn outlier_detection_ejects_a_tcp_endpoint_that_refuses_connections() {
    let (c, _app1, _app2) = web("l7-tcp-outlier");
    // Only v1 listens on 9200; v2's port refuses.
    let (v1, _) = (&c.servers[0], &c.servers[1]);
    let e1 = v1.spawn_app(&c.env, &["echo", &v1.v4(9200)]);
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("plain", "10.96.0.65", "web", ("tcp", 7000, 9200)),
            service("guarded", "10.96.0.66", "web", ("tcp", 7000, 9200)),
            traffic_policy(
                "guarded",
                json!({"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s",
                                            "baseEjectionTime": "30s", "maxEjectionPercent": 100}}),
            ),
        ],
    );
    let (_ca, _agent_a, _agent_b) = c.mesh();
    // Without a rule, round robin keeps sending every other connection to
    // the endpoint that refuses.
    assert_eq!(connects(&c, "10.96.0.65:7000", 20), 10);
    // With outlier detection, two refusals in a row eject it.
    assert_eq!(connects(&c, "10.96.0.66:7000", 20), 18);
    assert!(
        wait_until(Duration::from_secs(5), || e1.accepted().len() == 28),
        "{}",
        e1.accepted().len()
    );
}

#[test]
fn service_entry_endpoint_weights_share_the_connections() {
    let (c, _app1, _app2) = web("l7-tcp-weights");
    let (e1, e2) = echoes(&c);
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    write_yaml(
        &c.config.join("web.yaml"),
        &[json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "weighted", "namespace": "default"},
            "spec": {
                "hosts": ["weighted.example.internal"], "addresses": ["10.96.0.67"],
                "ports": [{"number": 7000, "name": "tcp", "protocol": "TCP", "targetPort": 9200}],
                "location": "MESH_INTERNAL", "resolution": "STATIC",
                "endpoints": [
                    {"address": v1.ip4.to_string(), "weight": 3},
                    {"address": v2.ip4.to_string(), "weight": 1},
                ],
            },
        })],
    );
    let (_ca, _agent_a, _agent_b) = c.mesh();
    assert_eq!(connects(&c, "10.96.0.67:7000", 20), 20);
    assert!(
        accepted(&e1, &e2, (15, 5)),
        "weights 3:1 over 20 connections (round robin): {} and {}",
        e1.accepted().len(),
        e2.accepted().len()
    );
}
