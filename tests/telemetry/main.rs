//! Telemetry through real traffic between two nodes: access logs in
//! Envoy's formats, selected and filtered by Istio's Telemetry resource,
//! with providers from a MeshConfig the agents watch; golden signals read
//! back through a real Prometheus.

mod access_log;
mod cli;
mod golden_signals;
mod tracing;

use std::{path::PathBuf, time::Duration};

use mesh_tests::{
    Agent,
    ca::Ca,
    cluster::{Cluster, cluster, service, write_text, write_yaml},
    sys::wait_until,
};
use serde_json::{Value, json};

/// The service the client calls.
const VIP: &str = "10.96.0.10";

/// `web` (an HTTP server on :9000 and an echo server on :9100, node b)
/// behind a Service with an HTTP port; with `per_request`, an
/// AuthorizationPolicy that makes b's agent read each request; both
/// agents started with `--mesh-config` (written by the test).
struct Mesh {
    c: Cluster,
    mesh_config: PathBuf,
    agent_a: Agent,
    agent_b: Agent,
    /// `web`'s HTTP server, which logs each request with its headers.
    web_app: mesh_tests::pod::App,
    _ca: Ca,
}

impl Mesh {
    fn start(
        test: &str,
        mesh_config: &dyn Fn(&std::path::Path) -> String,
        per_request: bool,
    ) -> Self {
        let c = cluster(test, &[("web", &[("app", "web")])]);
        let web = &c.servers[0];
        let web_app = web.spawn_app(&c.env, &["http", "web", &web.v4(9000)]);
        web.spawn_app(&c.env, &["echo", &web.v4(9100)]);
        let mesh_path = c.env.dir.join("mesh.yaml");
        write_text(&mesh_path, &mesh_config(&c.env.dir));
        let mut docs = vec![service("web", VIP, "web", ("http-web", 80, 9000))];
        if per_request {
            docs.push(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                         "rules": [{"to": [{"operation": {"paths": ["/*"]}}]},
                                   {"to": [{"operation": {"ports": ["9100"]}}]}]},
            }));
        }
        write_yaml(&c.config.join("web.yaml"), &docs);
        let mesh_flag = mesh_path.display().to_string();
        let (ca, agent_a, agent_b) = c.mesh_with(&["--mesh-config", &mesh_flag]);
        Self {
            c,
            mesh_config: mesh_path,
            agent_a,
            agent_b,
            web_app,
            _ca: ca,
        }
    }

    /// Writes `telemetry.yaml` and waits until both agents applied it.
    fn telemetry(&self, docs: &[Value]) {
        let version = |a: &Agent| a.metrics().value("mesh_config_version", &[]);
        let before = (version(&self.agent_a), version(&self.agent_b));
        write_yaml(&self.c.config.join("telemetry.yaml"), docs);
        assert!(
            wait_until(Duration::from_secs(5), || version(&self.agent_a) > before.0
                && version(&self.agent_b) > before.1),
            "Telemetry not applied:\n{}",
            self.agent_a.log()
        );
    }

    /// One HTTP/1.1 request to `web` at `path`: the status.
    fn get(&self, path: &str, extra: &[&str]) -> u64 {
        let url = format!("http://{VIP}:80{path}");
        let mut args = vec!["http-count", &url, "1"];
        args.extend(extra);
        let v = self.c.client.run_app(&args).json();
        v["last"]["status"].as_u64().unwrap_or(0)
    }
}

/// A Telemetry resource.
fn telemetry(name: &str, spec: Value) -> Value {
    let (ns, name) = name.split_once('/').unwrap_or(("default", name));
    json!({
        "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// The lines of `path` containing `needle` (none when it does not exist).
fn lines_with(path: &std::path::Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}
