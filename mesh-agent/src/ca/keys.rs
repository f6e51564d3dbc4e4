//! The CA's signing material as it is now: the signer loaded from the CA
//! directory, and the certificate the CA's own endpoint presents. The
//! files are re-read when they change, so a root rotation (a second root
//! published in `root-cert.pem`, then a new signing certificate) needs no
//! restart; a change that does not load is refused and the last good
//! material keeps signing.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::sign::CertifiedKey;

use super::{
    Error,
    signer::{Signer, Usage},
};
use crate::{spiffe::SpiffeId, tls};

/// The files the signer is made of.
const FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

/// Lifetime of the CA endpoint's own certificate (re-issued at every
/// start and every reload).
const ENDPOINT_TTL: Duration = Duration::from_secs(365 * 86400);

/// One generation of signing material.
pub struct Keys {
    pub signer: Signer,
    /// What the CA's endpoint presents (`spiffe://<td>/mesh/ca`).
    pub endpoint: Arc<CertifiedKey>,
}

impl Keys {
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let signer = Signer::load(dir, trust_domain)?;
        let (chain, key) = signer.issue(
            &SpiffeId::ca(trust_domain),
            Usage::Server,
            ENDPOINT_TTL,
            false,
        )?;
        let chain_der = chain
            .iter()
            .map(|p| tls::certs_from_pem("CA endpoint", p))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let endpoint = tls::certified_key(
            "CA endpoint",
            chain_der,
            tls::key_from_pem("CA endpoint key", &key)?,
        )?;
        Ok(Self { signer, endpoint })
    }
}

/// What the CA files hold now (`None`: missing), to tell a change.
fn stamp(dir: &Path) -> Vec<Option<Vec<u8>>> {
    FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).ok())
        .collect()
}

/// The current signing material, swapped whole on reload.
pub struct Current {
    dir: PathBuf,
    trust_domain: String,
    keys: RwLock<Arc<Keys>>,
    /// The files' contents last read.
    tried: std::sync::Mutex<Vec<Option<Vec<u8>>>>,
    /// The roots callers' node credentials are checked against.
    pub bundle: Arc<tls::SharedBundle>,
}

impl Current {
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let tried = stamp(dir);
        let keys = Keys::load(dir, trust_domain)?;
        let bundle = Arc::new(tls::SharedBundle::new(tls::TrustBundle::from_pems(
            "root-cert.pem",
            keys.signer.bundle(),
        )?));
        Ok(Self {
            dir: dir.into(),
            trust_domain: trust_domain.into(),
            keys: RwLock::new(Arc::new(keys)),
            tried: std::sync::Mutex::new(tried),
            bundle,
        })
    }

    pub fn get(&self) -> Arc<Keys> {
        self.keys.read().expect("keys lock").clone()
    }

    /// Re-reads the CA files if they changed since they were last read
    /// (loaded or refused): `Ok(true)` when new material is in force,
    /// `Ok(false)` when nothing changed, `Err` when the new files do not
    /// load (the previous material stays; the same files are not tried
    /// again).
    pub fn reload(&self) -> Result<bool, Error> {
        let now = stamp(&self.dir);
        {
            let mut tried = self.tried.lock().expect("tried lock");
            if *tried == now {
                return Ok(false);
            }
            *tried = now;
        }
        let keys = Keys::load(&self.dir, &self.trust_domain)?;
        self.bundle.update(keys.signer.bundle())?;
        *self.keys.write().expect("keys lock") = Arc::new(keys);
        Ok(true)
    }
}

/// Presents the current endpoint certificate to each new caller.
pub struct EndpointCert(pub Arc<Current>);

impl std::fmt::Debug for EndpointCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndpointCert")
    }
}

impl rustls::server::ResolvesServerCert for EndpointCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().endpoint.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Pki, TRUST_DOMAIN};

    #[test]
    fn a_change_that_does_not_load_is_refused_once_and_the_old_material_stays() {
        let pki = Pki::new();
        let current = Current::load(&pki.dir.0, TRUST_DOMAIN).unwrap();
        let before = current.get().endpoint.cert[0].clone();
        assert!(!current.reload().unwrap(), "nothing changed yet");
        std::fs::write(pki.dir.join("ca-key.pem"), "not a key").unwrap();
        assert!(current.reload().is_err(), "a broken key must not load");
        assert!(
            !current.reload().unwrap(),
            "the same broken files are not tried again"
        );
        assert_eq!(
            current.get().endpoint.cert[0],
            before,
            "the old material stays"
        );
        // A rotation half written: the new key beside the old certificate.
        let next = Pki::new();
        std::fs::copy(next.dir.join("ca-key.pem"), pki.dir.join("ca-key.pem")).unwrap();
        match current.reload() {
            Err(Error::KeyMismatch { .. }) => {}
            other => panic!("a key of another CA must not load: {other:?}"),
        }
        assert_eq!(
            current.get().endpoint.cert[0],
            before,
            "the old material stays"
        );
        // The rest of it: the new material loads.
        for f in FILES {
            std::fs::copy(next.dir.join(f), pki.dir.join(f)).unwrap();
        }
        assert!(current.reload().unwrap());
        assert_ne!(current.get().endpoint.cert[0], before);
        assert_eq!(current.get().signer.bundle(), next.signer.bundle());
        assert_eq!(current.bundle.get().pems(), next.signer.bundle());
    }
}
