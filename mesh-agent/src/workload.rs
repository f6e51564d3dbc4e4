//! The workload registry: which pods live on this node, where their network
//! namespace and cgroup are, and who they are. Read from a YAML file for now
//! (Kubernetes comes later and produces the same `Workload`s).
//!
//! ```yaml
//! workloads:
//!   - name: sleep-7d5f
//!     namespace: default
//!     serviceAccount: sleep
//!     ips: [10.10.0.2, fd10::2]
//!     netns: /run/netns/sleep-7d5f
//!     cgroup: /sys/fs/cgroup/unified/kubepods/pod-sleep-7d5f
//!     labels: {app: sleep, version: v1}
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// One pod on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The pod's addresses (one per family).
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (`/run/netns/…` or
    /// `/proc/<pid>/ns/net`). Empty: found from the pod's `uid` (see
    /// [`crate::discover`]).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory. Empty: found from the pod's `uid`.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub cgroup: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's annotations the agent reads ([`FAIL_OPEN_ANNOTATION`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The node the pod is scheduled on. Agents enrol the pods of their own
    /// node and use the others to reach them over HBONE; the CA issues a
    /// node certificates only for its pods. Absent means "this node" (a
    /// single-node registry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Kubernetes UID, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The workload the pod belongs to (its Deployment, StatefulSet,
    /// CronJob…), as Istio names it in metrics. From Kubernetes it is
    /// derived from the pod's owner as Istio does; absent, the
    /// `service.istio.io/workload-name` label, else the pod's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

fn default_service_account() -> String {
    "default".into()
}

/// The annotation by which a pod asks to fail open: `"true"` lets its
/// traffic go direct, uncaptured, while no agent runs on its node (it
/// prefers availability to the mesh's guarantees). Without it, a pod's
/// connections are refused while the agent is away (fail closed).
pub const FAIL_OPEN_ANNOTATION: &str = "mesh-agent.io/fail-open";

impl Workload {
    /// Whether the pod asked to fail open ([`FAIL_OPEN_ANNOTATION`]).
    pub fn fails_open(&self) -> bool {
        self.annotations
            .get(FAIL_OPEN_ANNOTATION)
            .is_some_and(|v| v == "true")
    }
}

/// `namespace/name`: unique on a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkloadKey(String);

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl WorkloadKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        WorkloadKey(format!("{namespace}/{name}"))
    }
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey::new(&self.namespace, &self.name)
    }

    /// The workload's name in metrics (`source_workload`,
    /// `destination_workload`): Istio's `service.istio.io/workload-name`
    /// label, else the owner it was derived from, else the pod's name.
    pub fn workload_name(&self) -> &str {
        self.labels
            .get("service.istio.io/workload-name")
            .or(self.workload_name.as_ref())
            .unwrap_or(&self.name)
    }

    /// Istio's canonical service: its label, else the usual app labels,
    /// else the workload's name.
    pub fn canonical_service(&self) -> &str {
        self.label_or(
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
            self.workload_name(),
        )
    }

    /// Istio's canonical revision.
    pub fn canonical_revision(&self) -> &str {
        self.label_or(
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
            "latest",
        )
    }

    /// `*_app` in metrics: the canonical service, as ztunnel reports it.
    pub fn app(&self) -> &str {
        self.canonical_service()
    }

    /// `*_version` in metrics: the canonical revision, as ztunnel reports it.
    pub fn version(&self) -> &str {
        self.canonical_revision()
    }

    fn label_or<'a>(&'a self, keys: &[&str], default: &'a str) -> &'a str {
        keys.iter()
            .find_map(|k| self.labels.get(*k))
            .map_or(default, String::as_str)
    }
}

/// Problems of a registry's entries: (field path, message), paths like
/// `workloads[2].ips`. Duplicates across files are found when the
/// snapshot is built.
pub fn problems(ws: &[Workload]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut keys = HashMap::new();
    let mut ips = HashMap::new();
    for (index, w) in ws.iter().enumerate() {
        let mut bad = |field: &str, reason: String| {
            out.push((format!("workloads[{index}].{field}"), reason));
        };
        if let Err(r) = check_dns_label(&w.name) {
            bad("name", r);
        }
        if let Err(r) = check_dns_label(&w.namespace) {
            bad("namespace", r);
        }
        if let Err(r) = check_dns_subdomain(&w.service_account) {
            bad("serviceAccount", r);
        }
        if let Some(n) = &w.node
            && let Err(r) = check_dns_subdomain(n)
        {
            bad("node", r);
        }
        if let Some(first) = keys.insert(w.key(), index) {
            bad("name", format!("{} is also workloads[{first}]", w.key()));
        }
        if w.ips.is_empty() {
            bad("ips", "at least one address is required".into());
        }
        for ip in &w.ips {
            // In-process unit tests place pods on 127.0.0.0/8: the only
            // addresses a test can bind without privilege.
            if (ip.is_loopback() && !cfg!(test)) || ip.is_unspecified() || ip.is_multicast() {
                bad("ips", format!("{ip} cannot be a pod address"));
            }
            if let Some(other) = ips.insert(*ip, w.key()) {
                bad("ips", format!("{ip} is also the address of {other}"));
            }
        }
        if w.ips.iter().filter(|i| i.is_ipv4()).count() > 1
            || w.ips.iter().filter(|i| i.is_ipv6()).count() > 1
        {
            bad("ips", "at most one IPv4 and one IPv6 address".into());
        }
        for (field, p) in [("netns", &w.netns), ("cgroup", &w.cgroup)] {
            if !is_empty_path(p) && !p.is_absolute() {
                bad(field, format!("{} is not an absolute path", p.display()));
            }
        }
        // Only a pod of this node is enrolled, so only its netns and cgroup
        // matter: a pod on another node is known by identity, addresses
        // and node alone. Without `node:` the pod is on this node; with
        // one, the agent checks when it enrols the pod.
        if w.node.is_none()
            && (is_empty_path(&w.netns) || is_empty_path(&w.cgroup))
            && w.uid.is_none()
        {
            bad(
                "netns",
                "netns and cgroup are required for a pod of this node (no `node:`) unless uid is \
                 given (they are then found from it)"
                    .into(),
            );
        }
    }
    out
}

fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)"
        ))
    }
}

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 || s.split('.').any(|l| check_dns_label(l).is_err()) {
        return Err(format!("{s:?} is not a DNS-1123 subdomain"));
    }
    Ok(())
}

#[cfg(test)]
impl Workload {
    /// A workload for unit tests: one IPv4 address, placeholder paths.
    pub fn for_tests(name: &str, namespace: &str, labels: &[(&str, &str)]) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            service_account: "default".into(),
            ips: vec!["10.0.0.2".parse().expect("address")],
            netns: "/run/netns/test".into(),
            cgroup: "/sys/fs/cgroup/test".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            node: None,
            uid: None,
            workload_name: None,
        }
    }
}

impl Workload {
    /// Whether this pod runs on `node` (no node named means this one).
    pub fn is_on(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }

    /// The pod's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> crate::spiffe::SpiffeId {
        crate::spiffe::SpiffeId::workload(trust_domain, &self.namespace, &self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
  - name: client
    namespace: default
    serviceAccount: sleep
    ips: [10.10.0.2, "fd10::2"]
    netns: /run/netns/client
    cgroup: /sys/fs/cgroup/unified/t/client
    labels: {app: sleep, version: v1}
  - name: server
    namespace: demo
    ips: [10.10.0.3]
    netns: /run/netns/server
    cgroup: /sys/fs/cgroup/unified/t/server
    node: node-b
"#;

    /// The registry in `s`, or its first problem as `validate` prints it.
    fn p(s: &str) -> Result<Vec<Workload>, String> {
        let mut out = crate::documents::Parsed::default();
        crate::documents::parse_file(std::path::Path::new("w.yaml"), s.as_bytes(), &mut out);
        if let Some(e) = out.problems.first() {
            return Err(e.to_string());
        }
        Ok(out
            .documents
            .into_iter()
            .flat_map(|d| match d {
                crate::documents::Document::Workloads(ws, _) => ws,
                _ => vec![],
            })
            .collect())
    }

    #[test]
    fn parses_and_derives_istio_labels() {
        let ws = p(GOOD).unwrap();
        assert_eq!(ws.len(), 2);
        assert_eq!(ws[0].key().to_string(), "default/client");
        assert_eq!(ws[0].canonical_service(), "sleep");
        assert_eq!(ws[0].canonical_revision(), "v1");
        assert_eq!(ws[1].service_account, "default");
        assert_eq!(ws[1].canonical_service(), "server");
        assert_eq!(ws[1].canonical_revision(), "latest");
        // `*_app` is the canonical service, as ztunnel reports it.
        assert_eq!(ws[1].app(), "server");
        assert_eq!(ws[1].version(), "latest");
        assert!(
            ws[0].is_on("node-a") && ws[0].is_on("node-b"),
            "no node: this one"
        );
        assert!(ws[1].is_on("node-b") && !ws[1].is_on("node-a"));
        assert_eq!(
            ws[0].identity("td").to_string(),
            "spiffe://td/ns/default/sa/sleep"
        );
    }

    #[test]
    fn empty_file_is_an_empty_registry() {
        assert_eq!(p("").unwrap(), vec![]);
        assert_eq!(p("workloads: []").unwrap(), vec![]);
    }

    #[test]
    fn syntax_errors_carry_line_and_field() {
        let e = p("workloads:\n  - name: a\n    namespace: b\n    ipz: []\n").unwrap_err();
        assert!(
            e.starts_with("w.yaml:4: error: workload registry: workloads[0].ipz:"),
            "{e}"
        );
        assert!(e.contains("unknown field `ipz`"), "{e}");
        let e = p("workloads:\n  - name: a\n    namespace: b\n    ips: [not-an-ip]\n    netns: /x\n    cgroup: /y\n").unwrap_err();
        assert!(
            e.starts_with("w.yaml:4: error: workload registry: workloads[0].ips[0]:"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_name_the_workload_and_field() {
        let dup_ip = GOOD.replace("ips: [10.10.0.3]", "ips: [10.10.0.2]");
        assert_eq!(
            p(&dup_ip).unwrap_err(),
            "w.yaml:12: error: workload registry: workloads[1].ips: 10.10.0.2 is also the address of default/client"
        );
        let bad_name = GOOD.replace("name: server", "name: Server_1");
        let e = p(&bad_name).unwrap_err();
        assert!(
            e.contains("w.yaml:10: error: workload registry: workloads[1].name: \"Server_1\" is not a DNS-1123 label"),
            "{e}"
        );
        let rel = GOOD.replace("netns: /run/netns/server", "netns: run/netns/server");
        assert!(
            p(&rel)
                .unwrap_err()
                .contains("netns: run/netns/server is not an absolute path")
        );
        // Loopback addresses are refused outside this crate's unit tests
        // (which place pods there): see the golden corpus, `registry.yaml`.
        let dup = GOOD
            .replace("namespace: demo", "namespace: default")
            .replace("name: server", "name: client");
        assert!(
            p(&dup)
                .unwrap_err()
                .contains("default/client is also workloads[0]")
        );
        let no_paths = "workloads:\n  - name: a\n    namespace: b\n    ips: [10.0.0.9]\n";
        assert!(p(no_paths).unwrap_err().contains("unless uid is given"));
        let by_uid = format!("{no_paths}    uid: 4a3c\n");
        assert_eq!(p(&by_uid).unwrap()[0].uid.as_deref(), Some("4a3c"));
    }
}
