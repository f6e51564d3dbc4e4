//! The agent with `--kubernetes`: a fake API server on the fabric (real
//! HTTP, list and watch) tells two agents about pods, a service and a
//! policy. Each agent enrols only its own node's pods, found by UID in the
//! cgroup tree; traffic to the service crosses nodes over HBONE; pods added
//! and deleted through the API are enrolled and removed. Beside Istio
//! ambient, the pods Istio captures on a node are left to it.

use std::time::Duration;

use mesh_tests::{
    Agent, AgentOptions, Env, Node, Pod,
    ca::Ca,
    fake_apiserver::{FakeApiServer, in_netns},
    pod::FABRIC_ADDR,
    sys::wait_until,
};
use serde_json::{Value, json};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PA: &str = "/apis/security.istio.io/v1/peerauthentications";
const OUR_LABEL: &str = "mesh-agent.io/dataplane-mode";
const ISTIO_LABEL: &str = "istio.io/dataplane-mode";

fn enrolled(agent: &Agent) -> Vec<String> {
    let dump = agent.config_dump();
    let mut keys: Vec<String> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            format!(
                "{}/{}",
                w["namespace"].as_str().unwrap(),
                w["name"].as_str().unwrap()
            )
        })
        .collect();
    keys.sort();
    keys
}

fn workload<'a>(dump: &'a Value, name: &str) -> &'a Value {
    dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("{name} not enrolled: {dump}"))
}

#[test]
fn pods_services_and_policies_come_from_the_kubernetes_api() {
    let env = Env::new("kube");
    let a = env.node("a");
    let b = env.node("b");
    let mut client = env.pod(&a, "client");
    client.service_account = "client-sa".into();
    let mut server = env.pod(&b, "server");
    server.service_account = "server-sa".into();
    let late = env.pod(&a, "late");
    let fabric = env.connect_nodes(&[&a, &b]);

    // The API server lives on the fabric, where both nodes reach it.
    let listener = in_netns(&fabric, || {
        std::net::TcpListener::bind((FABRIC_ADDR, 0)).expect("bind on the fabric")
    });
    let api = FakeApiServer::start(listener);
    for c in [PODS, NAMESPACES, SERVICES, SLICES, PA] {
        api.register(c);
    }
    api.apply(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    api.apply(PODS, client.kubernetes());
    api.apply(PODS, server.kubernetes());
    api.apply(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "echo", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.60", "selector": {"app": "server"},
                        "ports": [{"name": "tcp-echo", "port": 80, "targetPort": 9000}]}}),
    );
    api.apply(
        PA,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "default"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let kubeconfig = env.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    // The pods' processes: the kubelet would have started them.
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    client.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    // The CA places pods by what the API says too (no pod listed in files).
    let ca_dir = env.dir.join("ca");
    mesh_tests::ca::init_root(&ca_dir);
    let ca = Ca::serve_with_env(
        &env,
        &fabric,
        &ca_dir,
        &[],
        // Istio's label, opted into: the CA places pods as the agents do.
        &["--kubernetes", "--dataplane-mode-label", ISTIO_LABEL],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let opts = |node: &Node| {
        let mut args = ca.agent_args(node);
        args.extend([
            "--kubernetes".into(),
            "--dataplane-mode-label".into(),
            ISTIO_LABEL.into(),
            "--cgroup-root".into(),
            env.cgroup.display().to_string(),
        ]);
        AgentOptions {
            args,
            env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
            ..Default::default()
        }
    };
    let agent_a = Agent::start(&env, &a, &[], opts(&a));
    let agent_b = Agent::start(&env, &b, &[], opts(&b));

    // Each agent enrols its own node's pod and no other, found by UID.
    assert_eq!(enrolled(&agent_a), ["default/client"]);
    assert_eq!(enrolled(&agent_b), ["default/server"]);
    let dump = agent_a.config_dump();
    let c = workload(&dump, "client");
    assert!(
        c["netns"].as_str().unwrap().starts_with("/proc/")
            && c["cgroup"]
                .as_str()
                .unwrap()
                .ends_with(&format!("pod{}", client.uid)),
        "{c}"
    );
    assert!(
        api.requests().iter().any(|r| r.path == PODS
            && r.query.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=a")),
        "node a's pods were not asked for by field selector"
    );
    let kube = &dump["sources"]["kubernetes"];
    assert_eq!(kube["Pod (this node)"]["count"], 1, "{kube}");
    assert_eq!(kube["Pod (other nodes)"]["count"], 1, "{kube}");

    // The service, known only from the API, leads across nodes over HBONE.
    let r = client
        .run_app(&["connect", "10.96.0.60:80", "via the kubernetes api"])
        .json();
    assert_eq!(r["received"], "via the kubernetes api");
    let m = agent_a.metrics();
    assert_eq!(
        m.value(
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "echo.default.svc.cluster.local"),
                ("connection_security_policy", "mutual_tls"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/server-sa"
                ),
            ]
        ),
        1.0
    );
    // STRICT from the API: plaintext from outside the mesh (node b itself)
    // is refused.
    let node_b_host = Pod {
        netns: b.netns.clone(),
        ..client.clone()
    };
    let outside = node_b_host.run_app_outside_cgroup(&["connect", &server.v4(9000)]);
    assert!(
        !outside.ok(),
        "STRICT let plaintext in: {}",
        outside.describe()
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent_b.metrics().try_value(
            "mesh_proxy_errors_total",
            &[("reason", "plaintext_refused")]
        ) == Ok(1.0)),
        "the refusal was not counted: {}",
        agent_b.metrics().0
    );
    assert_eq!(
        agent_b.config_dump()["snapshot"]["policies"]["default/server"]["peerAuthentication"]["mode"],
        "STRICT"
    );

    // A pod scheduled later on node a is enrolled, and removed when deleted.
    late.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    api.apply(PODS, late.kubernetes());
    assert!(
        wait_until(Duration::from_secs(10), || enrolled(&agent_a)
            == ["default/client", "default/late"]),
        "{}",
        agent_a.log()
    );
    assert_eq!(enrolled(&agent_b), ["default/server"], "not on node b");
    let r = late.run_app(&["connect", "10.96.0.60:80", "late"]).json();
    assert_eq!(r["received"], "late");
    api.delete(PODS, "default/late");
    assert!(
        wait_until(Duration::from_secs(10), || enrolled(&agent_a)
            == ["default/client"]),
        "{}",
        agent_a.log()
    );
    drop(api);
}

/// An agent on `node` reading only the Kubernetes API `api` serves.
fn agent_of(env: &Env, node: &Node, api: &FakeApiServer) -> Agent {
    let kubeconfig = env.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    Agent::start(
        env,
        node,
        &[],
        AgentOptions {
            args: vec![
                "--kubernetes".into(),
                "--cgroup-root".into(),
                env.cgroup.display().to_string(),
            ],
            env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
            ..Default::default()
        },
    )
}

/// A pod the API says is on this node, before its processes exist: the
/// agent keeps it pending (not an error that stops anything) and enrols
/// it once the pod has a process.
#[test]
fn a_pod_without_a_process_yet_is_enrolled_when_it_starts() {
    let env = Env::new("kube-pending");
    let a = env.node("a");
    let pod: Pod = env.pod(&a, "slow");
    let api = FakeApiServer::start(in_netns(&a.netns, || {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }));
    for c in [PODS, NAMESPACES, SERVICES, SLICES] {
        api.register(c);
    }
    let mut labelled = pod.kubernetes();
    labelled["metadata"]["labels"][OUR_LABEL] = json!("ambient");
    api.apply(PODS, labelled);
    let agent = agent_of(&env, &a, &api);
    let dump = agent.config_dump();
    assert!(
        dump["pending"]["default/slow"]
            .as_str()
            .unwrap_or_default()
            .contains("no process in"),
        "{dump}"
    );
    pod.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    assert!(
        wait_until(Duration::from_secs(10), || enrolled(&agent)
            == ["default/slow"]),
        "{}",
        agent.log()
    );
    assert!(
        agent.config_dump()["pending"]
            .as_object()
            .unwrap()
            .is_empty()
    );
}

/// The Kubernetes API fails (every request 500, the watches cut) for a
/// while: the agent keeps its last snapshot — its pods enrolled, their
/// traffic flowing, still ready — and counts the errors. A pod added
/// meanwhile is enrolled once the API answers again, after a relist (the
/// versions the agent watched from were compacted during the outage).
/// (A 503 or 429 is retried inside the Kubernetes client before the
/// watcher sees it; a 500 reaches it.)
#[test]
fn a_failing_api_keeps_the_last_snapshot_and_recovery_relists() {
    let env = Env::new("kube-down");
    let a = env.node("a");
    let labelled = |name: &str| {
        let mut p = env.pod(&a, name);
        p.labels.push((OUR_LABEL.into(), "ambient".into()));
        p
    };
    let (client, server, late) = (labelled("client"), labelled("server"), labelled("late"));
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    client.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    late.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    let api = FakeApiServer::start(in_netns(&a.netns, || {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }));
    for c in [PODS, NAMESPACES, SERVICES, SLICES] {
        api.register(c);
    }
    api.apply(PODS, client.kubernetes());
    api.apply(PODS, server.kubernetes());
    let agent = agent_of(&env, &a, &api);
    assert_eq!(enrolled(&agent), ["default/client", "default/server"]);
    let works = || {
        let r = client.run_app(&["connect", &server.v4(9000)]);
        r.ok()
            && r.json()["local"]
                .as_str()
                .is_some_and(|l| l.starts_with("127."))
    };
    assert!(works());

    let errors = || -> f64 {
        agent
            .metrics()
            .0
            .lines()
            .filter(|l| l.starts_with("mesh_kube_watch_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let errors_before = errors();
    api.fail_with(Some(500));
    api.apply(PODS, late.kubernetes());
    assert!(
        wait_until(Duration::from_secs(20), || errors() > errors_before),
        "no watch error counted while the API fails:\n{}",
        agent.log()
    );
    // Serving on the last snapshot: pods, traffic, readiness.
    for _ in 0..5 {
        assert!(works(), "traffic failed while the API was down");
    }
    assert_eq!(enrolled(&agent), ["default/client", "default/server"]);
    agent
        .try_get("http://127.0.0.1:15021/healthz/ready")
        .expect("still ready on the last snapshot");

    let lists = || {
        api.requests()
            .iter()
            .filter(|r| r.path == PODS && !r.is_watch())
            .count()
    };
    let lists_before = lists();
    api.expire();
    api.fail_with(None);
    assert!(
        wait_until(Duration::from_secs(30), || enrolled(&agent)
            == ["default/client", "default/late", "default/server"]),
        "the pod added during the outage was not enrolled after it:\n{}",
        agent.log()
    );
    assert!(lists() > lists_before, "recovery did not list again");
    assert!(works());
}

/// Beside Istio ambient: Istio's data plane on the node (an istio-cni-node
/// pod, on the host's network) keeps the pods Istio's label puts in ambient
/// mode. The agent enrols the pods of its own label only, says which it
/// left to Istio and why, and takes such a pod over once Istio has gone
/// from the node.
#[test]
fn beside_istio_ambient_the_pods_istio_captures_are_left_to_it() {
    let env = Env::new("kube-istio");
    let a = env.node("a");
    let mut ours = env.pod(&a, "ours");
    ours.labels.push((OUR_LABEL.into(), "ambient".into()));
    let mut both = env.pod(&a, "both");
    both.labels.push((OUR_LABEL.into(), "ambient".into()));
    both.labels.push((ISTIO_LABEL.into(), "ambient".into()));
    let mut istios = env.pod(&a, "istios");
    istios.labels.push((ISTIO_LABEL.into(), "ambient".into()));
    let api = FakeApiServer::start(in_netns(&a.netns, || {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }));
    for c in [PODS, NAMESPACES, SERVICES, SLICES] {
        api.register(c);
    }
    for p in [&ours, &both, &istios] {
        api.apply(PODS, p.kubernetes());
        p.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    }
    api.apply(
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "istio-cni-node-x", "namespace": "istio-system",
                            "uid": "00000000-0000-4000-8000-00000000c0c0",
                            "labels": {"k8s-app": "istio-cni-node"}},
               "spec": {"nodeName": a.name, "hostNetwork": true,
                        "containers": [{"name": "install-cni", "image": "istio/install-cni"}]},
               "status": {"phase": "Running", "podIP": "192.0.2.10"}}),
    );
    let agent = agent_of(&env, &a, &api);
    assert!(
        wait_until(Duration::from_secs(10), || enrolled(&agent)
            == ["default/ours"]),
        "{}",
        agent.log()
    );
    let dump = agent.config_dump();
    let left: Vec<(&str, &str)> = dump["leftToIstio"]
        .as_array()
        .unwrap_or_else(|| panic!("no leftToIstio: {dump}"))
        .iter()
        .map(|l| (l["pod"].as_str().unwrap(), l["istioPod"].as_str().unwrap()))
        .collect();
    // `istios` is not ours to begin with: not enrolled, and not "left".
    assert_eq!(left, [("default/both", "istio-system/istio-cni-node-x")]);
    let log = agent.log();
    assert!(
        log.contains("pod default/both is not enrolled")
            && log.contains("label it mesh-agent.io/dataplane-mode: ambient"),
        "{log}"
    );

    api.delete(PODS, "istio-system/istio-cni-node-x");
    assert!(
        wait_until(Duration::from_secs(10), || enrolled(&agent)
            == ["default/both", "default/ours"]),
        "{}",
        agent.log()
    );
    assert!(
        agent.config_dump()["leftToIstio"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}
