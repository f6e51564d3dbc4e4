//! RequestAuthentication on real requests: keys from a JWKS server the
//! destination's agent fetches, tokens refused with 401, the request
//! principal and claims in AuthorizationPolicy, a rotated key picked up
//! without a restart.

use jsonwebtoken::Algorithm;
use mesh_tests::jwt::{self as mint, Key};
use serde_json::json;

use super::*;

const ISS: &str = "https://issuer.test";

#[test]
fn tokens_are_verified_at_the_destination() {
    let m = mesh("authz-jwt", &[]);
    let k1 = Key::rsa("k1", Algorithm::RS256);
    let k2 = Key::ec("k2", Algorithm::ES256);
    let jwks_file = m.env.dir.join("jwks.json");
    std::fs::write(&jwks_file, mint::jwks(&[&k1])).unwrap();
    let server = m.keys.spawn_app(
        &m.env,
        &["file", &m.keys.v4(8500), jwks_file.to_str().unwrap()],
    );
    let uri = format!("http://{}/jwks.json", m.keys.v4(8500));
    m.apply(&[
        json!({
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "jwtRules": [{"issuer": ISS, "audiences": ["web"], "jwksUri": uri,
                              "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}]}],
            },
        }),
        policy(
            "need-token",
            json!({"rules": [{
                "from": [{"source": {"requestPrincipals": ["*"]}}],
                "to": [{"operation": {"paths": ["/user/*"]}}],
            }, {
                "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}],
                "to": [{"operation": {"paths": ["/admin/*"]}}],
            }, {
                "to": [{"operation": {"paths": ["/public"]}}],
            }]}),
        ),
    ]);
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let good = mint::claims(ISS, "alice", "web");
    let t1 = k1.sign(&good);

    // No token: authentication passes, the policy decides.
    assert_eq!(m.status("/public", &[]), 200, "no token, public path");
    assert_denied(&m.get("/user/x", &[]), "no token, requestPrincipals: [*]");
    // A good token: allowed; the claim header reached the application.
    let v = m.get("/user/x", &[&bearer(&t1)]);
    assert_eq!(v["status"], 200, "{v}");
    // Claims: groups must hold admins.
    let mut admin = good.clone();
    admin["groups"] = json!(["dev", "admins"]);
    assert_eq!(m.status("/admin/x", &[&bearer(&k1.sign(&admin))]), 200);
    assert_denied(&m.get("/admin/x", &[&bearer(&t1)]), "no admins group");

    // The negative suite: each a 401, counted by reason.
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let cases = [
        ("algorithm", mint::unsigned(&good)),
        ("algorithm", mint::hs256_with_public_key(&k1, &good)),
        ("signature", mint::tampered(&t1)),
        (
            "expired",
            k1.sign(&with("exp", mint::now_plus(-3600).into())),
        ),
        (
            "not_yet_valid",
            k1.sign(&with("nbf", mint::now_plus(3600).into())),
        ),
        (
            "unknown_issuer",
            k1.sign(&with("iss", "https://evil".into())),
        ),
        ("audience", k1.sign(&with("aud", "other".into()))),
        ("malformed", "not-a-token".into()),
        ("unknown_key", k1.sign_as("k9", &good)),
        ("too_large", k1.sign(&with("pad", "x".repeat(9000).into()))),
    ];
    for (reason, token) in cases {
        let count = || {
            m.agent_b
                .metrics()
                .try_value("mesh_jwt_rejections_total", &[("reason", reason)])
                .unwrap_or(0.0)
        };
        let before = count();
        let v = m.get("/public", &[&bearer(&token)]);
        assert_eq!(v["status"], 401, "{reason}: {v}");
        assert_eq!(
            v["headers"]["x-mesh-response-flags"], "UAEX",
            "{reason}: {v}"
        );
        assert_eq!(count(), before + 1.0, "{reason} counted");
    }

    // The issuer rotates to k2: a token naming it is verified after one
    // refetch, without a restart.
    std::fs::write(&jwks_file, mint::jwks(&[&k1, &k2])).unwrap();
    let fetches = || {
        server
            .lines()
            .iter()
            .filter(|l| l["event"] == "file")
            .count()
    };
    let before = fetches();
    let t2 = k2.sign(&good);
    assert!(
        wait_until(Duration::from_secs(5), || m
            .status("/user/x", &[&bearer(&t2)])
            == 200),
        "the rotated key was not picked up:\n{}",
        m.agent_b.log()
    );
    assert!(fetches() > before, "fetched again");
    let ok = m
        .agent_b
        .metrics()
        .value("mesh_jwks_fetches_total", &[("result", "ok")]);
    assert!(ok >= 2.0, "the first fetch and the refetch: {ok}");
}
