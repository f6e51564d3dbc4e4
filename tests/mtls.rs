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

#[test]
fn the_destination_refuses_clients_with_bad_certificates_and_says_why() {
    let c = cluster("mtls-refuse-in");
    let (env, registry) = (&c.env, [&c.client, &c.server]);
    c.server.spawn_app(env, &["echo", &c.server.v4(9000)]);
    // A host outside the mesh on node a, playing the attacker.
    let rogue = env.pod(&c.a, "rogue");
    let ca = Ca::start(env, &c.fabric, "ca", &registry);
    let _agent_a = Agent::start(env, &c.a, &registry, mtls(&ca, &c.a, &[]));
    let agent_b = Agent::start(env, &c.b, &registry, mtls(&ca, &c.b, &[]));
    let other_ca = env.dir.join("other-ca");
    mesh_tests::ca::init_root(&other_ca);
    let client_id = "spiffe://cluster.local/ns/default/sa/client-sa";
    let cases = [
        (
            "unknown_ca",
            mesh_tests::ca::issue(&other_ca, "foreign", client_id, false),
        ),
        (
            "wrong_trust_domain",
            ca.issue("evil", "spiffe://evil.local/ns/default/sa/client-sa", false),
        ),
        ("expired", ca.issue("old", client_id, true)),
    ];
    let (target, authority) = (c.server.v4(15008), c.server.v4(9000));
    for (reason, cred) in &cases {
        let r = rogue.run_app(&[
            "hbone-connect",
            cred.cert.to_str().unwrap(),
            cred.key.to_str().unwrap(),
            &target,
            &authority,
            "x",
        ]);
        assert!(
            !r.ok(),
            "{reason}: a bad certificate got through: {}",
            r.describe()
        );
        let counted = || {
            agent_b.metrics().value(
                "mesh_tls_handshake_failures_total",
                &[("direction", "inbound"), ("reason", reason)],
            ) == 1.0
        };
        assert!(
            wait_until(Duration::from_secs(5), counted),
            "{reason} not counted:\n{}",
            agent_b.metrics().0
        );
        assert!(
            agent_b.log().contains(&format!("reason={reason}")),
            "{reason} not logged:\n{}",
            agent_b.log()
        );
    }
    let r = rogue.run_app(&["hbone-connect", "-", "-", &target, &authority, "x"]);
    assert!(!r.ok(), "a client without a certificate got through");
    let counted = || {
        agent_b.metrics().value(
            "mesh_tls_handshake_failures_total",
            &[
                ("direction", "inbound"),
                ("reason", "no_client_certificate"),
            ],
        ) == 1.0
    };
    assert!(
        wait_until(Duration::from_secs(5), counted),
        "{}",
        agent_b.metrics().0
    );
    // A certificate from the mesh's CA is a mesh identity: let in (what it
    // may do is authorization's business).
    let ok = ca.issue(
        "tool",
        "spiffe://cluster.local/ns/default/sa/debug-tool",
        false,
    );
    let r = rogue
        .run_app(&[
            "hbone-connect",
            ok.cert.to_str().unwrap(),
            ok.key.to_str().unwrap(),
            &target,
            &authority,
            "let me in",
        ])
        .json();
    assert_eq!(r["received"], "let me in");
}

#[test]
fn the_source_refuses_a_destination_with_the_wrong_identity_or_ca() {
    let c = cluster("mtls-refuse-out");
    let env = &c.env;
    // Two impostors on node b claim (in node a's registry) to run as the
    // server's service account; node b's agent does not know them.
    let mut impostor = env.pod(&c.b, "impostor");
    impostor.service_account = "server-sa".into();
    let mut foreign = env.pod(&c.b, "foreign");
    foreign.service_account = "server-sa".into();
    let ca = Ca::start(env, &c.fabric, "ca", &[&c.client, &c.server]);
    let wrong_id = ca.issue(
        "impostor",
        "spiffe://cluster.local/ns/default/sa/someone-else",
        false,
    );
    impostor.spawn_app(
        env,
        &[
            "hbone-serve",
            wrong_id.cert.to_str().unwrap(),
            wrong_id.key.to_str().unwrap(),
            &impostor.v4(15008),
        ],
    );
    let other_ca = env.dir.join("other-ca");
    mesh_tests::ca::init_root(&other_ca);
    let foreign_cert = mesh_tests::ca::issue(
        &other_ca,
        "foreign",
        "spiffe://cluster.local/ns/default/sa/server-sa",
        false,
    );
    foreign.spawn_app(
        env,
        &[
            "hbone-serve",
            foreign_cert.cert.to_str().unwrap(),
            foreign_cert.key.to_str().unwrap(),
            &foreign.v4(15008),
        ],
    );
    let agent_a = Agent::start(
        env,
        &c.a,
        &[&c.client, &c.server, &impostor, &foreign],
        mtls(&ca, &c.a, &[]),
    );
    for (pod, reason) in [(&impostor, "wrong_identity"), (&foreign, "unknown_ca")] {
        let r = c.client.run_app(&["connect", &pod.v4(9000)]);
        assert!(
            !r.ok() && r.describe().contains("reset"),
            "{reason}: the client must see a refusal: {}",
            r.describe()
        );
        let counted = || {
            agent_a.metrics().value(
                "mesh_tls_handshake_failures_total",
                &[("direction", "outbound"), ("reason", reason)],
            ) >= 1.0
        };
        assert!(
            wait_until(Duration::from_secs(5), counted),
            "{reason} not counted:\n{}",
            agent_a.metrics().0
        );
    }
    let log = agent_a.log();
    assert!(
        log.contains("expected spiffe://cluster.local/ns/default/sa/server-sa"),
        "{log}"
    );
    assert!(log.contains("someone-else"), "{log}");
}

#[test]
fn the_ca_signs_only_identities_of_pods_on_the_asking_node() {
    let c = cluster("mtls-placement");
    let env = &c.env;
    let mut stray = env.pod(&c.a, "stray");
    stray.service_account = "stray-sa".into();
    // The CA's registry puts stray on node b; node a's says node a.
    let mut stray_on_b = stray.clone();
    stray_on_b.node = "b".into();
    let ca = Ca::start(env, &c.fabric, "ca", &[&c.client, &c.server, &stray_on_b]);
    let agent_a = Agent::start(
        env,
        &c.a,
        &[&c.client, &c.server, &stray],
        AgentOptions {
            unready: true,
            ..mtls(&ca, &c.a, &[])
        },
    );
    let refusal =
        "no pod with identity spiffe://cluster.local/ns/default/sa/stray-sa is scheduled on node a";
    assert!(
        wait_until(Duration::from_secs(10), || ca.log().contains(refusal)),
        "CA log:\n{}",
        ca.log()
    );
    let certs = || {
        agent_a.config_dump()["certificates"]["certificates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(10), || certs().iter().any(
            |c| c["identity"].as_str().unwrap().ends_with("/sa/stray-sa")
                && c["lastError"].as_str().is_some_and(|e| e.contains(refusal))
        )),
        "{:?}",
        certs()
    );
    assert!(
        certs().iter().any(
            |c| c["identity"].as_str().unwrap().ends_with("/sa/client-sa")
                && c["serial"].is_string()
        ),
        "the legitimate pod still gets its certificate: {:?}",
        certs()
    );
    assert!(
        agent_a
            .metrics()
            .value("mesh_certificate_requests_total", &[("result", "failed")])
            >= 1.0
    );
    // Not ready while a pod of the node has no certificate, and it says which.
    let ready = agent_a
        .try_get("http://127.0.0.1:15021/healthz/ready")
        .unwrap_err();
    assert!(
        ready.contains("no certificate yet for spiffe://cluster.local/ns/default/sa/stray-sa"),
        "{ready}"
    );
}

#[test]
fn renewal_keeps_open_connections_and_new_ones_use_the_new_certificate() {
    let c = cluster("mtls-renew");
    // 4 s certificates: renewed every 2 s. Node b's agent logs the serial of
    // every client certificate a handshake shows it.
    let (_ca, agent_a, agent_b) = c.mesh_logging(
        &["--workload-cert-ttl", "4s"],
        Some("info,mesh_agent::proxy::hbone=debug"),
    );
    let serial = || {
        agent_a.config_dump()["certificates"]["certificates"][0]["serial"]
            .as_str()
            .map(str::to_owned)
    };
    assert!(wait_until(Duration::from_secs(10), || serial().is_some()));
    let since_first = std::time::Instant::now();
    // One long-lived connection, a round trip every 100 ms, across several
    // renewals: it keeps the pooled HBONE connection dialled with the
    // first certificate busy, so that connection stays open.
    let chatter = c
        .client
        .spawn_app(&c.env, &["chatter", &c.server.v4(9000), "7"]);
    assert!(
        wait_until(Duration::from_secs(5), || presented_serials(&agent_b).len()
            == 1),
        "one handshake for the chatter:\n{}",
        agent_b.log()
    );
    let first_presented = presented_serials(&agent_b);
    for round in 0..2 {
        // After each renewal, a new connection is a stream on an HBONE
        // connection whose handshake showed the renewed certificate —
        // not on the pooled connection dialled with an older one.
        let before = serial().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || serial().as_ref()
                != Some(&before)),
            "round {round}: no renewal of a 4 s certificate in 5 s"
        );
        let renewed = serial().unwrap();
        let shown = presented_serials(&agent_b).len();
        c.client.run_app(&["connect", &c.server.v4(9000)]).json();
        assert!(
            wait_until(Duration::from_secs(5), || presented_serials(&agent_b).len()
                > shown),
            "round {round}: the new connection reused a pooled connection dialled with an \
             older certificate (no new handshake at node b)\n{}",
            agent_b.log()
        );
        let presented = presented_serials(&agent_b).pop().unwrap();
        let current = serial().unwrap();
        assert!(
            presented == renewed || presented == current,
            "round {round}: node b was shown certificate {presented}, the client's is {renewed} \
             (now {current})"
        );
        assert_ne!(presented, first_presented[0]);
    }
    let done = chatter.wait_for(|v| v["event"] == "done", Duration::from_secs(15));
    assert!(
        done["rounds"].as_u64().unwrap() >= 40,
        "the long-lived connection must live through the renewals: {done}"
    );
    let issued = agent_a
        .metrics()
        .value("mesh_certificate_requests_total", &[("result", "issued")]);
    // Renewed at half-life, about every 2 s: a few certificates, not a
    // renewal loop (allowing for a slow machine).
    let most = 2.0 + since_first.elapsed().as_secs_f64() / 1.5;
    assert!(
        issued >= 3.0 && issued <= most,
        "{issued} certificates issued in {:?} of 4 s lifetimes",
        since_first.elapsed()
    );
}

#[test]
fn a_second_root_during_rotation_keeps_traffic_flowing() {
    let c = cluster("mtls-rotate");
    let (env, registry) = (&c.env, [&c.client, &c.server]);
    let (ca, agent_a, agent_b) = c.mesh(&[
        "--workload-cert-ttl",
        "6s",
        "--trust-bundle-refresh",
        "300ms",
    ]);
    // A connection through the mesh, or everyone's account of why not.
    let connect = |ca: &Ca| {
        let r = c.client.run_app(&["connect", &c.server.v4(9000)]);
        assert!(
            r.ok(),
            "{}\n--- agent a:\n{}\n--- agent b:\n{}\n--- CA:\n{}",
            r.describe(),
            agent_a.log(),
            agent_b.log(),
            ca.log()
        );
    };
    connect(&ca);

    let root1 = std::fs::read_to_string(ca.dir.join("root-cert.pem")).unwrap();
    let new_root = env.dir.join("root2");
    mesh_tests::ca::init_root(&new_root);
    let root2 = std::fs::read_to_string(new_root.join("root-cert.pem")).unwrap();
    let stage = |name: &str, signer: &std::path::Path| {
        let d = env.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
            std::fs::copy(signer.join(f), d.join(f)).unwrap();
        }
        std::fs::write(d.join("root-cert.pem"), format!("{root1}{root2}")).unwrap();
        d
    };
    let roots = |a: &Agent| {
        a.config_dump()["certificates"]["trustBundle"]
            .as_array()
            .map_or(0, Vec::len)
    };
    // Phase 1: the old root still signs; both roots are published.
    let phase1 = stage("phase1", &ca.dir);
    let ca = ca.restart(env, &phase1, &registry);
    assert!(
        wait_until(Duration::from_secs(10), || roots(&agent_a) == 2
            && roots(&agent_b) == 2),
        "agents did not pick up the second root"
    );
    connect(&ca);
    // Phase 2: the new root signs; agents renew onto it one by one.
    let ca = ca.restart(env, &stage("phase2", &new_root), &registry);
    let issuer = |a: &Agent| {
        a.config_dump()["certificates"]["certificates"][0]["issuer"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let old_issuer = issuer(&agent_a);
    assert!(
        wait_until(Duration::from_secs(15), || issuer(&agent_a) != old_issuer),
        "agent a never renewed onto the new root"
    );
    // Mixed roots on the two sides: still trusted both ways.
    for _ in 0..5 {
        connect(&ca);
    }
    assert!(
        wait_until(Duration::from_secs(15), || issuer(&agent_b)
            == issuer(&agent_a)),
        "agent b never renewed onto the new root"
    );
    connect(&ca);
    assert_eq!(
        agent_a
            .metrics()
            .value("mesh_tls_handshake_failures_total", &[]),
        0.0
    );
}

#[test]
fn kubernetes_tokens_authenticate_nodes_through_tokenreview() {
    let c = cluster("mtls-tokenreview");
    let (env, registry) = (&c.env, [&c.client, &c.server]);
    // The API server's TokenReview, answered from a table, on the fabric.
    let fabric_host = mesh_tests::Pod {
        netns: c.fabric.clone(),
        ..c.client.clone()
    };
    let api = fabric_host
        .spawn_app_outside_cgroup(env, &["fake-kube", "10.255.0.254:6443", "token-of-a=a"]);
    let dir = env.dir.join("ca");
    mesh_tests::ca::init_root(&dir);
    let ca = Ca::serve(
        env,
        &c.fabric,
        &dir,
        &registry,
        &["--kube-api", "http://10.255.0.254:6443"],
    );
    let token = |name: &str, value: &str| {
        let p = env.dir.join(name);
        std::fs::write(&p, value).unwrap();
        p
    };
    let root = dir.join("root-cert.pem");
    let token_args = |t: std::path::PathBuf| AgentOptions {
        args: [
            "--ca-addr",
            &ca.addr,
            "--ca-root",
            root.to_str().unwrap(),
            "--ca-token-file",
            t.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..Default::default()
    };
    let agent_a = Agent::start(
        env,
        &c.a,
        &registry,
        token_args(token("a.token", "token-of-a\n")),
    );
    let _agent_b = Agent::start(
        env,
        &c.b,
        &registry,
        AgentOptions {
            unready: true,
            ..token_args(token("b.token", "stolen-token"))
        },
    );
    let serial = |a: &Agent| {
        a.config_dump()["certificates"]["certificates"][0]["serial"]
            .as_str()
            .map(str::to_owned)
    };
    assert!(
        wait_until(Duration::from_secs(10), || serial(&agent_a).is_some()),
        "node a's token was not accepted:\n{}",
        ca.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || ca
            .log()
            .contains("token rejected by the API server: invalid bearer token")),
        "CA log:\n{}",
        ca.log()
    );
    assert!(
        api.lines()
            .iter()
            .any(|l| l["path"] == "/apis/authentication.k8s.io/v1/tokenreviews")
    );
}

#[test]
fn an_intermediate_ca_signs_and_chains_verify_to_the_root() {
    let c = cluster("mtls-intermediate");
    let (env, registry) = (&c.env, [&c.client, &c.server]);
    c.server.spawn_app(env, &["echo", &c.server.v4(9000)]);
    // The root stays offline; only the intermediate is served.
    let root = env.dir.join("root");
    mesh_tests::ca::init_root(&root);
    let inter = env.dir.join("intermediate");
    mesh_tests::ca::tool(&[
        "init",
        "--dir",
        inter.to_str().unwrap(),
        "--signed-by",
        root.to_str().unwrap(),
    ]);
    let ca = Ca::serve(env, &c.fabric, &inter, &registry, &[]);
    let agent_a = Agent::start(env, &c.a, &registry, mtls(&ca, &c.a, &[]));
    let _agent_b = Agent::start(env, &c.b, &registry, mtls(&ca, &c.b, &[]));
    assert_eq!(
        c.client
            .run_app(&["connect", &c.server.v4(9000), "chained"])
            .json()["received"],
        "chained"
    );
    let d = agent_a.config_dump();
    let cert = &d["certificates"]["certificates"][0];
    assert!(
        cert["issuer"]
            .as_str()
            .unwrap()
            .contains("mesh intermediate CA"),
        "{cert}"
    );
    let roots = d["certificates"]["trustBundle"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    assert!(
        roots[0]["issuer"]
            .as_str()
            .unwrap()
            .contains("mesh root CA"),
        "only the root is trusted: {roots:?}"
    );
}
