//! The agent's answers to the CNI plugin (see [`crate::cni`]): enrol a pod
//! the runtime is setting up, on the namespace and addresses the runtime
//! gives, before its containers start.

use std::{net::IpAddr, path::Path, sync::Arc, time::Instant};

use super::agent::Agent;
use crate::{
    cni::{self, Call, Given, Parked, PodRef, Reply, Request},
    workload::{Workload, WorkloadKey},
};

/// Whether two paths name the same network namespace (`/var/run/netns/…`
/// from the runtime and `/proc/<pid>/ns/net` found later are one).
fn same_netns(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => a == b,
    }
}

impl Agent {
    pub(super) fn cni(&mut self, call: Call) {
        let Call { request, reply } = call;
        let answer = match request {
            Request::Add { pod, ips } => match self.cni_add(&pod, &ips) {
                Some(r) => r,
                None => {
                    tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), "CNI ADD for a pod not known yet: waiting for it");
                    self.parked.push(Parked {
                        pod,
                        ips,
                        reply,
                        until: Instant::now() + cni::WAIT_FOR_POD,
                    });
                    return;
                }
            },
            Request::Del { pod } => self.cni_del(&pod),
            Request::Check { pod } => self.cni_check(&pod),
        };
        let _ = reply.send(answer);
    }

    /// Answers the ADDs waiting for their pod that can be answered now.
    pub(super) fn answer_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        for p in std::mem::take(&mut self.parked) {
            if p.reply.is_closed() {
                continue; // the plugin gave up
            }
            match self.cni_add(&p.pod, &p.ips) {
                Some(r) => {
                    let _ = p.reply.send(r);
                }
                None if now >= p.until => {
                    let reason = format!(
                        "pod {}/{} (uid {}) is not known to this agent after {:?}: its view of \
                         the cluster is behind, or the pod is gone",
                        p.pod.namespace,
                        p.pod.name,
                        p.pod.uid.as_deref().unwrap_or("?"),
                        cni::WAIT_FOR_POD
                    );
                    tracing::warn!("CNI ADD refused: {reason}");
                    let _ = p.reply.send(Reply::Failed { reason });
                }
                None => self.parked.push(p),
            }
        }
    }

    /// The pod's record in the current snapshot, if it is of this node and
    /// the same pod (UID) the runtime means.
    fn cni_workload(&self, pod: &PodRef) -> Option<Arc<Workload>> {
        let snap = self.ctx.store.load();
        let key = format!("{}/{}", pod.namespace, pod.name);
        snap.local_workloads(&self.ctx.config.node_name)
            .find(|w| w.key().to_string() == key)
            .filter(|w| match (&w.uid, &pod.uid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .cloned()
    }

    /// `None`: the pod is not known yet (ask again later).
    fn cni_add(&mut self, pod: &PodRef, ips: &[IpAddr]) -> Option<Reply> {
        if !self.started {
            return None;
        }
        let Some(w) = self.cni_workload(pod) else {
            let key = format!("{}/{}", pod.namespace, pod.name);
            let outside = self
                .ctx
                .store
                .load()
                .registry
                .outside_on_node
                .contains(&key);
            // Without Kubernetes the registry is all there is: a pod it
            // does not list is not the mesh's.
            return (outside || !self.sources.waits_for_kube).then(|| Reply::Skipped {
                reason: format!("pod {key} is not in the mesh"),
            });
        };
        let key = w.key();
        self.cni_given.insert(
            key.clone(),
            Given {
                pod: pod.clone(),
                ips: ips.to_vec(),
            },
        );
        if let Some(e) = self.pods.get(&key) {
            if same_netns(&e.pod.workload.netns, &pod.netns) {
                return Some(Reply::Done); // a repeated ADD
            }
            // A new sandbox: the old namespace's listeners go.
            if let Some(e) = self.pods.remove(&key) {
                e.pod.remove(&self.ctx);
            }
        }
        let w = self.effective(&w);
        let reply = match self.enrol(&w) {
            Ok(p) => {
                tracing::info!(pod = %key, netns = %pod.netns.display(), "enrolled at the CNI plugin's request");
                self.pending.remove(&key);
                self.pods.insert(key, p);
                Reply::Done
            }
            Err(e) => {
                tracing::error!("CNI ADD: {e}");
                self.ctx.metrics.enrol_failed();
                Reply::Failed {
                    reason: e.to_string(),
                }
            }
        };
        self.publish();
        Some(reply)
    }

    fn cni_del(&mut self, pod: &PodRef) -> Reply {
        let key = WorkloadKey::new(&pod.namespace, &pod.name);
        if self
            .cni_given
            .get(&key)
            .is_some_and(|g| g.pod.container_id == pod.container_id)
        {
            self.cni_given.remove(&key);
        }
        let enrolled_here = self
            .pods
            .get(&key)
            .is_some_and(|e| same_netns(&e.pod.workload.netns, &pod.netns));
        if enrolled_here && let Some(e) = self.pods.remove(&key) {
            // Its namespace is going: let go of it now (the listeners in it
            // would keep it alive) rather than when the pod's record goes.
            e.pod.remove(&self.ctx);
            self.pending
                .insert(key.clone(), "its sandbox was deleted (CNI DEL)".into());
            tracing::info!(pod = %key, "released at the CNI plugin's request");
            self.publish();
        }
        Reply::Done
    }

    fn cni_check(&self, pod: &PodRef) -> Reply {
        let key = WorkloadKey::new(&pod.namespace, &pod.name);
        match self.pods.get(&key) {
            Some(e) if same_netns(&e.pod.workload.netns, &pod.netns) => Reply::Done,
            _ if self.cni_workload(pod).is_none() => Reply::Skipped {
                reason: "not in the mesh".into(),
            },
            _ => Reply::Failed {
                reason: format!("pod {key} is not enrolled on {}", pod.netns.display()),
            },
        }
    }

    /// `w` with what the runtime gave for it where its record has nothing
    /// yet (a starting pod's addresses come from the CNI plugin before its
    /// status has them).
    pub(super) fn effective(&self, w: &Arc<Workload>) -> Arc<Workload> {
        match self.cni_given.get(&w.key()) {
            Some(g) if w.ips.is_empty() && uid_matches(w, &g.pod) => {
                let mut filled = (**w).clone();
                filled.ips.clone_from(&g.ips);
                Arc::new(filled)
            }
            _ => w.clone(),
        }
    }

    /// The namespace the runtime made for `w`, if it told.
    pub(super) fn given_netns(&self, w: &Workload) -> Option<&Path> {
        self.cni_given
            .get(&w.key())
            .filter(|g| uid_matches(w, &g.pod))
            .map(|g| g.pod.netns.as_path())
    }
}

fn uid_matches(w: &Workload, pod: &PodRef) -> bool {
    match (&w.uid, &pod.uid) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}
