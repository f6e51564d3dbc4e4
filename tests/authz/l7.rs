//! Request-level policy: the destination's agent parses the HTTP inside
//! the tunnel and decides each request.

use std::time::Duration;

use serde_json::json;

use super::*;

const CLIENT: &str = "cluster.local/ns/default/sa/client-sa";

#[test]
fn request_rules_allow_and_their_mirrors_deny() {
    let m = mesh("authz-l7", &[]);
    // Nothing applies: everything is allowed and no decision is counted.
    assert_allowed(&m.get("/anything", &[]), "no policy");

    // Operations: methods and paths (prefix, exact, template), hosts.
    m.apply(&[policy(
        "ops",
        json!({"rules": [{"to": [{"operation": {
            "methods": ["GET"],
            "paths": ["/public/*", "/exact", "/books/{*}/pages"],
            "hosts": ["web", "web:*", "10.96.0.10*"],
        }}]}]}),
    )]);
    for ok in ["/public/a", "/exact", "/books/7/pages"] {
        m.counted(("ALLOW", "allow", "default/ops"), || {
            assert_allowed(&m.get(ok, &[]), ok)
        });
    }
    for no in [
        "/private",
        "/exact/",
        "/books/7/8/pages",
        "/public/../private",
    ] {
        m.counted(("ALLOW", "deny", "none"), || {
            assert_denied(&m.get(no, &[]), no)
        });
    }
    assert_denied(&m.get("/public/a", &["--method=POST"]), "POST");
    assert_denied(&m.get("/public/a", &["Host: evil"]), "another host");

    // Sources: principals and namespaces from the peer's certificate.
    m.apply(&[policy(
        "who",
        json!({"rules": [{"from": [{"source": {"principals": [CLIENT]}}]}]}),
    )]);
    assert_allowed(&m.get("/", &[]), "the client's principal");
    m.apply(&[policy(
        "who",
        json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/other"]}}]}]}),
    )]);
    assert_denied(&m.get("/", &[]), "another principal");
    m.apply(&[policy(
        "who",
        json!({"rules": [{"from": [{"source": {"namespaces": ["default"], "notPrincipals": ["*/sa/other"]}}]}]}),
    )]);
    assert_allowed(&m.get("/", &[]), "the client's namespace");
    m.apply(&[policy(
        "who",
        json!({"rules": [{"from": [{"source": {"namespaces": ["prod"]}}]}]}),
    )]);
    assert_denied(&m.get("/", &[]), "another namespace");

    // Conditions: a header, the source principal, the destination port.
    m.apply(&[policy(
        "when",
        json!({"rules": [{"when": [
            {"key": "request.headers[x-team]", "values": ["blue", "green*"]},
            {"key": "source.principal", "values": [CLIENT]},
            {"key": "destination.port", "values": ["8080"]},
        ]}]}),
    )]);
    assert_allowed(&m.get("/", &["x-team: blue"]), "header blue");
    assert_allowed(&m.get("/", &["x-team: green-2"]), "header green*");
    assert_denied(&m.get("/", &["x-team: red"]), "header red");
    assert_denied(&m.get("/", &[]), "no header");

    // Deny by default, and DENY beating ALLOW.
    m.apply(&[policy("nothing", json!({}))]);
    assert_denied(&m.get("/", &[]), "ALLOW with no rules");
    m.apply(&[
        policy("everything", json!({"rules": [{}]})),
        policy(
            "no-admin",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        ),
    ]);
    assert_allowed(&m.get("/", &[]), "rules: [{}]");
    m.counted(("DENY", "deny", "default/no-admin"), || {
        assert_denied(&m.get("/admin/x", &[]), "DENY beats ALLOW")
    });

    // Scope: mesh-wide (root namespace), another namespace, another
    // workload.
    m.apply(&[
        policy(
            "istio-system/mesh",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/mesh"]}}]}]}),
        ),
        policy("prod/elsewhere", json!({"action": "DENY", "rules": [{}]})),
        policy(
            "other-app",
            json!({"selector": {"matchLabels": {"app": "api"}}, "action": "DENY", "rules": [{}]}),
        ),
    ]);
    assert_denied(&m.get("/mesh", &[]), "mesh-wide DENY");
    assert_allowed(
        &m.get("/x", &[]),
        "other namespaces' and workloads' policies do not apply",
    );
    let web = m.web_policies();
    let ids: Vec<&str> = web["authorization"]["policies"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["istio-system/mesh"], "/config_dump: {web}");
}

#[test]
fn dry_run_and_audit_never_change_the_decision() {
    let m = mesh("authz-audit", &[]);
    let audit = m.audit.clone();
    let mut dry = policy(
        "dry",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/dry"]}}]}]}),
    );
    dry["metadata"]["annotations"] = json!({"istio.io/dry-run": "true"});
    m.apply(&[
        dry,
        policy(
            "audit",
            json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/audited"]}}]}]}),
        ),
        policy(
            "deny",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/denied"]}}]}]}),
        ),
    ]);
    m.counted(("DENY", "dry_run_deny", "default/dry"), || {
        assert_allowed(&m.get("/dry", &[]), "dry-run DENY")
    });
    m.counted(("AUDIT", "audit", "default/audit"), || {
        assert_allowed(&m.get("/audited", &[]), "AUDIT")
    });
    assert_denied(&m.get("/denied", &[]), "DENY");
    // The audit log: the audited request and the denial, nothing else.
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || lines().len() >= 2),
        "audit log: {:?}",
        lines()
    );
    let l = lines();
    assert_eq!(l.len(), 2, "{l:?}");
    assert_eq!(
        (
            &l[0]["decision"],
            &l[0]["reason"],
            &l[0]["policy"],
            &l[0]["path"]
        ),
        (
            &json!("allow"),
            &json!("AUDIT"),
            &json!("default/audit"),
            &json!("/audited")
        )
    );
    assert_eq!(
        (
            &l[1]["decision"],
            &l[1]["policy"],
            &l[1]["path"],
            &l[1]["method"]
        ),
        (
            &json!("deny"),
            &json!("default/deny"),
            &json!("/denied"),
            &json!("GET")
        )
    );
    assert_eq!(l[1]["source_principal"], CLIENT);
    assert_eq!(l[1]["source_ip"], m.client.ip4.to_string());
    assert_eq!(l[1]["destination_workload"], "default/web");
}

#[test]
fn http2_and_grpc_clients_are_decided_per_request() {
    let m = mesh("authz-h2", &[]);
    m.apply(&[policy(
        "deny-secret",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/secret", "/echo.Echo/Denied"]}}]}]}),
    )]);
    // HTTP/2 with prior knowledge, straight to the pod's HTTP port.
    let h2 = |path: &str| {
        let url = format!("http://{}{path}", m.web.v4(8080));
        m.client.run_app(&["h2-count", &url, "2"]).json()["answers"].clone()
    };
    assert_eq!(h2("/open"), json!({"hello from web": 2}));
    assert_eq!(h2("/secret"), json!({"HTTP 403": 2}));
    // gRPC: the denial is a gRPC status (PERMISSION_DENIED).
    let grpc = |method: &str| {
        let url = format!("http://{VIP}:50051/echo.Echo/{method}");
        m.client.run_app(&["grpc-call", &url, "2"])
    };
    assert_eq!(grpc("Allowed").json()["grpc_status"], "0");
    let denied = grpc("Denied");
    assert!(!denied.ok());
    let v = denied.last_json().expect("a JSON line");
    assert_eq!(
        (&v["grpc_status"], &v["echoed"]),
        (&json!("7"), &json!(0)),
        "{v}"
    );
    // Counted as requests with reporter destination.
    let m2 = m.agent_b.metrics();
    let n = m2.value(
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "403"),
            ("response_flags", "RBAC"),
        ],
    );
    assert_eq!(n, 2.0);
    let g = m2.value(
        "istio_requests_total",
        &[("reporter", "destination"), ("grpc_response_status", "7")],
    );
    assert_eq!(g, 1.0);
}

#[test]
fn a_policy_change_applies_under_load_without_failing_allowed_requests() {
    let m = mesh("authz-reload", &[]);
    let get_only = || {
        policy(
            "get",
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        )
    };
    m.apply(&[get_only()]);
    let stop = m.env.dir.join("stop-load");
    let url = format!("http://{VIP}:80/allowed");
    let load = m
        .client
        .spawn_app(&m.env, &["watch-get", &url, stop.to_str().unwrap()]);
    m.apply(&[
        get_only(),
        policy(
            "block",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/blocked"]}}]}]}),
        ),
    ]);
    // Applied: the very next request is decided by the new policy.
    assert_denied(&m.get("/blocked", &[]), "the new DENY");
    // The load goes on under the new policy: more of its requests are let
    // through after the change (counted by the destination) before it
    // stops — whatever the machine's speed.
    let allowed = || {
        m.agent_b
            .metrics()
            .try_value(
                "istio_requests_total",
                &[("reporter", "destination"), ("response_code", "200")],
            )
            .unwrap_or(0.0)
    };
    let at_change = allowed();
    assert!(
        wait_until(Duration::from_secs(10), || allowed() >= at_change + 5.0),
        "the load stalled after the change: {:?}",
        load.lines()
    );
    std::fs::write(&stop, "").unwrap();
    let done = load.wait_for(|l| l["event"] == "done", Duration::from_secs(10));
    assert_eq!(done["failures"], 0, "{done}: {:?}", load.lines());
    let answers: Vec<Value> = load
        .lines()
        .into_iter()
        .filter(|l| l["event"] == "answer")
        .collect();
    assert_eq!(answers.len(), 1, "one answer throughout: {answers:?}");
}
