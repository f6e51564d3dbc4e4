//! The manifests in `deploy/` run as written. The DaemonSet's and the CA
//! Deployment's container specs — args, env, volume mounts, and the
//! agent's capabilities — are read from the YAML and run against a fake
//! API server: each mount's path maps to a test directory, the CA's
//! Service name to its test address, and the in-cluster API (which the
//! kubelet, not the manifest, provides) to KUBECONFIG. The agent runs
//! under `setpriv` with exactly the capabilities its securityContext adds
//! and no_new_privs, the CA as the user its securityContext names. A pod
//! labelled for the mesh is enrolled from the API and talks across nodes
//! over mutual TLS; the node's topology labels give the agent its
//! locality. A flag renamed in the agent, a mount or a capability missing
//! from the manifest fails this test. Not reproduced here: the container
//! runtime's AppArmor and seccomp profiles, its read-only root and masked
//! /proc, a cgroup namespace.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_tests::{
    Agent, Env, Node,
    fake_apiserver::{FakeApiServer, in_netns},
    pod::FABRIC_ADDR,
    sys::{self, wait_until},
};
use serde_json::json;
use serde_yaml::Value;

/// The first `kind` in `deploy/<file>`.
fn document(file: &str, kind: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .find(|d: &Value| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

/// The first container of the first `kind` in `deploy/<file>`, and its pod spec.
fn spec(file: &str, kind: &str) -> (Value, Value) {
    let pod = document(file, kind)["spec"]["template"]["spec"].clone();
    (pod["containers"][0].clone(), pod)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Where things the manifest names are in this test: mount paths and the
/// addresses of in-cluster services.
struct Mapping(Vec<(String, String)>);

impl Mapping {
    /// `value` mapped, where an absolute path no mount covers fails the
    /// test: it would point at this machine's own files.
    fn apply_checked(&self, value: &str) -> String {
        let mapped = self.apply(value);
        let path = value.split_once('=').map_or(value, |(_, v)| v);
        assert!(
            !path.starts_with('/') || mapped != value,
            "{value}: a path no volume mount (or test mapping) covers"
        );
        mapped
    }

    /// `value` with a mapped path prefix (a whole path component) or
    /// address replaced; `--flag=value` maps its value.
    fn apply(&self, value: &str) -> String {
        if let Some((flag, v)) = value.split_once('=')
            && flag.starts_with("--")
        {
            return format!("{flag}={}", self.apply(v));
        }
        for (from, to) in &self.0 {
            if value == from {
                return to.clone();
            }
            if let Some(rest) = value.strip_prefix(from.as_str())
                && rest.starts_with('/')
            {
                return format!("{to}{rest}");
            }
        }
        value.to_owned()
    }

    /// Every volume mount of `container` mapped through `volumes` (volume
    /// name → test directory); a mount this test has no directory for
    /// fails it, so a new mount is looked at here.
    fn mounts(container: &Value, volumes: &BTreeMap<&str, PathBuf>) -> Vec<(String, String)> {
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                let name = m["name"].as_str().unwrap();
                let dir = volumes
                    .get(name)
                    .unwrap_or_else(|| panic!("volume {name}: no test directory for it"));
                (
                    m["mountPath"].as_str().unwrap().to_owned(),
                    dir.display().to_string(),
                )
            })
            .collect()
    }
}

/// The container's environment, mapped; `fieldRef`s from `fields`.
fn environment(container: &Value, map: &Mapping, fields: &[(&str, &str)]) -> Vec<(String, String)> {
    let Some(env) = container["env"].as_sequence() else {
        return Vec::new();
    };
    env.iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap().to_owned();
            let value = match v["value"].as_str() {
                Some(value) => map.apply_checked(value),
                None => {
                    let field = v["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .unwrap_or_else(|| panic!("env {name}: neither value nor fieldRef"));
                    fields
                        .iter()
                        .find(|(f, _)| *f == field)
                        .unwrap_or_else(|| panic!("env {name}: field {field} has no test value"))
                        .1
                        .to_owned()
                }
            };
            (name, value)
        })
        .collect()
}

/// `setpriv` arguments that give a root process exactly the capabilities
/// `securityContext` adds (after dropping ALL), with no_new_privs when it
/// forbids privilege escalation.
fn confinement(container: &Value) -> Vec<String> {
    let sc = &container["securityContext"];
    assert_ne!(
        sc["privileged"].as_bool(),
        Some(true),
        "the agent must not need privileged mode"
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let add = strings(&sc["capabilities"]["add"]);
    assert!(!add.is_empty(), "no capabilities named");
    let set = add
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let mut w = vec![
        "setpriv".to_owned(),
        format!("--bounding-set=-all,{set}"),
        "--inh-caps=-all".to_owned(),
    ];
    if sc["allowPrivilegeEscalation"].as_bool() == Some(false) {
        w.push("--no-new-privs".into());
    }
    w.push("--".into());
    w
}

#[test]
fn the_daemonset_and_the_ca_deployment_run_as_written() {
    let env = Env::new("deploy");
    let a = env.node("a");
    let b = env.node("b");
    let mut client = env.pod(&a, "client");
    client.service_account = "client-sa".into();
    let mut server = env.pod(&b, "server");
    server.service_account = "server-sa".into();
    let late = env.pod(&a, "late");
    let fabric = env.connect_nodes(&[&a, &b]);

    // The API: pods, their namespace in the mesh, each node's topology.
    let api = FakeApiServer::start(in_netns(&fabric, || {
        std::net::TcpListener::bind((FABRIC_ADDR, 0)).unwrap()
    }));
    for c in [
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/nodes",
    ] {
        api.register(c);
    }
    api.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default",
               "labels": {"mesh-agent.io/dataplane-mode": "ambient"}}}),
    );
    for node in [&a, &b] {
        api.apply(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name,
                   "labels": {"topology.kubernetes.io/region": "eu-west",
                              "topology.kubernetes.io/zone": format!("eu-west-{}", node.name)}}}),
        );
    }
    api.apply("/api/v1/pods", client.kubernetes());
    api.apply("/api/v1/pods", server.kubernetes());
    let kubeconfig = env.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kube_env = ("KUBECONFIG".to_owned(), kubeconfig.display().to_string());

    // What the ConfigMaps, Secrets and projected tokens would hold.
    let dir = |name: &str| {
        let d = env.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let workloads = dir("workloads");
    let cm = document("workloads.yaml", "ConfigMap");
    for (file, text) in cm["data"].as_mapping().unwrap() {
        std::fs::write(
            workloads.join(file.as_str().unwrap()),
            text.as_str().unwrap(),
        )
        .unwrap();
    }
    let mesh_config = dir("mesh-config");
    let mesh_cm = serde_yaml::Deserializer::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/workloads.yaml"),
        )
        .unwrap(),
    )
    .map(|d| -> Value { serde::Deserialize::deserialize(d).unwrap() })
    .find(|d| d["metadata"]["name"] == "mesh-config")
    .expect("the mesh-config ConfigMap");
    std::fs::write(
        mesh_config.join("mesh"),
        mesh_cm["data"]["mesh"].as_str().unwrap(),
    )
    .unwrap();
    let ca_keys = env.dir.join("ca-keys");
    mesh_tests::ca::init_root(&ca_keys);
    let ca_root = dir("ca-root");
    std::fs::copy(ca_keys.join("root-cert.pem"), ca_root.join("root-cert.pem")).unwrap();
    let service_account = dir("serviceaccount");
    std::fs::write(service_account.join("token"), "the-ca-token").unwrap();
    std::fs::copy(
        ca_keys.join("root-cert.pem"),
        service_account.join("ca.crt"),
    )
    .unwrap();

    // The API's TokenReview, for the CA: each agent's projected token.
    let fabric_host = mesh_tests::Pod {
        netns: fabric.clone(),
        ..client.clone()
    };
    let _tokenreview = fabric_host.spawn_app_outside_cgroup(
        &env,
        &[
            "fake-kube",
            &format!("{FABRIC_ADDR}:6443"),
            "token-of-a=a",
            "token-of-b=b",
        ],
    );

    // The CA, as ca.yaml runs it: its user, its args, its mounts.
    let (ca, ca_pod) = spec("ca.yaml", "Deployment");
    let uid = ca["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser");
    let gid = ca_pod["securityContext"]["fsGroup"].as_u64().unwrap_or(uid);
    chown(&ca_keys, uid, gid);
    let ca_map = Mapping(
        Mapping::mounts(
            &ca,
            &BTreeMap::from([("keys", ca_keys.clone()), ("workloads", workloads.clone())]),
        )
        .into_iter()
        .chain([
            (
                "/var/run/secrets/kubernetes.io/serviceaccount".to_owned(),
                service_account.display().to_string(),
            ),
            (
                "https://kubernetes.default.svc".to_owned(),
                format!("http://{FABRIC_ADDR}:6443"),
            ),
        ])
        .collect(),
    );
    let ca_log = env.dir.join("ca.log");
    let log = std::fs::File::create(&ca_log).unwrap();
    let ca_child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{fabric}"))
        .arg("--")
        .args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--no-new-privs",
            "--",
        ])
        .arg(sys::agent_bin())
        .args(strings(&ca["args"]).iter().map(|a| ca_map.apply_checked(a)))
        .env(&kube_env.0, &kube_env.1)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    env.track(ca_child);
    let ca_text = || std::fs::read_to_string(&ca_log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(20), || ca_text()
            .contains("certificate authority ready")),
        "the CA did not start as ca.yaml runs it:\n{}",
        ca_text()
    );

    // An agent per node, as the DaemonSet runs it.
    let (ds, ds_pod) = spec("daemonset.yaml", "DaemonSet");
    // First its init container, on node a's CNI directories: the runtime's
    // network configuration gets the plugin at the end of its chain.
    let (cni_bin, cni_conf) = (dir("cni-bin-a"), dir("cni-conf-a"));
    std::fs::write(
        cni_conf.join("10-net.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "bridge"}]}"#,
    )
    .unwrap();
    let installed_socket = {
        let init = ds_pod["initContainers"][0].clone();
        assert_eq!(init["name"].as_str(), Some("install-cni"));
        let sc = &init["securityContext"];
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert!(
            sc["capabilities"]["add"].is_null(),
            "install-cni needs no capability"
        );
        let map = Mapping(
            Mapping::mounts(
                &init,
                &BTreeMap::from([("cni-bin", cni_bin.clone()), ("cni-conf", cni_conf.clone())]),
            )
            .into_iter()
            // The runtime's view of the agent's socket: the handover
            // volume's host directory.
            .chain([(
                "/run/mesh-agent".to_owned(),
                dir("handover-a").display().to_string(),
            )])
            .collect(),
        );
        let out = Command::new("setpriv")
            .args([
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--no-new-privs",
                "--",
            ])
            .arg(sys::agent_bin())
            .args(strings(&init["args"]).iter().map(|a| map.apply_checked(a)))
            .output()
            .unwrap();
        assert!(out.status.success(), "install-cni: {out:?}");
        map.apply("/run/mesh-agent/cni.sock")
    };
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cni_conf.join("10-net.conflist")).unwrap()).unwrap();
    let plugin_conf = conflist["plugins"][1].clone();
    assert_eq!(plugin_conf["type"], "mesh-cni", "{conflist}");
    assert_eq!(plugin_conf["agentSocket"], installed_socket.as_str());
    assert!(cni_bin.join("mesh-cni").is_file());
    let start = |node: &Node| {
        let host_bpffs = env.pin_dir(node);
        std::fs::create_dir_all(&host_bpffs).unwrap();
        let token = dir(&format!("token-{}", node.name));
        std::fs::write(token.join("token"), format!("token-of-{}", node.name)).unwrap();
        let volumes = BTreeMap::from([
            ("bpffs", host_bpffs.clone()),
            ("cgroup", env.cgroup.clone()),
            ("netns", PathBuf::from("/run/netns")),
            ("workloads", workloads.clone()),
            ("mesh-config", mesh_config.clone()),
            ("ca-root", ca_root.clone()),
            ("ca-token", token),
            ("handover", dir(&format!("handover-{}", node.name))),
        ]);
        let map = Mapping(
            Mapping::mounts(&ds, &volumes)
                .into_iter()
                .chain([(
                    "mesh-ca.mesh-system.svc:15012".to_owned(),
                    format!("{FABRIC_ADDR}:15012"),
                )])
                .collect(),
        );
        let mut program = confinement(&ds);
        program.push(sys::agent_bin().display().to_string());
        program.extend(strings(&ds["args"]).iter().map(|a| map.apply_checked(a)));
        let mut vars = environment(
            &ds,
            &map,
            &[
                ("spec.nodeName", &node.name),
                ("metadata.uid", "agent-pod-uid"),
            ],
        );
        vars.push(kube_env.clone());
        let bpffs_dir = map.apply("/sys/fs/bpf/mesh");
        Agent::start_command(&env, node, &program, &vars, bpffs_dir.into())
    };
    let mut agent_a = start(&a);
    let mut agent_b = start(&b);

    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    client.spawn_app(&env, &["listen", "127.0.0.1:0"]);
    let enrolled = |agent: &Agent, name: &str| {
        agent.config_dump()["workloads"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == name))
    };
    assert!(
        wait_until(Duration::from_secs(20), || enrolled(&agent_a, "client")
            && enrolled(&agent_b, "server")),
        "pods not enrolled:\n{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    assert_eq!(
        agent_a.config_dump()["config"]["locality"],
        "eu-west/eu-west-a"
    );

    let r = client
        .run_app(&["connect", &server.v4(9000), "as written"])
        .json();
    assert_eq!(r["received"], "as written");
    assert_eq!(
        agent_a.metrics().value(
            "istio_tcp_connections_opened_total",
            &[
                ("connection_security_policy", "mutual_tls"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/server-sa"
                ),
            ]
        ),
        1.0,
        "{}",
        agent_a.metrics().0
    );
    // A pod created now: the runtime runs the installed plugin as the
    // conflist says, and the pod's first connect is captured, over mTLS.
    api.apply("/api/v1/pods", {
        let mut k = late.kubernetes();
        k["status"] = json!({"phase": "Pending"});
        k
    });
    let mut conf = plugin_conf.clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    conf["prevResult"] = json!({"cniVersion": "1.0.0",
        "ips": [{"address": format!("{}/24", late.ip4)}, {"address": format!("{}/64", late.ip6)}]});
    let mut plugin = Command::new(cni_bin.join("mesh-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "late-sandbox")
        .env("CNI_NETNS", late.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=late;K8S_POD_UID={}",
                late.uid
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut plugin.stdin.take().unwrap(),
        conf.to_string().as_bytes(),
    )
    .unwrap();
    let out = plugin.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}\n{}", agent_a.log());
    let r = late.run_app(&["connect", &server.v4(9000), "first"]).json();
    assert_eq!(r["received"], "first");
    assert_eq!(
        agent_a.metrics().value(
            "istio_tcp_connections_opened_total",
            &[
                ("connection_security_policy", "mutual_tls"),
                ("source_workload", "late")
            ]
        ),
        1.0,
        "the new pod's first connection did not go over mTLS"
    );

    // Deleted as the kubelet deletes a pod: SIGTERM, then the grace period
    // the manifest gives for draining.
    let grace = Duration::from_secs(
        ds_pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    for agent in [&mut agent_a, &mut agent_b] {
        assert!(
            agent.stop_within("TERM", grace).success(),
            "{}",
            agent.log()
        );
    }
}

fn chown(dir: &Path, uid: u64, gid: u64) {
    let s = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir)
        .status()
        .unwrap();
    assert!(s.success());
}
