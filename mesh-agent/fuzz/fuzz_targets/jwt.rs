//! A bearer token in a request, through RequestAuthentication as the
//! destination's agent runs it: found, its issuer chosen, its header and
//! claims decoded, its signature checked against the fixture key set
//! (`jwks.json`: a public key whose private half was thrown away).
#![no_main]

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use mesh_agent::{
    documents::{Parsed, parse_file},
    policy::{jwks::JwksStore, jwt::Authenticator},
};

const JWKS: &str = include_str!("../jwks.json");

fn authenticator() -> &'static (tokio::runtime::Runtime, Authenticator, JwksStore) {
    static A: OnceLock<(tokio::runtime::Runtime, Authenticator, JwksStore)> = OnceLock::new();
    A.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata: {{name: jwt, namespace: default}}\nspec:\n  jwtRules:\n  \
             - issuer: https://issuer.fuzz\n    audiences: [web]\n    jwks: '{}'\n",
            JWKS.trim()
        );
        let mut parsed = Parsed::default();
        parse_file(
            std::path::Path::new("ra.yaml"),
            yaml.as_bytes(),
            &mut parsed,
        );
        let store =
            rt.block_on(async { JwksStore::new(Duration::from_secs(600), Arc::new(|_: &str| {})) });
        let auth = Authenticator::from_resources(
            parsed.documents.iter().filter_map(|d| d.istio()),
            &store,
            Duration::from_secs(1),
        );
        assert_eq!(
            auth.rules.len(),
            1,
            "the fixture rule: {:?}",
            parsed.problems
        );
        (rt, auth, store)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (rt, auth, _) = authenticator();
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {token}")) else {
        return;
    };
    let mut parts = http::Request::get("/")
        .header(http::header::AUTHORIZATION, value)
        .body(())
        .expect("request")
        .into_parts()
        .0;
    if let Ok(Some(a)) = rt.block_on(auth.authenticate(&mut parts)) {
        // Only the fixture issuer's key can sign, and only for it.
        assert!(
            a.principal.starts_with("https://issuer.fuzz/"),
            "{}",
            a.principal
        );
    }
});
