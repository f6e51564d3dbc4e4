//! Zero trust between nodes: two simulated nodes joined by a fabric, a CA,
//! an agent per node with a node credential, pods on each node. Traffic
//! between nodes must be HBONE (HTTP/2 CONNECT over mutual TLS 1.3).

mod ca;
mod refusals;

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

impl Cluster {
    /// The usual mesh: an echo server on the server's port 9000, a CA placing
    /// client and server, and an agent on each node with `extra` flags.
    fn mesh(&self, extra: &[&str]) -> (Ca, Agent, Agent) {
        self.mesh_logging(extra, None)
    }

    /// `mesh`, with node b's agent logging at `log_b` (an EnvFilter).
    fn mesh_logging(&self, extra: &[&str], log_b: Option<&str>) -> (Ca, Agent, Agent) {
        let registry = [&self.client, &self.server];
        self.server
            .spawn_app(&self.env, &["echo", &self.server.v4(9000)]);
        let ca = Ca::start(&self.env, &self.fabric, "ca", &registry);
        let a = Agent::start(&self.env, &self.a, &registry, mtls(&ca, &self.a, extra));
        let mut opts_b = mtls(&ca, &self.b, extra);
        opts_b.log = log_b.map(String::from);
        let b = Agent::start(&self.env, &self.b, &registry, opts_b);
        (ca, a, b)
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

/// The serials of the client certificates node b's agent was shown, in
/// order (its `hbone: client connected` debug lines).
fn presented_serials(b: &Agent) -> Vec<String> {
    b.log()
        .lines()
        .filter(|l| l.contains("hbone: client connected"))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("serial="))
                .unwrap_or_else(|| panic!("no serial in {l:?}"))
                .to_owned()
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Occurrences of `needle` in `hay`.
fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// TLS 1.3 ServerHello's supported_versions extension: one per handshake.
const TLS13_SERVER_HELLO: [u8; 6] = [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];

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
    let accepted = echo.wait_accepted(2, Duration::from_secs(5));
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
    // Every byte both ways on :15008 is a TLS record: handshake first, then
    // only application data (TLS 1.3 hides everything else inside it).
    let flows = mesh_tests::pcap::tcp_flows(&pcap);
    assert!(flows.len() >= 2, "{flows:?}");
    for f in flows.iter().filter(|f| !f.bytes.is_empty()) {
        let records = mesh_tests::pcap::tls_records(&f.bytes)
            .unwrap_or_else(|e| panic!("{} -> {}: not TLS: {e}", f.src, f.dst));
        assert_eq!(
            records[0].0, 0x16,
            "{} -> {}: must start with a handshake record",
            f.src, f.dst
        );
        assert!(
            records[1..].iter().all(|(ty, _)| matches!(ty, 0x14 | 0x17)),
            "{} -> {}: {records:?}",
            f.src,
            f.dst
        );
    }

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
            .try_value("istio_tcp_received_bytes_total", &inb)
            == Ok(2.0 * payload.len() as f64)),
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

#[test]
fn streams_share_one_pooled_connection_which_closes_when_idle() {
    let c = cluster("mtls-pool");
    let env = &c.env;
    let (_ca, agent_a, _agent_b) = c.mesh(&["--hbone-idle-timeout", "1s"]);
    let capture = Capture::start(env, &c.a.netns, "up0", "tcp port 15008");
    let r = c
        .client
        .run_app(&["churn", &c.server.v4(9000), "50"])
        .json();
    assert_eq!(r["ok"], 50, "{r}");
    assert_eq!(
        agent_a
            .metrics()
            .value("mesh_hbone_pooled_connections", &[]),
        1.0
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent_a
            .metrics()
            .value("mesh_hbone_pooled_connections", &[])
            == 0.0),
        "the idle pooled connection was not closed"
    );
    // A new stream after that dials a new connection.
    c.client.run_app(&["connect", &c.server.v4(9000)]).json();
    let pcap = capture.stop(env);
    assert_eq!(
        count(&pcap, &TLS13_SERVER_HELLO),
        2,
        "50 streams on one handshake, then one more after the idle close"
    );
    let out = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        agent_a
            .metrics()
            .value("istio_tcp_connections_opened_total", &out),
        51.0
    );
}

/// More concurrent connections than one HBONE connection carries (100
/// streams) spread over more pooled connections instead of queueing behind
/// the stream limit.
#[test]
fn more_concurrent_streams_than_one_connection_carries_open_more_connections() {
    let c = cluster("mtls-many");
    let env = &c.env;
    let (_ca, agent_a, _agent_b) = c.mesh(&[]);
    let sink = c.server.v4(9001);
    c.server.spawn_app(env, &["sink", &sink]);
    let done = env.dir.join("many-done");
    let held = c
        .client
        .spawn_app(env, &["hold-many", &sink, "300", done.to_str().unwrap()]);
    let open = held.wait_for(|v| v["event"] == "open", Duration::from_secs(60));
    assert_eq!(open["count"], 300, "{open}");
    assert_eq!(
        agent_a
            .metrics()
            .value("mesh_hbone_pooled_connections", &[]),
        3.0,
        "300 streams at 100 per connection"
    );
    std::fs::write(&done, "").unwrap();
    held.wait_for(|v| v["event"] == "closed", Duration::from_secs(30));
}
