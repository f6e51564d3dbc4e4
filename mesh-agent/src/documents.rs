//! Reading configuration documents: multi-document YAML, JSON, Kubernetes
//! `List`s; each document located (file, line of every field path) and
//! sorted into Istio resources, Kubernetes objects the registry uses, and
//! workload registries. The Istio model (`crate::istio`) knows nothing of
//! files or of the other kinds; this module brings them together.

use std::{collections::BTreeMap, path::Path};

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;
use yaml_rust2::{
    Yaml,
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::{Marker, TScalarStyle},
};

pub mod check;

use crate::{
    istio::{Kind, Meta, Origin, Problem, Resource, Severity, Spec},
    workload::Workload,
};

/// The Kubernetes objects the service registry reads.
#[derive(Debug, Clone)]
pub enum KubeObject {
    Service(Box<k8s_openapi::api::core::v1::Service>),
    EndpointSlice(Box<k8s_openapi::api::discovery::v1::EndpointSlice>),
    Endpoints(Box<k8s_openapi::api::core::v1::Endpoints>),
    Pod(Box<k8s_openapi::api::core::v1::Pod>),
    Namespace(Box<k8s_openapi::api::core::v1::Namespace>),
}

impl KubeObject {
    /// `Kind namespace/name`, as problems name it.
    pub fn id(&self) -> String {
        let (kind, meta) = match self {
            KubeObject::Service(o) => ("Service", &o.metadata),
            KubeObject::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            KubeObject::Endpoints(o) => ("Endpoints", &o.metadata),
            KubeObject::Pod(o) => ("Pod", &o.metadata),
            KubeObject::Namespace(o) => {
                return format!(
                    "Namespace {}",
                    o.metadata.name.as_deref().unwrap_or_default()
                );
            }
        };
        format!(
            "{kind} {}/{}",
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default()
        )
    }
}

/// One configuration document.
// Built once per configuration change and moved a handful of times: the
// size difference between variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Document {
    Istio(Resource),
    Kube(KubeObject, Origin),
    /// A workload registry (`workloads: […]`, the agent's own format).
    Workloads(Vec<Workload>, Origin),
}

impl Document {
    /// The Istio resource, if this document is one.
    pub fn istio(&self) -> Option<&Resource> {
        match self {
            Document::Istio(r) => Some(r),
            _ => None,
        }
    }
}

/// Everything read from a source: documents, and problems found on the way.
#[derive(Debug, Default)]
pub struct Parsed {
    pub documents: Vec<Document>,
    pub problems: Vec<Problem>,
}

/// Reads every file of a source snapshot.
pub fn parse_snapshot(snapshot: &crate::watch::Snapshot) -> Parsed {
    let mut out = Parsed::default();
    for (file, bytes) in snapshot {
        parse_file(file, bytes, &mut out);
    }
    out
}

/// Reads one file (YAML, possibly several documents, or JSON).
pub fn parse_file(file: &Path, bytes: &[u8], out: &mut Parsed) {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return out
                .problems
                .push(file_problem(file, 1, format!("not UTF-8: {e}")));
        }
    };
    let mut b = Builder::default();
    if let Err(e) = Parser::new_from_str(text).load(&mut b, true) {
        let m = e.marker();
        return out.problems.push(file_problem(
            file,
            m.line(),
            format!("YAML syntax: {}", e.info()),
        ));
    }
    if let Some(line) = b.too_deep {
        return out.problems.push(file_problem(
            file,
            line,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    for doc in b.docs {
        let mut lines = BTreeMap::new();
        let mut budget = MAX_ALIASED;
        let value = to_json(
            &doc,
            String::new(),
            &mut lines,
            &b.anchors,
            &mut budget,
            false,
        );
        if budget == 0 {
            out.problems.push(file_problem(
                file,
                doc.line,
                format!(
                    "aliases expand to more than {MAX_ALIASED} values (an alias bomb?); write the \
                     values out instead"
                ),
            ));
            continue;
        }
        let origin = Origin::new(file, doc.line, lines);
        classify(value, origin, out);
    }
}

fn file_problem(file: &Path, line: usize, message: String) -> Problem {
    Problem {
        severity: Severity::Error,
        file: file.into(),
        line,
        resource: "document".into(),
        field: String::new(),
        message,
    }
}

/// Sorts one document (a JSON value) into `out`: an Istio resource, a
/// Kubernetes object, a workload registry, the items of a List, or a
/// problem.
pub fn classify(value: Value, origin: Origin, out: &mut Parsed) {
    if value.is_null() {
        return; // an empty document (`---` at the end)
    }
    let kind = value["kind"].as_str().unwrap_or_default().to_owned();
    let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
    if kind == "List" || kind.ends_with("List") && value["items"].is_array() {
        for (i, item) in value["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            classify(item, origin.item(i), out);
        }
        return;
    }
    if kind.is_empty() && value.get("workloads").is_some() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Registry {
            #[serde(default)]
            workloads: Vec<Workload>,
        }
        match typed::<Registry>(value) {
            Ok(r) => {
                let bad = crate::workload::problems(&r.workloads);
                for (path, msg) in &bad {
                    out.problems
                        .push(problem(&origin, "workload registry", path, msg.clone()));
                }
                if bad.is_empty() {
                    out.documents.push(Document::Workloads(r.workloads, origin));
                }
            }
            Err((path, msg)) => {
                out.problems
                    .push(problem(&origin, "workload registry", &path, msg))
            }
        }
        return;
    }
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ns = value["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let id = if kind.is_empty() {
        "document".to_owned()
    } else {
        format!(
            "{kind} {}/{name}",
            if ns.is_empty() { "default" } else { &ns }
        )
    };
    if let Some(k) = Kind::from_name(&kind) {
        match istio_resource(k, &api_version, value, &origin) {
            Ok(r) => out.documents.push(Document::Istio(r)),
            Err(p) => out.problems.extend(p),
        }
        return;
    }
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    if group.ends_with(".istio.io") {
        return out
            .problems
            .push(istio_kind_problem(group, &kind, &id, &origin));
    }
    let kube = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => strict(value).map(|v| KubeObject::Service(Box::new(v))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            strict(value).map(|v| KubeObject::EndpointSlice(Box::new(v)))
        }
        ("v1", "Endpoints") => strict(value).map(|v| KubeObject::Endpoints(Box::new(v))),
        ("v1", "Pod") => strict(value).map(|v| KubeObject::Pod(Box::new(v))),
        ("v1", "Namespace") => strict(value).map(|v| KubeObject::Namespace(Box::new(v))),
        _ => {
            // A near miss of a kind the mesh reads is a typo, not another
            // kind: skipping it would drop the object silently.
            let read = [
                ("", "Service"),
                ("", "Endpoints"),
                ("", "Pod"),
                ("", "Namespace"),
                ("discovery.k8s.io", "EndpointSlice"),
            ];
            if let Some((_, near)) = read
                .iter()
                .filter(|(g, _)| *g == group)
                .find(|(_, k)| *k != kind && edit_distance(k, &kind) <= 2)
            {
                return out.problems.push(problem(
                    &origin,
                    &id,
                    "kind",
                    format!("unknown kind {kind:?} in {api_version}: did you mean {near}?"),
                ));
            }
            let what = if kind.is_empty() {
                "a document without apiVersion/kind".to_owned()
            } else {
                format!("{api_version} {kind}")
            };
            let note = Problem {
                severity: Severity::Note,
                ..problem(
                    &origin,
                    &id,
                    "",
                    format!("{what} is not configuration the mesh reads: skipped"),
                )
            };
            return out.problems.push(note);
        }
    };
    match kube {
        Ok(k) => out.documents.push(Document::Kube(k, origin)),
        Err((path, msg)) => out.problems.push(problem(&origin, &id, &path, msg)),
    }
}

fn istio_resource(
    kind: Kind,
    api_version: &str,
    mut value: Value,
    origin: &Origin,
) -> Result<Resource, Vec<Problem>> {
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let mut meta: Meta = serde_json::from_value(value["metadata"].take()).unwrap_or_default();
    if meta.namespace.is_empty() {
        meta.namespace = "default".into();
    }
    let id = format!("{} {}/{}", kind.name(), meta.namespace, name);
    let mut problems = Vec::new();
    if group != kind.group() || !kind.versions().contains(&version) {
        let served: Vec<String> = kind
            .versions()
            .iter()
            .map(|v| format!("{}/{v}", kind.group()))
            .collect();
        problems.push(problem(
            origin,
            &id,
            "apiVersion",
            format!(
                "{api_version:?} is not served for {}; use one of {}",
                kind.name(),
                served.join(", ")
            ),
        ));
    }
    if let Some(obj) = value.as_object() {
        for key in obj
            .keys()
            .filter(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()))
        {
            problems.push(problem(
                origin,
                &id,
                key,
                format!("unknown field `{key}` (expected apiVersion, kind, metadata, spec)"),
            ));
        }
    }
    let spec_value = value
        .get_mut("spec")
        .map(Value::take)
        .unwrap_or(Value::Object(Default::default()));
    macro_rules! typed_spec {
        ($variant:ident) => {{
            let (spec, errors) = typed_all(spec_value);
            (spec.map(Spec::$variant), errors)
        }};
    }
    let spec = match kind {
        Kind::VirtualService => typed_spec!(VirtualService),
        Kind::DestinationRule => typed_spec!(DestinationRule),
        Kind::Gateway => typed_spec!(Gateway),
        Kind::ServiceEntry => typed_spec!(ServiceEntry),
        Kind::WorkloadEntry => typed_spec!(WorkloadEntry),
        Kind::Sidecar => typed_spec!(Sidecar),
        Kind::PeerAuthentication => typed_spec!(PeerAuthentication),
        Kind::RequestAuthentication => typed_spec!(RequestAuthentication),
        Kind::AuthorizationPolicy => typed_spec!(AuthorizationPolicy),
        Kind::Telemetry => typed_spec!(Telemetry),
        Kind::EnvoyFilter => typed_spec!(EnvoyFilter),
    };
    let (spec, type_errors) = spec;
    let spec_path = |p: &str| {
        if p.is_empty() {
            "spec".to_owned()
        } else {
            format!("spec.{p}")
        }
    };
    let bad: Vec<String> = type_errors.iter().map(|(p, _)| spec_path(p)).collect();
    for (path, msg) in type_errors {
        problems.push(problem(origin, &id, &spec_path(&path), msg));
    }
    let Some(spec) = spec else {
        return Err(problems);
    };
    let resource = Resource {
        api_version: api_version.into(),
        metadata: meta,
        spec,
        origin: origin.clone(),
    };
    if problems.is_empty() {
        return Ok(resource);
    }
    // Refused either way; the checks of the fields that did parse are
    // reported too, so one run shows every problem. Fields that did not
    // parse were left out, so what the checks say about them is noise.
    problems.extend(
        crate::istio::validate::check(&resource)
            .into_iter()
            .filter(|p| !bad.iter().any(|b| within(&p.field, b))),
    );
    Err(problems)
}

/// Whether field path `p` is `parent` or under it.
fn within(p: &str, parent: &str) -> bool {
    p.strip_prefix(parent)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// At most this many type errors are reported per resource.
const MAX_TYPE_ERRORS: usize = 32;

/// Deserialises `value` as `T`, finding every field that does not fit, not
/// only the first: each one is reported, removed, and the rest tried
/// again. Returns what parsed without them, and the errors (path, reason).
fn typed_all<T: DeserializeOwned>(mut value: Value) -> (Option<T>, Vec<(String, String)>) {
    let mut errors = Vec::new();
    for _ in 0..MAX_TYPE_ERRORS {
        let e = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return (Some(t), errors),
            Err(e) => e,
        };
        let segments: Vec<Segment> = e.path().iter().cloned().collect();
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        errors.push((path, e.into_inner().to_string()));
        if !remove(&mut value, &segments) {
            break;
        }
    }
    (None, errors)
}

/// Removes the field at `path` (for a list element, the whole list, so the
/// other errors' indices stay right). False when nothing could be removed.
fn remove(value: &mut Value, path: &[Segment]) -> bool {
    let end = path
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
        .unwrap_or(usize::MAX);
    if end == usize::MAX {
        return false;
    }
    let mut v = value;
    for s in &path[..end] {
        v = match (s, v) {
            (Segment::Map { key }, Value::Object(m)) => match m.get_mut(key) {
                Some(c) => c,
                None => return false,
            },
            (Segment::Seq { index }, Value::Array(a)) => match a.get_mut(*index) {
                Some(c) => c,
                None => return false,
            },
            _ => return false,
        };
    }
    match (&path[end], v) {
        (Segment::Map { key }, Value::Object(m)) => m.remove(key).is_some(),
        _ => false,
    }
}

/// Like [`typed`], and a field the type does not know is an error too, as
/// with `kubectl apply` (k8s-openapi's types ignore unknown fields: a typo
/// would silently drop a setting).
fn strict<T: DeserializeOwned + serde::Serialize>(value: Value) -> Result<T, (String, String)> {
    let t: T = typed(value.clone())?;
    let back = serde_json::to_value(&t).unwrap_or_default();
    let mut dropped = Vec::new();
    dropped_fields(&value, &back, String::new(), &mut dropped);
    match dropped.into_iter().next() {
        None => Ok(t),
        Some(path) => {
            let name = path
                .rsplit(['.', ']'])
                .next()
                .unwrap_or_default()
                .to_owned();
            Err((path, format!("unknown field `{name}`")))
        }
    }
}

/// Paths of `input` (non-null) that are missing from `output`.
fn dropped_fields(input: &Value, output: &Value, path: String, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i.iter().filter(|(_, v)| !v.is_null()) {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    None => out.push(p),
                    Some(ov) => dropped_fields(v, ov, p, out),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (a, b)) in i.iter().zip(o).enumerate() {
                dropped_fields(a, b, format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Deserialises `value` as `T`; on failure, the field path and the reason.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })
}

fn problem(origin: &Origin, resource: &str, path: &str, message: String) -> Problem {
    Problem {
        severity: Severity::Error,
        file: origin.file.clone(),
        line: origin.line_of(path),
        resource: resource.into(),
        field: path.into(),
        message,
    }
}

// ------------------------------------------------------------ YAML with lines

/// A YAML node and the line it starts on.
#[derive(Debug, Clone)]
struct Node {
    line: usize,
    value: NodeValue,
}

#[derive(Debug, Clone)]
enum NodeValue {
    Scalar(String, TScalarStyle),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Alias(usize),
}

enum Frame {
    Seq(usize, usize, Vec<Node>),
    Map(usize, usize, Vec<(Node, Node)>, Option<Node>),
}

/// Deeper nesting than any configuration needs is refused (the tree is
/// walked recursively).
const MAX_DEPTH: usize = 64;
/// Bounds a document after alias expansion ("billion laughs").
/// Values a document's aliases may expand to. Only what aliases produce
/// counts — the one way a small file becomes a huge document (the
/// "billion laughs") — so a large file without aliases (a registry of
/// tens of thousands of pods) is read whole.
const MAX_ALIASED: usize = 1 << 17;

/// Builds node trees from the parser's events (with their positions).
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: BTreeMap<usize, Node>,
    /// Where nesting went past `MAX_DEPTH`; the rest is skipped.
    too_deep: Option<usize>,
    skipping: usize,
}

impl Builder {
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(_, _, entries, key)) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        if self.skipping > 0 || self.too_deep.is_some() {
            match ev {
                Event::SequenceStart(..) | Event::MappingStart(..) => self.skipping += 1,
                Event::SequenceEnd | Event::MappingEnd => {
                    self.skipping = self.skipping.saturating_sub(1)
                }
                _ => {}
            }
            return;
        }
        if matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..))
            && self.stack.len() >= MAX_DEPTH
        {
            self.too_deep = Some(line);
            self.skipping = 1;
            return;
        }
        match ev {
            Event::Scalar(v, style, anchor, _) => self.push(
                Node {
                    line,
                    value: NodeValue::Scalar(v, style),
                },
                anchor,
            ),
            Event::Alias(id) => self.push(
                Node {
                    line,
                    value: NodeValue::Alias(id),
                },
                0,
            ),
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq(line, anchor, Vec::new()))
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(line, anchor, Vec::new(), None))
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq(line, anchor, items)) = self.stack.pop() {
                    self.push(
                        Node {
                            line,
                            value: NodeValue::Seq(items),
                        },
                        anchor,
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map(line, anchor, entries, _)) = self.stack.pop() {
                    self.push(
                        Node {
                            line,
                            value: NodeValue::Map(entries),
                        },
                        anchor,
                    );
                }
            }
            _ => {}
        }
    }
}

/// A scalar's JSON value under YAML's core schema (quoted scalars are strings).
fn scalar(text: &str, style: TScalarStyle) -> Value {
    if style != TScalarStyle::Plain {
        return Value::String(text.into());
    }
    match Yaml::from_str(text) {
        Yaml::Integer(i) => Value::from(i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(r), Value::Number),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Null => Value::Null,
        _ => Value::String(text.into()),
    }
}

/// The JSON value of `node`, recording the line of each field path.
/// Values produced through an alias (`aliased`) count against `budget`;
/// once it is spent (at 0) the rest is left out.
fn to_json(
    node: &Node,
    path: String,
    lines: &mut BTreeMap<String, usize>,
    anchors: &BTreeMap<usize, Node>,
    budget: &mut usize,
    aliased: bool,
) -> Value {
    if aliased {
        if *budget == 0 {
            return Value::Null;
        }
        *budget -= 1;
    }
    lines.entry(path.clone()).or_insert(node.line);
    match &node.value {
        NodeValue::Scalar(t, s) => scalar(t, *s),
        NodeValue::Alias(id) => anchors.get(id).map_or(Value::Null, |n| {
            to_json(n, path, lines, anchors, budget, true)
        }),
        NodeValue::Seq(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, n)| to_json(n, format!("{path}[{i}]"), lines, anchors, budget, aliased))
                .collect(),
        ),
        NodeValue::Map(entries) => {
            let mut m = serde_json::Map::new();
            for (k, v) in entries {
                let key = match &k.value {
                    NodeValue::Scalar(t, _) => t.clone(),
                    _ => format!(
                        "{:?}",
                        to_json(
                            k,
                            String::new(),
                            &mut BTreeMap::new(),
                            anchors,
                            budget,
                            aliased
                        )
                    ),
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                // The key's line: an error about a field points at its name.
                lines.insert(child.clone(), k.line);
                m.insert(key, to_json(v, child, lines, anchors, budget, aliased));
            }
            Value::Object(m)
        }
    }
}

/// Istio kinds this data plane knows of but does not read: accepted, with
/// a warning, never mistaken for typos.
const UNSUPPORTED_ISTIO_KINDS: [(&str, &str); 3] = [
    ("networking.istio.io", "ProxyConfig"),
    ("networking.istio.io", "WorkloadGroup"),
    ("extensions.istio.io", "WasmPlugin"),
];

/// A document of an Istio API group whose kind the mesh does not read: a
/// kind it knows but does not support (a warning), else a typo (an error,
/// with the nearest kind of the group as a suggestion).
fn istio_kind_problem(group: &str, kind: &str, id: &str, origin: &Origin) -> Problem {
    if UNSUPPORTED_ISTIO_KINDS.contains(&(group, kind)) {
        return Problem {
            severity: Severity::Warning,
            ..problem(
                origin,
                id,
                "kind",
                format!("{kind} is not supported by this data plane: it is ignored"),
            )
        };
    }
    let known: Vec<&str> = Kind::ALL
        .iter()
        .filter(|k| k.group() == group)
        .map(|k| k.name())
        .chain(
            UNSUPPORTED_ISTIO_KINDS
                .iter()
                .filter(|(g, _)| *g == group)
                .map(|(_, k)| *k),
        )
        .collect();
    let nearest = known
        .iter()
        .map(|k| {
            (
                edit_distance(&k.to_ascii_lowercase(), &kind.to_ascii_lowercase()),
                *k,
            )
        })
        .min();
    let hint = match nearest {
        Some((d, k)) if d <= 3 => format!(": did you mean {k}?"),
        _ if known.is_empty() => String::new(),
        _ => format!(" (its kinds: {})", known.join(", ")),
    };
    problem(
        origin,
        id,
        "kind",
        format!("unknown kind {kind:?} in {group}{hint}"),
    )
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}
