//! What an operator sees: Prometheus metrics, readiness, /config_dump,
//! runtime log levels, kernel log records in the agent's log, and readable
//! maps in `bpftool`.

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, Env, kernel, sys::wait_until};

#[test]
fn metrics_use_istio_names_and_labels() {
    let env = Env::new("metrics");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&client, &server], AgentOptions::default());
    client
        .run_app(&["connect", &server.v4(9000), "0123456789"])
        .json();

    let m = agent.metrics();
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        assert!(
            m.0.contains(&format!("# TYPE {name} counter")),
            "{name} missing"
        );
        let line = m
            .line(name)
            .unwrap_or_else(|| panic!("no sample of {name}"));
        for label in [
            "reporter",
            "source_workload",
            "source_workload_namespace",
            "source_principal",
            "source_app",
            "source_version",
            "source_canonical_service",
            "source_canonical_revision",
            "source_cluster",
            "destination_service",
            "destination_service_namespace",
            "destination_service_name",
            "destination_workload",
            "destination_workload_namespace",
            "destination_principal",
            "destination_app",
            "destination_version",
            "destination_canonical_service",
            "destination_canonical_revision",
            "destination_cluster",
            "request_protocol",
            "response_flags",
            "connection_security_policy",
        ] {
            assert!(
                line.contains(&format!("{label}=\"")),
                "{name} lacks label {label}: {line}"
            );
        }
    }
    let out = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_app", "client"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
    ];
    assert_eq!(m.value("istio_tcp_received_bytes_total", &out), 10.0);
    assert!(m.0.contains("# TYPE mesh_ebpf_program_events_total counter"));
    assert!(m.0.contains("mesh_workloads_enrolled 2"));
    // Envoy's path serves the same.
    let alias = agent
        .try_get("http://127.0.0.1:15020/stats/prometheus")
        .unwrap();
    assert!(alias.contains("istio_tcp_connections_opened_total{"));
    assert_eq!(
        agent
            .try_get("http://127.0.0.1:15021/healthz/ready")
            .unwrap()
            .trim(),
        "ready"
    );
}

#[test]
fn config_dump_shows_workloads_and_the_programs_bpftool_sees() {
    let env = Env::new("config-dump");
    let node = env.node("node");
    let pod = env.pod(&node, "web");
    let agent = Agent::start(
        &env,
        &node,
        &[&pod],
        AgentOptions::args(&["--exclude-outbound-ports", "22"]),
    );
    let d = agent.config_dump();
    assert_eq!(d["config"]["excludeOutboundPorts"][0], 22);
    let w = &d["workloads"][0];
    assert_eq!(w["name"], "web");
    assert_eq!(w["ips"][0], pod.ip4.to_string());
    assert!(w["netnsCookie"].as_u64().unwrap() > 0);
    assert_eq!(w["links"].as_array().unwrap().len(), 7);
    let listeners: Vec<&str> = w["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    for want in [
        "127.0.0.1:15001".to_string(),
        "[::1]:15001".into(),
        pod.v4(15006),
        pod.v4(15008),
        pod.v6(15006),
    ] {
        assert!(
            listeners.contains(&want.as_str()),
            "{want} not in {listeners:?}"
        );
    }
    let attached = kernel::cgroup_programs(&pod.cgroup);
    for p in d["ebpf"]["programs"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        assert!(kernel::program_loaded(p["id"].as_u64().unwrap()), "{name}");
        assert!(
            // sk_lookup hangs off the netns, sk_msg off the fast path's map.
            matches!(name, "mesh_sk_lookup" | "mesh_sk_msg") || attached.iter().any(|a| a == name),
            "{name} not attached"
        );
    }
}

#[test]
fn kernel_log_records_reach_the_agent_log_and_levels_change_at_runtime() {
    let env = Env::new("logs");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(
        &env,
        &node,
        &[&client],
        AgentOptions {
            log: Some("info,mesh_ebpf=debug".into()),
            ..Default::default()
        },
    );
    client.run_app(&["connect", &server.v4(9000)]).json();
    let want = format!("connect4: {}:9000 -> agent", server.ip4);
    assert!(
        wait_until(Duration::from_secs(5), || agent.log().contains(&want)),
        "no kernel record {want:?} in:
{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("mesh_ebpf::connect") && l.contains(&want))
    );

    assert_eq!(
        agent
            .try_get("http://127.0.0.1:15000/logging")
            .unwrap()
            .trim(),
        "level: info,mesh_ebpf=debug"
    );
    agent
        .try_post("http://127.0.0.1:15000/logging?level=debug")
        .unwrap();
    assert_eq!(
        agent
            .try_get("http://127.0.0.1:15000/logging")
            .unwrap()
            .trim(),
        "level: debug"
    );
    client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .log()
            .contains("outbound: proxying")),
        "debug level not applied:
{}",
        agent.log()
    );
    let bad = agent.try_post("http://127.0.0.1:15000/logging?level=no[such");
    assert!(bad.is_err(), "a bad filter must be refused");
    assert_eq!(
        agent
            .try_get("http://127.0.0.1:15000/logging")
            .unwrap()
            .trim(),
        "level: debug",
        "old level kept"
    );
}

#[test]
fn bpftool_shows_named_fields_of_a_live_connection() {
    let env = Env::new("bpftool");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&client], AgentOptions::default());
    let held = client.spawn_app(&env, &["hold", &server.v4(9000), "30"]);
    let local: std::net::SocketAddr = held
        .wait_for(|v| v["event"] == "holding", Duration::from_secs(5))["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let dump = kernel::dump_pinned(&agent.pin_dir.join("mesh_conn_dst"));
    let entries = dump.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{dump}");
    // With BTF, bpftool adds the decoded record under "formatted".
    let (k, v) = (
        &entries[0]["formatted"]["key"],
        &entries[0]["formatted"]["value"],
    );
    assert_eq!(k["src_port"], local.port(), "{dump}");
    assert_eq!(k["dst_port"], 15001);
    assert!(k["netns_cookie"].as_u64().unwrap() > 0);
    assert_eq!(v["port"], 9000);
    let octets: Vec<u64> = v["addr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(&octets[12..], &server.ip4.octets().map(u64::from));
    env.kill(held.pid);
}

#[test]
fn a_bad_workload_file_is_rejected_and_the_last_good_one_keeps_serving() {
    let env = Env::new("reload");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&client], AgentOptions::default());
    std::fs::write(&agent.workloads, "workloads:\n  - name: Client\n").unwrap();
    let rejected = || {
        agent
            .metrics()
            .value("mesh_config_rejected_total", &[("source", "files")])
            >= 1.0
    };
    assert!(
        wait_until(Duration::from_secs(5), rejected),
        "rejection not counted:
{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("the previous configuration stays in force"),
        "{}",
        agent.log()
    );
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "still captured: {r}"
    );
    assert_eq!(
        agent.config_dump()["workloads"].as_array().unwrap().len(),
        1
    );
}
