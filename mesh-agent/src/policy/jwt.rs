//! RequestAuthentication (`security.istio.io/v1`): JWT validation by the
//! destination's agent, as Istio configures Envoy's `jwt_authn` filter.
//!
//! * Tokens are looked for where each rule says (`fromHeaders` with their
//!   `prefix`, `fromParams`, `fromCookies`), by default in
//!   `Authorization: Bearer …` and the `access_token` query parameter.
//! * A request without a token passes authentication (AuthorizationPolicy
//!   decides whether one is required: `requestPrincipals: ["*"]`); a
//!   request with a token that fails — unknown issuer, bad signature,
//!   expired, not yet valid, wrong audience, unknown key, malformed,
//!   oversized, a symmetric or `none` algorithm — gets `401`.
//! * Keys come from the rule's inline `jwks` or its `jwksUri`
//!   ([`super::jwks`]: fetched, cached, refreshed on an interval and when a
//!   token names a key the cache does not hold).
//! * Only asymmetric algorithms are accepted (RS/PS 256/384/512, ES256,
//!   ES384, EdDSA); the key's type must agree with the token's algorithm,
//!   which closes the HS256-signed-with-the-public-key confusion.
//! * Verified: `request.auth.principal` is `iss/sub`; the token is removed
//!   unless `forwardOriginalToken`; `outputPayloadToHeader` and
//!   `outputClaimToHeaders` add headers for the application.

use std::{collections::HashMap, sync::Arc, time::Duration};

use base64::Engine;
use http::{HeaderName, HeaderValue, request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Serialize;

use super::jwks::{Jwks, JwksStore};
use crate::{
    istio::{Resource, Spec, security},
    workload::Workload,
};

/// The longest token accepted: a token is a header value, and keys and
/// claims of any real issuer fit many times over.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock skew allowed on `exp` and `nbf` (Envoy's default).
const LEEWAY_SECS: u64 = 60;

/// A verified token, as policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `iss/sub`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: serde_json::Value,
}

impl Authenticated {
    /// The values of a (nested) claim: a string, each string of a list, or
    /// the text of a number or boolean.
    pub fn claim(&self, path: &[String]) -> Vec<String> {
        let mut v = &self.claims;
        for p in path {
            match v.get(p) {
                Some(next) => v = next,
                None => return vec![],
            }
        }
        scalar_texts(v)
    }
}

fn scalar_texts(v: &serde_json::Value) -> Vec<String> {
    use serde_json::Value as V;
    match v {
        V::String(s) => vec![s.clone()],
        V::Number(n) => vec![n.to_string()],
        V::Bool(b) => vec![b.to_string()],
        V::Array(a) => a.iter().flat_map(scalar_texts).collect(),
        _ => vec![],
    }
}

/// Why a request's token was refused: the `401` body says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt is too large ({0} bytes; the limit is {MAX_TOKEN_BYTES})")]
    TooLarge(usize),
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwt algorithm {0} is not allowed (only RS, PS, ES and EdDSA)")]
    Algorithm(String),
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    UnknownKey,
    #[error("Jwks remote fetch failed and no keys are cached")]
    NoKeys,
    #[error("Jwt verification fails")]
    Signature,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    Audience,
}

impl Rejected {
    /// A short reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge(_) => "too_large",
            Self::UnknownIssuer => "unknown_issuer",
            Self::Algorithm(_) => "algorithm",
            Self::UnknownKey => "unknown_key",
            Self::NoKeys => "no_keys",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
        }
    }
}

/// Where a token may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Location {
    Header { name: String, prefix: String },
    Param(String),
    Cookie(String),
}

/// Where the keys of a rule come from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Keys {
    Inline(#[serde(skip)] Arc<JwkSet>),
    Remote(#[serde(skip)] Arc<Jwks>),
    /// The inline `jwks` does not parse: every token of the issuer fails.
    Invalid(String),
}

/// One `jwtRules` entry, compiled.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// `namespace/name` of its RequestAuthentication.
    pub policy: String,
    pub issuer: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    pub locations: Vec<Location>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    #[serde(skip)]
    keys: Keys,
    forward_original_token: bool,
    #[serde(skip)]
    output_payload_to_header: Option<HeaderName>,
    #[serde(skip)]
    output_claim_to_headers: Vec<(HeaderName, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<std::collections::BTreeMap<String, String>>,
    #[serde(skip)]
    namespace: String,
    /// Tokens verified already, with the key set that verified them: a
    /// token seen again costs a lookup, not a signature check, until it
    /// expires or the keys change (as Envoy's JWT cache).
    #[serde(skip)]
    verified: std::sync::Mutex<HashMap<String, Verified>>,
}

/// The most tokens one rule remembers; then it starts over.
const VERIFIED_CACHE: usize = 1024;

#[derive(Debug)]
struct Verified {
    auth: Arc<Authenticated>,
    /// `exp`, if the token has one.
    expires: Option<u64>,
    /// The key set it was verified with (compared by address).
    keys: Arc<JwkSet>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Rule {
    /// The rules of a (validated) RequestAuthentication; empty for other
    /// kinds and `targetRef` ones. Remote key sets come from `jwks`, so
    /// that one fetch serves every rule and snapshot naming the URI.
    pub fn from_resource(r: &Resource, jwks: &JwksStore, fetch_timeout: Duration) -> Vec<Self> {
        let Spec::RequestAuthentication(s) = &r.spec else {
            return vec![];
        };
        if s.target_ref.is_some() || !s.target_refs.is_empty() {
            return vec![];
        }
        s.jwt_rules
            .iter()
            .map(|j| Self::compile(r, s, j, jwks, fetch_timeout))
            .collect()
    }

    fn compile(
        r: &Resource,
        s: &security::RequestAuthentication,
        j: &security::JwtRule,
        jwks: &JwksStore,
        fetch_timeout: Duration,
    ) -> Self {
        let mut locations: Vec<Location> = j
            .from_headers
            .iter()
            .map(|h| Location::Header {
                name: h.name.to_ascii_lowercase(),
                prefix: h.prefix.clone(),
            })
            .chain(j.from_params.iter().cloned().map(Location::Param))
            .chain(j.from_cookies.iter().cloned().map(Location::Cookie))
            .collect();
        if locations.is_empty() {
            locations = vec![
                Location::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                },
                Location::Param("access_token".into()),
            ];
        }
        let keys = if !j.jwks.is_empty() {
            match serde_json::from_str::<JwkSet>(&j.jwks) {
                Ok(set) => Keys::Inline(Arc::new(set)),
                Err(e) => Keys::Invalid(format!("jwks: {e}")),
            }
        } else if !j.jwks_uri.is_empty() {
            // The rule's own `timeout` bounds its fetches, else the agent's.
            let timeout = j.timeout.as_ref().map_or(fetch_timeout, |d| d.get());
            Keys::Remote(jwks.get(&j.jwks_uri, timeout))
        } else {
            Keys::Invalid("neither jwks nor jwksUri is set".into())
        };
        let header = |h: &str| HeaderName::from_bytes(h.as_bytes()).ok();
        Self {
            policy: format!("{}/{}", r.metadata.namespace, r.metadata.name),
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            locations,
            jwks_uri: (!j.jwks_uri.is_empty()).then(|| j.jwks_uri.clone()),
            keys,
            forward_original_token: j.forward_original_token,
            output_payload_to_header: header(&j.output_payload_to_header),
            output_claim_to_headers: j
                .output_claim_to_headers
                .iter()
                .filter_map(|c| Some((header(&c.header)?, c.claim.clone())))
                .collect(),
            selector: s.selector.as_ref().map(|s| s.match_labels.clone()),
            namespace: r.metadata.namespace.clone(),
            verified: Default::default(),
        }
    }

    pub fn applies_to(&self, w: &Workload, root_namespace: &str) -> bool {
        (self.namespace == w.namespace || self.namespace == root_namespace)
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }

    /// The key set in force (fetching it first if never fetched).
    async fn key_set(&self) -> Result<Arc<JwkSet>, Rejected> {
        match &self.keys {
            Keys::Inline(set) => Ok(set.clone()),
            Keys::Remote(j) => j.keys().await.ok_or(Rejected::NoKeys),
            Keys::Invalid(_) => Err(Rejected::NoKeys),
        }
    }

    /// The key set now, without fetching.
    fn keys_now(&self) -> Option<Arc<JwkSet>> {
        match &self.keys {
            Keys::Inline(set) => Some(set.clone()),
            Keys::Remote(j) => j.cached(),
            Keys::Invalid(_) => None,
        }
    }

    /// `token` as this rule verified it before, if it did with the keys
    /// it has now and the token has not expired since.
    fn remembered(&self, token: &str) -> Option<Arc<Authenticated>> {
        let keys = self.keys_now()?;
        let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let v = cache.get(token)?;
        (Arc::ptr_eq(&v.keys, &keys)
            && v.expires
                .is_none_or(|exp| now_secs() <= exp.saturating_add(LEEWAY_SECS)))
        .then(|| v.auth.clone())
    }

    /// Verifies `token`, or finds it verified already with the same keys
    /// and not expired since.
    async fn verify_cached(&self, token: &str) -> Result<Arc<Authenticated>, Rejected> {
        let cache = || self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(auth) = self.remembered(token) {
            return Ok(auth);
        }
        let (auth, keys) = self.verify(token).await?;
        let auth = Arc::new(auth);
        // `exp` as jsonwebtoken read it (a number, possibly fractional);
        // a token whose `exp` is something else is not remembered.
        let expires = match auth.claims.get("exp") {
            None => Some(None),
            Some(e) => e.as_f64().filter(|f| *f >= 0.0).map(|f| Some(f as u64)),
        };
        if let Some(expires) = expires {
            let mut c = cache();
            if c.len() >= VERIFIED_CACHE {
                c.clear();
            }
            c.insert(
                token.to_owned(),
                Verified {
                    auth: auth.clone(),
                    expires,
                    keys,
                },
            );
        }
        Ok(auth)
    }

    /// Verifies `token` (whose issuer is this rule's); the key set that
    /// verified it.
    async fn verify(&self, token: &str) -> Result<(Authenticated, Arc<JwkSet>), Rejected> {
        // A header naming an algorithm the library does not know (`none`)
        // fails to decode: say which algorithm was refused.
        let header = jsonwebtoken::decode_header(token).map_err(|_| match alg_text(token) {
            Some(alg) => Rejected::Algorithm(alg),
            None => Rejected::Malformed,
        })?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(Rejected::Algorithm(format!("{:?}", header.alg)));
        }
        let mut set = self.key_set().await?;
        let mut key = find_key(&set, header.kid.as_deref(), header.alg);
        if key.is_none()
            && header.kid.is_some()
            && let Keys::Remote(j) = &self.keys
        {
            // A key the cache does not hold: the issuer may have rotated.
            if let Some(fresh) = j.refresh_for_unknown_key().await {
                set = fresh;
                key = find_key(&set, header.kid.as_deref(), header.alg);
            }
        }
        let key = key.ok_or(Rejected::UnknownKey)?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.required_spec_claims.clear();
        v.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
            // Without this, a token with no `aud` at all would pass.
            v.required_spec_claims.insert("aud".into());
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => Rejected::Expired,
                K::ImmatureSignature => Rejected::NotYetValid,
                K::InvalidAudience => Rejected::Audience,
                K::MissingRequiredClaim(c) if c == "aud" => Rejected::Audience,
                K::InvalidIssuer => Rejected::UnknownIssuer,
                K::InvalidAlgorithm => Rejected::Algorithm(format!("{:?}", header.alg)),
                K::InvalidSignature => Rejected::Signature,
                _ => Rejected::Malformed,
            }
        })?;
        let claims = data.claims;
        let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let auth = Authenticated {
            principal: format!(
                "{}/{}",
                text("iss").unwrap_or_default(),
                text("sub").unwrap_or_default()
            ),
            audiences: claims.get("aud").map(scalar_texts).unwrap_or_default(),
            presenter: text("azp"),
            claims,
        };
        Ok((auth, set))
    }
}

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The `alg` a token's header names, for a message.
fn alg_text(token: &str) -> Option<String> {
    let h = token.split('.').next()?;
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    Some(v.get("alg")?.as_str()?.to_owned())
}

/// The key for `kid` (any key when the token names none) that can verify
/// `alg`: a key of another type, or declaring another `alg`, does not.
fn find_key(set: &JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    set.keys
        .iter()
        .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
        .filter(|k| {
            let family_ok = matches!(
                (&k.algorithm, alg),
                (
                    P::RSA(_),
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
                    | (P::OctetKeyPair(_), Algorithm::EdDSA)
            );
            let alg_ok = k
                .common
                .key_algorithm
                .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"));
            family_ok && alg_ok
        })
        .find_map(|k| DecodingKey::from_jwk(k).ok())
}

/// The RequestAuthentication rules of one workload.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Authenticator {
    pub rules: Vec<Arc<Rule>>,
}

impl Authenticator {
    /// The rules of every RequestAuthentication among `resources`.
    pub fn from_resources<'a>(
        resources: impl IntoIterator<Item = &'a Resource>,
        jwks: &JwksStore,
        fetch_timeout: Duration,
    ) -> Self {
        Self {
            rules: resources
                .into_iter()
                .flat_map(|r| Rule::from_resource(r, jwks, fetch_timeout))
                .map(Arc::new)
                .collect(),
        }
    }
}

/// A token found in a request, and where.
struct Found<'r> {
    token: String,
    location: Location,
    rule: Option<&'r Rule>,
    /// The rule verified the token before (its cache said so).
    remembered: Option<Arc<Authenticated>>,
}

impl Authenticator {
    pub fn for_workload(all: &[Arc<Rule>], w: &Workload, root_namespace: &str) -> Self {
        Self {
            rules: all
                .iter()
                .filter(|r| r.applies_to(w, root_namespace))
                .cloned()
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Validates the request's token, if it has one, and applies the
    /// header rules of the issuer that signed it. `Ok(None)`: no token.
    pub async fn authenticate(
        &self,
        parts: &mut Parts,
    ) -> Result<Option<Arc<Authenticated>>, Rejected> {
        // The headers the rules write are the mesh's to write: a client's
        // own `x-jwt-sub: admin` never reaches the application.
        for r in &self.rules {
            if let Some(h) = &r.output_payload_to_header {
                parts.headers.remove(h);
            }
            for (h, _) in &r.output_claim_to_headers {
                parts.headers.remove(h);
            }
        }
        let Some(found) = self.find(parts)? else {
            return Ok(None);
        };
        let rule = found.rule.ok_or(Rejected::UnknownIssuer)?;
        let auth = match found.remembered {
            Some(a) => a,
            None => rule.verify_cached(&found.token).await?,
        };
        if !rule.forward_original_token
            && let Location::Header { name, .. } = &found.location
        {
            parts.headers.remove(name.as_str());
        }
        if let Some(h) = &rule.output_payload_to_header
            && let Some(payload) = found.token.split('.').nth(1)
            && let Ok(v) = HeaderValue::from_str(payload)
        {
            parts.headers.insert(h.clone(), v);
        }
        for (h, claim) in &rule.output_claim_to_headers {
            let path: Vec<String> = vec![claim.clone()];
            if let Some(v) = auth
                .claim(&path)
                .first()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                parts.headers.insert(h.clone(), v);
            }
        }
        Ok(Some(auth))
    }

    /// The first token in any rule's locations, with the rule of its
    /// issuer (that also looks there).
    fn find(&self, parts: &Parts) -> Result<Option<Found<'_>>, Rejected> {
        for r in &self.rules {
            for loc in &r.locations {
                let Some(token) = extract(parts, loc) else {
                    continue;
                };
                if token.len() > MAX_TOKEN_BYTES {
                    return Err(Rejected::TooLarge(token.len()));
                }
                // A token a rule verified before is that rule's (its `iss`
                // was checked): no need to decode it to find the rule, nor
                // to look it up again.
                // Only from the rule its issuer picks here: rules (and
                // their caches) are shared by workloads, and another
                // workload's rule of the same issuer may accept what this
                // one's refuses (another audience).
                let known = self
                    .rules
                    .iter()
                    .filter(|r| r.locations.contains(loc))
                    .find_map(|r| Some((&**r, r.remembered(&token)?)))
                    .filter(|(r, _)| {
                        self.rules
                            .iter()
                            .find(|x| x.issuer == r.issuer && x.locations.contains(loc))
                            .is_some_and(|x| std::ptr::eq(&**x, *r))
                    });
                if let Some((rule, auth)) = known {
                    return Ok(Some(Found {
                        token,
                        location: loc.clone(),
                        rule: Some(rule),
                        remembered: Some(auth),
                    }));
                }
                let issuer = unverified_issuer(&token).ok_or(Rejected::Malformed)?;
                let rule = self
                    .rules
                    .iter()
                    .find(|r| r.issuer == issuer && r.locations.contains(loc))
                    .map(|r| &**r);
                return Ok(Some(Found {
                    token,
                    location: loc.clone(),
                    rule,
                    remembered: None,
                }));
            }
        }
        Ok(None)
    }
}

/// The `iss` of a token not yet verified, to choose the rule that
/// verifies it.
fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v.get("iss")?.as_str()?.to_owned())
}

fn extract(parts: &Parts, loc: &Location) -> Option<String> {
    match loc {
        Location::Header { name, prefix } => {
            let v = parts.headers.get(name.as_str())?.to_str().ok()?.trim();
            let token = if prefix.is_empty() {
                v
            } else if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
                &v[prefix.len()..]
            } else {
                return None;
            };
            Some(token.trim().to_owned()).filter(|t| !t.is_empty())
        }
        Location::Param(p) => parts.uri.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == p && !v.is_empty()).then(|| v.to_owned())
        }),
        Location::Cookie(c) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == c && !v.is_empty()).then(|| v.to_owned())
            }),
    }
}

#[cfg(test)]
mod tests;
