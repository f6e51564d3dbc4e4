//! Which Kubernetes pods the mesh carries, and living beside Istio ambient.
//!
//! A pod is in the mesh when its label — or else its namespace's — named by
//! `--dataplane-mode-label` says `ambient` (`none` opts a pod out of a
//! meshed namespace), Istio ambient's rule with a key of our own:
//! `mesh-agent.io/dataplane-mode` by default. With Istio's key
//! (`istio.io/dataplane-mode`) the agent carries the pods ztunnel would.
//!
//! Either way, a pod Istio's own label puts in ambient mode on a node where
//! Istio's data plane runs (a `ztunnel` or `istio-cni-node` pod) belongs to
//! Istio: two data planes on one pod would each capture and proxy its
//! traffic. Such a pod is left to Istio, and said so, instead of enrolled.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use crate::workload::Workload;

/// The enrolment label's key unless `--dataplane-mode-label` says otherwise.
pub const DEFAULT_LABEL: &str = "mesh-agent.io/dataplane-mode";
/// Istio ambient's.
pub const ISTIO_LABEL: &str = "istio.io/dataplane-mode";

/// The rule: the pod's label decides, else its namespace's.
pub fn in_mode(
    key: &str,
    pod: &BTreeMap<String, String>,
    namespace: Option<&BTreeMap<String, String>>,
) -> bool {
    match pod.get(key).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace
            .and_then(|l| l.get(key))
            .is_some_and(|m| m == "ambient"),
    }
}

/// Which part of Istio's data plane a pod is, by the labels Istio's charts
/// give them.
pub fn istio_dataplane(p: &Pod) -> Option<&'static str> {
    let labels = p.metadata.labels.as_ref()?;
    let is = |k: &str, v: &str| labels.get(k).is_some_and(|x| x == v);
    if is("app", "ztunnel") {
        Some("ztunnel")
    } else if is("k8s-app", "istio-cni-node") {
        Some("istio-cni")
    } else {
        None
    }
}

/// A pod left to Istio ambient on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeftToIstio {
    /// `namespace/name` of the pod.
    pub pod: String,
    pub node: String,
    /// `namespace/name` of the Istio pod found on that node.
    pub istio_pod: String,
}

impl LeftToIstio {
    /// What the agent logs, once per pod.
    pub fn message(&self, label: &str) -> String {
        format!(
            "pod {} is not enrolled: Istio's label puts it in ambient mode ({ISTIO_LABEL}: ambient \
             on the pod or its namespace) and Istio's data plane runs on node {} ({}), which \
             captures it; two data planes on one pod would each proxy its traffic. Take {ISTIO_LABEL} \
             off the pod (or set it to none) and label it {label}: ambient to move it to this mesh",
            self.pod, self.node, self.istio_pod
        )
    }
}

/// Nodes running Istio's data plane, each with one of its pods (the first
/// by name, so the message does not change from one build to the next).
pub fn istio_nodes<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<String, String> {
    let mut nodes = BTreeMap::new();
    for p in pods {
        let terminated = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if let (Some(_), Some(node), false) = (istio_dataplane(p), node, terminated) {
            let name = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or("default"),
                p.metadata.name.as_deref().unwrap_or_default()
            );
            nodes
                .entry(node)
                .and_modify(|n: &mut String| {
                    if name < *n {
                        n.clone_from(&name);
                    }
                })
                .or_insert(name);
        }
    }
    nodes
}

/// Whether Istio claims `w` (a pod in Istio's ambient mode on one of
/// `istio_nodes`), and by which of its pods.
pub fn claimed_by_istio(
    w: &Workload,
    namespace: Option<&BTreeMap<String, String>>,
    istio_nodes: &BTreeMap<String, String>,
) -> Option<LeftToIstio> {
    let node = w.node.as_ref()?;
    let istio_pod = istio_nodes.get(node)?;
    in_mode(ISTIO_LABEL, &w.labels, namespace).then(|| LeftToIstio {
        pod: format!("{}/{}", w.namespace, w.name),
        node: node.clone(),
        istio_pod: istio_pod.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{documents, registry};

    fn registry(yaml: &str, label: &str) -> registry::Registry {
        let mut out = documents::Parsed::default();
        documents::parse_file(Path::new("t.yaml"), yaml.as_bytes(), &mut out);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        registry::build(
            &out.documents,
            &registry::Settings {
                cluster_domain: "cluster.local".into(),
                dataplane_mode_label: label.into(),
                node_name: None,
            },
        )
    }

    fn pod(name: &str, node: &str, ip: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {node}, containers: []}}\nstatus: {{phase: Running, podIP: {ip}}}\n---\n"
        )
    }

    fn enrolled(r: &registry::Registry) -> Vec<&str> {
        r.workloads.iter().map(|w| w.name.as_str()).collect()
    }

    #[test]
    fn our_label_enrols_by_default_and_istios_only_when_asked() {
        let yaml = [
            pod(
                "ours",
                "n1",
                "10.0.0.1",
                "mesh-agent.io/dataplane-mode: ambient",
            ),
            pod(
                "istios",
                "n1",
                "10.0.0.2",
                "istio.io/dataplane-mode: ambient",
            ),
            pod("plain", "n1", "10.0.0.3", "app: x"),
        ]
        .concat();
        assert_eq!(enrolled(&registry(&yaml, DEFAULT_LABEL)), ["ours"]);
        assert_eq!(enrolled(&registry(&yaml, ISTIO_LABEL)), ["istios"]);
    }

    #[test]
    fn a_pod_istio_captures_on_its_node_is_left_to_istio() {
        let ztunnel = "apiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-x, namespace: istio-system, labels: {app: ztunnel}}\n\
            spec: {nodeName: n1, containers: []}\nstatus: {phase: Running, podIP: 10.0.9.1}\n---\n";
        // istio-cni runs on the host's network; it counts all the same.
        let cni = "apiVersion: v1\nkind: Pod\nmetadata: {name: istio-cni-node-y, namespace: istio-system, labels: {k8s-app: istio-cni-node}}\n\
            spec: {nodeName: n2, hostNetwork: true, containers: []}\nstatus: {phase: Running, podIP: 192.168.0.2}\n---\n";
        let both = "mesh-agent.io/dataplane-mode: ambient, istio.io/dataplane-mode: ambient";
        let yaml = [
            ztunnel.to_owned(),
            cni.to_owned(),
            pod("both-1", "n1", "10.0.0.1", both),
            pod("both-2", "n2", "10.0.0.2", both),
            pod("both-3", "n3", "10.0.0.3", both),
            pod(
                "ours-1",
                "n1",
                "10.0.0.4",
                "mesh-agent.io/dataplane-mode: ambient",
            ),
        ]
        .concat();
        let r = registry(&yaml, DEFAULT_LABEL);
        // n3 runs no Istio: the pod is ours. A pod without Istio's label is
        // ours on any node.
        assert_eq!(enrolled(&r), ["both-3", "ours-1"]);
        let left: Vec<_> = r
            .left_to_istio
            .iter()
            .map(|l| (l.pod.as_str(), l.istio_pod.as_str()))
            .collect();
        assert_eq!(
            left,
            [
                ("shop/both-1", "istio-system/ztunnel-x"),
                ("shop/both-2", "istio-system/istio-cni-node-y")
            ]
        );
        let m = r.left_to_istio[0].message(DEFAULT_LABEL);
        assert!(
            m.contains("pod shop/both-1 is not enrolled")
                && m.contains("node n1 (istio-system/ztunnel-x)")
                && m.contains("label it mesh-agent.io/dataplane-mode: ambient"),
            "{m}"
        );
        // With Istio's label, every ambient pod on those nodes is Istio's.
        let r = registry(&yaml, ISTIO_LABEL);
        assert_eq!(enrolled(&r), ["both-3"]);
        assert_eq!(r.left_to_istio.len(), 2);
        // A ztunnel that has terminated captures nothing.
        let gone = yaml.replacen(
            "phase: Running, podIP: 10.0.9.1",
            "phase: Failed, podIP: 10.0.9.1",
            1,
        );
        assert_eq!(
            enrolled(&registry(&gone, DEFAULT_LABEL)),
            ["both-1", "both-3", "ours-1"]
        );
    }
}
