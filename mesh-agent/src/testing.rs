//! The in-process test tier's doubles and fixtures (no root, no eBPF): a
//! CA in a temporary directory, certificates for any identity, snapshots
//! from YAML, pods in the test's own network namespace at loopback
//! addresses, original destinations recorded by the test instead of the
//! capture programs, and small servers to send traffic to. Everything runs
//! over real sockets on 127.0.0.0/8, with real TLS.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{
    ca::signer::{self, Signer, Usage},
    config::{Cli, Command, Config},
    documents,
    identity::{
        IdentityManager,
        ca_client::{CaAuth, CaClient},
    },
    netns::Netns,
    proxy::{OriginalDestinations, PodContext, ProxyContext},
    snapshot::{self, Snapshot, SourceDocs, Store},
    spiffe::SpiffeId,
    telemetry::metrics::Metrics,
    tls::{self, SharedBundle, TrustBundle},
};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NODE: &str = "node-a";

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("mesh-agent-{}-{what}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temporary directory");
        Self(p)
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A mesh CA: its files in a temporary directory, and its signer.
pub struct Pki {
    pub dir: TempDir,
    pub trust_domain: String,
    pub signer: Signer,
}

impl Pki {
    pub fn new() -> Self {
        Self::for_domain(TRUST_DOMAIN)
    }

    pub fn for_domain(trust_domain: &str) -> Self {
        let dir = TempDir::new("ca");
        signer::init(&dir.0, trust_domain, Duration::from_secs(86400), None).expect("ca init");
        let signer = Signer::load(&dir.0, trust_domain).expect("ca load");
        Self {
            dir,
            trust_domain: trust_domain.into(),
            signer,
        }
    }

    /// The roots to trust.
    pub fn bundle(&self) -> Arc<SharedBundle> {
        Arc::new(SharedBundle::new(
            TrustBundle::from_pems("test roots", self.signer.bundle()).expect("bundle"),
        ))
    }

    /// A certificate chain and key for `id`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        usage: Usage,
        expired: bool,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (chain, key) = self
            .signer
            .issue(id, usage, Duration::from_secs(3600), expired)
            .expect("issue");
        let der = tls::certs_from_pem("test chain", &chain.concat()).expect("chain");
        (der, tls::key_from_pem("test key", &key).expect("key"))
    }

    /// `issue`, ready for rustls.
    pub fn certified(&self, id: &SpiffeId, usage: Usage) -> Arc<rustls::sign::CertifiedKey> {
        let (chain, key) = self.issue(id, usage, false);
        tls::certified_key("test", chain, key).expect("certified key")
    }

    /// A node credential for `node` written as `<node>.crt`/`<node>.key`.
    pub fn node_credential(&self, node: &str, ttl: Duration) -> (PathBuf, PathBuf) {
        let (chain, key) = self
            .signer
            .issue(
                &SpiffeId::node(&self.trust_domain, node),
                Usage::Node,
                ttl,
                false,
            )
            .expect("node credential");
        signer::write_credential(
            &self.dir.join("nodes"),
            node,
            &chain,
            &key,
            self.signer.bundle(),
        )
        .expect("write credential")
    }
}

/// The agent's settings for in-process tests: the defaults, no socket
/// mark (setting one needs privilege), short timeouts.
pub fn config() -> Config {
    let cli = Cli::try_parse_from(["mesh-agent", "run", "--node-name", NODE]).expect("flags");
    let Command::Run(mut c) = cli.command else {
        unreachable!("run")
    };
    c.agent_mark = 0;
    c.connect_timeout = Duration::from_secs(2);
    *c
}

/// Parses `yaml` (any configuration documents) as the `files` source;
/// panics on problems.
pub fn source(yaml: &str) -> SourceDocs {
    let mut out = documents::Parsed::default();
    documents::parse_file(Path::new("test.yaml"), yaml.as_bytes(), &mut out);
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    SourceDocs {
        name: "files",
        revision: "test".into(),
        documents: out.documents,
        notes: Vec::new(),
    }
}

/// The snapshot of `yaml`.
pub fn snapshot(yaml: &str) -> Snapshot {
    let settings = snapshot::Settings::offline(
        NODE,
        "istio-system",
        "cluster.local",
        crate::registry::ambient::DEFAULT_LABEL,
    );
    snapshot::build(&[&source(yaml)], &settings, 1).expect("snapshot")
}

/// Original destinations the test records, by the client's address, as
/// the capture programs would.
#[derive(Default)]
pub struct Recorded(Mutex<HashMap<SocketAddr, SocketAddr>>);

impl OriginalDestinations for Recorded {
    fn original_destination(
        &self,
        _netns_cookie: u64,
        peer: SocketAddr,
        _local: SocketAddr,
    ) -> Option<SocketAddr> {
        self.0.lock().unwrap().get(&peer).copied()
    }
}

/// An agent in this process: its context, and what it was told.
pub struct Agent {
    pub ctx: Arc<ProxyContext>,
    pub recorded: Arc<Recorded>,
    pub stop: CancellationToken,
}

impl Agent {
    /// An agent serving `snap`, with mutual TLS when `identities` is set.
    pub fn new(snap: Snapshot, identities: Option<Arc<IdentityManager>>) -> Self {
        Self::with_config(config(), snap, identities)
    }

    pub fn with_config(
        config: Config,
        snap: Snapshot,
        identities: Option<Arc<IdentityManager>>,
    ) -> Self {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let recorded = Arc::new(Recorded::default());
        let pool = identities.as_ref().map(|_| {
            crate::proxy::pool::Pool::new(crate::app::pool_settings(&config), metrics.clone())
        });
        let ctx = Arc::new(ProxyContext::new(
            Arc::new(config),
            recorded.clone(),
            metrics,
            Arc::new(Store::new(snap)),
            identities,
            pool,
        ));
        Self {
            ctx,
            recorded,
            stop: CancellationToken::new(),
        }
    }

    /// The pod of `snap`'s registry named `namespace/name`, enrolled here:
    /// in this process's network namespace, its listeners opened by the
    /// caller. It must have a loopback address.
    pub fn pod(&self, key: &str) -> Arc<PodContext> {
        let snap = self.ctx.store.load();
        let w = snap
            .registry
            .workloads
            .iter()
            .find(|w| w.key().to_string() == key)
            .unwrap_or_else(|| panic!("no workload {key} in the registry"))
            .clone();
        let identity = self
            .ctx
            .identities
            .as_ref()
            .map(|i| w.identity(i.trust_domain()));
        if let (Some(i), Some(id)) = (&self.ctx.identities, &identity) {
            i.acquire(id);
        }
        let pod = Arc::new(PodContext {
            workload: w,
            netns: Arc::new(Netns::current().expect("own netns")),
            netns_cookie: 0,
            identity,
            connections: self.ctx.limits.pod(),
        });
        self.ctx.local.insert_local(&pod);
        pod
    }

    /// Serves `pod`'s outbound capture listener (its 15001) on an
    /// ephemeral loopback port; returns that address.
    pub async fn outbound(&self, pod: &Arc<PodContext>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(crate::proxy::outbound::serve(
            l,
            pod.clone(),
            self.ctx.clone(),
            self.stop.clone(),
        ));
        addr
    }

    /// Serves `pod`'s HBONE listener on its address, port 15008.
    pub async fn hbone(&self, pod: &Arc<PodContext>) {
        let ip = pod.workload.ips[0];
        let l = TcpListener::bind(SocketAddr::new(ip, self.ctx.config.hbone_port))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}:15008: {e}"));
        tokio::spawn(crate::proxy::hbone::serve(
            l,
            pod.clone(),
            self.ctx.clone(),
            self.stop.clone(),
        ));
    }

    /// A client of the pod whose outbound listener is `listener`, which
    /// "dialled" `dst`: recorded as its original destination first, as the
    /// capture programs would.
    pub async fn dial(&self, listener: SocketAddr, dst: SocketAddr) -> TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let me = s.local_addr().unwrap();
        self.recorded.0.lock().unwrap().insert(me, dst);
        s.connect(listener).await.unwrap()
    }

    /// The metrics exposition.
    pub fn metrics(&self) -> String {
        self.ctx.metrics.render()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
        self.ctx.cut.cancel();
    }
}

/// The sum of the samples of `name` with all of `labels`; `None` when no
/// series matches (never read as 0).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, lbls) = series.split_once('{').unwrap_or((series, ""));
        if n == name
            && labels
                .iter()
                .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")))
        {
            *sum.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    sum
}

/// An identity manager of `NODE` whose certificates come from a real CA
/// (the in-process `ca::server`) placing `placement` (a workload registry).
pub struct Identities {
    pub pki: Pki,
    /// Serves while the test runs.
    pub _ca: crate::ca::server::Running,
    pub manager: Arc<IdentityManager>,
    _placement: TempDir,
}

impl Identities {
    pub async fn start(placement: &str) -> Self {
        let pki = Pki::new();
        let dir = TempDir::new("placement");
        std::fs::write(dir.join("workloads.yaml"), placement).unwrap();
        let ca = crate::ca::server::start(ca_config(&pki, &dir.0))
            .await
            .expect("CA start");
        let (cert, key) = pki.node_credential(NODE, Duration::from_secs(3600));
        let client = CaClient::new(
            &ca.addr.to_string(),
            pki.bundle(),
            TRUST_DOMAIN,
            CaAuth::NodeCredential { cert, key },
        )
        .expect("CA client");
        let manager = IdentityManager::new(
            TRUST_DOMAIN,
            client,
            pki.bundle(),
            Duration::from_secs(3600),
            Arc::new(Metrics::new().unwrap()),
        );
        Self {
            pki,
            _ca: ca,
            manager,
            _placement: dir,
        }
    }
}

/// `ca run` settings for `pki`'s directory, placement from `placement`,
/// on an ephemeral loopback port.
pub fn ca_config(pki: &Pki, placement: &Path) -> crate::config::CaRunConfig {
    let cli = Cli::try_parse_from([
        "mesh-agent",
        "ca",
        "run",
        "--dir",
        pki.dir.0.to_str().unwrap(),
        "--trust-domain",
        &pki.trust_domain,
        "--listen",
        "127.0.0.1:0",
        "--config",
        placement.to_str().unwrap(),
    ])
    .expect("ca flags");
    match cli.command {
        Command::Ca {
            command: crate::config::CaCommand::Run(c),
        } => *c,
        _ => unreachable!("ca run"),
    }
}

/// An echo server on `addr` (a loopback address): returns how many
/// connections it accepted so far.
pub async fn echo(addr: &str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let bound = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (bound, accepted)
}

/// Writes `payload`, half-closes, and reads everything back.
pub async fn round_trip(mut s: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no echo within 5 s"))??;
    Ok(back)
}

/// A workload registry entry for a pod at `ip` on `NODE` (in-process
/// pods need no real netns or cgroup).
pub fn workload_yaml(name: &str, ip: &str, sa: &str, labels: &str) -> String {
    format!(
        "  - {{name: {name}, namespace: default, serviceAccount: {sa}, ips: [{ip}], netns: /proc/self/ns/net, cgroup: /sys/fs/cgroup, node: {NODE}, labels: {{{labels}}}}}\n"
    )
}

/// A tiny HTTP/1.1 server on `addr` answering `hello from NAME` (200), or
/// the status in an `x-status` request header; `x-fail-every: K` answers
/// 503 to every K-th request it sees. Returns the request lines it saw.
pub async fn http_server(name: &'static str, addr: &str) -> Arc<Mutex<Vec<String>>> {
    use http_body_util::Full;
    let l = TcpListener::bind(addr).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (log, served) = (log.clone(), served.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    log.lock().unwrap().push(format!(
                        "{} {}{}",
                        req.method(),
                        req.uri().path_and_query().map_or("/", |p| p.as_str()),
                        req.headers()
                            .get("x-mark")
                            .and_then(|v| v.to_str().ok())
                            .map(|m| format!(" x-mark={m}"))
                            .unwrap_or_default()
                    ));
                    let header = |k: &str| {
                        req.headers()
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                    };
                    let status = match (header("x-status"), header("x-fail-every")) {
                        (Some(s), _) => s as u16,
                        (None, Some(k)) if k > 0 && n % k == 0 => 503,
                        _ => 200,
                    };
                    async move {
                        let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(format!(
                            "hello from {name}"
                        ))));
                        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    seen
}

/// An HTTP/1.1 client on a captured connection `s`.
pub async fn http_client(
    s: TcpStream,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    send
}

/// Sends `GET path` with `headers` on `send`: status, response flag
/// header, body.
pub async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    use http_body_util::BodyExt;
    let mut req = hyper::Request::builder().uri(path).header("host", "web");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::new()).unwrap())
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let flags = resp
        .headers()
        .get(crate::proxy::http::FLAGS_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, flags, String::from_utf8_lossy(&body).into_owned())
}
