//! The CNI plugin run as a container runtime runs it: `mesh-cni` with the
//! CNI environment and a network configuration on stdin, after a "previous
//! plugin" (the test) gave the pod its namespace and addresses. The pod's
//! very first connect, made the moment the plugin returns, is captured.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    time::Duration,
};

use mesh_tests::{Agent, AgentOptions, Env, Pod, kernel, sys};
use serde_json::{Value, json};

/// Runs the plugin for `pod` as the runtime would.
fn plugin(command: &str, pod: &Pod, socket: &std::path::Path) -> Output {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "mesh-cni",
        "agentSocket": socket,
        "excludeNamespaces": ["kube-system"],
        "timeoutSeconds": 15,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
            "ips": [
                {"address": format!("{}/24", pod.ip4), "interface": 0},
                {"address": format!("{}/64", pod.ip6), "interface": 0},
            ],
        },
    });
    let mut child = Command::new(sys::cni_bin())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                 K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.name, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mesh-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    mesh_tests::pod::wait_with_timeout(child, Duration::from_secs(30))
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mesh-cni printed no JSON ({e}): stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The pod as a starting pod's record: its UID and addresses, no paths
/// (the agent learns the namespace from the plugin, the cgroup from the
/// UID).
fn starting(pod: &Pod) -> Value {
    let mut w = pod.workload();
    let o = w.as_object_mut().unwrap();
    o.remove("netns");
    o.remove("cgroup");
    o.insert("uid".into(), json!(pod.uid));
    w
}

fn enrolled(agent: &Agent) -> Vec<String> {
    agent.config_dump()["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str().map(str::to_owned))
        .collect()
}

/// The pod is listed but has no process yet, so the agent cannot find its
/// namespace and keeps it pending (retried only on its hour-long timer).
/// The plugin's ADD enrols it before returning: the first connect goes to
/// the agent. A DEL lets it go; a pod the mesh does not carry is passed
/// through at once.
#[test]
fn a_pod_enrolled_by_the_plugin_is_captured_from_its_first_connect() {
    let env = Env::new("cni-add");
    let node = env.node("node");
    let server = env.pod(&node, "server");
    let web = env.pod(&node, "web");
    let stranger = env.pod(&node, "stranger");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let socket = env.dir.join("cni.sock");
    let agent = Agent::start(
        &env,
        &node,
        &[],
        AgentOptions {
            config_poll_interval: Some("1h".into()),
            ..AgentOptions::args(&["--cni-socket", socket.to_str().unwrap()])
        },
    );
    mesh_tests::cluster::write_text(
        &agent.workloads,
        &json!({"workloads": [starting(&web)]}).to_string(),
    );
    assert!(
        sys::wait_until(Duration::from_secs(20), || {
            agent.config_dump()["pending"]
                .as_object()
                .is_some_and(|p| p.contains_key("default/web"))
        }),
        "the agent did not take the starting pod as pending:\n{}",
        agent.log()
    );
    assert!(kernel::cgroup_programs(&web.cgroup).is_empty());

    let out = plugin("ADD", &web, &socket);
    assert!(
        out.status.success(),
        "ADD failed: {:?} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The result is the previous plugins' own.
    let result = stdout_json(&out);
    assert_eq!(result["ips"][0]["address"], format!("{}/24", web.ip4));
    assert_eq!(result["cniVersion"], "1.0.0");

    // At once, the pod's first connect: redirected to the agent's listener
    // in the pod (the client's local address is loopback).
    let r = web.run_app(&["connect", &server.v4(9000), "first"]).json();
    assert_eq!(r["received"], "first");
    assert_eq!(r["peer"], server.v4(9000));
    let local: std::net::SocketAddr = r["local"].as_str().unwrap().parse().unwrap();
    assert!(
        local.ip().is_loopback(),
        "the first connect was not captured: {r}\n{}",
        agent.log()
    );
    assert_eq!(enrolled(&agent), ["web"]);
    assert!(agent.log().contains("enrolled at the CNI plugin's request"));

    // A repeated ADD is answered at once and changes nothing.
    let cookie = agent.config_dump()["workloads"][0]["netnsCookie"].clone();
    assert!(plugin("ADD", &web, &socket).status.success());
    assert_eq!(
        agent.config_dump()["workloads"][0]["netnsCookie"],
        cookie,
        "a repeated ADD enrolled the pod again"
    );

    // A pod the registry does not list is not the mesh's: passed through.
    let out = plugin("ADD", &stranger, &socket);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout_json(&out)["ips"][0]["address"],
        format!("{}/24", stranger.ip4)
    );
    assert!(kernel::cgroup_programs(&stranger.cgroup).is_empty());

    // DEL: the sandbox goes, the agent lets go of it at once.
    let out = plugin("DEL", &web, &socket);
    assert!(out.status.success(), "{out:?}");
    assert!(enrolled(&agent).is_empty(), "{}", agent.log());
    assert!(
        kernel::cgroup_programs(&web.cgroup).is_empty(),
        "programs left on the deleted pod's cgroup"
    );
}

/// No agent on the node: the ADD fails with CNI's "try again later" (the
/// runtime tears the sandbox down and retries), so the pod never runs
/// uncaptured. The system's namespaces are not held up; a DEL succeeds.
#[test]
fn without_an_agent_the_add_fails_and_the_pod_does_not_start() {
    let env = Env::new("cni-noagent");
    let node = env.node("node");
    let web = env.pod(&node, "web");
    let socket = env.dir.join("no-agent.sock");

    let out = plugin("ADD", &web, &socket);
    assert!(!out.status.success(), "ADD succeeded without an agent");
    let err = stdout_json(&out);
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("did not answer"),
        "{err}"
    );
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains(socket.to_str().unwrap()),
        "{err}"
    );

    let mut system = web.clone();
    system.namespace = "kube-system".into();
    let out = plugin("ADD", &system, &socket);
    assert!(out.status.success(), "{out:?}");

    assert!(plugin("DEL", &web, &socket).status.success());
    let out = Command::new(sys::cni_bin())
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
}

/// With the Kubernetes API: the pod is scheduled, with no address yet in
/// its status, when the runtime runs the plugin. The agent enrols it on
/// the plugin's addresses, and when the status later brings the same
/// addresses it keeps the pod as it is (no second enrolment). A pod of the
/// node outside the mesh is passed through at once, not after a wait.
#[test]
fn a_starting_pod_from_the_api_is_enrolled_on_the_plugins_addresses() {
    use mesh_tests::fake_apiserver::{FakeApiServer, in_netns};
    const PODS: &str = "/api/v1/pods";
    let env = Env::new("cni-kube");
    let node = env.node("node");
    let server = env.pod(&node, "server");
    let mut web = env.pod(&node, "web");
    web.labels
        .push(("mesh-agent.io/dataplane-mode".into(), "ambient".into()));
    let plain = env.pod(&node, "plain");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);

    let gateway = format!("10.10.{}.1", node.index);
    let listener = in_netns(&node.netns, move || {
        std::net::TcpListener::bind((gateway.as_str(), 0)).expect("bind on the node")
    });
    let api = FakeApiServer::start(listener);
    for c in [
        PODS,
        "/api/v1/namespaces",
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        api.register(c);
    }
    let scheduled = |p: &Pod| {
        let mut k = p.kubernetes();
        k["status"] = json!({"phase": "Pending"});
        k
    };
    api.apply(PODS, scheduled(&web));
    api.apply(PODS, scheduled(&plain));
    let kubeconfig = env.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let socket = env.dir.join("cni.sock");
    let agent = Agent::start(
        &env,
        &node,
        &[],
        AgentOptions {
            args: [
                "--kubernetes",
                "--cgroup-root",
                env.cgroup.to_str().unwrap(),
                "--cni-socket",
                socket.to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec(),
            env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
            config_poll_interval: Some("1h".into()),
            ..Default::default()
        },
    );
    assert!(enrolled(&agent).is_empty());

    let out = plugin("ADD", &web, &socket);
    assert!(out.status.success(), "{out:?}\n{}", agent.log());
    let r = web.run_app(&["connect", &server.v4(9000), "first"]).json();
    let local: std::net::SocketAddr = r["local"].as_str().unwrap().parse().unwrap();
    assert!(local.ip().is_loopback(), "not captured: {r}");
    let dump = agent.config_dump();
    let w = &dump["workloads"][0];
    assert_eq!(w["name"], "web");
    assert_eq!(w["ips"], json!([web.ip4.to_string(), web.ip6.to_string()]));
    let cookie = w["netnsCookie"].clone();

    let started = std::time::Instant::now();
    let out = plugin("ADD", &plain, &socket);
    assert!(out.status.success(), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a pod outside the mesh waited {:?}",
        started.elapsed()
    );
    assert!(kernel::cgroup_programs(&plain.cgroup).is_empty());

    let version = || {
        agent
            .metrics()
            .try_value("mesh_config_version", &[])
            .unwrap_or(0.0)
    };
    let applied = |object: Value| {
        let before = version();
        api.apply(PODS, object);
        assert!(
            sys::wait_until(Duration::from_secs(20), || version() > before),
            "the change was not applied"
        );
        let dump = agent.config_dump();
        assert_eq!(dump["workloads"][0]["netnsCookie"], cookie, "{dump}");
        assert_eq!(dump["workloads"].as_array().unwrap().len(), 1);
    };
    // Another change while the status has no address yet: the pod stays
    // enrolled on the plugin's addresses.
    let mut relabelled = scheduled(&plain);
    relabelled["metadata"]["labels"]["tier"] = json!("back");
    applied(relabelled);
    // The status catches up with the same addresses: nothing changes.
    applied(web.kubernetes());
    assert_eq!(
        agent
            .log()
            .matches("enrolled at the CNI plugin's request")
            .count(),
        1
    );
    assert!(
        !agent.log().contains("removed"),
        "the pod was enrolled anew:\n{}",
        agent.log()
    );
}
