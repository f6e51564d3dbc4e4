//! Which Telemetry resources configure a workload, in Istio's order: the
//! root namespace's without a selector, then the workload namespace's
//! without a selector (the oldest of each, as Istio takes one), then
//! those of its namespace whose selector matches it, oldest first.
//! Workloads with the same Telemetries share one compiled plan.

use std::{collections::HashMap, sync::Arc};

use crate::{
    istio::{Resource, Spec},
    telemetry::{accesslog::LogPlan, trace::TracePlan},
    workload::Workload,
};

/// A workload's compiled Telemetry: access logging and tracing.
#[derive(Clone)]
pub(super) struct WorkloadTelemetry {
    pub access_logging: Arc<LogPlan>,
    pub tracing: Arc<TracePlan>,
}

/// Compiled plans by the Telemetries they come from.
#[derive(Default)]
pub(super) struct Plans(HashMap<Vec<String>, WorkloadTelemetry>);

impl Plans {
    /// The plans of `w`; `telemetries` are sorted oldest first.
    pub(super) fn of(
        &mut self,
        telemetries: &[Arc<Resource>],
        w: &Workload,
        root_namespace: &str,
    ) -> WorkloadTelemetry {
        let applying = applying(telemetries, w, root_namespace);
        let key: Vec<String> = applying.iter().map(|r| r.id()).collect();
        self.0
            .entry(key)
            .or_insert_with(|| {
                let specs = applying.iter().filter_map(|r| match &r.spec {
                    Spec::Telemetry(t) => Some((r, t)),
                    _ => None,
                });
                let logs = specs
                    .clone()
                    .map(|(r, t)| (r.id(), t.access_logging.as_slice()));
                WorkloadTelemetry {
                    access_logging: Arc::new(LogPlan::new(logs).unwrap_or_else(|e| {
                        // The validator refuses such a resource first.
                        tracing::warn!(workload = %w.key(), "Telemetry: {e}; access logs off for it");
                        LogPlan::default()
                    })),
                    tracing: Arc::new(TracePlan::new(specs.map(|(_, t)| t.tracing.as_slice()))),
                }
            })
            .clone()
    }
}

fn applying<'a>(
    telemetries: &'a [Arc<Resource>],
    w: &Workload,
    root_namespace: &str,
) -> Vec<&'a Arc<Resource>> {
    let selectorless = |ns: &str| {
        telemetries.iter().find(|r| {
            r.metadata.namespace == ns
                && matches!(&r.spec, Spec::Telemetry(t) if t.selector.is_none()
                    && t.target_ref.is_none() && t.target_refs.is_empty())
        })
    };
    let mut out: Vec<&Arc<Resource>> = selectorless(root_namespace).into_iter().collect();
    if w.namespace != root_namespace {
        out.extend(selectorless(&w.namespace));
    }
    out.extend(telemetries.iter().filter(|r| {
        r.metadata.namespace == w.namespace
            && matches!(&r.spec, Spec::Telemetry(t) if t.selector.as_ref().is_some_and(|s| {
                s.match_labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            }))
    }));
    out
}
