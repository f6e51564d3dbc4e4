//! Capture on the real kernel: pods are network namespaces with their own
//! cgroups, the real eBPF programs are attached, and real TCP flows.

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, Env, sys::wait_until};

fn outbound_preserves_original_destination(test: &str, v6: bool) {
    let env = Env::new(test);
    let node = env.node("node");
    let client = env.pod(&node, "client");
    // The server is outside the mesh: only the client is enrolled.
    let server = env.pod(&node, "server");
    let dst = if v6 { server.v6(9000) } else { server.v4(9000) };
    let echo = server.spawn_app(&env, &["echo", &dst]);
    let agent = Agent::start(&env, &node, &[&client], AgentOptions::default());

    let r = client
        .run_app(&["connect", &dst, "payload through the agent"])
        .json();
    assert_eq!(r["received"], "payload through the agent");
    // getpeername in the client shows the original destination, not the
    // agent's 127.0.0.1:15001 / [::1]:15001.
    assert_eq!(r["peer"], dst);
    // The client's socket really went to the agent's in-pod listener.
    let local: std::net::SocketAddr = r["local"].as_str().unwrap().parse().unwrap();
    assert!(
        local.ip().is_loopback(),
        "client was not redirected to loopback: {r}"
    );

    // The server saw a connection from the client pod's own address (the
    // agent connects from inside the pod's netns).
    let seen = echo.wait_for(|v| v["event"] == "accepted", Duration::from_secs(5));
    let peer: std::net::SocketAddr = seen["peer"].as_str().unwrap().parse().unwrap();
    let want_ip: std::net::IpAddr = if v6 {
        client.ip6.into()
    } else {
        client.ip4.into()
    };
    assert_eq!(peer.ip(), want_ip);

    let m = agent.metrics();
    let prog = if v6 { "connect6" } else { "connect4" };
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", prog), ("outcome", "redirected")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "sock_ops"), ("outcome", "redirected")]
        ),
        1.0
    );
    // The server is not in the registry: Istio's PassthroughCluster.
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service", "unknown"),
        ("destination_service_name", "PassthroughCluster"),
        ("destination_workload", "unknown"),
    ];
    assert_eq!(m.value("istio_tcp_connections_opened_total", &labels), 1.0);
    assert!(
        wait_until(Duration::from_secs(10), || {
            agent
                .metrics()
                .try_value("istio_tcp_connections_closed_total", &labels)
                == Ok(1.0)
        }),
        "timed out waiting for the connection to be reported closed"
    );
    let m = agent.metrics();
    assert_eq!(
        m.value("istio_tcp_received_bytes_total", &labels),
        25.0,
        "request bytes"
    );
    assert_eq!(
        m.value("istio_tcp_sent_bytes_total", &labels),
        25.0,
        "response bytes"
    );
}

#[test]
fn outbound_ipv4_preserves_original_destination() {
    outbound_preserves_original_destination("outbound-v4", false);
}

#[test]
fn outbound_ipv6_preserves_original_destination() {
    outbound_preserves_original_destination("outbound-v6", true);
}

#[test]
fn inbound_plaintext_is_steered_to_the_agent() {
    let env = Env::new("inbound");
    let node = env.node("node");
    let server = env.pod(&node, "server");
    // A client outside the mesh (not enrolled).
    let outsider = env.pod(&node, "outsider");
    let echo = server.spawn_app(&env, &["echo", &server.v4(8080), &server.v6(8080)]);
    let agent = Agent::start(&env, &node, &[&server], AgentOptions::default());

    for dst in [server.v4(8080), server.v6(8080)] {
        let r = outsider.run_app(&["connect", &dst, "inbound bytes"]).json();
        assert_eq!(r["received"], "inbound bytes");
        // Not captured on the client side: it is not enrolled.
        assert_eq!(r["peer"], dst);
    }
    // The application saw the agent's source (127.0.0.6 / ::6), proof the
    // connection came through the agent's inbound listener.
    let accepted = echo.wait_accepted(2, Duration::from_secs(5));
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(
        accepted[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.6:"),
        "{accepted:?}"
    );
    assert!(
        accepted[1]["peer"].as_str().unwrap().starts_with("[::6]:"),
        "{accepted:?}"
    );
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "sk_lookup"), ("outcome", "redirected")]
        ),
        2.0
    );
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(m.value("istio_tcp_connections_opened_total", &labels), 2.0);
}

#[test]
fn inbound_to_a_closed_port_is_refused() {
    let env = Env::new("inbound-closed");
    let node = env.node("node");
    let server = env.pod(&node, "server");
    let outsider = env.pod(&node, "outsider");
    // A connect timeout far beyond the client's 10 s read timeout: if the
    // agent waited for it, the client would report a timeout, not a reset.
    let _agent = Agent::start(
        &env,
        &node,
        &[&server],
        AgentOptions::args(&["--connect-timeout", "120s"]),
    );
    // The agent accepts for every port; when the application has no
    // listener the client must get a reset, as it would without the mesh.
    for dst in [server.v4(9999), server.v6(9999)] {
        let r = outsider.run_app(&["connect", &dst]);
        assert!(
            !r.ok() && r.describe().contains("reset"),
            "{dst}: {}",
            r.describe()
        );
    }
}

#[test]
fn pod_to_pod_on_one_node_passes_both_directions_of_the_agent() {
    let env = Env::new("pod-to-pod");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    let echo = server.spawn_app(&env, &["echo", &server.v4(7000)]);
    let agent = Agent::start(&env, &node, &[&client, &server], AgentOptions::default());

    let r = client
        .run_app(&["connect", &server.v4(7000), "both ways"])
        .json();
    assert_eq!(r["received"], "both ways");
    assert_eq!(r["peer"], server.v4(7000));
    assert!(
        echo.wait_accepted(1, Duration::from_secs(5))[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.6:")
    );
    let m = agent.metrics();
    let out = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    let inb = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    assert_eq!(m.value("istio_tcp_connections_opened_total", &out), 1.0);
    assert_eq!(m.value("istio_tcp_connections_opened_total", &inb), 1.0);
}

#[test]
fn excluded_ports_and_cidrs_bypass_the_agent() {
    let env = Env::new("exclusions");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let near = env.pod(&node, "near");
    let far = env.pod(&node, "far");
    near.spawn_app(&env, &["echo", &near.v4(22), &near.v4(80)]);
    far.spawn_app(&env, &["echo", &far.v4(80)]);
    let cidr = format!("{}/32", far.ip4);
    let agent = Agent::start(
        &env,
        &node,
        &[&client],
        AgentOptions::args(&[
            "--exclude-outbound-ports",
            "22",
            "--exclude-outbound-cidrs",
            &cidr,
        ]),
    );
    let redirected = |a: &Agent| {
        a.metrics().value(
            "mesh_ebpf_program_events_total",
            &[("program", "connect4"), ("outcome", "redirected")],
        )
    };
    let passed = |a: &Agent| {
        a.metrics().value(
            "mesh_ebpf_program_events_total",
            &[("program", "connect4"), ("outcome", "passed")],
        )
    };

    let opened = |a: &Agent| a.metrics().value("istio_tcp_connections_opened_total", &[]);

    // The same pod, a port that is not excluded: captured (so the probes
    // below see a capture when there is one).
    let r = client.run_app(&["connect", &near.v4(80), "z"]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    assert_eq!((redirected(&agent), passed(&agent)), (1.0, 0.0));
    assert_eq!(opened(&agent), 1.0);

    // Excluded port: straight to the server, and the client's socket really
    // is connected to it, not to the agent.
    let r = client.run_app(&["connect", &near.v4(22), "x"]).json();
    assert_eq!(r["peer"], near.v4(22));
    assert!(!r["local"].as_str().unwrap().starts_with("127."), "{r}");
    // Excluded CIDR.
    let r = client.run_app(&["connect", &far.v4(80), "y"]).json();
    assert!(!r["local"].as_str().unwrap().starts_with("127."), "{r}");
    assert_eq!((redirected(&agent), passed(&agent)), (1.0, 2.0));
    assert_eq!(opened(&agent), 1.0, "the excluded connections were proxied");
}

#[test]
fn inbound_excluded_port_bypasses_the_agent() {
    let env = Env::new("inbound-excl");
    let node = env.node("node");
    let server = env.pod(&node, "server");
    let outsider = env.pod(&node, "outsider");
    let echo = server.spawn_app(&env, &["echo", &server.v4(5432)]);
    let _agent = Agent::start(
        &env,
        &node,
        &[&server],
        AgentOptions::args(&["--exclude-inbound-ports", "5432"]),
    );
    outsider
        .run_app(&["connect", &server.v4(5432), "direct"])
        .json();
    let peer = echo.wait_accepted(1, Duration::from_secs(5))[0]["peer"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        peer.starts_with(&format!("{}:", outsider.ip4)),
        "the app should see the client itself, saw {peer}"
    );
}

#[test]
fn process_outside_enrolled_cgroups_is_untouched() {
    let env = Env::new("outside-cgroup");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&client], AgentOptions::default());
    let counts = |a: &Agent| {
        let m = a.metrics();
        (
            m.value("mesh_ebpf_program_events_total", &[("program", "connect4")]),
            m.value("istio_tcp_connections_opened_total", &[]),
        )
    };

    // From inside the pod's cgroup: captured, and counted.
    let r = client
        .run_app(&["connect", &server.v4(9000), "mine"])
        .json();
    assert!(r["local"].as_str().unwrap().starts_with("127."), "{r}");
    assert_eq!(counts(&agent), (1.0, 1.0));

    // Same network namespace as the enrolled pod, different cgroup.
    let r = client
        .run_app_outside_cgroup(&["connect", &server.v4(9000), "not mine"])
        .json();
    assert_eq!(r["received"], "not mine");
    assert!(!r["local"].as_str().unwrap().starts_with("127."), "{r}");
    assert_eq!(
        counts(&agent),
        (1.0, 1.0),
        "the program must not even run, nor the agent see it"
    );
}

#[test]
fn a_connection_without_a_recorded_destination_is_refused() {
    let env = Env::new("no-orig-dst");
    let node = env.node("node");
    let pod = env.pod(&node, "pod");
    let agent = Agent::start(&env, &node, &[&pod], AgentOptions::default());
    // Straight to the agent's listener, from outside the pod's cgroup: the
    // capture programs recorded nothing, so there is nowhere to go.
    let r = pod.run_app_outside_cgroup(&["connect", "127.0.0.1:15001"]);
    assert!(
        !r.ok() && r.describe().contains("reset"),
        "{}",
        r.describe()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            agent.metrics().try_value(
                "mesh_proxy_errors_total",
                &[
                    ("direction", "outbound"),
                    ("reason", "no_original_destination"),
                ],
            ) == Ok(1.0)
        }),
        "timed out waiting for the refusal to be counted"
    );
    assert!(
        agent.log().contains("no original destination recorded"),
        "{}",
        agent.log()
    );
}
