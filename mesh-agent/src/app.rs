//! Wiring: start everything in order, keep the configuration snapshot and
//! the enrolled pods in step with the sources, and take everything down
//! again on SIGTERM/SIGINT.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState, Endpoint},
    config::Config,
    ebpf::{self, Loaded},
    handover::{self, Taken},
    identity::{
        IdentityManager,
        ca_client::{CaAuth, CaClient},
    },
    pod,
    proxy::{ProxyContext, pool::Pool},
    snapshot::{self, Snapshot, Store},
    sources::{
        Rejection,
        files::{self, FileSource},
        kube::{self, KubeSource},
    },
    sys,
    telemetry::{self, logging::LogHandle, metrics::Metrics},
    tls, watch,
};

mod agent;
mod cni_calls;
mod mesh_watch;

use agent::{Agent, Sources};

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
    MeshConfig(#[from] crate::mesh_config::Error),
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
    #[error(transparent)]
    Handover(#[from] handover::Error),
    #[error(transparent)]
    Cni(#[from] crate::cni::Error),
}

impl Error {
    /// sysexits-style codes: 64 bad input, 69 something the agent needs is
    /// missing or taken, 77 not permitted, 70 internal.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NotRoot => 77,
            Error::Config(_) | Error::CaRoot(_) | Error::CaClient(_) | Error::MeshConfig(_) => 64,
            Error::Kube(_)
            | Error::Ebpf(_)
            | Error::Enrol(_)
            | Error::Admin(_)
            | Error::Handover(_)
            | Error::Cni(_) => 69,
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
    tracing::info!(config = %serde_json::to_string(&*config).unwrap_or_default(), "starting mesh-agent {}", crate::BUILD);
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
    // A running agent (restart, upgrade) hands its listening sockets over:
    // nothing is closed or re-bound, so no connect is refused meanwhile.
    let mut taken = {
        let path = config.handover_socket.clone();
        tokio::task::spawn_blocking(move || handover::take(&path))
            .await
            .expect("hand-over task")?
    };
    if let Some(t) = &taken {
        tracing::info!(
            from_pid = t.from_pid,
            pods = t.pods.len(),
            "taking over from the running agent"
        );
    }
    // Endpoints are bound before anything is attached, so a taken port
    // fails the start with nothing to undo.
    let admin_l = endpoint(&mut taken, config.admin_addr, Endpoint::Admin).await?;
    let metrics_l = endpoint(&mut taken, config.metrics_addr, Endpoint::Metrics).await?;
    let ready_l = endpoint(&mut taken, config.readiness_addr, Endpoint::Readiness).await?;
    let endpoint_fds: Vec<(SocketAddr, OwnedFd)> = [&admin_l, &metrics_l, &ready_l]
        .into_iter()
        .filter_map(|l| Some((l.local_addr().ok()?, l.as_fd().try_clone_to_owned().ok()?)))
        .collect();
    // Handed-over listeners are accepted on once this agent is ready.
    let (gate_tx, gate) = tokio::sync::watch::channel(taken.is_none());

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
        .map(|_| Pool::new(pool_settings(&config), metrics.clone()));
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
    let mesh = mesh_watch::load(config.mesh_config.as_deref(), config.access_log)?;
    ctx.mesh = arc_swap::ArcSwap::from_pointee(mesh.mesh);
    ctx.access_log = telemetry::accesslog::AccessLog::start(mesh.logs, metrics.access_log_counts());
    let lookup_store = store.clone();
    ctx.tracer = telemetry::trace::Tracer::start(
        mesh.traces,
        metrics.trace_span_counts(),
        Arc::new(move |host: &str, port: u16| {
            let ready = lookup_store.load().registry.ready_endpoints(host, port);
            (!ready.is_empty()).then(|| ready[fastrand::usize(..ready.len())])
        }),
    );
    let ctx = Arc::new(ctx);
    if let Some(path) = &config.mesh_config {
        mesh_watch::spawn(path, ctx.clone(), config.config_poll_interval);
    }
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
        conns: ctx.conns.clone(),
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
        handed: taken
            .as_mut()
            .map(|t| std::mem::take(&mut t.pods))
            .unwrap_or_default(),
        gate,
        cni_given: Default::default(),
        parked: Vec::new(),
        pins_lost: false,
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
    let mut takeover = taken.map(|t| {
        let state = state.clone();
        tokio::spawn(t.complete(
            move || state.readiness().is_ok(),
            gate_tx,
            config.handover_timeout,
        ))
    });
    let mut offers = takeover.is_none().then(|| offer(&config)).flatten();
    // The CNI plugin's requests: pods enrolled before their containers run.
    let mut cni_calls = match &config.cni_socket {
        Some(path) => Some(crate::cni::serve(path)?),
        None => None,
    };
    // Set once this agent's sockets were asked for.
    let mut handing_over = false;

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
    let stop = loop {
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
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            r = async { takeover.as_mut().expect("guarded").await }, if takeover.is_some() => {
                takeover = None;
                match r.expect("hand-over task") {
                    Ok(pid) => {
                        tracing::info!(from_pid = pid, "took over: the previous agent stops accepting and drains");
                        agent.handed.clear();
                        offers = offer(&config);
                    }
                    Err(e) => break Stop::TakeoverFailed(e),
                }
            },
            ev = async { offers.as_mut().expect("guarded").recv().await }, if offers.is_some() => match ev {
                Some(handover::Event::Requested { reply, .. }) => {
                    handing_over = true;
                    let _ = reply.send(agent.offer(&endpoint_fds));
                }
                Some(handover::Event::TakenOver { pid }) => break Stop::HandedOver(pid),
                Some(handover::Event::Abandoned) => handing_over = false,
                None => offers = None,
            },
            call = async { cni_calls.as_mut().expect("guarded").recv().await }, if cni_calls.is_some() => match call {
                Some(call) => agent.cni(call),
                None => cni_calls = None,
            },
            _ = tick.tick() => {
                if let Some(change) = file_source.as_mut().and_then(FileSource::poll) {
                    agent.update(change);
                }
                agent.retry_pending();
                agent.restore_pins();
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
        agent.answer_parked();
    };
    state
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    drop(kube);
    match stop {
        Stop::Signal(name) => {
            tracing::info!("{name}: shutting down");
            // Mid-hand-over, the other agent uses the same maps, links and
            // sockets: leave them to it.
            agent
                .shutdown(config.keep_pins || handing_over || takeover.is_some())
                .await;
            stop_admin.cancel();
        }
        Stop::HandedOver(pid) => {
            // The new agent serves the endpoints and accepts on every
            // listener; the pods' links and maps are its now.
            tracing::info!(to_pid = pid, "handed over: no longer accepting; draining");
            stop_admin.cancel();
            agent.shutdown(true).await;
            // A DaemonSet's old pod exits on its SIGTERM: exiting before,
            // the kubelet would restart it, and it would take the sockets back.
            tracing::info!("drained; exiting on SIGTERM");
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
        }
        Stop::TakeoverFailed(e) => {
            // The running agent keeps the sockets, links and maps.
            agent.shutdown(true).await;
            stop_admin.cancel();
            return Err(e.into());
        }
    }
    Ok(())
}

/// Why the main loop ended.
enum Stop {
    Signal(&'static str),
    /// A new agent took the listeners over (its pid).
    HandedOver(u32),
    /// This agent received the sockets but did not become ready in time.
    TakeoverFailed(handover::Error),
}

/// An endpoint's listener: handed over, or bound now.
async fn endpoint(
    taken: &mut Option<Taken>,
    addr: SocketAddr,
    ep: Endpoint,
) -> Result<tokio::net::TcpListener, admin::Error> {
    match taken.as_mut().and_then(|t| t.endpoints.remove(&addr)) {
        Some(l) => admin::adopt(l, addr, ep),
        None => admin::bind(addr, ep).await,
    }
}

/// Offers this agent's sockets to the next one; without the socket, a
/// restart still works, with connects refused while no agent listens.
fn offer(config: &Config) -> Option<tokio::sync::mpsc::Receiver<handover::Event>> {
    handover::offer(&config.handover_socket, config.handover_timeout)
        .inspect_err(|e| tracing::warn!("{e}: restarts will refuse connections briefly"))
        .ok()
}

/// How often the agent looks for freed heap to give back, and how much
/// must be free before it does (`malloc_trim` walks every arena).
const HEAP_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
const HEAP_TRIM_ABOVE: usize = 4 << 20;

/// How often series of departed workloads and services are removed.
const SERIES_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

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

/// The HBONE client pool's settings, from the command line.
pub fn pool_settings(config: &Config) -> crate::proxy::pool::Settings {
    crate::proxy::pool::Settings {
        idle: config.hbone_idle_timeout,
        max_age: config.hbone_max_connection_age,
        dial_timeout: config.connect_timeout,
        keepalive_interval: config.hbone_keepalive_interval,
        keepalive_timeout: config.hbone_keepalive_timeout,
    }
}
