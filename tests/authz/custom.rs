//! The CUSTOM action: an HTTP external authorizer from the MeshConfig's
//! `extensionProviders`, asked by the destination's agent before DENY
//! and ALLOW.

use std::time::Duration;

use serde_json::json;

use super::*;

#[test]
fn an_external_authorizer_allows_denies_and_fails_closed() {
    let m = mesh("authz-custom", &[]);
    let authz = m.keys.spawn_app(&m.env, &["ext-authz", &m.keys.v4(8600)]);
    let custom = |name: &str, provider: &str, paths: &[&str]| {
        policy(
            name,
            json!({"action": "CUSTOM", "provider": {"name": provider},
                   "rules": [{"to": [{"operation": {"paths": paths}}]}]}),
        )
    };
    m.apply(&[
        custom("ext", "ext", &["/custom/*"]),
        custom("ext-open", "ext-open", &["/open/*"]),
        custom("missing", "no-such-provider", &["/missing"]),
    ]);
    let checks = || {
        authz
            .lines()
            .into_iter()
            .filter(|l| l["event"] == "check")
            .collect::<Vec<_>>()
    };

    // Allowed: the authorizer saw the request, the app saw its header.
    let v = m.counted(("CUSTOM", "allow", "default/ext"), || {
        m.get("/custom/a?x=1", &["x-ext-authz: allow", "x-other: 1"])
    });
    assert_eq!(v["status"], 200, "{v}");
    let check = checks().last().cloned().expect("the authorizer was asked");
    assert_eq!(check["request"], "GET /custom/a?x=1 HTTP/1.1");
    assert_eq!(check["headers"]["x-ext-authz"], "allow");
    assert!(check["headers"].get("x-other").is_none(), "{check}");
    let web = &m._apps[0];
    let seen = web.wait_for(
        |l| {
            l["event"] == "http"
                && l["request"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("GET /custom/a"))
        },
        Duration::from_secs(5),
    );
    assert_eq!(
        seen["headers"]["x-ext-authz-check-result"], "allowed",
        "{seen}"
    );

    // Denied: the authorizer's status, body and headers reach the client.
    let v = m.counted(("CUSTOM", "deny", "default/ext"), || {
        m.get("/custom/b", &[])
    });
    assert_eq!(
        (
            &v["status"],
            &v["body"],
            &v["headers"]["x-ext-authz-check-result"]
        ),
        (&json!(403), &json!("denied by ext_authz"), &json!("denied")),
        "{v}"
    );
    // Paths no CUSTOM policy matches do not ask it.
    let n = checks().len();
    assert_eq!(m.status("/elsewhere", &[]), 200);
    assert_eq!(checks().len(), n);

    // No answer within the timeout: closed, unless failOpen.
    let v = m.get("/custom/slow", &["x-ext-authz: allow"]);
    assert_eq!(v["status"], 403, "timeout fails closed: {v}");
    assert_eq!(v["headers"]["x-mesh-response-flags"], "UAEX", "{v}");
    assert_eq!(m.status("/open/slow", &[]), 200, "failOpen");
    // A provider the MeshConfig does not define: denied.
    assert_eq!(m.status("/missing", &["x-ext-authz: allow"]), 403);
    // A TCP connection a CUSTOM policy matches cannot be asked about: it
    // is refused (the policies' HTTP fields ignored, as a DENY's).
    let n = checks().len();
    assert!(
        !m.echo(&m.client, &m.web.v4(9000)),
        "CUSTOM on TCP fails closed"
    );
    assert_eq!(checks().len(), n, "the authorizer is not asked");
}
