//! `mesh-agent analyze`: checks across resources, as `istioctl analyze`
//! makes them — a route to a subset no DestinationRule defines, a host no
//! Service or ServiceEntry serves, two VirtualServices for one host, a
//! subset that selects no endpoint, a gateway that does not exist, STRICT
//! mTLS where pods outside the mesh are known. Each message has a stable
//! code (Istio's where Istio has one) and a one-line fix.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::Serialize;

use crate::{
    documents::{self, Document, KubeObject, Parsed},
    istio::{
        Kind, Origin, Resource, Severity, Spec,
        networking::{Destination, VirtualService},
        security::MtlsMode,
    },
    snapshot::{self, Snapshot, SourceDocs, compile::fqdn},
};

/// How bad a finding is (istioctl's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub level: Level,
    /// Stable: `IST0101` (Istio's), `MESH01xx` (this data plane's own).
    pub code: &'static str,
    pub name: &'static str,
    /// `Kind namespace/name`.
    pub resource: String,
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
    /// What to change, in one line.
    pub fix: String,
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        };
        let at = if self.line == 0 {
            self.file.display().to_string()
        } else {
            format!("{}:{}", self.file.display(), self.line)
        };
        write!(
            f,
            "{level} [{}] ({} {at}) {}\n    fix: {}",
            self.code, self.resource, self.message, self.fix
        )
    }
}

const CLUSTER_DOMAIN: &str = "cluster.local";

/// Analyzes the documents of `paths` (files or directories; `-` for
/// standard input), with pods in the mesh by `dataplane_mode_label`.
pub fn paths(paths: &[PathBuf], dataplane_mode_label: &str) -> Vec<Message> {
    let report = documents::check::paths(paths);
    let mut parsed = Parsed::default();
    for p in paths {
        if let Ok(snapshot) = crate::watch::read(p) {
            for (file, bytes) in &snapshot {
                documents::parse_file(file, bytes, &mut parsed);
            }
        }
    }
    let mut out: Vec<Message> = report
        .problems
        .iter()
        .filter(|p| p.severity != Severity::Note)
        .map(|p| Message {
            level: if p.severity == Severity::Error {
                Level::Error
            } else {
                Level::Warning
            },
            code: if p.severity == Severity::Error {
                "IST0106"
            } else {
                "MESH0100"
            },
            name: if p.severity == Severity::Error {
                "SchemaValidationError"
            } else {
                "NotEnforced"
            },
            resource: p.resource.clone(),
            file: p.file.clone(),
            line: p.line,
            message: if p.field.is_empty() {
                p.message.clone()
            } else {
                format!("{}: {}", p.field, p.message)
            },
            fix: if p.severity == Severity::Error {
                "correct the field as the message says (see `mesh-agent validate`)".into()
            } else {
                "do not rely on it yet; see the README's list of what is enforced".into()
            },
        })
        .collect();
    if report.errors() == 0 {
        out.extend(documents_across(parsed, dataplane_mode_label));
    }
    out.sort_by(|a, b| (&a.file, a.line, a.level, a.code).cmp(&(&b.file, b.line, b.level, b.code)));
    out
}

/// The cross-resource checks of documents that validate one by one.
pub fn documents_across(parsed: Parsed, dataplane_mode_label: &str) -> Vec<Message> {
    let outside: Vec<(String, String)> = parsed
        .documents
        .iter()
        .filter_map(|d| match d {
            Document::Kube(KubeObject::Pod(p), _) => Some((
                p.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                p.metadata.name.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect();
    let source = SourceDocs {
        name: "files",
        revision: String::new(),
        documents: parsed.documents,
        notes: Vec::new(),
    };
    let settings =
        snapshot::Settings::offline("", "istio-system", CLUSTER_DOMAIN, dataplane_mode_label);
    let snap = match snapshot::build(&[&source], &settings, 1) {
        Ok(s) => s,
        Err(problems) => {
            return problems
                .into_iter()
                .map(|p| Message {
                    level: Level::Error,
                    code: "IST0106",
                    name: "SchemaValidationError",
                    resource: p.resource,
                    file: p.file,
                    line: p.line,
                    message: p.message,
                    fix: "remove the duplicate or conflicting definition".into(),
                })
                .collect();
        }
    };
    // Pods the configuration lists that are not in the mesh.
    let outside: Vec<String> = outside
        .into_iter()
        .filter(|(ns, name)| {
            !snap
                .registry
                .workloads
                .iter()
                .any(|w| w.namespace == *ns && w.name == *name)
        })
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    let mut out = Vec::new();
    let resources = |k: Kind| snap.resources.get(&k).into_iter().flatten();
    for r in resources(Kind::VirtualService) {
        if let Spec::VirtualService(vs) = &r.spec {
            virtual_service(&snap, r, vs, &mut out);
        }
    }
    conflicting_virtual_services(&snap, &mut out);
    for r in resources(Kind::DestinationRule) {
        destination_rule(&snap, r, &mut out);
    }
    for r in resources(Kind::PeerAuthentication) {
        strict_with_outside_pods(r, &outside, dataplane_mode_label, &mut out);
    }
    out
}

fn message(
    r: &Resource,
    field: &str,
    (level, code, name): (Level, &'static str, &'static str),
    message: String,
    fix: String,
) -> Message {
    Message {
        level,
        code,
        name,
        resource: r.id(),
        file: r.origin.file.clone(),
        line: line(&r.origin, field),
        message,
        fix,
    }
}

fn line(o: &Origin, field: &str) -> usize {
    o.line_of(field)
}

const NOT_FOUND: (Level, &str, &str) = (Level::Error, "IST0101", "ReferencedResourceNotFound");

/// Every destination of a VirtualService's routes, with its field path.
fn destinations(vs: &VirtualService) -> Vec<(String, &Destination)> {
    let mut out = Vec::new();
    for (i, h) in vs.http.iter().enumerate() {
        for (j, d) in h.route.iter().enumerate() {
            out.push((
                format!("spec.http[{i}].route[{j}].destination"),
                &d.destination,
            ));
        }
        if let Some(m) = &h.mirror {
            out.push((format!("spec.http[{i}].mirror"), m));
        }
    }
    let l4 = vs
        .tcp
        .iter()
        .map(|t| ("tcp", &t.route))
        .chain(vs.tls.iter().map(|t| ("tls", &t.route)));
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (kind, route) in l4 {
        let i = seen.entry(kind).or_default();
        for (j, d) in route.iter().enumerate() {
            out.push((
                format!("spec.{kind}[{i}].route[{j}].destination"),
                &d.destination,
            ));
        }
        *i += 1;
    }
    out
}

fn virtual_service(snap: &Snapshot, r: &Resource, vs: &VirtualService, out: &mut Vec<Message>) {
    let ns = &r.metadata.namespace;
    for (path, d) in destinations(vs) {
        let host = fqdn(&d.host, ns, CLUSTER_DOMAIN);
        if snap.registry.services_for_host(&host).is_empty() && !host.contains('*') {
            out.push(message(
                r,
                &format!("{path}.host"),
                NOT_FOUND,
                format!("Referenced host not found: {:?}", d.host),
                format!(
                    "add a Service or ServiceEntry for {host}, or correct the host (short names are \
                     services of the namespace {ns})"
                ),
            ));
            continue;
        }
        if !d.subset.is_empty() && snap.routes.subset_labels(&host, &d.subset).is_none() {
            out.push(message(
                r,
                &format!("{path}.subset"),
                NOT_FOUND,
                format!(
                    "Referenced host+subset in destinationrule not found: \"{}+{}\"",
                    d.host, d.subset
                ),
                format!(
                    "define subset {} in a DestinationRule for {host}, or route to a subset it defines",
                    d.subset
                ),
            ));
        }
    }
    for (i, g) in vs.gateways.iter().enumerate() {
        if g == "mesh" {
            continue;
        }
        let (gns, name) = g.split_once('/').unwrap_or((ns.as_str(), g.as_str()));
        let exists = snap
            .resources
            .get(&Kind::Gateway)
            .into_iter()
            .flatten()
            .any(|gw| gw.metadata.namespace == gns && gw.metadata.name == name);
        if !exists {
            out.push(message(
                r,
                &format!("spec.gateways[{i}]"),
                NOT_FOUND,
                format!("Referenced gateway not found: {g:?}"),
                format!("create Gateway {gns}/{name}, or correct the name (`mesh` is the sidecar-less mesh itself)"),
            ));
        }
    }
}

/// Two VirtualServices for one host inside the mesh: only the oldest
/// applies (Istio merges nothing either).
fn conflicting_virtual_services(snap: &Snapshot, out: &mut Vec<Message>) {
    let mut by_host: BTreeMap<&String, Vec<&Resource>> = BTreeMap::new();
    for (host, vss) in &snap.routes.virtual_services {
        for vs in vss.iter().filter(|v| v.for_mesh) {
            by_host.entry(host).or_default().push(&vs.resource);
        }
    }
    for (host, rs) in by_host.into_iter().filter(|(_, rs)| rs.len() > 1) {
        let names: Vec<String> = rs
            .iter()
            .map(|r| format!("{}/{}", r.metadata.namespace, r.metadata.name))
            .collect();
        for r in &rs[1..] {
            out.push(message(
                r,
                "spec.hosts",
                (Level::Error, "IST0109", "ConflictingMeshGatewayVirtualServiceHosts"),
                format!(
                    "The VirtualServices {} associated with mesh gateway define the same host {host}: \
                     only {} applies",
                    names.join(","),
                    names[0]
                ),
                "merge the conflicting VirtualServices into one".into(),
            ));
        }
    }
}

fn destination_rule(snap: &Snapshot, r: &Resource, out: &mut Vec<Message>) {
    let Spec::DestinationRule(dr) = &r.spec else {
        return;
    };
    let host = fqdn(&dr.host, &r.metadata.namespace, CLUSTER_DOMAIN);
    let services = snap.registry.services_for_host(&host);
    if services.is_empty() {
        if !host.contains('*') {
            out.push(message(
                r,
                "spec.host",
                (Level::Warning, "IST0174", "UnknownDestinationRuleHost"),
                format!(
                    "The host {} defined in the DestinationRule does not match any services in the mesh.",
                    dr.host
                ),
                format!("add a Service or ServiceEntry for {host}, or correct the host"),
            ));
        }
        return;
    }
    let endpoints: Vec<_> = services.iter().flat_map(|s| &s.endpoints).collect();
    // Only when endpoints are known: without pods or slices in the input,
    // "selects nothing" would be said of every subset.
    if endpoints.is_empty() {
        return;
    }
    for (i, s) in dr.subsets.iter().enumerate() {
        let selects = endpoints
            .iter()
            .any(|e| s.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)));
        if !selects {
            out.push(message(
                r,
                &format!("spec.subsets[{i}].labels"),
                (
                    Level::Error,
                    "IST0173",
                    "DestinationRuleSubsetNotSelectPods",
                ),
                format!(
                    "The Subset {} defined in the DestinationRule does not select any pods, which \
                     leads to 503 UH (no healthy upstream).",
                    s.name
                ),
                format!("give the subset labels {host}'s endpoints carry, or label the pods"),
            ));
        }
    }
}

/// STRICT refuses plaintext: pods outside the mesh that the configuration
/// lists can no longer reach what it covers.
fn strict_with_outside_pods(r: &Resource, outside: &[String], label: &str, out: &mut Vec<Message>) {
    let Spec::PeerAuthentication(pa) = &r.spec else {
        return;
    };
    let strict = pa.mtls.as_ref().and_then(|m| m.mode) == Some(MtlsMode::Strict);
    if !strict || outside.is_empty() {
        return;
    }
    out.push(message(
        r,
        "spec.mtls.mode",
        (
            Level::Warning,
            "MESH0101",
            "StrictMtlsWithPodsOutsideTheMesh",
        ),
        format!(
            "STRICT refuses plaintext, and {} pod(s) outside the mesh are known (e.g. {}): their \
             connections to the workloads this policy covers will be refused",
            outside.len(),
            outside[0]
        ),
        format!("enrol those pods ({label}: ambient), or keep PERMISSIVE until they are"),
    ));
}
