//! Remote JSON Web Key Sets (`jwksUri`): fetched over HTTP or HTTPS (the
//! system's CA roots), with a bounded timeout and size, cached per URI for
//! every rule and snapshot naming it, refreshed when older than the
//! refresh interval (in the background: requests keep the cached keys)
//! and at once when a token names a key the cache does not hold (at most
//! once per [`MIN_REFETCH`]). A failed fetch keeps the last keys and is
//! counted (`mesh_jwks_fetches_total{result="error"}`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use tokio::net::TcpStream;

/// The largest key set accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Unknown keys refetch at most this often, so tokens with made-up key
/// IDs cannot make the agent hammer the issuer.
pub const MIN_REFETCH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{uri}: {reason}")]
    Fetch { uri: String, reason: String },
}

/// Counts fetches by result (`ok`, `error`).
pub type OnFetch = Arc<dyn Fn(&str) + Send + Sync>;

/// The key sets of every `jwksUri` in use.
pub struct JwksStore {
    sets: Mutex<HashMap<String, Weak<Jwks>>>,
    refresh: Duration,
    on_fetch: OnFetch,
    /// Fetch a new URI's keys as soon as a rule names it.
    prefetch: bool,
}

impl std::fmt::Debug for JwksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksStore")
            .field("refresh", &self.refresh)
            .finish()
    }
}

impl JwksStore {
    pub fn new(refresh: Duration, on_fetch: OnFetch) -> Self {
        Self {
            sets: Mutex::default(),
            refresh,
            on_fetch,
            prefetch: true,
        }
    }

    /// A store that fetches only when a token needs the keys: for offline
    /// tools, which never do.
    pub fn offline() -> Self {
        Self {
            prefetch: false,
            ..Self::new(Duration::from_secs(20 * 60), Arc::new(|_| {}))
        }
    }

    /// The key set at `uri`, shared with whoever already uses it; a new
    /// one starts fetching at once (when a runtime runs).
    pub fn get(&self, uri: &str, timeout: Duration) -> Arc<Jwks> {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = sets.get(uri).and_then(Weak::upgrade) {
            return j;
        }
        sets.retain(|_, w| w.strong_count() > 0);
        let j = Arc::new(Jwks {
            uri: uri.into(),
            keys: ArcSwapOption::empty(),
            fetched: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            timeout,
            refresh: self.refresh,
            on_fetch: self.on_fetch.clone(),
        });
        sets.insert(uri.into(), Arc::downgrade(&j));
        if self.prefetch
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let j = j.clone();
            rt.spawn(async move { j.fetch().await });
        }
        j
    }
}

/// One remote key set.
pub struct Jwks {
    uri: String,
    keys: ArcSwapOption<JwkSet>,
    /// When the last fetch (good or not) finished.
    fetched: Mutex<Option<Instant>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    timeout: Duration,
    refresh: Duration,
    on_fetch: OnFetch,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("uri", &self.uri).finish()
    }
}

impl Jwks {
    /// The cached keys (fetched now if there are none yet); starts a
    /// background refresh when they are older than the interval.
    pub async fn keys(self: &Arc<Self>) -> Option<Arc<JwkSet>> {
        let Some(keys) = self.keys.load_full() else {
            self.fetch().await;
            return self.keys.load_full();
        };
        if self.age().is_none_or(|a| a >= self.refresh) {
            let me = self.clone();
            tokio::spawn(async move { me.fetch().await });
        }
        Some(keys)
    }

    /// The cached keys, without fetching.
    pub fn cached(&self) -> Option<Arc<JwkSet>> {
        self.keys.load_full()
    }

    /// Fetches again for a key ID the cache does not hold, unless a fetch
    /// finished moments ago; the keys after it.
    pub async fn refresh_for_unknown_key(self: &Arc<Self>) -> Option<Arc<JwkSet>> {
        if self.age().is_none_or(|a| a >= MIN_REFETCH) {
            self.fetch().await;
        }
        self.keys.load_full()
    }

    fn age(&self) -> Option<Duration> {
        self.fetched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    async fn fetch(&self) {
        let started = Instant::now();
        let _one = self.fetching.lock().await;
        // Another fetch finished while this one waited: use its result.
        if self
            .fetched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t > started)
        {
            return;
        }
        let r = tokio::time::timeout(self.timeout, get(&self.uri))
            .await
            .unwrap_or_else(|_| {
                Err(Error::Fetch {
                    uri: self.uri.clone(),
                    reason: format!("timed out after {:?}", self.timeout),
                })
            })
            .and_then(|body| {
                serde_json::from_slice::<JwkSet>(&body).map_err(|e| Error::Fetch {
                    uri: self.uri.clone(),
                    reason: format!("not a JWK set: {e}"),
                })
            });
        match r {
            Ok(set) => {
                tracing::info!(uri = %self.uri, keys = set.keys.len(), "jwks: fetched");
                self.keys.store(Some(Arc::new(set)));
                (self.on_fetch)("ok");
            }
            Err(e) => {
                tracing::warn!("jwks: {e}; keeping the keys cached before");
                (self.on_fetch)("error");
            }
        }
        *self.fetched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

/// `GET uri`, the body of a 200.
async fn get(uri: &str) -> Result<Bytes, Error> {
    let fail = |reason: String| Error::Fetch {
        uri: uri.into(),
        reason,
    };
    let u: http::Uri = uri.parse().map_err(|e| fail(format!("not a URI: {e}")))?;
    let https = match u.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(fail("only http and https are supported".into())),
    };
    let host = u.host().ok_or_else(|| fail("no host".into()))?;
    let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| fail(format!("connect: {e}")))?;
    let authority = u.authority().map_or(host, |a| a.as_str()).to_owned();
    let req = http::Request::get(u.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, &authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    if https {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| fail(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        send(TokioIo::new(tls), req, uri).await
    } else {
        send(TokioIo::new(tcp), req, uri).await
    }
}

async fn send<T>(io: T, req: http::Request<Empty<Bytes>>, uri: &str) -> Result<Bytes, Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let fail = |reason: String| Error::Fetch {
        uri: uri.into(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if resp.status() != http::StatusCode::OK {
        return Err(fail(format!("answered {}", resp.status())));
    }
    Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| fail(format!("body: {e}")))
}
