//! Connection-level policy: no HTTP parsing when no policy of the
//! workload needs the request; Istio's semantics for HTTP-only fields on
//! a connection that is not HTTP.

use std::time::Duration;

use serde_json::json;

use super::*;

#[test]
fn connection_rules_decide_before_any_byte_reaches_the_app() {
    let m = mesh("authz-l4", &[]);
    let (pod_echo, vip_echo) = (m.web.v4(9000), format!("{VIP}:90"));
    let closed = |peer: &str| {
        m.agent_b.metrics().try_value(
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("source_principal", peer)],
        )
    };

    // Ports, and who: the client over mTLS, the outsider in plaintext.
    m.apply(&[policy(
        "tcp",
        json!({"rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/default/sa/client-sa"]}}],
            "to": [{"operation": {"ports": ["9000"]}}],
        }]}),
    )]);
    m.counted(("ALLOW", "allow", "default/tcp"), || {
        assert!(m.echo(&m.client, &vip_echo), "the client, port 9000")
    });
    assert!(m.echo(&m.client, &pod_echo), "the client, by pod address");
    let before = closed("unknown").unwrap_or(0.0);
    m.counted(("ALLOW", "deny", "none"), || {
        assert!(
            !m.echo(&m.outsider, &pod_echo),
            "plaintext has no principal"
        )
    });
    assert_eq!(
        closed("unknown"),
        Ok(before + 1.0),
        "the denial is a closed connection"
    );
    assert_denied_http(&m, "port 8080 is not in the rule");
    let web = m.web_policies();
    assert_eq!(
        web["authorization"]["perRequest"], false,
        "an L4 policy does not parse HTTP: {web}"
    );

    // ipBlocks: the outsider's real source address.
    let outsider = format!("{}/32", m.outsider.ip4);
    m.apply(&[policy(
        "ips",
        json!({"rules": [{"from": [{"source": {"ipBlocks": [outsider]}}]}]}),
    )]);
    assert!(m.echo(&m.outsider, &pod_echo), "the outsider's address");
    assert!(
        !m.echo(&m.client, &pod_echo),
        "the client's address is not in the block"
    );
    m.apply(&[policy(
        "ips",
        json!({"rules": [{"from": [{"source": {"notIpBlocks": [outsider]}}]}]}),
    )]);
    assert!(!m.echo(&m.outsider, &pod_echo), "notIpBlocks");
    assert!(m.echo(&m.client, &pod_echo), "notIpBlocks, another address");

    // An L7 DENY on a raw TCP port: the HTTP fields are ignored, so the
    // rule denies on its other fields; on the HTTP port the path decides.
    m.apply(&[policy(
        "no-admin",
        json!({"action": "DENY", "rules": [{
            "from": [{"source": {"namespaces": ["default"]}}],
            "to": [{"operation": {"paths": ["/admin"]}}],
        }]}),
    )]);
    m.counted(("DENY", "deny", "default/no-admin"), || {
        assert!(!m.echo(&m.client, &vip_echo), "L7 DENY on a TCP port")
    });
    assert_eq!(m.status("/ok", &[]), 200);
    assert_denied(&m.get("/admin", &[]), "L7 DENY on the HTTP port");
    assert!(
        m.echo(&m.outsider, &pod_echo),
        "other sources are not denied"
    );

    // An ALLOW with HTTP fields never matches a TCP connection.
    m.apply(&[policy(
        "get-only",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    )]);
    assert!(
        !m.echo(&m.client, &vip_echo),
        "ALLOW with methods, TCP port"
    );
    assert_eq!(m.status("/x", &[]), 200, "ALLOW with methods, HTTP port");
    // The same with a second operation by port: a TCP connection to a port
    // no Service declares is detected as not HTTP and allowed by it, over
    // HBONE and in plaintext alike.
    m.apply(&[policy(
        "get-or-echo",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}, {"operation": {"ports": ["9000"]}}]}]}),
    )]);
    assert!(m.echo(&m.client, &pod_echo), "undeclared port, HBONE");
    assert!(m.echo(&m.outsider, &pod_echo), "undeclared port, plaintext");
    assert_eq!(m.status("/x", &[]), 200);
}

#[test]
fn open_connections_are_re_checked_when_policies_change() {
    let m = mesh("authz-recheck", &[]);
    let stop = m.env.dir.join("stop");
    let chatter = |pod: &Pod| {
        let app = pod.spawn_app(
            &m.env,
            &["chatter", &m.web.v4(9000), stop.to_str().unwrap()],
        );
        app.wait_for(|l| l["event"] == "echoed", Duration::from_secs(5));
        app
    };
    let (client, outsider) = (chatter(&m.client), chatter(&m.outsider));
    // A DENY for the client's namespace: its open connection is closed,
    // the outsider's (no namespace) stays.
    m.apply(&[policy(
        "deny-default",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]}),
    )]);
    let failed = client.wait_for(|l| l["event"] == "failed", Duration::from_secs(5));
    assert!(failed["rounds"].as_u64().unwrap_or(0) >= 1, "{failed}");
    assert!(
        m.agent_b.log().contains(
            "closing a connection: denied by AuthorizationPolicy (DENY default/deny-default)"
        ),
        "{}",
        m.agent_b.log()
    );
    // A policy that needs the request: a relayed connection of unknown
    // protocol is closed (once quiet), so that it is decided per request.
    let before = outsider.lines().len();
    m.apply(&[policy(
        "get-only",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    )]);
    let gone = outsider.wait_for(|l| l["event"] == "failed", Duration::from_secs(5));
    assert!(outsider.lines().len() > before, "{gone}");
    assert!(
        m.agent_b
            .log()
            .contains("its workload's policies now decide each request"),
        "{}",
        m.agent_b.log()
    );
    std::fs::write(&stop, "").unwrap();
}

/// An HTTP request refused at the connection: the destination answers
/// the tunnel 403 and the source agent replies 503.
fn assert_denied_http(m: &Mesh, what: &str) {
    let v = m.get("/", &[]);
    assert_ne!(v["status"], 200, "{what}: {v}");
}
