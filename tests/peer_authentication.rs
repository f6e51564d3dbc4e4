//! PeerAuthentication decides whether plaintext may reach a workload:
//! STRICT refuses it, PERMISSIVE (the default) and DISABLE let it in,
//! `portLevelMtls` overrides per port. Mesh traffic (HBONE) is mutual TLS
//! and always accepted. Policies come from Istio YAML and are reloaded.

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, ca::Ca, cluster::write_text, sys::wait_until};

const STRICT_NAMESPACE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"#;

const STRICT_EXCEPT_8080: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: server, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
"#;

const DISABLE_MESH_WIDE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: DISABLE}
"#;

#[test]
fn plaintext_follows_peer_authentication_and_mesh_traffic_is_always_mtls() {
    let env = mesh_tests::Env::new("peer-auth");
    let a = env.node("a");
    let b = env.node("b");
    let client = env.pod(&a, "client");
    let server = env.pod(&b, "server");
    // Outside the mesh: not in the registry, so it talks plaintext.
    let outsider = env.pod(&a, "outsider");
    let fabric = env.connect_nodes(&[&a, &b]);
    server.spawn_app(&env, &["echo", &server.v4(9000), &server.v4(8080)]);
    let registry = [&client, &server];
    let ca = Ca::start(&env, &fabric, "ca", &registry);
    let policy = env.dir.join("istio.yaml");
    std::fs::write(&policy, "").unwrap();
    let opts = |node| {
        let mut args = ca.agent_args(node);
        args.extend(["--istio-config".into(), policy.to_str().unwrap().into()]);
        AgentOptions {
            args,
            ..Default::default()
        }
    };
    let _agent_a = Agent::start(&env, &a, &registry, opts(&a));
    let agent_b = Agent::start(&env, &b, &registry, opts(&b));

    let plaintext = |port: u16| outsider.run_app(&["connect", &server.v4(port), "plain"]);
    let mesh = |port: u16| {
        client
            .run_app(&["connect", &server.v4(port), "mtls"])
            .json()
    };
    let apply = |yaml: &str, applied: usize| {
        // Atomically: a write the agent read half-way (truncated, not yet
        // written) would be applied as an empty policy, and counted.
        write_text(&policy, yaml);
        // Version 1 is the configuration the agent started with.
        let n = || agent_b.metrics().value("mesh_config_version", &[]) as usize;
        assert!(
            wait_until(Duration::from_secs(5), || n() > applied),
            "policy not applied:\n{}",
            agent_b.log()
        );
    };
    // Refusals counted, waiting for the count to reach `n` (the client sees
    // the reset before the agent counts it).
    let refused = |n: f64| {
        let count = || {
            agent_b.metrics().try_value(
                "mesh_proxy_errors_total",
                &[("direction", "inbound"), ("reason", "plaintext_refused")],
            )
        };
        wait_until(Duration::from_secs(5), || count() == Ok(n));
        count()
    };

    // Nothing configured: PERMISSIVE.
    assert_eq!(plaintext(9000).json()["received"], "plain");
    assert_eq!(mesh(9000)["received"], "mtls");

    // STRICT for the namespace: plaintext is refused (a reset, counted and
    // logged), mesh traffic still flows.
    apply(STRICT_NAMESPACE, 1);
    let r = plaintext(9000);
    // A reset shows as ECONNRESET, or as ENOTCONN when it lands before the
    // client's half-close (seen on a slow VM).
    assert!(
        !r.ok() && (r.describe().contains("reset") || r.describe().contains("not connected")),
        "STRICT let plaintext in: {}",
        r.describe()
    );
    assert_eq!(refused(1.0), Ok(1.0));
    assert!(
        agent_b
            .log()
            .contains("PeerAuthentication is STRICT for default/server")
    );
    assert_eq!(mesh(9000)["received"], "mtls");

    // Workload STRICT with port 8080 PERMISSIVE.
    apply(STRICT_EXCEPT_8080, 2);
    assert_eq!(plaintext(8080).json()["received"], "plain");
    assert!(!plaintext(9000).ok());
    assert_eq!(refused(2.0), Ok(2.0));
    assert_eq!(mesh(8080)["received"], "mtls");

    // A broken update is rejected; the last good policy keeps serving.
    write_text(&policy, &STRICT_EXCEPT_8080.replace("STRICT", "STRICKT"));
    let rejected = || {
        agent_b
            .metrics()
            .value("mesh_config_rejected_total", &[("source", "files")])
            >= 1.0
    };
    assert!(
        wait_until(Duration::from_secs(5), rejected),
        "{}",
        agent_b.log()
    );
    assert!(
        agent_b
            .log()
            .contains("spec.mtls.mode: unknown variant `STRICKT`"),
        "{}",
        agent_b.log()
    );
    assert!(
        !plaintext(9000).ok(),
        "the previous STRICT policy must still apply"
    );

    // Mesh-wide DISABLE: plaintext passes through.
    apply(DISABLE_MESH_WIDE, 3);
    assert_eq!(plaintext(9000).json()["received"], "plain");
    let dump = agent_b.config_dump();
    let snap = &dump["snapshot"];
    assert_eq!(
        snap["peerAuthentications"]["policies"][0]["mode"],
        "DISABLE"
    );
    // Resolved once per snapshot for each pod of the node.
    assert_eq!(
        snap["policies"]["default/server"]["peerAuthentication"]["mode"], "DISABLE",
        "{snap}"
    );
    assert_eq!(snap["version"], 4, "three updates applied after the first");
}
