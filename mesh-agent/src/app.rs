//! Wiring: start everything in order, keep the pods in step with the
//! workload file, and take everything down again on SIGTERM/SIGINT.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState, Endpoint},
    config::Config,
    ebpf::{self, Loaded},
    identity::{
        IdentityManager,
        ca_client::{CaAuth, CaClient},
    },
    pod::{self, EnrolledPod},
    policy::{self, PeerAuthentications},
    proxy::{ProxyContext, WorkloadIndex, pool::Pool},
    sys,
    telemetry::{self, logging::LogHandle, metrics::Metrics},
    tls,
    watch::{self, Watch},
    workload::{self, Workload, WorkloadKey},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "mesh-agent must run as root (it loads eBPF programs, attaches them to pod cgroups and \
         enters pod network namespaces)"
    )]
    NotRoot,
    #[error(transparent)]
    Workloads(#[from] workload::Error),
    #[error(transparent)]
    Policy(#[from] policy::Error),
    #[error("cannot read {path}: {source}")]
    ReadConfig {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--ca-root: {0}")]
    CaRoot(#[source] tls::Error),
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
            Error::Workloads(_)
            | Error::Policy(_)
            | Error::ReadConfig { .. }
            | Error::CaRoot(_)
            | Error::CaClient(_) => 64,
            Error::Ebpf(_) | Error::Enrol(_) | Error::Admin(_) => 69,
            Error::Telemetry(_) | Error::Signal(_) => 70,
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config, log: Arc<LogHandle>) -> Result<(), Error> {
    if !sys::is_root() {
        return Err(Error::NotRoot);
    }
    let config = Arc::new(config);
    tracing::info!(config = %serde_json::to_string(&*config).unwrap_or_default(), "starting mesh-agent {}", env!("CARGO_PKG_VERSION"));
    let initial_text = watch::read(&config.workloads).map_err(|source| workload::Error::Read {
        path: config.workloads.clone(),
        source,
    })?;
    let initial = workload::parse_snapshot(&initial_text)?;
    let istio_text = match &config.istio_config {
        Some(p) => Some(watch::read(p).map_err(|source| Error::ReadConfig {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    let peer_auth = match &istio_text {
        Some(t) => PeerAuthentications::parse(t, &config.root_namespace)?,
        None => PeerAuthentications::empty(&config.root_namespace),
    };

    // Signals first: from here on, an interrupt must lead to a clean exit.
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;

    let metrics = Arc::new(Metrics::new()?);
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
    metrics.register_ebpf(loaded.maps())?;

    let identities = identities(&config, &metrics)?;
    let pool = identities
        .as_ref()
        .map(|_| Pool::new(config.hbone_idle_timeout, metrics.clone()));
    if identities.is_none() {
        tracing::warn!(
            "no --ca-addr: mutual TLS is off, meshed destinations are reached in plaintext"
        );
    }
    let ctx = Arc::new(ProxyContext {
        config: config.clone(),
        maps: loaded.maps(),
        metrics: metrics.clone(),
        workloads: WorkloadIndex::default(),
        identities,
        pool,
        peer_auth: RwLock::new(Arc::new(peer_auth)),
        connections: TaskTracker::new(),
        cut: CancellationToken::new(),
    });
    ctx.workloads.set_registry(&initial);
    let state = Arc::new(AdminState {
        config: config.clone(),
        metrics: metrics.clone(),
        log,
        ready: false.into(),
        dump: RwLock::new(serde_json::Value::Null),
        identities: ctx.identities.clone(),
    });
    let stop_admin = CancellationToken::new();
    for (l, ep) in [
        (admin_l, Endpoint::Admin),
        (metrics_l, Endpoint::Metrics),
        (ready_l, Endpoint::Readiness),
    ] {
        tokio::spawn(admin::serve(l, state.clone(), ep, stop_admin.clone()));
    }

    let local: Vec<Workload> = initial
        .into_iter()
        .filter(|w| w.is_on(&config.node_name))
        .collect();
    let keys: Vec<String> = local
        .iter()
        .map(|w| pod::links_dir_name(&w.key()))
        .collect();
    for stale in loaded.prune_links(&|name| keys.iter().any(|k| k == name)) {
        tracing::info!(links = %stale, "detached links left by a previous agent for a pod no longer listed");
    }
    let mut agent = Agent {
        loaded,
        ctx,
        pods: BTreeMap::new(),
        state: state.clone(),
    };
    for w in local {
        // At start a bad workload is fatal: the operator sees it at once.
        let key = w.key();
        let p = pod::enrol(w, &mut agent.loaded, &agent.ctx)?;
        agent.pods.insert(key, p);
    }
    pins.armed = false;
    drop(pins);
    agent.publish();
    state.ready.store(true, Ordering::Release);
    tracing::info!(pods = agent.pods.len(), pin_dir = %agent.loaded.pin_dir().display(), "ready");

    let mut workloads_watch = Watch::new(config.workloads.clone(), initial_text);
    let mut istio_watch = config
        .istio_config
        .clone()
        .zip(istio_text)
        .map(|(p, t)| Watch::new(p, t));
    let mut tick = tokio::time::interval(config.workload_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = tick.tick() => {
                if let Some(change) = workloads_watch.poll() {
                    let parsed = change
                        .map_err(|source| workload::Error::Read { path: config.workloads.clone(), source })
                        .and_then(|s| workload::parse_snapshot(&s));
                    match parsed {
                        Ok(ws) => {
                            agent.apply(ws);
                            metrics.workload_reload("applied");
                        }
                        Err(e) => {
                            // Keep serving the last good registry.
                            tracing::error!("workload file rejected, keeping the previous one: {e}");
                            metrics.workload_reload("rejected");
                        }
                    }
                }
                if let Some(change) = istio_watch.as_mut().and_then(Watch::poll) {
                    agent.apply_istio(change);
                }
            },
        }
    };
    tracing::info!("{signal_name}: shutting down");
    state.ready.store(false, Ordering::Release);
    agent.shutdown().await;
    stop_admin.cancel();
    Ok(())
}

/// The certificate manager, when a CA is configured.
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
    let ca = CaClient::new(addr, bundle.clone(), &config.trust_domain, auth)?;
    let manager = IdentityManager::new(
        &config.trust_domain,
        ca,
        bundle,
        config.workload_cert_ttl,
        metrics.clone(),
    );
    manager.refresh_bundle_every(config.trust_bundle_refresh);
    tracing::info!(ca = %addr, trust_domain = %config.trust_domain, node = %config.node_name, "mutual TLS on");
    Ok(Some(manager))
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

struct Agent {
    loaded: Loaded,
    ctx: Arc<ProxyContext>,
    pods: BTreeMap<WorkloadKey, EnrolledPod>,
    state: Arc<AdminState>,
}

impl Agent {
    /// Installs new Istio configuration, or keeps the current one if it is
    /// invalid (logged and counted).
    fn apply_istio(&mut self, change: std::io::Result<watch::Snapshot>) {
        let cfg = &self.ctx.config;
        let path = cfg.istio_config.clone().unwrap_or_default();
        let parsed = change
            .map_err(|source| Error::ReadConfig { path, source })
            .and_then(|s| PeerAuthentications::parse(&s, &cfg.root_namespace).map_err(Error::from));
        match parsed {
            Ok(p) => {
                tracing::info!(
                    peer_authentications = p.policies.len(),
                    "Istio configuration applied"
                );
                *self.ctx.peer_auth.write().expect("policy lock") = Arc::new(p);
                self.publish();
            }
            Err(e) => {
                tracing::error!("Istio configuration rejected, keeping the previous one: {e}");
                self.ctx.metrics.config_rejected("istio");
            }
        }
    }

    /// Brings the enrolled pods in line with the registry `all` (every
    /// node's pods; this node's are enrolled). A pod that fails to enrol is
    /// logged and skipped; the others are unaffected.
    fn apply(&mut self, all: Vec<Workload>) {
        self.ctx.workloads.set_registry(&all);
        let node = self.ctx.config.node_name.clone();
        let mut desired: BTreeMap<WorkloadKey, Workload> = all
            .into_iter()
            .filter(|w| w.is_on(&node))
            .map(|w| (w.key(), w))
            .collect();
        let gone: Vec<WorkloadKey> = self
            .pods
            .iter()
            .filter(|(k, p)| desired.get(*k) != Some(&*p.workload))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(p) = self.pods.remove(&k) {
                p.remove(&self.ctx);
            }
        }
        desired.retain(|k, _| !self.pods.contains_key(k));
        for (k, w) in desired {
            match pod::enrol(w, &mut self.loaded, &self.ctx) {
                Ok(p) => {
                    self.pods.insert(k, p);
                }
                Err(e) => {
                    tracing::error!("{e}");
                    self.ctx.metrics.workload_reload("enrol_failed");
                }
            }
        }
        self.publish();
    }

    /// Refreshes `/config_dump` and the workload gauge.
    fn publish(&self) {
        let pods: Vec<_> = self.pods.values().map(EnrolledPod::dump).collect();
        let doc = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": &*self.ctx.config,
            "workloads": pods,
            "peerAuthentications": &**self.ctx.peer_auth.read().expect("policy lock"),
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
            if keep { p.keep() } else { p.remove(&self.ctx) }
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
