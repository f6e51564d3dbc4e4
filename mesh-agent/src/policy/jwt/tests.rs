//! The JWT negative suite and the header rules, against real signatures
//! (keys generated per run); the remote key set against a real HTTP
//! server on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};

use jsonwebtoken::Algorithm;
use mesh_tests::jwt::{self as mint, Key};

use super::*;

const ISS: &str = "https://issuer.example";

fn rules(yaml_rule: &str, store: &JwksStore) -> Authenticator {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec:\n  jwtRules:\n{yaml_rule}\n"
    );
    let mut out = crate::documents::Parsed::default();
    crate::documents::parse_file(std::path::Path::new("ra.yaml"), yaml.as_bytes(), &mut out);
    let problems = crate::documents::check::documents(&out);
    assert!(
        !problems
            .iter()
            .any(|p| p.severity == crate::istio::Severity::Error),
        "{problems:?}"
    );
    let auth = Authenticator::from_resources(
        out.documents.iter().filter_map(|d| d.istio()),
        store,
        Duration::from_secs(2),
    );
    assert!(!auth.rules.is_empty(), "no rule parsed from {yaml}");
    auth
}

fn store() -> JwksStore {
    JwksStore::new(Duration::from_secs(600), Arc::new(|_| {}))
}

fn inline(keys: &[&Key], extra: &str) -> String {
    format!(
        "  - issuer: {ISS}\n    audiences: [web]\n    jwks: '{}'\n{extra}",
        mint::jwks(keys)
    )
}

fn parts(headers: &[(&str, &str)], uri: &str) -> Parts {
    let mut b = http::Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

async fn check(a: &Authenticator, token: &str) -> Result<Option<Arc<Authenticated>>, Rejected> {
    let mut p = parts(&[("authorization", &format!("Bearer {token}"))], "/");
    a.authenticate(&mut p).await
}

#[tokio::test]
async fn every_asymmetric_algorithm_verifies() {
    let keys = [
        Key::rsa("rs256", Algorithm::RS256),
        Key::rsa("rs384", Algorithm::RS384),
        Key::rsa("rs512", Algorithm::RS512),
        Key::rsa("ps256", Algorithm::PS256),
        Key::rsa("ps384", Algorithm::PS384),
        Key::rsa("ps512", Algorithm::PS512),
        Key::ec("es256", Algorithm::ES256),
        Key::ec("es384", Algorithm::ES384),
        Key::ed25519("ed"),
    ];
    let refs: Vec<&Key> = keys.iter().collect();
    let store = store();
    let a = rules(&inline(&refs, ""), &store);
    for k in &keys {
        let t = k.sign(&mint::claims(ISS, "alice", "web"));
        let got = check(&a, &t)
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", k.alg));
        assert_eq!(
            got.unwrap().principal,
            format!("{ISS}/alice"),
            "{:?}",
            k.alg
        );
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_reason() {
    let key = Key::rsa("k1", Algorithm::RS256);
    let other = Key::rsa("k1", Algorithm::RS256);
    let store = store();
    let a = rules(&inline(&[&key], ""), &store);
    let good = mint::claims(ISS, "alice", "web");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let cases: Vec<(&str, String, Rejected)> = vec![
        (
            "alg none",
            mint::unsigned(&good),
            Rejected::Algorithm("none".into()),
        ),
        (
            "HS256 with the public key",
            mint::hs256_with_public_key(&key, &good),
            Rejected::Algorithm("HS256".into()),
        ),
        (
            "bad signature",
            mint::tampered(&key.sign(&good)),
            Rejected::Signature,
        ),
        (
            "signed by another key",
            other.sign(&good),
            Rejected::Signature,
        ),
        (
            "expired",
            key.sign(&with("exp", mint::now_plus(-3600).into())),
            Rejected::Expired,
        ),
        (
            "nbf ahead",
            key.sign(&with("nbf", mint::now_plus(3600).into())),
            Rejected::NotYetValid,
        ),
        (
            "wrong issuer",
            key.sign(&with("iss", "https://evil".into())),
            Rejected::UnknownIssuer,
        ),
        (
            "wrong audience",
            key.sign(&with("aud", "other".into())),
            Rejected::Audience,
        ),
        (
            "unknown kid",
            key.sign_as("k9", &good),
            Rejected::UnknownKey,
        ),
        (
            "no aud while audiences are required",
            key.sign(&{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("aud");
                c
            }),
            Rejected::Audience,
        ),
        ("malformed", "abc.def".into(), Rejected::Malformed),
        ("not base64", "a.b.c".into(), Rejected::Malformed),
    ];
    for (what, token, want) in cases {
        assert_eq!(check(&a, &token).await, Err(want), "{what}");
    }
    let big = key.sign(&with("pad", "x".repeat(MAX_TOKEN_BYTES).into()));
    assert!(
        matches!(check(&a, &big).await, Err(Rejected::TooLarge(n)) if n == big.len()),
        "oversized"
    );
    // Within the leeway: accepted.
    let t = key.sign(&with("exp", mint::now_plus(-10).into()));
    assert!(check(&a, &t).await.unwrap().is_some());
}

#[tokio::test]
async fn no_token_passes_and_locations_and_headers_apply() {
    let key = Key::ec("k", Algorithm::ES256);
    let store = store();
    let extra = "    fromHeaders: [{name: x-jwt, prefix: \"Token \"}]\n    fromParams: [tok]\n    fromCookies: [session]\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{header: x-sub, claim: sub}]\n";
    let a = rules(&inline(&[&key], extra), &store);
    assert_eq!(a.authenticate(&mut parts(&[], "/")).await, Ok(None));
    // A client's own claim headers are removed, token or not.
    let mut p = parts(&[("x-sub", "admin"), ("x-jwt-payload", "e30")], "/");
    assert_eq!(a.authenticate(&mut p).await, Ok(None));
    assert!(p.headers.get("x-sub").is_none() && p.headers.get("x-jwt-payload").is_none());
    let t = key.sign(&mint::claims(ISS, "bob", "web"));
    // The default location is replaced by the ones given.
    let mut p = parts(&[("authorization", &format!("Bearer {t}"))], "/");
    assert_eq!(a.authenticate(&mut p).await, Ok(None));
    let mut p = parts(&[("x-jwt", &format!("Token {t}"))], "/");
    assert!(a.authenticate(&mut p).await.unwrap().is_some());
    assert!(
        p.headers.get("x-jwt").is_none(),
        "the token is not forwarded"
    );
    assert_eq!(p.headers["x-sub"], "bob");
    let payload = p.headers["x-jwt-payload"].to_str().unwrap();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&decoded).unwrap()["sub"],
        "bob"
    );
    let mut p = parts(&[], &format!("/x?a=1&tok={t}"));
    assert!(a.authenticate(&mut p).await.unwrap().is_some());
    let mut p = parts(&[("cookie", &format!("a=b; session={t}"))], "/");
    assert!(a.authenticate(&mut p).await.unwrap().is_some());
    let mut p = parts(&[("x-jwt", &format!("Token {}", mint::tampered(&t)))], "/");
    assert_eq!(a.authenticate(&mut p).await, Err(Rejected::Signature));
    // forwardOriginalToken keeps it.
    let a = rules(&inline(&[&key], "    forwardOriginalToken: true\n"), &store);
    let mut p = parts(&[("authorization", &format!("Bearer {t}"))], "/");
    assert!(a.authenticate(&mut p).await.unwrap().is_some());
    assert!(p.headers.contains_key("authorization"));
}

/// A JWKS server on loopback whose key set the test replaces; counts GETs.
async fn jwks_server(body: Arc<std::sync::Mutex<String>>, hits: Arc<AtomicUsize>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (body, hits) = (body.clone(), hits.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let b = body.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(b)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

type Results = Arc<std::sync::Mutex<Vec<String>>>;

fn counting_store() -> (JwksStore, Results) {
    let results = Results::default();
    let r2 = results.clone();
    let store = JwksStore::new(
        Duration::from_secs(600),
        Arc::new(move |r| r2.lock().unwrap().push(r.into())),
    );
    (store, results)
}

#[tokio::test]
async fn remote_keys_are_fetched_cached_and_rotated() {
    let k1 = Key::ed25519("k1");
    let k2 = Key::ed25519("k2");
    let body = Arc::new(std::sync::Mutex::new(mint::jwks(&[&k1])));
    let hits = Arc::new(AtomicUsize::new(0));
    let uri = jwks_server(body.clone(), hits.clone()).await;
    let (store, results) = counting_store();
    let a = rules(&format!("  - issuer: {ISS}\n    jwksUri: {uri}\n"), &store);
    let c = mint::claims(ISS, "carol", "any");
    assert!(check(&a, &k1.sign(&c)).await.unwrap().is_some());
    assert!(check(&a, &k1.sign(&c)).await.unwrap().is_some());
    assert_eq!(hits.load(Ordering::SeqCst), 1, "cached");
    // The issuer rotates to k2: the unknown key ID triggers one refetch,
    // once the last fetch is old enough.
    *body.lock().unwrap() = mint::jwks(&[&k2]);
    tokio::time::sleep(super::super::jwks::MIN_REFETCH).await;
    assert!(check(&a, &k2.sign(&c)).await.unwrap().is_some());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Made-up key IDs do not refetch again at once.
    assert_eq!(
        check(&a, &k2.sign_as("k9", &c)).await,
        Err(Rejected::UnknownKey)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // The k1 token verified (and remembered) before is not taken from the
    // cache once k1 left the key set (Ed25519 signs alike: the same token).
    assert_eq!(check(&a, &k1.sign(&c)).await, Err(Rejected::UnknownKey));
    // A second rule naming the URI shares the cache.
    let b = rules(&format!("  - issuer: {ISS}\n    jwksUri: {uri}\n"), &store);
    assert!(check(&b, &k2.sign(&c)).await.unwrap().is_some());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(*results.lock().unwrap(), ["ok", "ok"]);
}

#[tokio::test]
async fn a_failed_fetch_keeps_the_last_keys_and_is_counted() {
    let k1 = Key::ed25519("k1");
    let body = Arc::new(std::sync::Mutex::new(mint::jwks(&[&k1])));
    let hits = Arc::new(AtomicUsize::new(0));
    let uri = jwks_server(body.clone(), hits.clone()).await;
    let (store, results) = counting_store();
    let a = rules(&format!("  - issuer: {ISS}\n    jwksUri: {uri}\n"), &store);
    let c = mint::claims(ISS, "dave", "any");
    assert!(check(&a, &k1.sign(&c)).await.unwrap().is_some());
    *body.lock().unwrap() = "not json".into();
    tokio::time::sleep(super::super::jwks::MIN_REFETCH).await;
    // An unknown key forces a refetch, which fails: k1 still verifies.
    assert_eq!(
        check(&a, &k1.sign_as("k2", &c)).await,
        Err(Rejected::UnknownKey)
    );
    assert!(check(&a, &k1.sign(&c)).await.unwrap().is_some());
    assert_eq!(*results.lock().unwrap(), ["ok", "error"]);
    // Unreachable from the start: no keys, refused (not allowed).
    let none = rules(
        &format!("  - issuer: {ISS}\n    jwksUri: http://127.0.0.1:9/jwks\n"),
        &store,
    );
    assert_eq!(check(&none, &k1.sign(&c)).await, Err(Rejected::NoKeys));
}

#[tokio::test]
async fn a_verified_token_is_remembered_until_it_expires() {
    let key = Key::ed25519("k");
    let store = store();
    let a = rules(&inline(&[&key], ""), &store);
    // Expired 59 s ago: still inside the 60 s of skew, for a moment.
    let mut claims = mint::claims(ISS, "erin", "web");
    claims["exp"] = mint::now_plus(-59).into();
    let t = key.sign(&claims);
    let first = check(&a, &t).await.unwrap().unwrap();
    let again = check(&a, &t).await.unwrap().unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "the second check is the cached result"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        check(&a, &t).await,
        Err(Rejected::Expired),
        "not past its expiry"
    );
    // A fractional `exp` is an expiry too.
    claims["exp"] = serde_json::json!(mint::now_plus(-59) as f64 - 0.5);
    let t = key.sign(&claims);
    assert!(check(&a, &t).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        check(&a, &t).await,
        Err(Rejected::Expired),
        "fractional exp"
    );
}

/// Rules are shared by workloads, and so are their caches: a token
/// another workload's rule verified (its audience) is not taken here,
/// where the issuer's first rule wants another audience.
#[tokio::test]
async fn a_token_remembered_by_another_workloads_rule_is_decided_by_this_ones() {
    let key = Key::ed25519("k");
    let store = store();
    let both = rules(
        &format!(
            "{}  - issuer: {ISS}\n    audiences: [api]\n    jwks: '{}'\n",
            inline(&[&key], ""),
            mint::jwks(&[&key])
        ),
        &store,
    );
    let (web_rule, api_rule) = (both.rules[0].clone(), both.rules[1].clone());
    let api_only = Authenticator {
        rules: vec![api_rule.clone()],
    };
    let web_first = Authenticator {
        rules: vec![web_rule, api_rule],
    };
    let t = key.sign(&mint::claims(ISS, "frank", "api"));
    assert!(
        check(&api_only, &t).await.unwrap().is_some(),
        "audience api"
    );
    assert_eq!(
        check(&web_first, &t).await,
        Err(Rejected::Audience),
        "the issuer's first rule here wants audience web"
    );
}
