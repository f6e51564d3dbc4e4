//! Zero trust between nodes: two simulated nodes joined by a fabric, a CA,
//! an agent per node with a node credential, pods on each node. Traffic
//! between nodes must be HBONE (HTTP/2 CONNECT over mutual TLS 1.3).

use std::time::Duration;

use mesh_tests::{
    Agent, AgentOptions, Env, Node, Pod,
    ca::{Ca, Capture},
    sys::wait_until,
};

/// Two nodes, a client pod on `a`, a server pod on `b`, a CA on the fabric.
struct Cluster {
    env: Env,
    a: Node,
    b: Node,
    client: Pod,
    server: Pod,
    fabric: String,
}

fn cluster(test: &str) -> Cluster {
    let env = Env::new(test);
    let a = env.node("a");
    let b = env.node("b");
    let mut client = env.pod(&a, "client");
    client.service_account = "client-sa".into();
    let mut server = env.pod(&b, "server");
    server.service_account = "server-sa".into();
    let fabric = env.connect_nodes(&[&a, &b]);
    Cluster {
        env,
        a,
        b,
        client,
        server,
        fabric,
    }
}

fn mtls(ca: &Ca, node: &Node, extra: &[&str]) -> AgentOptions {
    let mut args = ca.agent_args(node);
    args.extend(extra.iter().map(|s| s.to_string()));
    AgentOptions {
        args,
        ..Default::default()
    }
}

#[test]
fn cross_node_traffic_is_mutual_tls_and_never_plaintext_on_the_wire() {
    let c = cluster("mtls-wire");
    let (env, registry) = (&c.env, [&c.client, &c.server]);
    let echo = c
        .server
        .spawn_app(env, &["echo", &c.server.v4(9000), &c.server.v6(9000)]);
    let ca = Ca::start(env, &c.fabric, "ca", &registry);
    let agent_a = Agent::start(env, &c.a, &registry, mtls(&ca, &c.a, &[]));
    let agent_b = Agent::start(env, &c.b, &registry, mtls(&ca, &c.b, &[]));
    let capture = Capture::start(env, &c.a.netns, "up0", "tcp port 15008");

    let payload = "secret-payload-that-must-never-cross-the-wire-in-clear";
    for dst in [c.server.v4(9000), c.server.v6(9000)] {
        let r = c.client.run_app(&["connect", &dst, payload]).json();
        assert_eq!(r["received"], payload, "{dst}");
        assert_eq!(
            r["peer"], dst,
            "getpeername still shows the original destination"
        );
    }
    let pcap = capture.stop(env);

    // The server got the bytes from the destination agent, in its own pod.
    let accepted = echo.accepted();
    assert_eq!(accepted.len(), 2);
    assert!(
        accepted[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.6:"),
        "{accepted:?}"
    );
    // On the wire between the nodes: TLS 1.3 handshakes, and no payload.
    assert!(
        pcap.len() > 200,
        "nothing captured on node a's uplink ({} bytes); agent a:\n{}\n{}",
        pcap.len(),
        agent_a.log(),
        agent_a
            .metrics()
            .0
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !contains(&pcap, payload.as_bytes()),
        "plaintext payload seen on the wire"
    );
    assert!(
        contains(&pcap, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 ServerHello (supported_versions = 0x0304) on the wire"
    );
    assert!(
        contains(&pcap, b"\x02h2"),
        "ALPN h2 expected in the ClientHello"
    );

    let (client_id, server_id) = (
        "spiffe://cluster.local/ns/default/sa/client-sa",
        "spiffe://cluster.local/ns/default/sa/server-sa",
    );
    let out = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", client_id),
        ("destination_principal", server_id),
    ];
    assert_eq!(
        agent_a
            .metrics()
            .value("istio_tcp_connections_opened_total", &out),
        2.0
    );
    let inb = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", client_id),
        ("destination_principal", server_id),
        ("source_workload", "client"),
    ];
    assert!(
        wait_until(Duration::from_secs(5), || agent_b
            .metrics()
            .value("istio_tcp_received_bytes_total", &inb)
            == 2.0 * payload.len() as f64),
        "destination metrics: {}",
        agent_b.metrics().0
    );

    // /config_dump lists the certificates held, never keys.
    let dump = agent_a
        .try_get("http://127.0.0.1:15000/config_dump")
        .unwrap();
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a key leaked into /config_dump"
    );
    let d: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let certs = d["certificates"]["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "{d}");
    assert_eq!(certs[0]["identity"], client_id);
    assert!(certs[0]["serial"].as_str().unwrap().len() >= 16);
    assert!(certs[0]["notAfter"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        d["certificates"]["trustBundle"].as_array().unwrap().len(),
        1
    );
    assert!(ca.log().contains("CA: issued") && ca.log().contains(server_id));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
