//! L7 routing in the node agent, through real captured connections: the
//! source pod's agent terminates HTTP on ports declared HTTP and routes each
//! request by the VirtualService and DestinationRule of the service's host,
//! then carries it over HBONE to the chosen endpoint.

use mesh_tests::cluster::{Cluster, cluster, service, write_yaml};
use serde_json::{Value, json};

/// Two versions of `web` on node b, a Service with an HTTP port, subsets
/// by version.
fn web(test: &str) -> Cluster {
    let c = cluster(
        test,
        &[
            ("web-v1", &[("app", "web"), ("version", "v1")]),
            ("web-v2", &[("app", "web"), ("version", "v2")]),
        ],
    );
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    v1.spawn_app(&c.env, &["http", "v1", &v1.v4(9000)]);
    v2.spawn_app(&c.env, &["http", "v2", &v2.v4(9000)]);
    c
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
    let c = web("l7-split");
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
}
