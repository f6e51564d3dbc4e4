//! Where each meshed pod runs, as the CA learns it from the same sources
//! the agents read (workload registries with `node:` set, Kubernetes Pods
//! with `spec.nodeName`), kept in step with them.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::{
    registry,
    snapshot::SourceDocs,
    sources::{files::FileSource, kube::KubeSource},
    workload::Workload,
};

/// The meshed workloads of the configuration (pods in the mesh by
/// `dataplane_mode_label`, as the agents see them), with their nodes.
pub fn of<'a>(
    sources: impl IntoIterator<Item = &'a SourceDocs>,
    dataplane_mode_label: &str,
) -> Vec<Workload> {
    let settings = registry::Settings {
        cluster_domain: "cluster.local".into(),
        dataplane_mode_label: dataplane_mode_label.into(),
        node_name: None,
    };
    registry::build(sources.into_iter().flat_map(|s| &s.documents), &settings)
        .workloads
        .iter()
        .map(|w| (**w).clone())
        .collect()
}

/// The placement in force, swapped whole when a source changes.
pub type Shared = RwLock<Arc<Vec<Workload>>>;

/// Keeps `placement` in step with the files and the API.
pub async fn watch(
    placement: Arc<Shared>,
    mut files: Option<FileSource>,
    mut file_docs: Option<SourceDocs>,
    notifier: Option<crate::watch::Notifier>,
    kube: Option<Arc<KubeSource>>,
    dataplane_mode_label: String,
) {
    loop {
        let files_changed = async {
            match &notifier {
                Some(n) => n.changed().await,
                None => std::future::pending().await,
            }
        };
        let kube_changed = async {
            match &kube {
                Some(k) => k.changed().await,
                None => std::future::pending().await,
            }
        };
        let file_event = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => true,
            _ = files_changed => {
                tokio::time::sleep(crate::watch::SETTLE).await;
                true
            }
            _ = kube_changed => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                false
            }
        };
        if file_event {
            match files.as_mut().and_then(FileSource::poll) {
                None => continue,
                Some(Ok(docs)) => file_docs = Some(docs),
                Some(Err(e)) => {
                    tracing::error!("placement rejected, keeping the previous one: {e}");
                    continue;
                }
            }
        }
        let kube_docs = kube.as_ref().and_then(|k| k.docs());
        let ws = of(
            file_docs.iter().chain(kube_docs.as_ref()),
            &dataplane_mode_label,
        );
        tracing::info!(workloads = ws.len(), "placement reloaded");
        *placement.write().expect("placement lock") = Arc::new(ws);
    }
}
