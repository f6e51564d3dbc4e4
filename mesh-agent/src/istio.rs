//! Istio's configuration resources, typed (serde), as users write them:
//! `networking.istio.io` VirtualService, DestinationRule, Gateway,
//! ServiceEntry, WorkloadEntry, Sidecar; `security.istio.io`
//! PeerAuthentication, RequestAuthentication, AuthorizationPolicy;
//! `telemetry.istio.io` Telemetry — for every API version Istio serves.
//!
//! [`parse`] reads YAML/JSON documents (with the line of every field),
//! [`validate`] checks them the way `istioctl validate` does.

pub mod common;
pub mod envoy_filter;
pub mod networking;
pub mod security;
pub mod telemetry;
pub mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The Istio kinds the mesh reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    WorkloadEntry,
    Sidecar,
    PeerAuthentication,
    RequestAuthentication,
    AuthorizationPolicy,
    Telemetry,
    EnvoyFilter,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Sidecar,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Telemetry,
        Kind::EnvoyFilter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Sidecar => "Sidecar",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Telemetry => "Telemetry",
            Kind::EnvoyFilter => "EnvoyFilter",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::PeerAuthentication | Kind::RequestAuthentication | Kind::AuthorizationPolicy => {
                "security.istio.io"
            }
            Kind::Telemetry => "telemetry.istio.io",
            _ => "networking.istio.io",
        }
    }

    /// The API versions Istio serves for this kind.
    pub fn versions(self) -> &'static [&'static str] {
        if self == Kind::EnvoyFilter {
            return &["v1alpha3"];
        }
        match self.group() {
            "security.istio.io" => &["v1", "v1beta1"],
            "telemetry.istio.io" => &["v1", "v1alpha1"],
            _ => &["v1", "v1beta1", "v1alpha3"],
        }
    }

    /// The Kubernetes resource (plural) name, for API paths.
    pub fn plural(self) -> String {
        let lower = self.name().to_lowercase();
        match lower.strip_suffix('y') {
            // A consonant before the y: ServiceEntry, WorkloadEntry,
            // AuthorizationPolicy, Telemetry (not Gateway).
            Some(stem) if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) => format!("{stem}ies"),
            _ => format!("{lower}s"),
        }
    }
}

/// Kubernetes object metadata: what the mesh uses, the rest ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Meta {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// One Istio resource: its envelope and typed spec.
// Parsed once per configuration change; see `documents::Document`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Spec {
    VirtualService(networking::VirtualService),
    DestinationRule(networking::DestinationRule),
    Gateway(networking::Gateway),
    ServiceEntry(networking::ServiceEntry),
    WorkloadEntry(networking::WorkloadEntry),
    Sidecar(networking::Sidecar),
    PeerAuthentication(security::PeerAuthentication),
    RequestAuthentication(security::RequestAuthentication),
    AuthorizationPolicy(security::AuthorizationPolicy),
    Telemetry(telemetry::Telemetry),
    EnvoyFilter(envoy_filter::EnvoyFilter),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::VirtualService(_) => Kind::VirtualService,
            Spec::DestinationRule(_) => Kind::DestinationRule,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::ServiceEntry(_) => Kind::ServiceEntry,
            Spec::WorkloadEntry(_) => Kind::WorkloadEntry,
            Spec::Sidecar(_) => Kind::Sidecar,
            Spec::PeerAuthentication(_) => Kind::PeerAuthentication,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::Telemetry(_) => Kind::Telemetry,
            Spec::EnvoyFilter(_) => Kind::EnvoyFilter,
        }
    }

    /// The spec alone, as JSON (for `/config_dump` and round trips).
    pub fn to_json(&self) -> serde_json::Value {
        let r = match self {
            Spec::VirtualService(s) => serde_json::to_value(s),
            Spec::DestinationRule(s) => serde_json::to_value(s),
            Spec::Gateway(s) => serde_json::to_value(s),
            Spec::ServiceEntry(s) => serde_json::to_value(s),
            Spec::WorkloadEntry(s) => serde_json::to_value(s),
            Spec::Sidecar(s) => serde_json::to_value(s),
            Spec::PeerAuthentication(s) => serde_json::to_value(s),
            Spec::RequestAuthentication(s) => serde_json::to_value(s),
            Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
            Spec::Telemetry(s) => serde_json::to_value(s),
            Spec::EnvoyFilter(s) => serde_json::to_value(s),
        };
        r.unwrap_or_default()
    }
}

/// Where a document came from, and the line of each of its field paths.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub file: std::path::PathBuf,
    /// Line of the document (or List item).
    pub line: usize,
    lines: std::sync::Arc<BTreeMap<String, usize>>,
    /// `items[3].` when the document is an item of a List.
    prefix: String,
}

impl Origin {
    /// A document at `line` of `file`, with the line of each field path.
    pub fn new(file: &std::path::Path, line: usize, lines: BTreeMap<String, usize>) -> Self {
        Self {
            file: file.into(),
            line,
            lines: std::sync::Arc::new(lines),
            prefix: String::new(),
        }
    }

    /// The line of `path` (relative to the document), or of its nearest
    /// ancestor that has one.
    pub fn line_of(&self, path: &str) -> usize {
        let mut p = format!("{}{path}", self.prefix);
        loop {
            if let Some(l) = self.lines.get(&p) {
                return *l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return self.line,
            }
        }
    }

    /// The origin of an object read from an API rather than a file: `name`
    /// says where (e.g. `kubernetes:VirtualService/ns/name`); no lines.
    pub fn object(name: &str) -> Self {
        Self {
            file: name.into(),
            ..Self::default()
        }
    }

    /// The origin of item `index` of a `List` read from this one.
    pub fn item(&self, index: usize) -> Self {
        let prefix = format!("{}items[{index}].", self.prefix);
        let line = self
            .lines
            .get(prefix.trim_end_matches('.'))
            .copied()
            .unwrap_or(self.line);
        Self {
            file: self.file.clone(),
            line,
            lines: self.lines.clone(),
            prefix,
        }
    }
}

/// An Istio resource as read: envelope, spec, and where it came from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub api_version: String,
    pub metadata: Meta,
    #[serde(flatten)]
    pub spec: Spec,
    #[serde(skip)]
    pub origin: Origin,
}

impl Resource {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// `Kind namespace/name`, as problems name it.
    pub fn id(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind().name(),
            self.metadata.namespace,
            self.metadata.name
        )
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The resource is refused.
    Error,
    /// Accepted, but it does not do what it says: a policy the agent does
    /// not enforce. `validate --strict` counts these as errors.
    Warning,
    /// Accepted; worth knowing (a field not enforced yet, a skipped object).
    Note,
}

/// One finding, located: file, line, resource, field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub file: std::path::PathBuf,
    pub line: usize,
    /// `Kind namespace/name`, or what the document is when it has no name.
    pub resource: String,
    /// Dotted path with indices, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        };
        // Objects read from an API have no line.
        if self.line == 0 {
            write!(f, "{}: {sev}: {}", self.file.display(), self.resource)?;
        } else {
            write!(
                f,
                "{}:{}: {sev}: {}",
                self.file.display(),
                self.line,
                self.resource
            )?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}
