//! Configuration through real traffic: services and ServiceEntries from a
//! config directory decide where captured connections go (and which
//! identity HBONE expects there), and the directory can be rewritten while
//! traffic flows without a failed request or a dropped connection.

use std::time::{Duration, Instant};

use mesh_tests::{
    Agent, Pod,
    ca::TRUST_DOMAIN,
    cluster::{cluster, get, service, write_text, write_yaml},
    sys::wait_until,
};
use serde_json::{Value, json};

#[test]
fn services_and_service_entries_pick_endpoints_and_expect_their_identity() {
    let c = cluster(
        "cfg-services",
        &[
            ("web-v1", &[("app", "web"), ("version", "v1")]),
            ("web-v2", &[("app", "web"), ("version", "v2")]),
        ],
    );
    let (v1, v2) = (&c.servers[0], &c.servers[1]);
    v1.spawn_app(&c.env, &["http", "v1", &v1.v4(9000)]);
    v2.spawn_app(&c.env, &["http", "v2", &v2.v4(9000)]);
    write_yaml(
        &c.config.join("services.yaml"),
        &[
            // TCP ports: this test is about L4 (tests/l7.rs does HTTP).
            service("web", "10.96.0.10", "web", ("tcp-web", 80, 9000)),
            service(
                "nobody",
                "10.96.0.11",
                "nothing-selects-this",
                ("tcp", 80, 9000),
            ),
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "legacy", "namespace": "default"},
                "spec": {
                    "hosts": ["legacy.example.internal"],
                    "addresses": ["10.200.0.0/24"],
                    "ports": [{"number": 80, "name": "tcp", "protocol": "TCP", "targetPort": 9000}],
                    "location": "MESH_INTERNAL",
                    "resolution": "STATIC",
                    "endpoints": [{"address": v2.ip4.to_string()}],
                },
            }),
        ],
    );
    let (_ca, agent_a, _agent_b) = c.mesh();

    // The service's VIP is nowhere on the network: the agent picks an
    // endpoint (round robin) and carries the connection there over HBONE.
    let answers: Vec<String> = (0..6)
        .map(|_| {
            let r = c.client.run_app(&["get", "http://10.96.0.10:80/"]);
            assert!(
                r.ok(),
                "{}\nagent a:\n{}\nagent b:\n{}",
                r.describe(),
                agent_a.log(),
                _agent_b.log()
            );
            String::from_utf8_lossy(&r.output.stdout).into_owned()
        })
        .collect();
    for name in ["hello from v1", "hello from v2"] {
        assert_eq!(
            answers.iter().filter(|a| a.starts_with(name)).count(),
            3,
            "{answers:?}"
        );
    }
    let web_sa = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/web-sa");
    let m = agent_a.metrics();
    assert_eq!(
        m.value(
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "web.default.svc.cluster.local"),
                ("destination_service_name", "web"),
                ("destination_service_namespace", "default"),
                ("connection_security_policy", "mutual_tls"),
                ("destination_principal", &web_sa),
            ]
        ),
        6.0,
        "{}",
        m.0
    );

    // A ServiceEntry address range: any address in it reaches its endpoint.
    assert!(get(&c.client, "http://10.200.0.77:80/").starts_with("hello from v2"));

    // No endpoint: refused at once, counted with Istio's reason.
    let r = c.client.run_app(&["connect", "10.96.0.11:80"]);
    assert!(!r.ok(), "{}", r.describe());
    assert!(
        wait_until(Duration::from_secs(5), || agent_a.metrics().try_value(
            "mesh_proxy_errors_total",
            &[("reason", "no_healthy_upstream")]
        ) == Ok(1.0)),
        "the refusal was not counted: {}",
        agent_a.metrics().0
    );
    assert!(
        agent_a
            .log()
            .contains("nobody.default.svc.cluster.local port 80: no ready endpoint"),
        "{}",
        agent_a.log()
    );

    // The registry is in the config dump.
    let dump = agent_a.config_dump();
    let services = dump["snapshot"]["registry"]["services"].as_array().unwrap();
    let web = services
        .iter()
        .find(|s| s["name"] == "web")
        .expect("web in the registry");
    assert_eq!(web["hostname"], "web.default.svc.cluster.local");
    assert_eq!(web["ports"][0]["protocol"], "TCP", "named tcp-web");
    // Each pod is an endpoint per address family.
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 4);
    assert_eq!(web["endpoints"][0]["workload"], "default/web-v1");
}

/// One version of the rewritten file: everything that changes, in one
/// file, so a rewrite is one atomic rename.
fn mesh_yaml(i: usize, server: &Pod) -> Vec<Value> {
    let endpoints = if i.is_multiple_of(2) {
        // Selector form: the Service's endpoints come from the registry.
        vec![]
    } else {
        // EndpointSlice form, with an endpoint that is not ready.
        vec![json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "echo-x1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "port": 9000}],
            "endpoints": [
                {"addresses": [server.ip4.to_string()], "conditions": {"ready": true}},
                {"addresses": ["10.10.9.9"], "conditions": {"ready": false}},
            ],
        })]
    };
    let mut docs = vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.50", "selector": {"app": "server"},
                     "ports": [{"name": "tcp", "port": 80, "targetPort": 9000}]},
        }),
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "echo", "namespace": "default",
                         "labels": {"iteration": i.to_string()}},
            "spec": {"hosts": ["echo"], "tcp": [{"route": [
                {"destination": {"host": "echo", "port": {"number": 80}}, "weight": 100}]}]},
        }),
        json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "default"},
            "spec": {"mtls": {"mode": if i.is_multiple_of(3) { "STRICT" } else { "PERMISSIVE" }}},
        }),
    ];
    docs.extend(endpoints);
    docs
}

/// Broken versions, each refused for a different reason.
fn broken_yaml(i: usize, server: &Pod) -> String {
    let good: String = mesh_yaml(i, server)
        .iter()
        .map(|d| format!("---\n{d}\n"))
        .collect();
    match i % 4 {
        0 => format!("{good}---\nkind: [unclosed\n"),
        1 => good.replace("\"weight\":100", "\"weight\":150"),
        2 => good.replace("\"clusterIP\"", "\"clusterIPz\""),
        _ => format!(
            "{good}{}",
            good.split("---\n")
                .nth(2)
                .map(|d| format!("---\n{d}"))
                .unwrap()
        ),
    }
}

#[test]
fn hot_reload_under_load_never_fails_a_request_or_drops_a_connection() {
    let c = cluster("cfg-reload", &[("server", &[("app", "server")])]);
    let server = &c.servers[0];
    server.spawn_app(&c.env, &["echo", &server.v4(9000)]);
    let file = c.config.join("mesh.yaml");
    write_yaml(&file, &mesh_yaml(0, server));
    let (_ca, agent_a, agent_b) = c.mesh();
    let vip = "10.96.0.50:80";
    assert_eq!(
        c.client.run_app(&["connect", vip, "warm-up"]).json()["received"],
        "warm-up"
    );

    let stop = c.env.dir.join("stop-traffic");
    let stop_arg = stop.display().to_string();
    let load = c.client.spawn_app(&c.env, &["load", vip, &stop_arg]);
    let chatter = c.client.spawn_app(&c.env, &["chatter", vip, &stop_arg]);

    let version = |a: &Agent| a.metrics().value("mesh_config_version", &[]);
    let rejected = |a: &Agent| {
        a.metrics()
            .value("mesh_config_rejected_total", &[("source", "files")])
    };
    let (v0, started) = (version(&agent_a), Instant::now());
    let (mut applied, mut refused) = (0.0, 0.0);
    for i in 1..=100 {
        // Every seventh write is broken, never the last.
        let broken = i % 7 == 3;
        if broken {
            write_text(&file, &broken_yaml(i, server));
            refused += 1.0;
        } else {
            write_yaml(&file, &mesh_yaml(i, server));
            applied += 1.0;
        }
        for agent in [&agent_a, &agent_b] {
            let seen = || {
                if broken {
                    rejected(agent) == refused
                } else {
                    version(agent) == v0 + applied
                }
            };
            assert!(
                wait_until(Duration::from_secs(10), seen),
                "write {i} (broken: {broken}) not seen by node {}: version {}, rejected {}\n{}",
                agent.node.name,
                version(agent),
                rejected(agent),
                agent.log()
            );
        }
    }
    let rewrites = started.elapsed();
    std::fs::write(&stop, "").unwrap();
    let done = load.wait_for(|v| v["event"] == "done", Duration::from_secs(20));
    assert_eq!(done["failed"], 0, "{done}");
    let connections = done["ok"].as_u64().unwrap();
    assert!(connections >= 100, "{done}");
    let rounds = chatter.wait_for(|v| v["event"] == "done", Duration::from_secs(20));
    assert!(
        rounds["rounds"].as_u64().unwrap() >= 10,
        "the long-lived connection must live through every reload: {rounds}"
    );
    assert_eq!(refused, 14.0);
    assert_eq!(rejected(&agent_a), refused);

    // The final snapshot is the final file.
    let dump = agent_a.config_dump();
    let snap = &dump["snapshot"];
    assert_eq!(snap["version"].as_f64(), Some(v0 + applied));
    let vs = &snap["resources"]["VirtualService"][0];
    assert_eq!(vs["metadata"]["labels"]["iteration"], "100");
    assert_eq!(vs["spec"], mesh_yaml(100, server)[1]["spec"]);
    assert_eq!(
        snap["policies"]["default/client"]["peerAuthentication"]["mode"], "PERMISSIVE",
        "100 is not a multiple of 3"
    );
    let echo = snap["registry"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    assert_eq!(
        echo["endpoints"].as_array().unwrap().len(),
        2,
        "iteration 100 is the selector form: the pod's IPv4 and IPv6 addresses"
    );
    // Write 94 was the last broken one: a typo in the Service.
    let last = dump["sources"]["lastRejected"]["files"]["problems"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last.contains("mesh.yaml") && last.contains("unknown field `clusterIPz`"),
        "{last}"
    );
    eprintln!(
        "100 rewrites ({refused} broken) in {rewrites:?} under load: {connections} new connections and {} round trips on one connection, none failed",
        rounds["rounds"]
    );
}
