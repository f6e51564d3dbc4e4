//! AuthorizationPolicy and RequestAuthentication, enforced by the
//! destination's agent on real traffic: a client pod on node a reaches a
//! `web` pod on node b over HBONE (mutual TLS), an outsider pod (not in
//! the mesh) reaches it in plaintext. Every allowed case has a mirror
//! that is denied; each is seen by the client and counted by the agent.

mod custom;
mod jwt;
mod l4;
mod l7;
mod rate_limit;

use std::{path::PathBuf, time::Duration};

use mesh_tests::{
    Agent, AgentOptions, Env, Node, Pod, ca::Ca, cluster::write_yaml, pod::App, sys::wait_until,
};
use serde_json::{Value, json};

/// The Service in front of `web`: HTTP on 80 (→ 8080), TCP on 90
/// (→ 9000), gRPC on 50051.
const VIP: &str = "10.96.0.10";

struct Mesh {
    env: Env,
    client: Pod,
    web: Pod,
    /// On node a, outside the mesh: plaintext.
    outsider: Pod,
    /// On node b, outside the mesh: where a JWKS server runs.
    keys: Pod,
    config: PathBuf,
    /// The destination agent's `--audit-log`.
    audit: PathBuf,
    agent_b: Agent,
    _agents: (Ca, Agent),
    _apps: Vec<App>,
}

fn mesh(test: &str, extra: &[&str]) -> Mesh {
    let env = Env::new(test);
    let a = env.node("a");
    let b = env.node("b");
    let mut client = env.pod(&a, "client");
    client.service_account = "client-sa".into();
    let outsider = env.pod(&a, "outsider");
    let mut web = env.pod(&b, "web");
    web.service_account = "web-sa".into();
    web.labels = [("app".to_string(), "web".to_string())].into();
    let keys = env.pod(&b, "keys");
    let fabric = env.connect_nodes(&[&a, &b]);
    let apps = vec![
        web.spawn_app(&env, &["http", "web", &web.v4(8080), &web.v4(7000)]),
        web.spawn_app(&env, &["echo", &web.v4(9000)]),
        web.spawn_app(&env, &["h2", "web", &web.v4(50051)]),
    ];
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    write_yaml(&config.join("web.yaml"), &[service()]);
    let registry = [&client, &web];
    let ca = Ca::start(&env, &fabric, "ca", &registry);
    let audit = env.dir.join("audit.log");
    // The CUSTOM action's authorizers, at the keys pod (see `custom`).
    let mesh_config = env.dir.join("mesh.yaml");
    std::fs::write(&mesh_config, mesh_config_text(&keys)).unwrap();
    let opts = |node: &Node| {
        let mut args = ca.agent_args(node);
        args.extend(["--config".into(), config.display().to_string()]);
        args.extend(["--audit-log".into(), audit.display().to_string()]);
        args.extend(["--mesh-config".into(), mesh_config.display().to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        AgentOptions {
            args,
            ..Default::default()
        }
    };
    let agent_a = Agent::start(&env, &a, &registry, opts(&a));
    let agent_b = Agent::start(&env, &b, &registry, opts(&b));
    Mesh {
        env,
        client,
        web,
        outsider,
        keys,
        config,
        audit,
        agent_b,
        _agents: (ca, agent_a),
        _apps: apps,
    }
}

/// Istio's `istio` ConfigMap with two HTTP external authorizers at
/// `keys`:8600, one failing closed (the default), one open.
fn mesh_config_text(keys: &Pod) -> String {
    let provider = |name: &str, fail_open: bool| {
        json!({"name": name, "envoyExtAuthzHttp": {
            "service": keys.ip4.to_string(), "port": 8600, "timeout": "500ms",
            "failOpen": fail_open,
            "includeRequestHeadersInCheck": ["x-ext-authz"],
            "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
            "headersToDownstreamOnDeny": ["x-ext-authz-check-result", "content-type"],
        }})
    };
    let mesh = json!({"extensionProviders": [provider("ext", false), provider("ext-open", true)]});
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": mesh.to_string()},
    });
    cm.to_string()
}

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "clusterIP": VIP,
            "selector": {"app": "web"},
            "ports": [
                {"name": "http-web", "port": 80, "targetPort": 8080},
                {"name": "tcp-echo", "port": 90, "targetPort": 9000},
                {"name": "grpc", "port": 50051, "targetPort": 50051},
            ],
        },
    })
}

/// An AuthorizationPolicy in `default` (or `namespace/name`).
fn policy(name: &str, spec: Value) -> Value {
    let (ns, name) = name.split_once('/').unwrap_or(("default", name));
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

impl Mesh {
    /// Replaces the policies and waits until the destination's agent
    /// applied them.
    fn apply(&self, docs: &[Value]) {
        let version = || self.agent_b.metrics().value("mesh_config_version", &[]);
        let before = version();
        write_yaml(&self.config.join("policies.yaml"), docs);
        assert!(
            wait_until(Duration::from_secs(5), || version() > before),
            "policies not applied:\n{}",
            self.agent_b.log()
        );
    }

    /// One HTTP/1.1 request from the client to `web` at `path`.
    fn get(&self, path: &str, extra: &[&str]) -> Value {
        let url = format!("http://{VIP}:80{path}");
        let mut args = vec!["http-count", &url, "1"];
        args.extend(extra);
        self.client.run_app(&args).json()["last"].clone()
    }

    /// The policies `/config_dump` shows for `web`.
    fn web_policies(&self) -> Value {
        self.agent_b.config_dump()["snapshot"]["policies"]["default/web"].clone()
    }

    fn status(&self, path: &str, extra: &[&str]) -> u64 {
        self.get(path, extra)["status"].as_u64().unwrap_or(0)
    }

    /// Whether an echo round trip from `pod` to `addr` works.
    fn echo(&self, pod: &Pod, addr: &str) -> bool {
        pod.run_app(&["connect", addr, "ping"]).ok()
    }

    /// `mesh_authz_decisions_total` for these labels (0 before the first).
    fn decisions(&self, action: &str, decision: &str, policy: &str) -> f64 {
        self.agent_b
            .metrics()
            .try_value(
                "mesh_authz_decisions_total",
                &[
                    ("action", action),
                    ("decision", decision),
                    ("policy", policy),
                ],
            )
            .unwrap_or(0.0)
    }

    /// Asserts `f` changes the decision count by exactly one.
    fn counted<T>(&self, labels: (&str, &str, &str), f: impl FnOnce() -> T) -> T {
        let before = self.decisions(labels.0, labels.1, labels.2);
        let r = f();
        let after = self.decisions(labels.0, labels.1, labels.2);
        assert_eq!(after, before + 1.0, "{labels:?} counted once");
        r
    }
}

/// The 403 a denied HTTP request gets.
fn assert_denied(v: &Value, what: &str) {
    assert_eq!(v["status"], 403, "{what}: {v}");
    assert_eq!(v["body"], "RBAC: access denied\n", "{what}: {v}");
    assert_eq!(v["headers"]["x-mesh-response-flags"], "RBAC", "{what}: {v}");
}

fn assert_allowed(v: &Value, what: &str) {
    assert_eq!(v["status"], 200, "{what}: {v}");
}
