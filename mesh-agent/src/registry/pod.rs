//! Kubernetes Pods as the mesh sees them: a workload with its addresses,
//! identity, node and labels, and the name of the workload (Deployment,
//! StatefulSet, CronJob…) Istio's metrics call it by.

use std::net::IpAddr;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::workload::Workload;

/// A Pod as a workload: scheduled or running, not on the host network
/// (without addresses while it starts). Its netns and cgroup are found from its UID on its node.
pub fn workload(p: &Pod) -> Option<Workload> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|i| i.parse::<IpAddr>().ok()),
        );
    }
    // A scheduled pod without an address yet is starting: its node's agent
    // enrols it when the CNI plugin gives the addresses (`crate::cni`).
    if ips.is_empty() && spec.node_name.is_none() {
        return None;
    }
    let namespace = p.metadata.namespace.as_deref().unwrap_or("default");
    let name = p.metadata.name.as_deref().unwrap_or_default();
    Some(Workload {
        name: name.into(),
        namespace: namespace.into(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        ips,
        netns: Default::default(),
        cgroup: Default::default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        annotations: p.metadata.annotations.clone().unwrap_or_default(),
        node: spec.node_name.clone(),
        uid: p.metadata.uid.clone(),
        workload_name: Some(workload_name(&p.metadata)),
    })
}

/// The workload a pod belongs to, as Istio derives it from the pod alone
/// (`GetDeployMetaFromPod`): a pod made by a controller (it has a
/// `generateName`) is named after its controlling owner — a ReplicaSet's
/// name less the `pod-template-hash` (so its Deployment's), a Job's name
/// less a CronJob's `-<8–10 digits>` suffix (so its CronJob's), any other
/// owner's name as it is; a pod of its own is its own name.
pub fn workload_name(meta: &ObjectMeta) -> String {
    let name = meta.name.clone().unwrap_or_default();
    if meta.generate_name.as_deref().is_none_or(str::is_empty) {
        return name;
    }
    let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return name;
    };
    let labels = meta.labels.as_ref();
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = labels.and_then(|l| {
                l.get("pod-template-hash")
                    .or(l.get("rollouts-pod-template-hash"))
            });
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => deployment.to_owned(),
                None => owner.name.clone(),
            }
        }
        "Job" => match owner.name.rsplit_once('-') {
            Some((cronjob, n))
                if (8..=10).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cronjob.to_owned()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn pod(
        name: &str,
        generated: bool,
        owner: Option<(&str, &str)>,
        hash: Option<&str>,
    ) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            generate_name: generated.then(|| "x-".into()),
            labels: hash.map(|h| [("pod-template-hash".to_string(), h.to_string())].into()),
            owner_references: owner.map(|(kind, name)| {
                vec![OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller: Some(true),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }
    }

    #[test]
    fn workload_names_follow_istio() {
        let cases = [
            // A Deployment's pod: its ReplicaSet less the template hash.
            (
                pod(
                    "reviews-v1-7d5f9c-abcde",
                    true,
                    Some(("ReplicaSet", "reviews-v1-7d5f9c")),
                    Some("7d5f9c"),
                ),
                "reviews-v1",
            ),
            // A ReplicaSet whose name does not end in the hash: itself.
            (
                pod(
                    "rs-abcde",
                    true,
                    Some(("ReplicaSet", "custom-rs")),
                    Some("7d5f9c"),
                ),
                "custom-rs",
            ),
            // A CronJob's Job: the Job less its schedule suffix.
            (
                pod(
                    "backup-28901230-xyz",
                    true,
                    Some(("Job", "backup-28901230")),
                    None,
                ),
                "backup",
            ),
            // A plain Job.
            (
                pod("migrate-xyz", true, Some(("Job", "migrate")), None),
                "migrate",
            ),
            (pod("db-0", true, Some(("StatefulSet", "db")), None), "db"),
            (
                pod("agent-x1", true, Some(("DaemonSet", "agent")), None),
                "agent",
            ),
            // A pod of its own, or one not made by a controller.
            (pod("debug", false, None, None), "debug"),
            (
                pod("static-web", false, Some(("Node", "node-a")), None),
                "static-web",
            ),
        ];
        for (meta, want) in cases {
            assert_eq!(workload_name(&meta), want, "{:?}", meta.name);
        }
    }
}
