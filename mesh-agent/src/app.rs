//! Wiring: start everything in order, keep the configuration snapshot and
//! the enrolled pods in step with the sources, and take everything down
//! again on SIGTERM/SIGINT.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState, Endpoint},
    config::Config,
    discover,
    ebpf::{self, Loaded},
    identity::{
        IdentityManager,
        ca_client::{CaAuth, CaClient},
    },
    pod::{self, EnrolledPod},
    proxy::{ProxyContext, pool::Pool},
    snapshot::{self, Snapshot, SourceDocs, Store},
    sources::{
        Rejection,
        files::{self, FileSource},
        kube::{self, KubeSource},
    },
    sys,
    telemetry::{self, logging::LogHandle, metrics::Metrics},
    tls, watch,
    workload::{Workload, WorkloadKey},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "mesh-agent must run as root (it loads eBPF programs, attaches them to pod cgroups and \
         enters pod network namespaces)"
    )]
    NotRoot,
    #[error("{0}")]
    Config(Rejection),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("--ca-root: {0}")]
    CaRoot(#[source] tls::Error),
    #[error("--mesh-config: {0}")]
    MeshConfig(#[from] crate::policy::ext_authz::Error),
    #[error(transparent)]
    CaClient(#[from] crate::identity::ca_client::Error),
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    #[error(transparent)]
    Enrol(#[from] pod::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error(transparent)]
    Telemetry(#[from] telemetry::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

impl Error {
    /// sysexits-style codes: 64 bad input, 69 something the agent needs is
    /// missing or taken, 77 not permitted, 70 internal.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NotRoot => 77,
            Error::Config(_) | Error::CaRoot(_) | Error::CaClient(_) | Error::MeshConfig(_) => 64,
            Error::Kube(_) | Error::Ebpf(_) | Error::Enrol(_) | Error::Admin(_) => 69,
            Error::Telemetry(_) | Error::Signal(_) => 70,
        }
    }
}

/// How long a burst of Kubernetes events is gathered into one snapshot.
const KUBE_DEBOUNCE: Duration = Duration::from_millis(50);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config, log: Arc<LogHandle>) -> Result<(), Error> {
    if !sys::is_root() {
        return Err(Error::NotRoot);
    }
    let config = Arc::new(config);
    tracing::info!(config = %serde_json::to_string(&*config).unwrap_or_default(), "starting mesh-agent {}", env!("CARGO_PKG_VERSION"));
    // Configuration first: a bad file at start is an error the operator
    // sees at once, before anything is attached.
    let (mut file_source, initial_files) = if config.config.is_empty() {
        (None, None)
    } else {
        let (s, docs) = FileSource::open(&config.config);
        (Some(s), Some(docs.map_err(Error::Config)?))
    };
    let kube_client = if config.kubernetes {
        Some(kube::client().await?)
    } else {
        None
    };
    let config = match &kube_client {
        Some(client) if config.locality.is_empty() => {
            kube::with_node_locality(config, client).await
        }
        _ => config,
    };

    // Signals first: from here on, an interrupt must lead to a clean exit.
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;

    let metrics = Arc::new(Metrics::with_series_cap(config.metrics_max_series)?);
    if file_source.is_some() {
        metrics.config_source(files::NAME);
    }
    if kube_client.is_some() {
        metrics.config_source(kube::NAME);
    }
    // Endpoints are bound before anything is attached, so a taken port
    // fails the start with nothing to undo.
    let admin_l = admin::bind(config.admin_addr, Endpoint::Admin).await?;
    let metrics_l = admin::bind(config.metrics_addr, Endpoint::Metrics).await?;
    let ready_l = admin::bind(config.readiness_addr, Endpoint::Readiness).await?;

    let mut loaded = Loaded::load(&config, telemetry::logging::kernel_log_level())?;
    // Until the pods are enrolled, any failure removes the map pins again.
    let mut pins = PinGuard {
        dir: loaded.pin_dir().to_path_buf(),
        created: loaded.created_pins().to_vec(),
        armed: true,
    };
    let _log_task = ebpf::forward_logs(&mut loaded);
    loaded.attach_fast_path(&config);
    metrics.register_ebpf(loaded.maps())?;

    let identities = identities(&config, &metrics)?;
    let pool = identities
        .as_ref()
        .map(|_| Pool::new(config.hbone_idle_timeout, metrics.clone()));
    if identities.is_none() {
        // Asked for with --insecure-no-mtls; said loudly all the same.
        tracing::warn!(
            "INSECURE: mutual TLS is off (--insecure-no-mtls): traffic between pods of different \
             nodes is plaintext and no identity is checked"
        );
    }
    metrics.set_insecure(identities.is_none());
    let jwks = {
        let metrics = metrics.clone();
        crate::policy::jwks::JwksStore::new(
            config.jwks_refresh_interval,
            Arc::new(move |result| metrics.jwks_fetch(result)),
        )
    };
    let settings = snapshot::Settings {
        node_name: config.node_name.clone(),
        root_namespace: config.root_namespace.clone(),
        cluster_domain: config.cluster_domain.clone(),
        dataplane_mode_label: config.dataplane_mode_label.clone(),
        jwks: Arc::new(jwks),
        jwks_timeout: config.jwks_fetch_timeout,
        limiters: Arc::default(),
    };
    let store = Arc::new(Store::new(Snapshot::empty(&settings)));
    let maps = loaded.maps();
    let mut ctx = ProxyContext::new(
        config.clone(),
        maps.clone(),
        metrics.clone(),
        store.clone(),
        identities,
        pool,
    );
    if maps.fast_path_unavailable().is_none() {
        ctx.fast_credit = Some(maps.clone());
    }
    if let Some(path) = &config.mesh_config {
        ctx.mesh = crate::policy::ext_authz::MeshConfig::read(path)?;
    }
    let ctx = Arc::new(ctx);
    {
        // Idle upstream HTTP connections go after a while, with the HBONE
        // streams they hold.
        let upstreams = Arc::downgrade(&ctx.upstreams);
        tokio::spawn(async move {
            while let Some(u) = upstreams.upgrade() {
                u.sweep();
                drop(u);
                tokio::time::sleep(crate::proxy::http::upstreams::IDLE_TIMEOUT / 4).await;
            }
        });
    }
    {
        // Series of workloads and services that left go from /metrics.
        let (store, metrics) = (store.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERIES_SWEEP_INTERVAL).await;
                let removed = metrics.sweep_series(&store.load().registry);
                if removed > 0 {
                    tracing::debug!(removed, "metric series of departed workloads removed");
                }
            }
        });
    }
    // Memory comes back after a burst of connections: glibc keeps freed
    // pages in its arenas until asked to return them.
    tokio::spawn(async {
        loop {
            tokio::time::sleep(HEAP_TRIM_INTERVAL).await;
            if crate::sys::free_heap_bytes() > HEAP_TRIM_ABOVE {
                crate::sys::release_free_memory();
            }
        }
    });
    let kube = kube_client.map(|c| {
        Arc::new(KubeSource::start(
            c,
            kube::Settings {
                node_name: Some(config.node_name.clone()),
                remote_pods: config.kube_remote_pods,
            },
            metrics.clone(),
        ))
    });
    let state = Arc::new(AdminState {
        config: config.clone(),
        metrics: metrics.clone(),
        log,
        ready: false.into(),
        dump: Default::default(),
        identities: ctx.identities.clone(),
        store: store.clone(),
        kube: kube.clone(),
        maps,
    });
    let stop_admin = CancellationToken::new();
    for (l, ep) in [
        (admin_l, Endpoint::Admin),
        (metrics_l, Endpoint::Metrics),
        (ready_l, Endpoint::Readiness),
    ] {
        tokio::spawn(admin::serve(l, state.clone(), ep, stop_admin.clone()));
    }

    let mut agent = Agent {
        loaded,
        ctx,
        pods: BTreeMap::new(),
        pending: BTreeMap::new(),
        state: state.clone(),
        sources: Sources {
            settings,
            files: None,
            kube: None,
            waits_for_kube: kube.is_some(),
            version: 0,
            rejected: BTreeMap::new(),
        },
        started: false,
        warned: BTreeMap::new(),
    };
    if let Some(docs) = initial_files {
        if kube.is_some() {
            // Nothing is published before the cluster has been listed.
            agent.sources.files = Some(docs);
        } else {
            agent.start(docs)?;
        }
    }
    // Startup enrolment is over (or, with Kubernetes, happens as the first
    // snapshot arrives, where a failed pod does not stop the agent).
    pins.armed = false;
    drop(pins);
    agent.publish();

    let notifier = file_source.as_ref().and_then(|_| {
        watch::Notifier::new(&config.config)
            .inspect_err(|e| {
                tracing::warn!(error = %e, interval = ?config.config_poll_interval,
                    "cannot watch the configuration files for changes; reading them on a timer only");
            })
            .ok()
    });
    let mut tick = tokio::time::interval(config.config_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal_name = loop {
        let kube_changed = async {
            match &kube {
                Some(k) => k.changed().await,
                None => std::future::pending().await,
            }
        };
        let files_changed = async {
            match &notifier {
                Some(n) => n.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = tick.tick() => {
                if let Some(change) = file_source.as_mut().and_then(FileSource::poll) {
                    agent.update(change);
                }
                agent.retry_pending();
            },
            _ = files_changed => {
                tokio::time::sleep(watch::SETTLE).await;
                if let Some(change) = file_source.as_mut().and_then(FileSource::poll) {
                    agent.update(change);
                }
            },
            _ = kube_changed => {
                tokio::time::sleep(KUBE_DEBOUNCE).await;
                if let Some(docs) = kube.as_ref().and_then(|k| k.docs()) {
                    agent.update(Ok(docs));
                }
            },
        }
    };
    tracing::info!("{signal_name}: shutting down");
    state
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    drop(kube);
    agent.shutdown().await;
    stop_admin.cancel();
    Ok(())
}

/// The certificate manager, when a CA is configured.
/// How often the agent looks for freed heap to give back, and how much
/// must be free before it does (`malloc_trim` walks every arena).
const HEAP_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
const HEAP_TRIM_ABOVE: usize = 4 << 20;

/// How often series of departed workloads and services are removed.
const SERIES_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

fn identities(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<IdentityManager>>, Error> {
    let Some(addr) = &config.ca_addr else {
        return Ok(None);
    };
    let root_path = config
        .ca_root
        .as_ref()
        .expect("validated: --ca-root comes with --ca-addr");
    let roots = tls::read_pem(root_path).map_err(Error::CaRoot)?;
    let bundle = tls::TrustBundle::from_pems(&root_path.display().to_string(), &[roots])
        .map_err(Error::CaRoot)?;
    let bundle = Arc::new(tls::SharedBundle::new(bundle));
    let auth = match (&config.node_cert, &config.node_key, &config.ca_token_file) {
        (Some(cert), Some(key), _) => CaAuth::NodeCredential {
            cert: cert.clone(),
            key: key.clone(),
        },
        (_, _, Some(token)) => CaAuth::Token(token.clone()),
        _ => unreachable!("validated: one way to authenticate"),
    };
    let trust_domain = match &auth {
        CaAuth::NodeCredential { cert, .. } => crate::identity::ca_client::credential_trust_domain(
            cert,
            &config.node_name,
            config.trust_domain.as_deref(),
        )?,
        CaAuth::Token(_) => config
            .trust_domain
            .clone()
            .unwrap_or_else(|| crate::ca::signer::DEFAULT_TRUST_DOMAIN.into()),
    };
    let ca = CaClient::new(addr, bundle.clone(), &trust_domain, auth)?;
    let manager = IdentityManager::new(
        &trust_domain,
        ca,
        bundle,
        config.workload_cert_ttl,
        metrics.clone(),
    );
    manager.refresh_bundle_every(config.trust_bundle_refresh);
    manager.renew_node_credential_when_due();
    tracing::info!(ca = %addr, %trust_domain, node = %config.node_name, "mutual TLS on");
    Ok(Some(manager))
}

/// Captured connections' original destinations come from the kernel's
/// capture maps.
impl crate::proxy::OriginalDestinations for ebpf::Maps {
    fn original_destination(
        &self,
        netns_cookie: u64,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) -> Option<std::net::SocketAddr> {
        ebpf::Maps::original_destination(self, netns_cookie, peer, local)
    }
}

/// Fast-path credit goes to the kernel's `mesh_fast_read` map.
impl crate::proxy::app_stream::FastPathCredit for ebpf::Maps {
    fn read(&self, netns_cookie: u64, local: SocketAddr, peer: SocketAddr, total: u64) {
        self.fast_path_read(netns_cookie, local, peer, total);
    }
    fn closed(&self, netns_cookie: u64, local: SocketAddr, peer: SocketAddr) {
        self.fast_path_closed(netns_cookie, local, peer);
    }
}

/// Removes the map pins this agent created if startup fails before the pods
/// are enrolled (adopted pins stay for the agent that made them).
struct PinGuard {
    dir: std::path::PathBuf,
    created: Vec<std::path::PathBuf>,
    armed: bool,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.armed {
            ebpf::remove_pins(&self.dir, &self.created);
        }
    }
}

/// The last good content of each source, and what was last refused.
struct Sources {
    settings: snapshot::Settings,
    files: Option<SourceDocs>,
    kube: Option<SourceDocs>,
    /// With Kubernetes configured, nothing is built before it has synced.
    waits_for_kube: bool,
    version: u64,
    /// The last rejected update of each source (kept after later updates
    /// apply, with its time), for `/config_dump`.
    rejected: BTreeMap<&'static str, serde_json::Value>,
}

impl Sources {
    fn slot(&mut self, name: &str) -> &mut Option<SourceDocs> {
        if name == kube::NAME {
            &mut self.kube
        } else {
            &mut self.files
        }
    }

    /// Builds the snapshot with `update` replacing its source's content;
    /// on failure the source keeps its previous content.
    fn try_update(&mut self, update: SourceDocs) -> Result<Option<Snapshot>, Rejection> {
        let name = update.name;
        let previous = self.slot(name).replace(update);
        if self.waits_for_kube && self.kube.is_none() {
            return Ok(None);
        }
        let current: Vec<&SourceDocs> = [&self.files, &self.kube].into_iter().flatten().collect();
        match snapshot::build(&current, &self.settings, self.version + 1) {
            Ok(s) => {
                self.version += 1;
                Ok(Some(s))
            }
            Err(problems) => {
                *self.slot(name) = previous;
                Err(Rejection {
                    source: name,
                    problems,
                })
            }
        }
    }
}

/// A pod as enrolled, and the registry entry it was enrolled from (which
/// has no paths when they were discovered).
struct Enrolled {
    desired: Arc<Workload>,
    pod: EnrolledPod,
}

struct Agent {
    loaded: Loaded,
    ctx: Arc<ProxyContext>,
    pods: BTreeMap<WorkloadKey, Enrolled>,
    /// Pods of this node not enrolled yet, with the reason (retried).
    pending: BTreeMap<WorkloadKey, String>,
    state: Arc<AdminState>,
    sources: Sources,
    /// Whether the first snapshot has been applied.
    started: bool,
    /// Resources whose policy is not enforced and pods left to Istio,
    /// already warned about.
    warned: BTreeMap<String, String>,
}

impl Agent {
    /// The first snapshot without Kubernetes: every pod must enrol, or the
    /// start fails (the operator sees a bad registry at once).
    fn start(&mut self, docs: SourceDocs) -> Result<(), Error> {
        let snap = match self.sources.try_update(docs) {
            Ok(Some(s)) => s,
            Ok(None) => unreachable!("files alone are enough to build"),
            Err(r) => return Err(Error::Config(r)),
        };
        self.install(snap, files::NAME);
        let snap = self.ctx.store.load();
        self.prune_stale_links(&snap);
        let node = self.ctx.config.node_name.clone();
        for w in snap.local_workloads(&node) {
            let p = self.enrol(w)?;
            self.pods.insert(w.key(), p);
        }
        self.started = true;
        self.state
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(pods = self.pods.len(), pin_dir = %self.loaded.pin_dir().display(), "ready");
        crate::sys::release_free_memory();
        Ok(())
    }

    /// A source changed: build and install a new snapshot, or keep the
    /// current one and report why not.
    fn update(&mut self, change: Result<SourceDocs, Rejection>) {
        let result = change.and_then(|docs| {
            let name = docs.name;
            self.sources.try_update(docs).map(|s| s.map(|s| (s, name)))
        });
        match result {
            Ok(Some((snap, source))) => {
                self.install(snap, source);
                if !self.started {
                    let snap = self.ctx.store.load();
                    self.prune_stale_links(&snap);
                    self.started = true;
                }
                self.reconcile();
                if !self.state.ready.load(std::sync::atomic::Ordering::Acquire) {
                    self.state
                        .ready
                        .store(true, std::sync::atomic::Ordering::Release);
                    tracing::info!(
                        pods = self.pods.len(),
                        pending = self.pending.len(),
                        "ready"
                    );
                }
            }
            Ok(None) => {}
            Err(r) => {
                // Keep serving the last good configuration.
                tracing::error!("{r}\n  (the previous configuration stays in force)");
                self.ctx.metrics.config_rejected(r.source);
                self.sources.rejected.insert(
                    r.source,
                    serde_json::json!({
                        "at": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                        "problems": r.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    }),
                );
            }
        }
        self.publish();
    }

    fn install(&mut self, snap: Snapshot, source: &str) {
        let (version, at) = (snap.version, snap.applied_at);
        let counts: BTreeMap<&str, usize> = snap
            .resources
            .iter()
            .map(|(k, v)| (k.name(), v.len()))
            .collect();
        tracing::info!(
            version,
            source,
            workloads = snap.registry.workloads.len(),
            services = snap.registry.services.len(),
            resources = ?counts,
            "configuration applied"
        );
        // Policies in force on paper but not in the data path: said once
        // per resource version, loudly.
        let warnings: BTreeMap<String, String> = snap
            .resources
            .values()
            .flatten()
            .filter_map(|r| crate::istio::validate::not_enforced(r))
            .filter(|p| p.severity == crate::istio::Severity::Warning)
            .map(|p| {
                (
                    format!("{}@{}", p.resource, p.file.display()),
                    p.to_string(),
                )
            })
            .chain(
                // Pods of this node Istio ambient carries: not ours to enrol.
                snap.registry
                    .left_to_istio
                    .iter()
                    .filter(|l| l.node == self.ctx.config.node_name)
                    .map(|l| {
                        let label = &self.ctx.config.dataplane_mode_label;
                        (format!("left-to-istio {}", l.pod), l.message(label))
                    }),
            )
            .collect();
        for (key, text) in &warnings {
            if !self.warned.contains_key(key) {
                tracing::warn!("{text}");
            }
        }
        self.warned = warnings;
        self.ctx.store.swap(snap);
        self.ctx.metrics.config_applied(source, version, at);
    }

    /// Detaches links a previous agent left for pods no longer listed.
    fn prune_stale_links(&self, snap: &Snapshot) {
        let keys: Vec<String> = snap
            .local_workloads(&self.ctx.config.node_name)
            .map(|w| pod::links_dir_name(&w.key()))
            .collect();
        for stale in self
            .loaded
            .prune_links(&|name| keys.iter().any(|k| k == name))
        {
            tracing::info!(links = %stale, "detached links left by a previous agent for a pod no longer listed");
        }
    }

    /// Enrols `w`, first finding its netns and cgroup from its UID when the
    /// source did not give them (Kubernetes Pods).
    fn enrol(&mut self, w: &Arc<Workload>) -> Result<Enrolled, Error> {
        let mut resolved = (**w).clone();
        if resolved.netns.as_os_str().is_empty() || resolved.cgroup.as_os_str().is_empty() {
            let Some(uid) = resolved.uid.clone() else {
                return Err(Error::Enrol(pod::Error::NoPaths { pod: w.key() }));
            };
            let (cgroup, netns) =
                discover::pod(&self.ctx.config.cgroup_root, &uid).map_err(|source| {
                    Error::Enrol(pod::Error::Discover {
                        pod: w.key(),
                        source,
                    })
                })?;
            resolved.cgroup = cgroup;
            resolved.netns = netns;
        }
        let p = pod::enrol(resolved, &mut self.loaded, &self.ctx)?;
        Ok(Enrolled {
            desired: w.clone(),
            pod: p,
        })
    }

    /// Brings the enrolled pods in line with the current snapshot. A pod
    /// that fails to enrol is logged, kept pending and retried; the others
    /// are unaffected.
    fn reconcile(&mut self) {
        let snap = self.ctx.store.load();
        let node = self.ctx.config.node_name.clone();
        let mut desired: BTreeMap<WorkloadKey, Arc<Workload>> = snap
            .local_workloads(&node)
            .map(|w| (w.key(), w.clone()))
            .collect();
        let gone: Vec<WorkloadKey> = self
            .pods
            .iter()
            .filter(|(k, p)| desired.get(*k) != Some(&p.desired))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(p) = self.pods.remove(&k) {
                p.pod.remove(&self.ctx);
            }
        }
        self.pending.retain(|k, _| desired.contains_key(k));
        desired.retain(|k, _| !self.pods.contains_key(k));
        for (k, w) in desired {
            match self.enrol(&w) {
                Ok(p) => {
                    self.pending.remove(&k);
                    self.pods.insert(k, p);
                }
                Err(e) => {
                    let msg = e.to_string();
                    // Logged once per distinct reason, not on every retry.
                    if self.pending.get(&k) != Some(&msg) {
                        tracing::error!("{msg}");
                        self.ctx.metrics.enrol_failed();
                    }
                    self.pending.insert(k, msg);
                }
            }
        }
        self.publish();
    }

    /// Tries the pods that could not be enrolled again.
    fn retry_pending(&mut self) {
        if !self.pending.is_empty() {
            self.reconcile();
        }
    }

    /// Refreshes `/config_dump` and the workload gauge.
    fn publish(&self) {
        let pods: Vec<_> = self.pods.values().map(|p| p.pod.dump()).collect();
        let sources = serde_json::json!({
            "files": self.sources.files.as_ref().map(|s| serde_json::json!({
                "paths": self.ctx.config.config,
                "revision": s.revision,
                "documents": s.documents.len(),
            })),
            "kubernetes": self.state.kube.as_ref().map(|k| k.status()),
            "lastRejected": self.sources.rejected,
        });
        let snap = self.ctx.store.load();
        let left_to_istio: Vec<_> = snap
            .registry
            .left_to_istio
            .iter()
            .filter(|l| l.node == self.ctx.config.node_name)
            .collect();
        let doc = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "mutualTls": if self.ctx.identities.is_some() {
                "on"
            } else {
                "OFF (--insecure-no-mtls): traffic between nodes is plaintext"
            },
            "config": &*self.ctx.config,
            "workloads": pods,
            "pending": self.pending,
            "leftToIstio": left_to_istio,
            "sources": sources,
            "ebpf": {
                "pinDir": self.loaded.pin_dir(),
                "programs": self.loaded.programs(),
                "mapAbiVersion": mesh_common::MAP_ABI_VERSION,
            },
        });
        *self.state.dump.write().expect("dump lock") = doc;
        self.ctx.metrics.set_workloads(self.pods.len());
    }

    /// Detaches (or, with --keep-pins, keeps) every pod, lets connections
    /// drain for the configured time, then cuts the rest and unpins maps.
    async fn shutdown(mut self) {
        let keep = self.ctx.config.keep_pins;
        for (_, p) in std::mem::take(&mut self.pods) {
            if keep {
                p.pod.keep()
            } else {
                p.pod.remove(&self.ctx)
            }
        }
        self.ctx.connections.close();
        if tokio::time::timeout(self.ctx.config.drain_timeout, self.ctx.connections.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.ctx.connections.len(),
                "drain period over; closing the remaining connections"
            );
            self.ctx.cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.ctx.connections.wait()).await;
        }
        if keep {
            tracing::info!(pin_dir = %self.loaded.pin_dir().display(), "leaving maps and links pinned (--keep-pins)");
        } else {
            self.loaded.unpin_maps();
        }
    }
}
