//! The Kubernetes source: kube-rs watchers for the Pods of this node
//! (field selector `spec.nodeName`), the Pods of other nodes (their
//! identities, for HBONE), Services, EndpointSlices, Namespaces and the
//! Istio API groups.
//!
//! kube-runtime's watcher lists, then watches from the list's resource
//! version; on `410 Gone` it lists again, on a dropped stream it watches
//! again from the last version it saw, and errors back off exponentially
//! (0.8 s doubling to 30 s). Each relist replaces that kind's objects
//! atomically, so deletions missed while disconnected are not kept.
//!
//! Objects are validated one by one as they arrive: an invalid one is
//! rejected (logged, counted) and its previous version stays in force. No
//! configuration is published until every kind has been listed once, so
//! the agent never runs with half of the cluster's policies.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::Notify;

use crate::{
    documents::{self as parse, Document, KubeObject, Parsed, check},
    istio::{Kind, Origin, Problem, Severity},
    snapshot::SourceDocs,
    telemetry::metrics::Metrics,
};

pub const NAME: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot configure the Kubernetes client (in a pod: its service account; elsewhere: \
         KUBECONFIG or ~/.kube/config): {0}"
    )]
    Config(#[source] kube::Error),
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The node an agent runs on: its pods are watched by field selector.
    /// `None` (the CA): every pod, in one watch.
    pub node_name: Option<String>,
    /// With a node: also watch the pods of other nodes (their identities
    /// and labels).
    pub remote_pods: bool,
}

/// One watched resource: its objects and how the watch is going.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct KindState {
    #[serde(skip)]
    objects: BTreeMap<String, Document>,
    #[serde(skip)]
    listing: Option<BTreeMap<String, Document>>,
    /// Listed at least once (or found not to exist: an Istio CRD that is
    /// not installed counts as empty).
    synced: bool,
    count: usize,
    lists: u64,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    /// Objects refused, by `namespace/name`, with why.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    rejected: BTreeMap<String, Vec<String>>,
}

#[derive(Default)]
struct State {
    kinds: BTreeMap<&'static str, KindState>,
    /// +1 on every change: the source's revision.
    generation: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    metrics: Arc<Metrics>,
}

/// The running watchers.
pub struct KubeSource {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// What becomes of one object.
// Lives for one event; see `parse::Document` on the variant sizes.
#[allow(clippy::large_enum_variant)]
enum Converted {
    Keep(Document),
    /// Not for us (a pod of another node on this node's watch, a pod
    /// without an address yet): treated as absent.
    Absent,
    Rejected(Vec<Problem>),
}

/// The client for the cluster the agent runs in (or KUBECONFIG's).
pub async fn client() -> Result<Client, Error> {
    Client::try_default().await.map_err(Error::Config)
}

/// This node's locality from its Node object's labels, as
/// `region/zone/subzone` (`topology.kubernetes.io/region` and `zone`,
/// Istio's `topology.istio.io/subzone`); `None` when it has no region.
pub async fn node_locality(client: &Client, node: &str) -> Result<Option<String>, kube::Error> {
    let n = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(locality_from_labels(&n.metadata.labels.unwrap_or_default()))
}

fn locality_from_labels(labels: &BTreeMap<String, String>) -> Option<String> {
    let region = labels.get("topology.kubernetes.io/region")?;
    let label = |k: &str| labels.get(k).map(String::as_str).unwrap_or_default();
    let l = format!(
        "{region}/{}/{}",
        label("topology.kubernetes.io/zone"),
        label("topology.istio.io/subzone")
    );
    Some(l.trim_end_matches('/').to_owned())
}

/// `--locality` from this node's Node object, when not given: a DaemonSet
/// cannot put a node's labels in its pods' environment, and locality-aware
/// load balancing needs it. Asked a few times (an API server that is
/// briefly away at node boot must not cost the agent its locality for
/// life; the watches wait for it anyway); a node that cannot be read (no
/// `get` on nodes) leaves the locality unknown, said once, not fatal.
pub async fn with_node_locality(
    config: Arc<crate::config::Config>,
    client: &Client,
) -> Arc<crate::config::Config> {
    let node = config.node_name.as_str();
    if node.is_empty() {
        return config;
    }
    let mut wait = std::time::Duration::from_millis(500);
    let mut attempt = 1;
    let result = loop {
        match node_locality(client, node).await {
            Err(e) if attempt < LOCALITY_ATTEMPTS && !is_refusal(&e) => {
                tracing::debug!(node, attempt, "cannot read the node yet: {e}");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            other => break other,
        }
    };
    match result {
        Ok(Some(locality)) => {
            tracing::info!(node, %locality, "locality from the node's topology labels");
            let mut with = (*config).clone();
            with.locality = locality;
            Arc::new(with)
        }
        Ok(None) => {
            tracing::info!(
                node,
                "the node has no topology.kubernetes.io/region label: locality unknown"
            );
            config
        }
        Err(e) => {
            tracing::warn!(
                node,
                "cannot read the node's topology labels: {e} (locality unknown; set --locality)"
            );
            config
        }
    }
}

/// Tries of the Node read: 0.5 + 1 + 2 + 4 s between them.
const LOCALITY_ATTEMPTS: u32 = 5;

/// An answer that will not change by asking again (forbidden, not found).
fn is_refusal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if (400..500).contains(&r.code))
}

impl KubeSource {
    /// Starts every watcher.
    pub fn start(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            changed: Notify::new(),
            metrics,
        });
        let Some(node) = settings.node_name.clone() else {
            return Self::start_cluster_wide(client, shared);
        };
        let mut tasks = Vec::new();
        let local = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let this_node = node.clone();
        tasks.push(spawn(
            shared.clone(),
            "Pod (this node)",
            Api::<Pod>::all(client.clone()),
            local,
            move |p: Pod| {
                let node = &this_node;
                let on = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                if on != Some(node.as_str()) {
                    // The field selector should have kept it out.
                    tracing::warn!(pod = %key(&p), node = ?on, "Kubernetes returned a pod of another node on this node's watch; ignored");
                    return Converted::Absent;
                }
                pod(p)
            },
        ));
        if settings.remote_pods {
            let others = watcher::Config::default().fields(&format!("spec.nodeName!={node}"));
            tasks.push(spawn(
                shared.clone(),
                "Pod (other nodes)",
                Api::<Pod>::all(client.clone()),
                others,
                move |p: Pod| {
                    if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()) {
                        return Converted::Absent; // the other watch has it
                    }
                    pod(p)
                },
            ));
        }
        Self::start_common(client, shared, tasks)
    }

    /// Every pod in one watch (placement, for the CA), and the rest as for
    /// an agent.
    fn start_cluster_wide(client: Client, shared: Arc<Shared>) -> Self {
        let tasks = vec![spawn(
            shared.clone(),
            "Pod",
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            pod,
        )];
        Self::start_common(client, shared, tasks)
    }

    fn start_common(
        client: Client,
        shared: Arc<Shared>,
        mut tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        tasks.push(spawn(
            shared.clone(),
            "Namespace",
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            |mut n: Namespace| {
                n.metadata.managed_fields = None;
                let o = origin("Namespace", &n);
                Converted::Keep(Document::Kube(KubeObject::Namespace(Box::new(n)), o))
            },
        ));
        tasks.push(spawn(
            shared.clone(),
            "Service",
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            |mut s: Service| {
                s.metadata.managed_fields = None;
                s.status = None;
                let o = origin("Service", &s);
                Converted::Keep(Document::Kube(KubeObject::Service(Box::new(s)), o))
            },
        ));
        tasks.push(spawn(
            shared.clone(),
            "EndpointSlice",
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            |mut s: EndpointSlice| {
                s.metadata.managed_fields = None;
                let o = origin("EndpointSlice", &s);
                Converted::Keep(Document::Kube(KubeObject::EndpointSlice(Box::new(s)), o))
            },
        ));
        for kind in Kind::ALL {
            // The newest version each kind is served at (EnvoyFilter has
            // only v1alpha3).
            let gvk = GroupVersionKind::gvk(kind.group(), kind.versions()[0], kind.name());
            let ar = ApiResource::from_gvk_with_plural(&gvk, &kind.plural());
            let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
            let api_version = ar.api_version.clone();
            tasks.push(spawn(
                shared.clone(),
                kind.name(),
                api,
                watcher::Config::default(),
                move |o: DynamicObject| istio(kind, &api_version, o),
            ));
        }
        Self { shared, tasks }
    }

    /// Waits until something changed.
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// The current objects, once every kind has been listed.
    pub fn docs(&self) -> Option<SourceDocs> {
        let state = self.shared.state.lock().expect("kube state lock");
        if state.kinds.len() < self.tasks.len() || !state.kinds.values().all(|k| k.synced) {
            return None;
        }
        Some(SourceDocs {
            name: NAME,
            revision: state.generation.to_string(),
            documents: state
                .kinds
                .values()
                .flat_map(|k| k.objects.values().cloned())
                .collect(),
            notes: Vec::new(),
        })
    }

    /// How each watch is going, for `/config_dump`.
    pub fn status(&self) -> serde_json::Value {
        let state = self.shared.state.lock().expect("kube state lock");
        serde_json::to_value(&state.kinds).unwrap_or_default()
    }
}

fn key<K: Resource>(o: &K) -> String {
    let m = o.meta();
    match &m.namespace {
        Some(ns) => format!("{ns}/{}", m.name.as_deref().unwrap_or_default()),
        None => m.name.clone().unwrap_or_default(),
    }
}

fn origin<K: Resource>(kind: &str, o: &K) -> Origin {
    Origin::object(&format!("{NAME}:{kind}/{}", key(o)))
}

/// A Pod reduced to what the registry reads (a cluster's pods add up).
fn pod(p: Pod) -> Converted {
    let spec = p.spec.unwrap_or_default();
    let status = p.status.unwrap_or_default();
    let slim = Pod {
        metadata: kube::api::ObjectMeta {
            name: p.metadata.name,
            namespace: p.metadata.namespace,
            uid: p.metadata.uid,
            labels: p.metadata.labels,
            // Only those the agent reads.
            annotations: p.metadata.annotations.map(|mut a| {
                a.retain(|k, _| k == crate::workload::FAIL_OPEN_ANNOTATION);
                a
            }),
            creation_timestamp: p.metadata.creation_timestamp,
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            containers: Vec::new(),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..Default::default()
        }),
    };
    // Istio's data-plane pods are kept (istio-cni runs on the host's
    // network): they show where Istio ambient already captures pods.
    if crate::registry::pod::workload(&slim).is_none()
        && crate::registry::ambient::istio_dataplane(&slim).is_none()
    {
        return Converted::Absent;
    }
    let o = origin("Pod", &slim);
    Converted::Keep(Document::Kube(KubeObject::Pod(Box::new(slim)), o))
}

/// An Istio custom resource, validated as `mesh-agent validate` would.
fn istio(kind: Kind, api_version: &str, o: DynamicObject) -> Converted {
    let mut value = serde_json::to_value(&o).unwrap_or_default();
    // List items may come without their type; the watch said what it is.
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.name().into();
    if let Some(m) = value["metadata"].as_object_mut() {
        m.remove("managedFields");
    }
    let mut parsed = Parsed::default();
    parse::classify(value, origin(kind.name(), &o), &mut parsed);
    let problems = check::documents(&parsed);
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Converted::Rejected(problems);
    }
    match parsed.documents.pop() {
        Some(d) => Converted::Keep(d),
        None => Converted::Rejected(problems),
    }
}

fn spawn<K, F>(
    shared: Arc<Shared>,
    name: &'static str,
    api: Api<K>,
    config: watcher::Config,
    convert: F,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(K) -> Converted + Send + 'static,
{
    shared
        .state
        .lock()
        .expect("kube state lock")
        .kinds
        .entry(name)
        .or_default();
    tokio::spawn(async move {
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            let changed = {
                let mut state = shared.state.lock().expect("kube state lock");
                let State { kinds, generation } = &mut *state;
                let k = kinds.entry(name).or_default();
                let changed = apply(name, k, ev, &convert, &shared.metrics);
                k.count = k.objects.len();
                if changed {
                    *generation += 1;
                }
                changed
            };
            if changed {
                shared.changed.notify_one();
            }
        }
    })
}

/// Folds one watch event into a kind's state; true when its objects changed.
fn apply<K: Resource, F: Fn(K) -> Converted>(
    name: &str,
    k: &mut KindState,
    ev: Result<watcher::Event<K>, watcher::Error>,
    convert: &F,
    metrics: &Metrics,
) -> bool {
    use watcher::Event;
    let take = |k: &mut KindState, o: K| -> (String, Option<Document>) {
        let id = key(&o);
        match convert(o) {
            Converted::Keep(d) => {
                k.rejected.remove(&id);
                (id, Some(d))
            }
            Converted::Absent => {
                k.rejected.remove(&id);
                (id, None)
            }
            Converted::Rejected(problems) => {
                metrics.config_rejected(NAME);
                let errors: Vec<String> = problems
                    .iter()
                    .filter(|p| p.severity == Severity::Error)
                    .map(ToString::to_string)
                    .collect();
                tracing::error!(kind = name, object = %id, "rejected, its previous version (if any) stays in force:\n  {}", errors.join("\n  "));
                k.rejected.insert(id.clone(), errors);
                // Keep what was there.
                (id.clone(), k.objects.get(&id).cloned())
            }
        }
    };
    match ev {
        Ok(Event::Init) => {
            k.listing = Some(BTreeMap::new());
            false
        }
        Ok(Event::InitApply(o)) => {
            let (id, d) = take(k, o);
            if let (Some(d), Some(l)) = (d, k.listing.as_mut()) {
                l.insert(id, d);
            }
            false
        }
        Ok(Event::InitDone) => {
            if let Some(l) = k.listing.take() {
                k.objects = l;
            }
            k.synced = true;
            k.lists += 1;
            k.last_error = None;
            tracing::debug!(kind = name, objects = k.objects.len(), "listed");
            true
        }
        Ok(Event::Apply(o)) => {
            let (id, d) = take(k, o);
            match d {
                Some(d) => k.objects.insert(id, d),
                None => k.objects.remove(&id),
            };
            true
        }
        Ok(Event::Delete(o)) => {
            let id = key(&o);
            k.rejected.remove(&id);
            k.objects.remove(&id).is_some()
        }
        Err(e) => {
            k.errors += 1;
            metrics.kube_watch_error(name);
            let msg = e.to_string();
            let missing = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
            if k.last_error.as_deref() != Some(msg.as_str()) {
                if missing {
                    tracing::warn!(
                        kind = name,
                        "not served by the API server (CRD not installed?): treated as empty until it is"
                    );
                } else {
                    tracing::warn!(kind = name, "watch error (retrying with backoff): {msg}");
                }
            }
            k.last_error = Some(msg);
            if missing && !k.synced {
                k.synced = true;
                return true;
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_comes_from_the_topology_labels() {
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let l = labels(&[
            ("topology.kubernetes.io/region", "eu-west-1"),
            ("topology.kubernetes.io/zone", "eu-west-1a"),
        ]);
        assert_eq!(
            locality_from_labels(&l).as_deref(),
            Some("eu-west-1/eu-west-1a")
        );
        let l = labels(&[
            ("topology.kubernetes.io/region", "r"),
            ("topology.kubernetes.io/zone", "z"),
            ("topology.istio.io/subzone", "s"),
        ]);
        assert_eq!(locality_from_labels(&l).as_deref(), Some("r/z/s"));
        assert_eq!(
            locality_from_labels(&labels(&[("topology.kubernetes.io/zone", "z")])),
            None
        );
    }
}
