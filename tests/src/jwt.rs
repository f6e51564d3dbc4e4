//! Signing keys and JWTs for tests, generated at test time (RSA keys by
//! the `openssl` tool, EC and Ed25519 keys by ring): the key set a
//! RequestAuthentication trusts and tokens good, bad and forged.

use std::process::Command;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::{
    rand::SystemRandom,
    signature::{self, KeyPair},
};
use serde_json::{Value, json};

/// A private key and its public JWK.
pub struct Key {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    /// The public key as a JWK.
    pub jwk: Value,
    /// The public key's DER (for the algorithm-confusion forgery).
    pub public_der: Vec<u8>,
}

fn openssl(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the openssl tool (package openssl) generates the tests' RSA keys");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(i) = input {
        stdin.write_all(i).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Key {
    /// A 2048-bit RSA key for RS* or PS*.
    pub fn rsa(kid: &str, alg: Algorithm) -> Self {
        let pem = openssl(&["genrsa", "2048"], None);
        let der = openssl(&["rsa", "-outform", "DER", "-traditional"], Some(&pem));
        let pair = signature::RsaKeyPair::from_der(&der).expect("a PKCS#1 RSA key");
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
        Self {
            kid: kid.into(),
            alg,
            encoding: EncodingKey::from_rsa_der(&der),
            jwk: json!({"kty": "RSA", "kid": kid, "alg": format!("{alg:?}"), "use": "sig",
                "n": B64.encode(&c.n), "e": B64.encode(&c.e)}),
            public_der: pair.public().as_ref().to_vec(),
        }
    }

    /// An ECDSA key: P-256 for ES256, P-384 for ES384.
    pub fn ec(kid: &str, alg: Algorithm) -> Self {
        let (signing, crv, half) = match alg {
            Algorithm::ES256 => (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
            Algorithm::ES384 => (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
            other => panic!("{other:?} is not an ECDSA algorithm"),
        };
        let rng = SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
        let pair = signature::EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        let (x, y) = point[1..].split_at(half);
        Self {
            kid: kid.into(),
            alg,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "kid": kid, "alg": format!("{alg:?}"), "crv": crv,
                "x": B64.encode(x), "y": B64.encode(y)}),
            public_der: point.to_vec(),
        }
    }

    pub fn ed25519(kid: &str) -> Self {
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = pair.public_key().as_ref().to_vec();
        Self {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "kid": kid, "alg": "EdDSA", "crv": "Ed25519",
                "x": B64.encode(&public)}),
            public_der: public,
        }
    }

    /// A token with these claims, signed by this key (its `kid` in the
    /// header).
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding).expect("signing")
    }

    /// The same, naming another key ID.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, claims, &self.encoding).expect("signing")
    }
}

/// A JWK set (`{"keys": [...]}`) of these keys' public halves.
pub fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Seconds since the epoch, `offset` from now.
pub fn now_plus(offset: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    now + offset
}

/// Claims for `sub` from `iss` to `aud`, valid for an hour.
pub fn claims(iss: &str, sub: &str, aud: &str) -> Value {
    json!({"iss": iss, "sub": sub, "aud": aud, "iat": now_plus(0), "exp": now_plus(3600)})
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        B64.encode(claims.to_string())
    )
}

/// The algorithm-confusion forgery: HS256 with the RSA public key as the
/// HMAC secret, naming that key.
pub fn hs256_with_public_key(key: &Key, claims: &Value) -> String {
    let head = B64.encode(json!({"alg": "HS256", "typ": "JWT", "kid": key.kid}).to_string());
    let body = B64.encode(claims.to_string());
    let input = format!("{head}.{body}");
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.public_der);
    let tag = ring::hmac::sign(&k, input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

/// `token` with one character in the middle of its signature changed
/// (still valid base64url, so only the signature check can refuse it).
pub fn tampered(token: &str) -> String {
    let sig_start = token.rfind('.').unwrap() + 1;
    let at = sig_start + (token.len() - sig_start) / 2;
    let mut b = token.as_bytes().to_vec();
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}
