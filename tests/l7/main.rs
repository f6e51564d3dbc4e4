//! L7 routing in the node agent, through real captured connections: the
//! source pod's agent terminates HTTP on ports declared HTTP and routes each
//! request by the VirtualService and DestinationRule of the service's host,
//! then carries it over HBONE to the chosen endpoint. One test per feature,
//! so one failure does not hide the others; the TCP tests at the end show
//! the same DestinationRules acting on plain TCP services.
//!
//! Shares of random draws (weights, fault percentages, locality
//! distribution) are checked within four standard deviations of the
//! sample: a correct agent fails such a check about once in 16,000 runs.

mod destination_rules;
mod matching;
mod protocols;
mod resilience;
mod rewriting;
mod tcp;

use std::time::Duration;

use mesh_tests::{
    cluster::{Cluster, cluster},
    pod::App,
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

/// A DestinationRule for `host` with this traffic policy.
fn traffic_policy(host: &str, policy: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": "default"},
        "spec": {"host": host, "trafficPolicy": policy},
    })
}

fn to(subset: &str) -> Value {
    json!([{"destination": {"host": "web", "subset": subset}}])
}

fn prefix(p: &str) -> Value {
    json!([{"uri": {"prefix": p}}])
}

/// The usual L7 setup: `web` with subsets v1/v2 and these `http` routes,
/// a port named `http-web` (80 → 9000), the mesh started with `extra`
/// agent flags.
fn web_routes(test: &str, http: Value, extra: &[&str]) -> Web {
    let (c, app1, app2) = web(test);
    mesh_tests::cluster::write_yaml(
        &c.config.join("web.yaml"),
        &[
            mesh_tests::cluster::service("web", "10.96.0.10", "web", ("http-web", 80, 9000)),
            destination_rule(),
            virtual_service(http),
        ],
    );
    let (ca, agent_a, agent_b) = c.mesh_with(extra);
    Web {
        c,
        app1,
        app2,
        agent_a,
        _agents: (ca, agent_b),
    }
}

/// A running L7 setup.
struct Web {
    c: Cluster,
    app1: App,
    app2: App,
    agent_a: mesh_tests::Agent,
    _agents: (mesh_tests::ca::Ca, mesh_tests::Agent),
}

impl Web {
    /// One request to `web` at `path`.
    fn one(&self, path: &str, extra: &[&str]) -> Value {
        count(&self.c, &format!("http://10.96.0.10:80{path}"), 1, extra)
    }

    fn many(&self, path: &str, n: usize, extra: &[&str]) -> Value {
        count(&self.c, &format!("http://10.96.0.10:80{path}"), n, extra)
    }
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

fn status(v: &Value) -> u64 {
    v["last"]["status"].as_u64().unwrap_or(0)
}

fn last_header<'a>(v: &'a Value, name: &str) -> &'a str {
    v["last"]["headers"][name].as_str().unwrap_or("")
}

/// The last request a server logged (path and headers as it saw them).
/// The server logs a request before answering it, so after a client's
/// answer only the pipe to the test is left to wait for.
fn last_request(app: &App) -> Value {
    app.wait_for(|l| l["event"] == "http", Duration::from_secs(5));
    app.lines()
        .into_iter()
        .rev()
        .find(|l| l["event"] == "http")
        .expect("the server logged a request")
}

/// The requests `app` logged, as their request lines.
fn requests(app: &App) -> Vec<String> {
    app.lines()
        .iter()
        .filter(|l| l["event"] == "http")
        .map(|l| l["request"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Sends a well-formed request for `path` and waits until `app` logged
/// it: every request answered before it is in `app`'s log by then, if it
/// reached `app` at all (the server logs before it answers).
fn barrier(c: &Cluster, app: &App, path: &str) {
    let r = count(c, &format!("http://10.96.0.10:80{path}"), 1, &[]);
    assert_eq!(status(&r), 200, "barrier request: {r}");
    app.wait_for(
        |l| {
            l["event"] == "http"
                && l["request"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("GET {path} ")))
        },
        Duration::from_secs(5),
    );
}

/// Asserts `observed` of `n` draws of probability `p` lies within four
/// standard deviations of `n·p`.
fn within_4_sigma(observed: u64, n: u64, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (observed as f64 - mean).abs() <= 4.0 * sigma,
        "{what}: {observed} of {n}, expected {mean:.0} ± {:.0} (4σ)",
        4.0 * sigma
    );
}
