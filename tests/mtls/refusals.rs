//! Peers with bad certificates are refused, counted and logged with the
//! reason, on both sides of a connection.

use super::*;

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
