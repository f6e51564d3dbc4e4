//! The manifests in `deploy/` parse, and the DaemonSet runs the agent with
//! flags the agent accepts (a renamed flag breaks this test, not a cluster).

use std::path::Path;

use clap::Parser as _;
use mesh_agent::config::{Cli, Command};
use serde::Deserialize as _;

fn docs(file: &str) -> Vec<serde_yaml::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

/// The `args` of the first container of the first `kind` in `file`.
fn container_args(file: &str, kind: &str) -> (serde_yaml::Value, Vec<String>) {
    let d = docs(file)
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"));
    let container = d["spec"]["template"]["spec"]["containers"][0].clone();
    let args = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    (container, args)
}

fn parse(args: &[String]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("mesh-agent").chain(args.iter().map(String::as_str)))
}

#[test]
fn every_manifest_parses_and_has_a_kind() {
    let kustomization = &docs("kustomization.yaml")[0];
    let resources = kustomization["resources"].as_sequence().expect("resources");
    assert!(!resources.is_empty());
    for r in resources {
        for d in docs(r.as_str().unwrap()) {
            assert!(d["kind"].as_str().is_some(), "{r:?}: document without kind");
            assert!(
                d["apiVersion"].as_str().is_some(),
                "{r:?}: document without apiVersion"
            );
        }
    }
}

#[test]
fn daemonset_arguments_are_accepted_by_the_agent() {
    let (container, args) = container_args("daemonset.yaml", "DaemonSet");
    let cli = parse(&args).unwrap_or_else(|e| panic!("the DaemonSet's args are not valid: {e}"));
    let Command::Run(config) = cli.command else {
        panic!("not a run command")
    };
    config.validate().expect("valid settings");
    assert!(
        config.keep_pins,
        "a restarting agent must leave pods failing closed"
    );
    // Upgrades put the new pod beside the old one, which takes its sockets
    // over: no host ports (the scheduler would keep the new pod off the
    // node), and the hand-over socket on a volume both pods mount.
    assert!(
        container.get("ports").is_none(),
        "host ports would stop the surge pod"
    );
    let ds = docs("daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_i64(), Some(1));
    assert_eq!(rolling["maxUnavailable"].as_i64(), Some(0));
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    assert!(
        mounts.iter().any(|m| m["mountPath"]
            .as_str()
            .is_some_and(|p| config.handover_socket.starts_with(p))),
        "{} is on no volume",
        config.handover_socket.display()
    );
    // Prometheus scrapes the agent's metrics port.
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"].as_str(),
        Some(config.metrics_addr.port().to_string().as_str())
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"].as_i64(),
        Some(i64::from(config.readiness_addr.port()))
    );
}

#[test]
fn the_workload_configmap_holds_a_valid_registry() {
    let cm = &docs("workloads.yaml")[0];
    let text = cm["data"]["workloads.yaml"].as_str().unwrap();
    let file = (
        Path::new("deploy/workloads.yaml").to_path_buf(),
        text.as_bytes().to_vec(),
    );
    let docs = mesh_agent::sources::files::read_documents([&file])
        .unwrap_or_else(|e| panic!("the workload ConfigMap is refused: {e}"));
    assert!(!docs.documents.is_empty());
}

#[test]
fn the_ca_deployment_arguments_are_accepted() {
    let (_, args) = container_args("ca.yaml", "Deployment");
    let cli =
        parse(&args).unwrap_or_else(|e| panic!("the CA Deployment's args are not valid: {e}"));
    let Command::Ca {
        command: mesh_agent::config::CaCommand::Run(cfg),
    } = cli.command
    else {
        panic!("not `ca run`")
    };
    assert_eq!(cfg.listen.port(), 15012);
    assert_eq!(cfg.kube_audience.as_deref(), Some("mesh-ca"));
    // The agents' token audience matches.
    let ds = docs("daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let token = ds["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ca-token")
        .expect("the ca-token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "mesh-ca"
    );
}

#[test]
fn the_agent_and_the_ca_watch_kubernetes_with_the_access_they_need() {
    let (_, args) = container_args("daemonset.yaml", "DaemonSet");
    let Command::Run(config) = parse(&args).unwrap().command else {
        panic!("not a run command")
    };
    assert!(config.kubernetes);
    let ds = docs("daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["hostPID"].as_bool(),
        Some(true),
        "pods' network namespaces are found through /proc"
    );
    let (_, ca_args) = container_args("ca.yaml", "Deployment");
    let Command::Ca {
        command: mesh_agent::config::CaCommand::Run(ca),
    } = parse(&ca_args).unwrap().command
    else {
        panic!("not `ca run`")
    };
    assert!(ca.kubernetes, "the CA places pods by the API");

    // Every kind the watchers list and watch is granted.
    let role = docs("rbac.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    let allowed = |group: &str, resource: &str| {
        role["rules"].as_sequence().unwrap().iter().any(|r| {
            let has = |key: &str, v: &str| {
                r[key]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|x| x.as_str() == Some(v) || x.as_str() == Some("*"))
            };
            has("apiGroups", group)
                && has("resources", resource)
                && has("verbs", "list")
                && has("verbs", "watch")
        })
    };
    for (group, resource) in [
        ("", "pods"),
        ("", "services"),
        ("", "namespaces"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        assert!(allowed(group, resource), "{group}/{resource}");
    }
    for kind in mesh_agent::istio::Kind::ALL {
        assert!(allowed(kind.group(), &kind.plural()), "{kind:?}");
    }
    // And nothing but reading: the agent changes nothing in the cluster.
    for rule in role["rules"].as_sequence().unwrap() {
        for verb in rule["verbs"].as_sequence().unwrap() {
            let verb = verb.as_str().unwrap();
            assert!(
                ["get", "list", "watch"].contains(&verb),
                "the agent's role grants {verb}: {rule:?}"
            );
        }
    }
}

#[test]
fn the_crds_serve_every_istio_kind_and_version_the_agent_reads() {
    let crds = docs("crds/istio.yaml");
    assert_eq!(crds.len(), mesh_agent::istio::Kind::ALL.len());
    for kind in mesh_agent::istio::Kind::ALL {
        let crd = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == kind.name())
            .unwrap_or_else(|| panic!("no CRD for {kind:?}"));
        assert_eq!(crd["spec"]["group"], kind.group());
        assert_eq!(crd["spec"]["names"]["plural"], kind.plural().as_str());
        assert_eq!(
            crd["metadata"]["name"].as_str().unwrap(),
            format!("{}.{}", kind.plural(), kind.group())
        );
        let versions: Vec<&str> = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(versions, kind.versions(), "{kind:?}");
        let stored: Vec<_> = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|v| v["storage"].as_bool() == Some(true))
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            stored,
            [kind.versions()[0]],
            "the agent watches the newest version, stored"
        );
    }
}

/// Every metric the Grafana dashboard queries is one the agent defines
/// (its families are named in `src/telemetry`), and it queries the golden
/// signals: request rate, errors, latency quantiles.
#[test]
fn the_dashboard_uses_only_the_agents_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("../deploy/grafana/mesh-agent-golden-signals.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let mut defined = String::new();
    let mut stack = vec![root.join("src/telemetry")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                defined.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let name = regex::Regex::new(r"\b(?:istio|mesh)_[a-z0-9_]+").unwrap();
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        for m in name.find_iter(e) {
            let family = m
                .as_str()
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            used.insert(family.to_owned());
        }
    }
    assert!(used.len() >= 8, "too few metrics: {used:?}");
    for f in &used {
        assert!(
            defined.contains(&format!("\"{f}\"")),
            "the dashboard queries {f}, which the agent does not define"
        );
    }
    let all = exprs.join("\n");
    for signal in [
        "rate(istio_requests_total",
        "response_code=~\"5..\"",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "istio_request_duration_milliseconds_bucket",
    ] {
        assert!(all.contains(signal), "no {signal} in the dashboard");
    }
}
