//! A two-node mesh for tests that drive it through configuration: a
//! client pod on node `a`, server pods on node `b`, a CA on the fabric, an
//! agent per node reading one config directory.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::{Agent, AgentOptions, Env, Node, Pod, ca::Ca};

/// Two nodes on a fabric with a CA; `client` on `a`, `servers` on `b`.
pub struct Cluster {
    pub env: Env,
    pub a: Node,
    pub b: Node,
    pub client: Pod,
    pub servers: Vec<Pod>,
    pub fabric: String,
    pub config: PathBuf,
}

pub fn cluster(test: &str, servers: &[(&str, &[(&str, &str)])]) -> Cluster {
    let env = Env::new(test);
    let a = env.node("a");
    let b = env.node("b");
    let mut client = env.pod(&a, "client");
    client.service_account = "client-sa".into();
    let servers = servers
        .iter()
        .map(|(name, labels)| {
            let mut p = env.pod(&b, name);
            p.service_account = "web-sa".into();
            p.labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            p
        })
        .collect();
    let fabric = env.connect_nodes(&[&a, &b]);
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    Cluster {
        env,
        a,
        b,
        client,
        servers,
        fabric,
        config,
    }
}

impl Cluster {
    /// A CA and an agent on each node, all reading the config directory.
    pub fn mesh(&self) -> (Ca, Agent, Agent) {
        self.mesh_with(&[])
    }

    /// Like `mesh`, with more agent flags.
    pub fn mesh_with(&self, extra: &[&str]) -> (Ca, Agent, Agent) {
        let ca = self.ca();
        let registry = self.registry();
        let a = Agent::start(
            &self.env,
            &self.a,
            &registry,
            self.agent_options(&ca, &self.a, extra),
        );
        let b = Agent::start(
            &self.env,
            &self.b,
            &registry,
            self.agent_options(&ca, &self.b, extra),
        );
        (ca, a, b)
    }

    /// The client and the servers, as every agent lists them.
    pub fn registry(&self) -> Vec<&Pod> {
        let mut registry = vec![&self.client];
        registry.extend(&self.servers);
        registry
    }

    /// The CA the agents join.
    pub fn ca(&self) -> Ca {
        Ca::start(&self.env, &self.fabric, "ca", &self.registry())
    }

    /// The options of `node`'s agent: `ca`'s flags, the config directory,
    /// and `extra`.
    pub fn agent_options(&self, ca: &Ca, node: &Node, extra: &[&str]) -> AgentOptions {
        let mut args = ca.agent_args(node);
        args.extend(["--config".into(), self.config.display().to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        AgentOptions {
            args,
            ..Default::default()
        }
    }
}

/// Writes `docs` as one multi-document YAML file, atomically (a rename),
/// so the agent never reads half of it.
pub fn write_yaml(path: &Path, docs: &[Value]) {
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_yaml_text(d)))
        .collect();
    write_text(path, &text);
}

pub fn write_text(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// JSON is YAML; one document per line keeps the files readable in logs.
pub fn serde_yaml_text(v: &Value) -> String {
    format!("{v}\n")
}

/// A Service `name` at `vip` selecting `app: selector`, with one port
/// (its name decides the protocol, as in Istio: `http-…`, `tcp-…`).
pub fn service(name: &str, vip: &str, selector: &str, port: (&str, u16, u16)) -> Value {
    let (port_name, port, target) = port;
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": vip,
            "selector": {"app": selector},
            "ports": [{"name": port_name, "port": port, "targetPort": target}],
        },
    })
}

/// An AuthorizationPolicy for `app: web` allowing GET on port 8080 (its
/// HTTP server) and anything on 9000 (its echo server): the destination's
/// agent decides each request.
pub fn web_get_and_echo_policy() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [
                {"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]},
                {"to": [{"operation": {"ports": ["9000"]}}]},
            ],
        },
    })
}

pub fn get(pod: &Pod, url: &str) -> String {
    let r = pod.run_app(&["get", url]);
    assert!(r.ok(), "GET {url}: {}", r.describe());
    String::from_utf8_lossy(&r.output.stdout).into_owned()
}
