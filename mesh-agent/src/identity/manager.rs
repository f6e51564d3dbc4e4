//! Certificates for the identities of the pods on this node: a key made
//! here and never written anywhere, a CSR to the CA, renewal at half-life
//! (a new key each time). New handshakes pick up the new certificate; open
//! connections keep theirs, so renewal never drops a connection.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{pki_types::PrivateKeyDer, sign::CertifiedKey};
use serde::Serialize;
use tokio::sync::watch;

use super::{Error, ca_client::CaClient};
use crate::spiffe::SpiffeId;
use crate::{
    telemetry::metrics::Metrics,
    tls::{self, CertInfo, SharedBundle},
};

/// The certificate in use for one identity.
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// Higher for every certificate this agent receives
    /// ([`crate::tls::next_generation`]).
    pub generation: u64,
}

struct Entry {
    /// Pods on this node with this identity.
    users: usize,
    current: watch::Receiver<Option<Arc<Issued>>>,
    last_error: Arc<Mutex<Option<String>>>,
    task: tokio::task::AbortHandle,
}

/// Holds the node's workload certificates.
pub struct IdentityManager {
    trust_domain: String,
    ca: CaClient,
    bundle: Arc<SharedBundle>,
    ttl: Duration,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    metrics: Arc<Metrics>,
}

/// What `/config_dump` shows: certificates (never keys) and trusted roots.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    pub certificates: Vec<CertState>,
    pub trust_bundle: Vec<CertInfo>,
    /// The credential this node presents to the CA (renewed at half-life).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_credential: Option<CertInfo>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertState {
    pub identity: String,
    pub pods: usize,
    #[serde(flatten)]
    pub cert: Option<CertInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl IdentityManager {
    pub fn new(
        trust_domain: &str,
        ca: CaClient,
        bundle: Arc<SharedBundle>,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.into(),
            ca,
            bundle,
            ttl,
            entries: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn bundle(&self) -> Arc<SharedBundle> {
        self.bundle.clone()
    }

    /// A pod with identity `id` arrived: make sure a certificate is (being) fetched.
    pub fn acquire(self: &Arc<Self>, id: &SpiffeId) {
        let mut entries = self.entries.lock().expect("identity lock");
        if let Some(e) = entries.get_mut(id) {
            e.users += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let last_error = Arc::new(Mutex::new(None));
        let task = tokio::spawn(keep_fresh(
            Arc::downgrade(self),
            id.clone(),
            tx,
            last_error.clone(),
        ))
        .abort_handle();
        entries.insert(
            id.clone(),
            Entry {
                users: 1,
                current: rx,
                last_error,
                task,
            },
        );
    }

    /// A pod with identity `id` left; the last one drops the certificate.
    pub fn release(&self, id: &SpiffeId) {
        let mut entries = self.entries.lock().expect("identity lock");
        if let Some(e) = entries.get_mut(id) {
            e.users -= 1;
            if e.users == 0 {
                e.task.abort();
                entries.remove(id);
            }
        }
    }

    /// The certificate to present for `id` now, if there is one that has
    /// not expired: past its `not_after` the identity has none (its
    /// handshakes fail here, not at the peer), until a renewal succeeds.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.lock().expect("identity lock");
        let issued = entries.get(id)?.current.borrow().clone()?;
        (issued.info.not_after > SystemTime::now()).then(|| issued.key.clone())
    }

    /// The generation of `id`'s current certificate (0: none yet). A
    /// connection dialled with an older one presented a certificate that
    /// has since been replaced.
    pub fn generation(&self, id: &SpiffeId) -> u64 {
        let entries = self.entries.lock().expect("identity lock");
        entries
            .get(id)
            .and_then(|e| e.current.borrow().as_ref().map(|i| i.generation))
            .unwrap_or(0)
    }

    /// Waits (at most `timeout`) for the first certificate of `id`; an
    /// error at once if the one it has expired.
    pub async fn wait(&self, id: &SpiffeId, timeout: Duration) -> Result<Arc<CertifiedKey>, Error> {
        let not_ready = || Error::NotReady {
            identity: id.to_string(),
            waited: timeout,
            ca: self.ca.addr().into(),
        };
        let mut rx = {
            let entries = self.entries.lock().expect("identity lock");
            entries.get(id).ok_or_else(not_ready)?.current.clone()
        };
        let issued = tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .map_err(|_| not_ready())?
            .map_err(|_| not_ready())?
            .clone()
            .ok_or_else(not_ready)?;
        // Not a certificate past its time: a connection pooled before the
        // expiry would still carry the stream.
        if issued.info.not_after <= SystemTime::now() {
            return Err(Error::Expired {
                identity: id.to_string(),
                at: humantime::format_rfc3339_seconds(issued.info.not_after).to_string(),
                ca: self.ca.addr().into(),
            });
        }
        Ok(issued.key.clone())
    }

    /// Identities that have no certificate yet (readiness waits for none).
    pub fn pending(&self) -> Vec<String> {
        let entries = self.entries.lock().expect("identity lock");
        let mut p: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.current.borrow().is_none())
            .map(|(id, _)| id.to_string())
            .collect();
        p.sort();
        p
    }

    /// Renews the node credential at its half-life, for as long as the
    /// manager lives; a failed renewal is retried every `RETRY` (an expired
    /// credential would lock the node out of the CA).
    pub fn renew_node_credential_when_due(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        const RETRY: Duration = Duration::from_secs(10);
        // Long waits are taken a day at a time (a year-long credential's
        // half-life is beyond what one timer should hold).
        const LONGEST_WAIT: Duration = Duration::from_secs(86400);
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut retry_at: Option<Instant> = None;
            loop {
                let Some(m) = me.upgrade() else { return };
                let Some(due) = m.ca.node_credential_due() else {
                    return; // a token, nothing to renew
                };
                let wait = match retry_at {
                    Some(t) => t.saturating_duration_since(Instant::now()),
                    None => due.duration_since(SystemTime::now()).unwrap_or_default(),
                };
                if !wait.is_zero() {
                    drop(m);
                    tokio::time::sleep(wait.min(LONGEST_WAIT)).await;
                    continue;
                }
                match m.ca.renew_node_credential().await {
                    Ok(info) => {
                        retry_at = None;
                        tracing::info!(serial = %info.serial, not_after = %humantime::format_rfc3339_seconds(info.not_after), "node credential renewed");
                    }
                    Err(e) => {
                        retry_at = Some(Instant::now() + RETRY);
                        tracing::warn!(
                            "node credential renewal failed (retrying in {RETRY:?}): {e}"
                        );
                    }
                }
            }
        })
    }

    /// Re-reads the trust bundle from the CA every `every` (new roots during
    /// a rotation reach agents before any certificate needs them).
    pub fn refresh_bundle_every(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(m) = me.upgrade() else { return };
                match m.ca.trust_bundle().await {
                    Ok(pems) => match m.bundle.update(&pems) {
                        Ok(true) => tracing::info!(roots = pems.len(), "trust bundle updated"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!("the CA sent an unusable trust bundle: {e}"),
                    },
                    Err(e) => tracing::warn!("trust bundle refresh failed: {e}"),
                }
            }
        })
    }

    pub fn dump(&self) -> CertDump {
        let entries = self.entries.lock().expect("identity lock");
        let mut certificates: Vec<CertState> = entries
            .iter()
            .map(|(id, e)| CertState {
                identity: id.to_string(),
                pods: e.users,
                cert: e.current.borrow().as_ref().map(|i| i.info.clone()),
                last_error: e.last_error.lock().expect("error lock").clone(),
            })
            .collect();
        certificates.sort_by(|a, b| a.identity.cmp(&b.identity));
        CertDump {
            certificates,
            trust_bundle: self.bundle.get().infos(),
            node_credential: self.ca.node_credential(),
        }
    }

    /// One round trip to the CA: new key, CSR, signed chain.
    async fn fetch(&self, id: &SpiffeId) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = p.serialize_request(&key)?.pem()?;
        let resp = self.ca.sign(id, csr, self.ttl).await?;
        // The bundle first: peers' new certificates may need its new roots.
        self.bundle
            .update(&resp.trust_bundle)
            .map_err(|e| Error::BadCertificate(e.to_string()))?;
        let mut chain = Vec::new();
        for pem in &resp.cert_chain {
            chain.extend(
                tls::certs_from_pem("certificate chain", pem)
                    .map_err(|e| Error::BadCertificate(e.to_string()))?,
            );
        }
        let leaf = chain
            .first()
            .ok_or_else(|| Error::BadCertificate("empty chain".into()))?;
        let info = tls::cert_info(leaf).map_err(|e| Error::BadCertificate(e.to_string()))?;
        if info.identity.as_deref() != Some(id.to_string().as_str()) {
            return Err(Error::BadCertificate(format!(
                "asked for {id}, got {:?}",
                info.identity
            )));
        }
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let key = tls::certified_key(&id.to_string(), chain, key_der)
            .map_err(|e| Error::BadCertificate(e.to_string()))?;
        Ok(Issued {
            key,
            info,
            generation: crate::tls::next_generation(),
        })
    }
}

/// The longest wait between two certificate requests that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// …once the certificate has expired and every connection fails.
const MAX_BACKOFF_EXPIRED: Duration = Duration::from_secs(5);

/// How long to wait before asking again after a failure: the backoff, but
/// waking at the certificate's expiry (to say so at once) and, past it,
/// at most every few seconds.
fn retry_in(backoff: Duration, had_one: bool, left: Option<Duration>) -> Duration {
    match (had_one, left) {
        (true, Some(left)) => backoff.min(left.max(Duration::from_millis(50))),
        (true, None) => backoff.min(MAX_BACKOFF_EXPIRED),
        (false, _) => backoff,
    }
}

/// When to renew: halfway through what is left of a certificate just
/// received (its half-life). Not from `not_before`: CAs backdate it for
/// clock skew (ours by a minute), which for short lifetimes would put the
/// half-life in the past and renew in a loop. Never sooner than 500 ms.
fn renew_in(info: &CertInfo) -> Duration {
    let left = info
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    (left / 2).max(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(not_before: SystemTime, not_after: SystemTime) -> CertInfo {
        CertInfo {
            identity: None,
            serial: "1".into(),
            not_before,
            not_after,
            issuer: String::new(),
        }
    }

    #[test]
    fn failed_renewals_wake_at_expiry_and_retry_often_after_it() {
        let s = Duration::from_secs;
        assert_eq!(retry_in(s(8), false, None), s(8));
        assert_eq!(retry_in(s(8), true, Some(s(3))), s(3));
        assert_eq!(retry_in(s(2), true, Some(s(3))), s(2));
        assert_eq!(retry_in(s(30), true, None), s(5));
        assert_eq!(
            retry_in(s(1), true, Some(Duration::ZERO)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn renewal_is_at_half_the_remaining_life_even_when_backdated() {
        let now = SystemTime::now();
        // 24 h, backdated a minute: about 12 h.
        let day = renew_in(&info(
            now - Duration::from_secs(60),
            now + Duration::from_secs(86400),
        ));
        assert!(
            day > Duration::from_secs(43000) && day <= Duration::from_secs(43200),
            "{day:?}"
        );
        // 4 s, backdated a minute: about 2 s, not "already due".
        let short = renew_in(&info(
            now - Duration::from_secs(60),
            now + Duration::from_secs(4),
        ));
        assert!(
            short > Duration::from_millis(1500) && short <= Duration::from_secs(2),
            "{short:?}"
        );
        // Expired or about to: soon, but not in a loop.
        let late = renew_in(&info(
            now - Duration::from_secs(10),
            now - Duration::from_secs(1),
        ));
        assert_eq!(late, Duration::from_millis(500));
    }
}

/// Fetches a certificate for `id` and renews it at half-life, retrying
/// failures with backoff, until the identity is released.
async fn keep_fresh(
    mgr: Weak<IdentityManager>,
    id: SpiffeId,
    tx: watch::Sender<Option<Arc<Issued>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut backoff = Duration::from_millis(500);
    // Said once per expiry, when the certificate in hand runs out.
    let mut expiry_said = false;
    loop {
        let Some(m) = mgr.upgrade() else { return };
        let wait = match m.fetch(&id).await {
            Ok(issued) => {
                let next = renew_in(&issued.info);
                if expiry_said {
                    tracing::info!(identity = %id, "certificate renewed after it expired: the identity's connections work again");
                }
                tracing::info!(identity = %id, serial = %issued.info.serial, renew_in = ?next, "certificate issued");
                m.metrics.certificate_request("issued");
                tx.send_replace(Some(Arc::new(issued)));
                *last_error.lock().expect("error lock") = None;
                backoff = Duration::from_millis(500);
                expiry_said = false;
                next
            }
            Err(e) => {
                m.metrics.certificate_request("failed");
                *last_error.lock().expect("error lock") = Some(e.to_string());
                let expires = tx.borrow().as_ref().map(|i| i.info.not_after);
                let left = expires.and_then(|t| t.duration_since(SystemTime::now()).ok());
                let b = retry_in(backoff, expires.is_some(), left);
                match (expires, left) {
                    (Some(at), None) if !expiry_said => {
                        expiry_said = true;
                        tracing::error!(
                            identity = %id,
                            expired_at = %humantime::format_rfc3339_seconds(at),
                            "certificate expired and the CA cannot renew it ({e}): this identity's \
                             connections are refused (fail closed) until a renewal succeeds; \
                             retrying every {b:?}"
                        );
                    }
                    _ => {
                        tracing::warn!(identity = %id, valid_for = ?left, "certificate request failed (retrying in {b:?}): {e}")
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                b
            }
        };
        drop(m);
        let deadline = Instant::now() + wait;
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Presents the current certificate of one identity, in handshakes on
/// either side; looked up per handshake, so renewals apply at once.
#[derive(Clone)]
pub struct CertFor {
    pub manager: Arc<IdentityManager>,
    pub identity: SpiffeId,
}

impl std::fmt::Debug for CertFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertFor({})", self.identity)
    }
}

impl rustls::server::ResolvesServerCert for CertFor {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.manager.current(&self.identity)
    }
}

impl rustls::client::ResolvesClientCert for CertFor {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.manager.current(&self.identity)
    }
    fn has_certs(&self) -> bool {
        true
    }
}
