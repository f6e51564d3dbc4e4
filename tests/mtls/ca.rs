//! The CA and certificates over time: placement, renewal under a live
//! connection, root rotation, TokenReview, intermediates.

use super::*;

/// Replaces a file by a rename, as an operator's tooling (or a Secret
/// volume) does, so the CA never reads half of it.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
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
    // The renewal rate is judged over a window this test times itself:
    // the agents may take seconds to become ready on a slow (emulated)
    // machine, and certificates issued meanwhile are not in the window.
    let issued = || {
        agent_a
            .metrics()
            .value("mesh_certificate_requests_total", &[("result", "issued")])
    };
    let issued_before = issued();
    let window = std::time::Instant::now();
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
    let in_window = issued() - issued_before;
    let elapsed = window.elapsed();
    // Renewed at half-life, about every 2 s: a few certificates, not a
    // renewal loop (allowing for a slow machine).
    let most = 1.0 + elapsed.as_secs_f64() / 1.5;
    assert!(
        in_window >= 2.0 && in_window <= most,
        "{in_window} certificates issued in {elapsed:?} of 4 s lifetimes ({issued_before} before); \
         all of them:\n{}",
        agent_a
            .log()
            .lines()
            .filter(|l| l.contains("certificate issued"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_second_root_during_rotation_keeps_traffic_flowing() {
    let c = cluster("mtls-rotate");
    let env = &c.env;
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
    let roots = |a: &Agent| {
        a.config_dump()["certificates"]["trustBundle"]
            .as_array()
            .map_or(0, Vec::len)
    };
    // The CA is never restarted: it re-reads its files when they change.
    // Phase 1: the old root still signs; both roots are published.
    let pid = ca.pid();
    write_atomically(&ca.dir.join("root-cert.pem"), &format!("{root1}{root2}"));
    assert!(
        wait_until(Duration::from_secs(10), || roots(&agent_a) == 2
            && roots(&agent_b) == 2),
        "agents did not pick up the second root\n--- CA:\n{}",
        ca.log()
    );
    connect(&ca);
    // Phase 2: the new root signs; agents renew onto it one by one.
    for f in ["ca-key.pem", "ca-cert.pem", "cert-chain.pem"] {
        let text = std::fs::read_to_string(new_root.join(f)).unwrap();
        write_atomically(&ca.dir.join(f), &text);
    }
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
    assert_eq!(ca.pid(), pid, "the CA was restarted");
    assert!(ca.log().contains("CA files reloaded"), "{}", ca.log());
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
