//! The agent's state between events: the configuration sources' last good
//! content, the enrolled pods, and what each change does to them.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::Duration,
};

use super::Error;
use crate::{
    admin::AdminState,
    discover,
    ebpf::Loaded,
    handover::{self, Offered, wire::Listener},
    pod::{self, EnrolledPod},
    proxy::ProxyContext,
    snapshot::{self, Snapshot, SourceDocs},
    sources::{Rejection, files, kube},
    workload::{Workload, WorkloadKey},
};

/// The last good content of each source, and what was last refused.
pub(super) struct Sources {
    pub(super) settings: snapshot::Settings,
    pub(super) files: Option<SourceDocs>,
    pub(super) kube: Option<SourceDocs>,
    /// With Kubernetes configured, nothing is built before it has synced.
    pub(super) waits_for_kube: bool,
    pub(super) version: u64,
    /// The last rejected update of each source (kept after later updates
    /// apply, with its time), for `/config_dump`.
    pub(super) rejected: BTreeMap<&'static str, serde_json::Value>,
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
pub(super) struct Enrolled {
    pub(super) desired: Arc<Workload>,
    pub(super) pod: EnrolledPod,
}

pub(super) struct Agent {
    pub(super) loaded: Loaded,
    pub(super) ctx: Arc<ProxyContext>,
    pub(super) pods: BTreeMap<WorkloadKey, Enrolled>,
    /// Pods of this node not enrolled yet, with the reason (retried).
    pub(super) pending: BTreeMap<WorkloadKey, String>,
    pub(super) state: Arc<AdminState>,
    pub(super) sources: Sources,
    /// Whether the first snapshot has been applied.
    pub(super) started: bool,
    /// Resources whose policy is not enforced and pods left to Istio,
    /// already warned about.
    pub(super) warned: BTreeMap<String, String>,
    /// Pods' listeners handed over by the agent this one replaces, until
    /// their pods are enrolled.
    pub(super) handed: HashMap<String, Vec<(Listener, std::net::TcpListener)>>,
    /// Opens once this agent is ready to accept on them.
    pub(super) gate: tokio::sync::watch::Receiver<bool>,
    /// What the CNI plugin said of the pods it asked to enrol.
    pub(super) cni_given: HashMap<WorkloadKey, crate::cni::Given>,
    /// CNI ADDs waiting for their pod to be known.
    pub(super) parked: Vec<crate::cni::Parked>,
    /// The pins went and could not be put back (said once).
    pub(super) pins_lost: bool,
}

impl Agent {
    /// The first snapshot without Kubernetes: every pod must enrol, or the
    /// start fails (the operator sees a bad registry at once).
    pub(super) fn start(&mut self, docs: SourceDocs) -> Result<(), Error> {
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
    pub(super) fn update(&mut self, change: Result<SourceDocs, Rejection>) {
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
    pub(super) fn enrol(&mut self, w: &Arc<Workload>) -> Result<Enrolled, Error> {
        let mut resolved = (**w).clone();
        if resolved.ips.is_empty() {
            return Err(Error::Enrol(pod::Error::NoAddress { pod: w.key() }));
        }
        if resolved.netns.as_os_str().is_empty()
            && let Some(given) = self.given_netns(w)
        {
            resolved.netns = given.to_path_buf();
        }
        if resolved.netns.as_os_str().is_empty() || resolved.cgroup.as_os_str().is_empty() {
            let Some(uid) = resolved.uid.clone() else {
                return Err(Error::Enrol(pod::Error::NoPaths { pod: w.key() }));
            };
            let discover_err = |source| {
                Error::Enrol(pod::Error::Discover {
                    pod: w.key(),
                    source,
                })
            };
            let root = &self.ctx.config.cgroup_root;
            if resolved.netns.as_os_str().is_empty() {
                let (cgroup, netns) = discover::pod(root, &uid).map_err(discover_err)?;
                resolved.cgroup = cgroup;
                resolved.netns = netns;
            } else if resolved.cgroup.as_os_str().is_empty() {
                resolved.cgroup = discover::cgroup(root, &uid).map_err(discover_err)?;
            }
        }
        let handed = self
            .handed
            .remove(&w.key().to_string())
            .map(|listeners| pod::Handed {
                listeners,
                gate: self.gate.clone(),
            });
        let p = pod::enrol(resolved, handed, &mut self.loaded, &self.ctx)?;
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
            .map(|w| (w.key(), self.effective(w)))
            .collect();
        self.cni_given.retain(|k, _| desired.contains_key(k));
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
                    if matches!(e, Error::Enrol(pod::Error::NoAddress { .. })) {
                        // A pod starting: its addresses come with the CNI
                        // plugin's ADD, or its status.
                        tracing::debug!("{msg}");
                    } else if self.pending.get(&k) != Some(&msg) {
                        // Logged once per distinct reason, not on every retry.
                        tracing::error!("{msg}");
                        self.ctx.metrics.enrol_failed();
                    }
                    self.pending.insert(k, msg);
                }
            }
        }
        self.publish();
    }

    /// Puts the pins back if they went (bpffs remounted, or the directory
    /// removed): capture never stopped — this process holds the maps,
    /// programs and links — but a successor, or `uninstall`, finds the
    /// node's state by its pins. Checked on every tick (one `stat` per map).
    pub(super) fn restore_pins(&mut self) {
        if self.loaded.pins_present() {
            self.pins_lost = false;
            return;
        }
        let dir = self.loaded.pin_dir().display().to_string();
        let repinned = self.loaded.repin_maps().and_then(|maps| {
            let mut links = 0;
            for p in self.pods.values_mut() {
                links += p.pod.repin()?;
            }
            Ok((maps, links))
        });
        match repinned {
            Ok((maps, links)) => {
                tracing::warn!(pin_dir = %dir, maps, links, "the pins were gone (bpffs remounted, or the directory removed); capture never stopped, and every map and link is pinned again");
                self.pins_lost = false;
            }
            Err(e) if !self.pins_lost => {
                tracing::error!(pin_dir = %dir, "the pins are gone and cannot be put back: {e}. Capture goes on while this agent runs, but a restart or an upgrade will not find this node's state; remount bpffs there");
                self.pins_lost = true;
            }
            Err(_) => {}
        }
    }

    /// Tries the pods that could not be enrolled again.
    pub(super) fn retry_pending(&mut self) {
        if !self.pending.is_empty() {
            self.reconcile();
        }
    }

    /// Refreshes `/config_dump` and the workload gauge.
    pub(super) fn publish(&self) {
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
            "version": crate::BUILD,
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

    /// Every socket to hand to the next agent: the endpoints and each
    /// pod's listeners.
    pub(super) fn offer(&self, endpoints: &[(SocketAddr, OwnedFd)]) -> Vec<Offered> {
        let endpoints = endpoints.iter().filter_map(|(addr, fd)| {
            Some(Offered {
                msg: handover::wire::Message::Endpoint { addr: *addr },
                fds: vec![fd.try_clone().ok()?],
            })
        });
        let pods = self.pods.values().filter_map(|p| {
            p.pod
                .offer()
                .inspect_err(|e| tracing::warn!(pod = %p.desired.key(), "cannot hand over: {e}"))
                .ok()
        });
        endpoints.chain(pods).collect()
    }

    /// Detaches (or, with `keep`, keeps) every pod, tells HBONE peers
    /// GOAWAY, lets connections drain for the configured time, then cuts
    /// the rest and (without `keep`) unpins maps.
    pub(super) async fn shutdown(mut self, keep: bool) {
        for (_, p) in std::mem::take(&mut self.pods) {
            if keep {
                p.pod.keep()
            } else {
                p.pod.remove(&self.ctx)
            }
        }
        self.ctx.connections.close();
        self.ctx.draining.cancel();
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
