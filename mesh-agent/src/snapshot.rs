//! The configuration snapshot: everything the sources say, validated,
//! merged and compiled once into one immutable, versioned value. The agent
//! swaps snapshots atomically; each connection takes the current one when
//! it starts and keeps it for its lifetime, so a reload never changes the
//! rules under a connection in flight.

pub mod compile;
mod telemetry;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::{
    documents::Document,
    istio::{Kind, Problem, Resource, Severity, Spec},
    policy::{
        PeerAuthentications,
        authz::{self, WorkloadAuthz},
        jwks::JwksStore,
        jwt::{self, Authenticator},
        peer_auth::Effective,
        rate_limit::{FilterLimits, Limiter, Limiters, Unit},
    },
    registry::{self, Registry, protocol::Protocol},
    workload::{Workload, WorkloadKey},
};

/// What one source currently provides.
#[derive(Debug, Clone, Default)]
pub struct SourceDocs {
    /// `files` or `kubernetes`.
    pub name: &'static str,
    /// Changes whenever the content does (a content hash, resource versions).
    pub revision: String,
    pub documents: Vec<Document>,
    /// Findings that did not refuse anything (fields not yet enforced…).
    pub notes: Vec<Problem>,
}

/// What a snapshot's sources were, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub name: &'static str,
    pub revision: String,
    pub documents: usize,
}

/// Settings the snapshot is compiled against.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub root_namespace: String,
    pub cluster_domain: String,
    /// The label that enrols pods (`--dataplane-mode-label`).
    pub dataplane_mode_label: String,
    /// The remote JWK sets RequestAuthentications name, shared by every
    /// snapshot so that a reload does not refetch them.
    pub jwks: Arc<JwksStore>,
    /// How long a JWKS fetch may take.
    pub jwks_timeout: std::time::Duration,
    /// The rate-limit buckets, kept across snapshots.
    pub limiters: Arc<Limiters>,
}

impl Settings {
    /// Settings with a JWKS store that never fetches ahead of use (for
    /// offline tools and tests).
    pub fn offline(
        node_name: &str,
        root_namespace: &str,
        cluster_domain: &str,
        dataplane_mode_label: &str,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            root_namespace: root_namespace.into(),
            cluster_domain: cluster_domain.into(),
            dataplane_mode_label: dataplane_mode_label.into(),
            jwks: Arc::new(JwksStore::offline()),
            jwks_timeout: std::time::Duration::from_secs(5),
            limiters: Arc::default(),
        }
    }
}

/// Policies that apply to one workload of this node, resolved once.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPolicies {
    pub peer_authentication: Effective,
    /// The AuthorizationPolicies that apply, in evaluation order.
    #[serde(skip_serializing_if = "is_empty_authz")]
    pub authorization: Arc<WorkloadAuthz>,
    /// The JWT rules of the RequestAuthentications that apply.
    #[serde(skip_serializing_if = "is_empty_jwt")]
    pub request_authentication: Arc<Authenticator>,
    /// The protocols its ports are declared with by the Services that
    /// select it (absent: not declared, detected from the first bytes).
    #[serde(skip_serializing_if = "is_empty_map")]
    pub port_protocols: Arc<BTreeMap<u16, Protocol>>,
    /// Its local rate limits (EnvoyFilter), each with its own bucket.
    #[serde(skip_serializing_if = "is_empty_limits")]
    pub rate_limits: Arc<Vec<Arc<Limiter>>>,
    /// `Kind namespace/name` of each policy that selects the workload.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub telemetry: Vec<String>,
    /// Its Telemetry `accessLogging`, merged in Istio's order.
    #[serde(skip)]
    pub access_logging: Arc<crate::telemetry::accesslog::LogPlan>,
    /// Its Telemetry `tracing`.
    #[serde(skip)]
    pub tracing: Arc<crate::telemetry::trace::TracePlan>,
}

fn is_empty_authz(a: &Arc<WorkloadAuthz>) -> bool {
    a.is_empty()
}

fn is_empty_jwt(a: &Arc<Authenticator>) -> bool {
    a.is_empty()
}

fn is_empty_map(m: &Arc<BTreeMap<u16, Protocol>>) -> bool {
    m.is_empty()
}

fn is_empty_limits(l: &Arc<Vec<Arc<Limiter>>>) -> bool {
    l.is_empty()
}

/// What the destination's agent decides a connection to one workload
/// with.
#[derive(Debug, Clone)]
pub struct InboundPolicy {
    pub authorization: Arc<WorkloadAuthz>,
    pub request_authentication: Arc<Authenticator>,
    pub port_protocols: Arc<BTreeMap<u16, Protocol>>,
    pub rate_limits: Arc<Vec<Arc<Limiter>>>,
    pub access_logging: Arc<crate::telemetry::accesslog::LogPlan>,
    pub tracing: Arc<crate::telemetry::trace::TracePlan>,
}

impl InboundPolicy {
    /// Whether HTTP connections are decided per request (some policy
    /// needs the request, a RequestAuthentication or a request rate limit
    /// applies).
    pub fn per_request(&self) -> bool {
        self.authorization.per_request
            || !self.request_authentication.is_empty()
            || self.limits(Unit::Requests).next().is_some()
    }

    /// The rate limits counting `unit`.
    pub fn limits(&self, unit: Unit) -> impl Iterator<Item = &Limiter> {
        self.rate_limits
            .iter()
            .map(|l| &**l)
            .filter(move |l| l.limit.unit == unit)
    }

    /// The request limits of a request to `port`: the per-route ones of
    /// its vhost (`inbound|http|PORT`) if any, else the filter's own — a
    /// route's `typed_per_filter_config` replaces the filter's
    /// configuration in Envoy, it does not add to it.
    pub fn request_limits(&self, port: u16) -> impl Iterator<Item = &Limiter> {
        let per_route = self
            .limits(Unit::Requests)
            .any(|l| l.limit.port == Some(port));
        self.limits(Unit::Requests)
            .filter(move |l| match l.limit.port {
                Some(p) => p == port,
                None => !per_route,
            })
    }
}

/// One immutable, compiled configuration.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// 1 for the first configuration applied, +1 for each one after.
    pub version: u64,
    #[serde(serialize_with = "rfc3339")]
    pub applied_at: SystemTime,
    pub sources: Vec<SourceStatus>,
    /// Istio resources by kind, oldest first.
    pub resources: BTreeMap<Kind, Vec<Arc<Resource>>>,
    pub registry: Registry,
    pub routes: compile::Routes,
    pub peer_authentications: PeerAuthentications,
    /// Every AuthorizationPolicy and JWT rule, compiled once.
    #[serde(skip)]
    pub authorization_policies: Vec<Arc<authz::Policy>>,
    #[serde(skip)]
    pub jwt_rules: Vec<Arc<jwt::Rule>>,
    #[serde(skip)]
    pub rate_limit_filters: Vec<FilterLimits>,
    #[serde(skip)]
    pub limiters: Arc<Limiters>,
    #[serde(skip)]
    pub root_namespace: String,
    /// For each workload on this node.
    pub policies: BTreeMap<WorkloadKey, WorkloadPolicies>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Problem>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

impl Snapshot {
    /// The configuration before any source has been read.
    pub fn empty(settings: &Settings) -> Self {
        Self {
            version: 0,
            applied_at: SystemTime::now(),
            sources: Vec::new(),
            resources: BTreeMap::new(),
            registry: Registry::default(),
            routes: compile::Routes::default(),
            peer_authentications: PeerAuthentications::empty(&settings.root_namespace),
            authorization_policies: Vec::new(),
            jwt_rules: Vec::new(),
            rate_limit_filters: Vec::new(),
            limiters: settings.limiters.clone(),
            root_namespace: settings.root_namespace.clone(),
            policies: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    /// The PeerAuthentication mode in force for a workload of this node.
    pub fn peer_authentication(&self, w: &Workload) -> Effective {
        match self.policies.get(&w.key()) {
            Some(p) => p.peer_authentication.clone(),
            // Not indexed (enrolled from an older snapshot): resolve now.
            None => self.peer_authentications.effective(w),
        }
    }

    /// What the destination's agent decides connections to `w` with.
    /// The access logging and tracing of a local workload.
    fn telemetry(&self, w: &Workload) -> telemetry::WorkloadTelemetry {
        match self.policies.get(&w.key()) {
            Some(p) => telemetry::WorkloadTelemetry {
                access_logging: p.access_logging.clone(),
                tracing: p.tracing.clone(),
            },
            // Not indexed (enrolled from an older snapshot): resolve now.
            None => telemetry::Plans::default().of(
                self.resources
                    .get(&Kind::Telemetry)
                    .map_or(&[][..], |v| v.as_slice()),
                w,
                &self.root_namespace,
            ),
        }
    }

    /// The access logging of a local workload (Telemetry, MeshConfig).
    pub fn access_logging(&self, w: &Workload) -> Arc<crate::telemetry::accesslog::LogPlan> {
        self.telemetry(w).access_logging
    }

    /// The tracing of a local workload (Telemetry, MeshConfig).
    pub fn tracing(&self, w: &Workload) -> Arc<crate::telemetry::trace::TracePlan> {
        self.telemetry(w).tracing
    }

    pub fn inbound_policy(&self, w: &Workload) -> InboundPolicy {
        match self.policies.get(&w.key()) {
            Some(p) => InboundPolicy {
                authorization: p.authorization.clone(),
                request_authentication: p.request_authentication.clone(),
                port_protocols: p.port_protocols.clone(),
                rate_limits: p.rate_limits.clone(),
                access_logging: p.access_logging.clone(),
                tracing: p.tracing.clone(),
            },
            // Not indexed (enrolled from an older snapshot): resolve now.
            None => {
                let telemetry = self.telemetry(w);
                InboundPolicy {
                    authorization: Arc::new(WorkloadAuthz::for_workload(
                        &self.authorization_policies,
                        w,
                        &self.root_namespace,
                    )),
                    request_authentication: Arc::new(Authenticator::for_workload(
                        &self.jwt_rules,
                        w,
                        &self.root_namespace,
                    )),
                    port_protocols: Arc::default(),
                    rate_limits: Arc::new(limiters(
                        &self.rate_limit_filters,
                        &self.limiters,
                        w,
                        &self.root_namespace,
                    )),
                    access_logging: telemetry.access_logging,
                    tracing: telemetry.tracing,
                }
            }
        }
    }

    /// The workloads this node enrols.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.registry.on_node(node)
    }
}

/// Builds the snapshot of `sources`. Errors are problems between documents
/// of different files or sources (each document was validated on its own
/// when its source read it).
pub fn build(
    sources: &[&SourceDocs],
    settings: &Settings,
    version: u64,
) -> Result<Snapshot, Vec<Problem>> {
    let docs: Vec<&Document> = sources.iter().flat_map(|s| &s.documents).collect();
    conflicts(&docs)?;
    let mut resources: BTreeMap<Kind, Vec<Arc<Resource>>> = BTreeMap::new();
    for d in &docs {
        if let Document::Istio(r) = d {
            resources
                .entry(r.kind())
                .or_default()
                .push(Arc::new(r.clone()));
        }
    }
    for rs in resources.values_mut() {
        rs.sort_by(|a, b| {
            (
                &a.metadata.creation_timestamp,
                &a.metadata.namespace,
                &a.metadata.name,
            )
                .cmp(&(
                    &b.metadata.creation_timestamp,
                    &b.metadata.namespace,
                    &b.metadata.name,
                ))
        });
    }
    let registry = registry::build(
        docs.iter().copied(),
        &registry::Settings {
            cluster_domain: settings.cluster_domain.clone(),
            dataplane_mode_label: settings.dataplane_mode_label.clone(),
            node_name: Some(settings.node_name.clone()),
        },
    );
    let all: Vec<&Arc<Resource>> = resources.values().flatten().collect();
    let routes = compile::Routes::new(all.iter().copied(), &settings.cluster_domain);
    let peer_authentications = PeerAuthentications::from_resources(
        all.iter().map(|r| r.as_ref()),
        &settings.root_namespace,
    );
    let authorization_policies: Vec<Arc<authz::Policy>> = all
        .iter()
        .filter_map(|r| authz::Policy::from_resource(r))
        .map(Arc::new)
        .collect();
    for p in &authorization_policies {
        for problem in &p.problems {
            tracing::warn!(policy = %p.id, "AuthorizationPolicy: {problem}");
        }
    }
    let jwt_rules = jwt::Authenticator::from_resources(
        all.iter().map(|r| &***r),
        &settings.jwks,
        settings.jwks_timeout,
    )
    .rules;
    let rate_limit_filters: Vec<FilterLimits> = all
        .iter()
        .filter_map(|r| FilterLimits::from_resource(r))
        .collect();
    let mut port_protocols = local_port_protocols(&registry, &settings.node_name);
    let mut telemetry_plans = telemetry::Plans::default();
    let telemetries = resources.get(&Kind::Telemetry).cloned().unwrap_or_default();
    let policies = registry
        .on_node(&settings.node_name)
        .map(|w| {
            let selecting = |kind: Kind| -> Vec<String> {
                resources
                    .get(&kind)
                    .into_iter()
                    .flatten()
                    .filter(|r| applies_to(r, w, &settings.root_namespace))
                    .map(|r| r.id())
                    .collect()
            };
            let plans = telemetry_plans.of(&telemetries, w, &settings.root_namespace);
            let p = WorkloadPolicies {
                peer_authentication: peer_authentications.effective(w),
                authorization: Arc::new(WorkloadAuthz::for_workload(
                    &authorization_policies,
                    w,
                    &settings.root_namespace,
                )),
                request_authentication: Arc::new(Authenticator::for_workload(
                    &jwt_rules,
                    w,
                    &settings.root_namespace,
                )),
                port_protocols: Arc::new(port_protocols.remove(&w.key()).unwrap_or_default()),
                rate_limits: Arc::new(limiters(
                    &rate_limit_filters,
                    &settings.limiters,
                    w,
                    &settings.root_namespace,
                )),
                telemetry: selecting(Kind::Telemetry),
                access_logging: plans.access_logging,
                tracing: plans.tracing,
            };
            (w.key(), p)
        })
        .collect();
    Ok(Snapshot {
        version,
        applied_at: SystemTime::now(),
        sources: sources
            .iter()
            .map(|s| SourceStatus {
                name: s.name,
                revision: s.revision.clone(),
                documents: s.documents.len(),
            })
            .collect(),
        resources,
        registry,
        routes,
        peer_authentications,
        authorization_policies,
        jwt_rules,
        rate_limit_filters,
        limiters: settings.limiters.clone(),
        root_namespace: settings.root_namespace.clone(),
        policies,
        notes: sources.iter().flat_map(|s| s.notes.clone()).collect(),
    })
}

/// A bucket of `w`'s own for each rate limit that applies to it.
fn limiters(
    filters: &[FilterLimits],
    store: &Limiters,
    w: &Workload,
    root_namespace: &str,
) -> Vec<Arc<Limiter>> {
    let key = w.key().to_string();
    let applying: Vec<&FilterLimits> = filters
        .iter()
        .filter(|f| f.applies_to(w, root_namespace))
        .collect();
    let mut out = Vec::new();
    for f in &applying {
        // Route `rate_limits` from the workload's other EnvoyFilters (a
        // resource's own are in its limits already).
        let others: Vec<_> = applying
            .iter()
            .filter(|g| g.id != f.id)
            .flat_map(|g| g.route_rules.iter().cloned())
            .collect();
        for (i, l) in f.limits.iter().enumerate() {
            if others.is_empty() {
                out.push(store.get(&key, &f.id, i, l));
            } else {
                let mut l = l.clone();
                l.add_route_rules(&others);
                out.push(store.get(&key, &f.id, i, &l));
            }
        }
    }
    out
}

/// The declared protocol of each port of this node's workloads, from the
/// Services whose endpoints they are: one pass over the endpoints.
fn local_port_protocols(
    registry: &Registry,
    node: &str,
) -> HashMap<WorkloadKey, BTreeMap<u16, Protocol>> {
    let mut out: HashMap<WorkloadKey, BTreeMap<u16, Protocol>> = HashMap::new();
    for svc in &registry.services {
        for e in &svc.endpoints {
            let Some(w) = e.workload.as_ref().map(|w| &w.0) else {
                continue;
            };
            if w.node.as_deref() != Some(node) {
                continue;
            }
            for sp in svc.ports.iter().filter(|p| p.protocol != Protocol::Unknown) {
                out.entry(w.key())
                    .or_default()
                    .entry(e.port_for(sp))
                    .or_insert(sp.protocol);
            }
        }
    }
    out
}

/// Whether a workload-scoped policy (selector form) applies to `w`: its
/// namespace's or the root namespace's policies without a selector, and
/// those whose selector matches in its namespace. `targetRef` policies bind
/// to gateways and services, not to a pod.
fn applies_to(r: &Resource, w: &Workload, root_namespace: &str) -> bool {
    let (selector, targeted) = match &r.spec {
        Spec::AuthorizationPolicy(s) => (
            &s.selector,
            s.target_ref.is_some() || !s.target_refs.is_empty(),
        ),
        Spec::RequestAuthentication(s) => (
            &s.selector,
            s.target_ref.is_some() || !s.target_refs.is_empty(),
        ),
        Spec::Telemetry(s) => (
            &s.selector,
            s.target_ref.is_some() || !s.target_refs.is_empty(),
        ),
        _ => return false,
    };
    if targeted {
        return false;
    }
    let ns = &r.metadata.namespace;
    match selector {
        None => ns == &w.namespace || ns == root_namespace,
        Some(sel) => {
            ns == &w.namespace
                && sel
                    .match_labels
                    .iter()
                    .all(|(k, v)| w.labels.get(k) == Some(v))
        }
    }
}

/// The same object defined twice (in two files or two sources), or two
/// workloads claiming one address.
fn conflicts(docs: &[&Document]) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    let mut seen: HashMap<String, (std::path::PathBuf, usize)> = HashMap::new();
    let mut ips: HashMap<IpAddr, String> = HashMap::new();
    let mut keys: HashSet<WorkloadKey> = HashSet::new();
    let mut conflict =
        |origin: &crate::istio::Origin, resource: String, field: &str, message: String| {
            problems.push(Problem {
                severity: Severity::Error,
                file: origin.file.clone(),
                line: origin.line,
                resource,
                field: field.into(),
                message,
            });
        };
    for d in docs {
        let (id, origin) = match d {
            Document::Istio(r) => (r.id(), &r.origin),
            Document::Kube(k, o) => (k.id(), o),
            Document::Workloads(ws, o) => {
                for w in ws {
                    if !keys.insert(w.key()) {
                        conflict(
                            o,
                            "workload registry".into(),
                            "workloads",
                            format!("{} is listed twice", w.key()),
                        );
                    }
                    for ip in &w.ips {
                        if let Some(other) = ips.insert(*ip, w.key().to_string())
                            && other != w.key().to_string()
                        {
                            conflict(
                                o,
                                "workload registry".into(),
                                "workloads",
                                format!("{ip} is the address of both {other} and {}", w.key()),
                            );
                        }
                    }
                }
                continue;
            }
        };
        match seen.get(&id) {
            Some((file, line)) => conflict(
                origin,
                id.clone(),
                "metadata.name",
                format!("defined twice (also at {}:{line})", file.display()),
            ),
            None => {
                seen.insert(id, (origin.file.clone(), origin.line));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The snapshot in force, swapped atomically.
pub struct Store {
    current: ArcSwap<Snapshot>,
    /// The version in force, for whoever must act on a change (open
    /// connections re-checking their authorization).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new(initial: Snapshot) -> Self {
        let (changed, _) = tokio::sync::watch::channel(initial.version);
        Self {
            current: ArcSwap::from_pointee(initial),
            changed,
        }
    }

    /// The current snapshot; hold the `Arc` for as long as the work it
    /// decides (a connection) lasts.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        let version = next.version;
        let old = self.current.swap(Arc::new(next));
        self.changed.send_replace(version);
        old
    }

    /// Wakes on every swap after this call.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::documents as parse;

    fn source(name: &'static str, file: &str, yaml: &str) -> SourceDocs {
        let mut out = parse::Parsed::default();
        parse::parse_file(Path::new(file), yaml.as_bytes(), &mut out);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        SourceDocs {
            name,
            revision: "r1".into(),
            documents: out.documents,
            notes: vec![],
        }
    }

    fn settings() -> Settings {
        Settings::offline(
            "node-a",
            "istio-system",
            "cluster.local",
            crate::registry::ambient::DEFAULT_LABEL,
        )
    }

    const WORKLOADS: &str = r#"
workloads:
  - {name: web, namespace: shop, ips: [10.0.0.2], netns: /n, cgroup: /c, labels: {app: web}, node: node-a}
  - {name: db, namespace: shop, ips: [10.0.0.3], netns: /n, cgroup: /c, labels: {app: db}, node: node-b}
"#;

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-only, namespace: shop}
spec: {selector: {matchLabels: {app: db}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh, namespace: istio-system}
spec: {accessLogging: [{providers: [{name: envoy}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}, weight: 90}, {destination: {host: reviews, subset: v2}, weight: 10}]}]
"#;

    #[test]
    fn merges_sources_and_indexes_policies_by_local_workload() {
        let files = source("files", "w.yaml", WORKLOADS);
        let kube = source("kubernetes", "kube", POLICIES);
        let s = build(&[&files, &kube], &settings(), 7).unwrap();
        assert_eq!(s.version, 7);
        assert_eq!(s.sources.len(), 2);
        assert_eq!(s.registry.workloads.len(), 2);
        assert_eq!(
            s.policies.len(),
            1,
            "only this node's workloads are indexed"
        );
        let web = &s.policies.values().next().unwrap();
        let ids: Vec<&str> = web
            .authorization
            .policies
            .iter()
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(ids, ["shop/web-only"]);
        assert_eq!(web.telemetry, ["Telemetry istio-system/mesh"]);
        assert_eq!(
            web.peer_authentication.mode(80),
            crate::policy::MtlsMode::Strict
        );
        let vs = &s.routes.virtual_services["reviews.shop.svc.cluster.local"][0];
        assert_eq!(vs.http[0].cumulative_weights, [90, 100]);
        let dump = serde_json::to_value(&s).unwrap();
        assert_eq!(dump["version"], 7);
        assert_eq!(
            dump["resources"]["VirtualService"][0]["metadata"]["name"],
            "reviews"
        );
    }

    #[test]
    fn conflicts_between_files_are_refused() {
        let a = source("files", "a.yaml", POLICIES);
        let b = source(
            "files",
            "b.yaml",
            &POLICIES[..POLICIES.find("---").unwrap()],
        );
        let e = build(&[&a, &b], &settings(), 1).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_string(),
            "b.yaml:2: error: PeerAuthentication istio-system/default: metadata.name: defined twice (also at a.yaml:2)"
        );
        let w2 = source(
            "files",
            "w2.yaml",
            &WORKLOADS.replace("name: web", "name: web2"),
        );
        let w = source("files", "w.yaml", WORKLOADS);
        let e = build(&[&w, &w2], &settings(), 1).unwrap_err();
        assert!(
            e[0].message
                .contains("10.0.0.2 is the address of both shop/web and shop/web2"),
            "{e:?}"
        );
    }

    #[test]
    fn the_store_swaps_whole_snapshots() {
        let store = Store::new(Snapshot::empty(&settings()));
        let held = store.load();
        let files = source("files", "w.yaml", WORKLOADS);
        store.swap(build(&[&files], &settings(), 1).unwrap());
        assert_eq!(held.version, 0, "a holder keeps the snapshot it took");
        assert_eq!(store.load().version, 1);
        assert_eq!(store.load().registry.workloads.len(), 2);
    }
}
