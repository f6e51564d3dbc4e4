//! PeerAuthentication (`security.istio.io/v1`, `v1beta1`): whether a
//! workload accepts plaintext, with Istio's precedence.
//!
//! * Scope: mesh-wide (root namespace, no selector) < namespace-wide (no
//!   selector) < workload-specific (selector matching the pod's labels).
//! * Several policies at one level: the oldest (`creationTimestamp`, then
//!   name) wins.
//! * `UNSET` inherits from the level above; nothing at all is `PERMISSIVE`.
//! * `portLevelMtls` (workload-specific policies only) overrides the mode
//!   for one target port of the pod.
//!
//! HBONE is always mutual TLS; the mode decides the plaintext path:
//! `STRICT` refuses it, `PERMISSIVE` accepts it, `DISABLE` passes it through.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    istio::{Resource, Spec, security},
    workload::Workload,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    /// Whether plaintext connections are let in.
    pub fn allows_plaintext(self) -> bool {
        self != Self::Strict
    }

    fn of(m: &Option<security::MutualTls>) -> Self {
        match m.as_ref().and_then(|m| m.mode) {
            None | Some(security::MtlsMode::Unset) => Self::Unset,
            Some(security::MtlsMode::Disable) => Self::Disable,
            Some(security::MtlsMode::Permissive) => Self::Permissive,
            Some(security::MtlsMode::Strict) => Self::Strict,
        }
    }
}

/// One PeerAuthentication resource, reduced to what decides a mode.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// RFC 3339; compared as text, which orders RFC 3339 UTC times.
    pub creation_timestamp: Option<String>,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_level: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthentication {
    /// The policy of a (validated) resource; `None` for other kinds.
    pub fn from_resource(r: &Resource) -> Option<Self> {
        let Spec::PeerAuthentication(s) = &r.spec else {
            return None;
        };
        Some(Self {
            name: r.metadata.name.clone(),
            namespace: r.metadata.namespace.clone(),
            creation_timestamp: r.metadata.creation_timestamp.clone(),
            selector: s.selector.as_ref().map(|s| s.match_labels.clone()),
            mode: MtlsMode::of(&s.mtls),
            port_level: s
                .port_level_mtls
                .iter()
                .filter_map(|(p, m)| Some((p.parse::<u16>().ok()?, MtlsMode::of(&Some(m.clone())))))
                .collect(),
        })
    }
}

/// The mode of one workload, resolved once per snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Effective {
    pub mode: Option<MtlsMode>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level: BTreeMap<u16, MtlsMode>,
}

impl Effective {
    /// The mode for plaintext arriving at `port`.
    pub fn mode(&self, port: u16) -> MtlsMode {
        self.port_level
            .get(&port)
            .copied()
            .or(self.mode)
            .unwrap_or(MtlsMode::Permissive)
    }
}

/// All PeerAuthentications in force.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentications {
    pub root_namespace: String,
    pub policies: Vec<PeerAuthentication>,
}

impl PeerAuthentications {
    pub fn empty(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.into(),
            policies: vec![],
        }
    }

    /// The policies among `resources` (validated Istio resources).
    pub fn from_resources<'a>(
        resources: impl IntoIterator<Item = &'a Resource>,
        root_namespace: &str,
    ) -> Self {
        Self {
            root_namespace: root_namespace.into(),
            policies: resources
                .into_iter()
                .filter_map(PeerAuthentication::from_resource)
                .collect(),
        }
    }

    /// What applies to workload `w`, resolved once: its ports that a
    /// workload policy names, and the mode of every other port.
    pub fn effective(&self, w: &Workload) -> Effective {
        let (port_level, mode) = self.resolve(w);
        Effective { mode, port_level }
    }

    /// The mode for plaintext arriving at `port` of workload `w`.
    pub fn mode_for(&self, w: &Workload, port: u16) -> MtlsMode {
        self.effective(w).mode(port)
    }

    /// Port overrides (each already falling back to the levels above) and
    /// the mode of the other ports.
    fn resolve(&self, w: &Workload) -> (BTreeMap<u16, MtlsMode>, Option<MtlsMode>) {
        let oldest = |it: &mut dyn Iterator<Item = &PeerAuthentication>| {
            it.min_by(|a, b| {
                (&a.creation_timestamp, &a.name).cmp(&(&b.creation_timestamp, &b.name))
            })
            .cloned()
        };
        let workload = oldest(&mut self.policies.iter().filter(|p| {
            p.namespace == w.namespace
                && p.selector
                    .as_ref()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        }));
        let namespace = oldest(
            &mut self
                .policies
                .iter()
                .filter(|p| p.namespace == w.namespace && p.selector.is_none()),
        );
        let mesh = oldest(
            &mut self
                .policies
                .iter()
                .filter(|p| p.namespace == self.root_namespace && p.selector.is_none()),
        );
        let first_set = |modes: [Option<MtlsMode>; 3]| {
            modes.into_iter().flatten().find(|m| *m != MtlsMode::Unset)
        };
        let base = first_set([
            workload.as_ref().map(|p| p.mode),
            namespace.as_ref().map(|p| p.mode),
            mesh.as_ref().map(|p| p.mode),
        ]);
        let ports = workload
            .map(|p| p.port_level)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(port, m)| {
                let m = if m == MtlsMode::Unset { base? } else { m };
                Some((port, m))
            })
            .collect();
        (ports, base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PeerAuthentications, String> {
        let mut out = crate::documents::Parsed::default();
        crate::documents::parse_file(std::path::Path::new("pa.yaml"), yaml.as_bytes(), &mut out);
        let problems = crate::documents::check::documents(&out);
        if let Some(p) = problems
            .iter()
            .find(|p| p.severity == crate::istio::Severity::Error)
        {
            return Err(p.to_string());
        }
        Ok(PeerAuthentications::from_resources(
            out.documents.iter().filter_map(|d| match d {
                crate::documents::Document::Istio(r) => Some(r),
                _ => None,
            }),
            "istio-system",
        ))
    }

    fn pod(ns: &str, labels: &[(&str, &str)]) -> Workload {
        Workload::for_tests("p", ns, labels)
    }

    const DOCS: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: relaxed, namespace: legacy}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: db, namespace: legacy}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    9090: {}
---
apiVersion: v1
kind: Service
metadata: {name: ignored}
"#;

    #[test]
    fn precedence_follows_istio() {
        let p = parse(DOCS).unwrap();
        assert_eq!(p.policies.len(), 3);
        // Mesh-wide STRICT applies where nothing closer says otherwise.
        assert_eq!(p.mode_for(&pod("default", &[]), 80), MtlsMode::Strict);
        // Namespace-wide beats mesh-wide.
        assert_eq!(
            p.mode_for(&pod("legacy", &[("app", "web")]), 80),
            MtlsMode::Permissive
        );
        // Workload-specific beats namespace-wide; its ports override it.
        let db = pod("legacy", &[("app", "db"), ("tier", "data")]);
        assert_eq!(p.mode_for(&db, 5432), MtlsMode::Strict);
        assert_eq!(p.mode_for(&db, 8080), MtlsMode::Disable);
        // An UNSET port inherits the workload's mode.
        assert_eq!(p.mode_for(&db, 9090), MtlsMode::Strict);
        // Nothing at all: PERMISSIVE.
        assert_eq!(
            PeerAuthentications::empty("istio-system").mode_for(&db, 1),
            MtlsMode::Permissive
        );
    }

    #[test]
    fn unset_inherits_and_the_oldest_policy_wins() {
        let p = parse(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-newer, namespace: ns, creationTimestamp: "2024-02-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-older, namespace: ns, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: w, namespace: ns}
spec: {selector: {matchLabels: {app: x}}, mtls: {mode: UNSET}}
"#,
        )
        .unwrap();
        assert_eq!(
            p.mode_for(&pod("ns", &[("app", "x")]), 80),
            MtlsMode::Strict
        );
    }

    #[test]
    fn kubernetes_lists_are_read() {
        let p = parse(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata: {name: x, namespace: ns}\n  spec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        assert_eq!(p.policies.len(), 1);
    }

    #[test]
    fn invalid_policies_name_file_line_resource_and_field() {
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: ns}\nspec: {mtls: {mode: STRICKT}}\n").unwrap_err();
        assert!(
            e.starts_with("pa.yaml:4: error: PeerAuthentication ns/x: spec.mtls.mode: unknown variant `STRICKT`"),
            "{e}"
        );
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: ns}\nspec: {portLevelMtls: {80: {mode: STRICT}}}\n").unwrap_err();
        assert!(
            e.contains("spec.portLevelMtls: port-level mTLS needs a workload selector"),
            "{e}"
        );
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: ns}\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}\n").unwrap_err();
        assert!(e.contains("spec.portLevelMtls.http"), "{e}");
        assert!(parse("kind: [").unwrap_err().starts_with("pa.yaml:"));
    }

    #[test]
    fn effective_modes_are_resolved_per_workload() {
        let p = parse(DOCS).unwrap();
        let db = pod("legacy", &[("app", "db")]);
        let e = p.effective(&db);
        assert_eq!(e.mode, Some(MtlsMode::Strict));
        assert_eq!(e.port_level.get(&8080), Some(&MtlsMode::Disable));
        assert_eq!(
            e.port_level.get(&9090),
            Some(&MtlsMode::Strict),
            "UNSET inherits"
        );
        assert_eq!(e.mode(1234), MtlsMode::Strict);
        assert_eq!(Effective::default().mode(1), MtlsMode::Permissive);
    }
}
