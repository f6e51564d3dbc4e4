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

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::Error;
use crate::workload::Workload;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "UNSET" => Self::Unset,
            "DISABLE" => Self::Disable,
            "PERMISSIVE" => Self::Permissive,
            "STRICT" => Self::Strict,
            _ => return None,
        })
    }

    /// Whether plaintext connections are let in.
    pub fn allows_plaintext(self) -> bool {
        self != Self::Strict
    }
}

/// One PeerAuthentication resource.
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
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

    /// Reads every PeerAuthentication in a source (files of multi-document
    /// YAML, JSON, or Kubernetes `List`s). Other kinds are skipped here.
    pub fn parse(snapshot: &crate::watch::Snapshot, root_namespace: &str) -> Result<Self, Error> {
        let mut policies = Vec::new();
        for (file, text) in snapshot {
            for doc in serde_yaml::Deserializer::from_slice(text) {
                let v = Value::deserialize(doc).map_err(|e| Error::Syntax {
                    file: file.clone(),
                    message: e.to_string(),
                })?;
                let items = match v["kind"].as_str() {
                    Some("List") => v["items"].as_sequence().cloned().unwrap_or_default(),
                    _ => vec![v],
                };
                for item in items {
                    if item["kind"].as_str() == Some("PeerAuthentication")
                        && item["apiVersion"]
                            .as_str()
                            .is_some_and(|a| a.starts_with("security.istio.io/"))
                    {
                        policies.push(one(file, &item)?);
                    }
                }
            }
        }
        Ok(Self {
            root_namespace: root_namespace.into(),
            policies,
        })
    }

    /// The mode for plaintext arriving at `port` of workload `w`.
    pub fn mode_for(&self, w: &Workload, port: u16) -> MtlsMode {
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
        let port_mode = workload
            .as_ref()
            .and_then(|p| p.port_level.get(&port).copied());
        [
            port_mode,
            workload.map(|p| p.mode),
            namespace.map(|p| p.mode),
            mesh.map(|p| p.mode),
        ]
        .into_iter()
        .flatten()
        .find(|m| *m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive)
    }
}

fn one(file: &Path, v: &Value) -> Result<PeerAuthentication, Error> {
    let meta: Meta = serde_yaml::from_value(v["metadata"].clone()).map_err(|e| Error::Syntax {
        file: file.into(),
        message: format!("PeerAuthentication metadata: {e}"),
    })?;
    let namespace = meta.namespace.unwrap_or_else(|| "default".into());
    let resource = format!("PeerAuthentication {namespace}/{}", meta.name);
    let bad = |field: &str, reason: String| Error::Invalid {
        file: file.into(),
        resource: resource.clone(),
        field: field.into(),
        reason,
    };
    let spec = &v["spec"];
    let mode_at = |field: &str, m: &Value| -> Result<MtlsMode, Error> {
        match m {
            Value::Null => Ok(MtlsMode::Unset),
            Value::String(s) => MtlsMode::parse(s).ok_or_else(|| {
                bad(
                    field,
                    format!("unknown mode {s:?} (UNSET, DISABLE, PERMISSIVE or STRICT)"),
                )
            }),
            other => Err(bad(field, format!("expected a string, found {other:?}"))),
        }
    };
    let mode = mode_at("spec.mtls.mode", &spec["mtls"]["mode"])?;
    let selector = match &spec["selector"]["matchLabels"] {
        Value::Null => None,
        Value::Mapping(m) => Some(
            m.iter()
                .map(|(k, v)| match (k.as_str(), v.as_str()) {
                    (Some(k), Some(v)) => Ok((k.to_owned(), v.to_owned())),
                    _ => Err(bad(
                        "spec.selector.matchLabels",
                        "labels must be strings".into(),
                    )),
                })
                .collect::<Result<BTreeMap<_, _>, _>>()?,
        ),
        _ => {
            return Err(bad(
                "spec.selector.matchLabels",
                "expected a map of labels".into(),
            ));
        }
    };
    let mut port_level = BTreeMap::new();
    if let Value::Mapping(ports) = &spec["portLevelMtls"] {
        if selector.is_none() {
            return Err(bad(
                "spec.portLevelMtls",
                "port-level mTLS needs a workload selector".into(),
            ));
        }
        for (k, v) in ports {
            let port = match k {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| bad("spec.portLevelMtls", format!("{k:?} is not a port number")))?;
            port_level.insert(
                port as u16,
                mode_at(&format!("spec.portLevelMtls.{port}.mode"), &v["mode"])?,
            );
        }
    }
    Ok(PeerAuthentication {
        name: meta.name,
        namespace,
        creation_timestamp: meta.creation_timestamp,
        selector,
        mode,
        port_level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PeerAuthentications, String> {
        PeerAuthentications::parse(
            &vec![("pa.yaml".into(), yaml.as_bytes().to_vec())],
            "istio-system",
        )
        .map_err(|e| e.to_string())
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
    fn invalid_policies_name_file_resource_and_field() {
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: ns}\nspec: {mtls: {mode: STRICKT}}\n").unwrap_err();
        assert_eq!(
            e,
            "pa.yaml: PeerAuthentication ns/x: spec.mtls.mode: unknown mode \"STRICKT\" (UNSET, DISABLE, PERMISSIVE or STRICT)"
        );
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: ns}\nspec: {portLevelMtls: {80: {mode: STRICT}}}\n").unwrap_err();
        assert!(
            e.contains("spec.portLevelMtls: port-level mTLS needs a workload selector"),
            "{e}"
        );
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: ns}\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}\n").unwrap_err();
        assert!(e.contains("is not a port number"), "{e}");
        assert!(parse("kind: [").unwrap_err().starts_with("pa.yaml: "));
    }
}
