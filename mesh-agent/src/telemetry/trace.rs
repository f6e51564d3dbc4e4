//! Distributed tracing: each agent a request passes records a span — the
//! source's agent a CLIENT span, the destination's a SERVER span when it
//! reads the request — with Envoy's and Istio's tags, and passes its own
//! span on as the parent (W3C and B3 headers, `context`). Spans go to the
//! MeshConfig's `zipkin` or `opentelemetry` provider chosen by Telemetry
//! (`plan`), in batches, from a task of their own behind a bounded queue:
//! a full queue drops spans and counts them, and never holds a request.

pub mod context;
pub mod export;
pub mod plan;

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;
use tokio::sync::mpsc;

pub use self::{
    context::SpanContext,
    plan::{Providers, Resolved, TracePlan},
};
use super::accesslog::Mode;

/// An endpoint of the mesh's Service with this hostname and port, if
/// there is one (the registry, from the agent's snapshot).
pub type Lookup = Arc<dyn Fn(&str, u16) -> Option<SocketAddr> + Send + Sync>;

/// Spans waiting to be exported, at most.
pub const QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tracing provider {provider:?}: {reason}")]
    Provider { provider: String, reason: String },
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub ctx: SpanContext,
    pub name: String,
    pub kind: Mode,
    pub start: SystemTime,
    pub end: SystemTime,
    /// `service.name` of the workload that recorded it
    /// (`<app>.<namespace>`, as Istio names a proxy's service).
    pub service: String,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// Envoy's and Istio's tags, then the Telemetry's custom tags.
    pub tags: Vec<(String, String)>,
    /// 5xx, or no response at all.
    pub error: bool,
}

/// The node's tracer: the providers in force and the export queue.
pub struct Tracer {
    tx: Option<mpsc::Sender<(Span, Arc<plan::Target>)>>,
    providers: ArcSwap<Providers>,
    counts: IntCounterVec,
}

/// Every result is exported from the start, at zero.
fn touch(counts: &IntCounterVec) {
    for r in ["exported", "dropped", "failed"] {
        counts.with_label_values(&[r]);
    }
}

/// A span being recorded: its context and where it goes.
pub struct Active {
    pub ctx: SpanContext,
    pub how: Resolved,
    pub start: SystemTime,
}

impl Tracer {
    /// Starts the exporter on the current runtime; `counts` is
    /// `mesh_trace_spans_total`; `lookup` finds providers that are
    /// Services of the mesh.
    pub fn start(providers: Providers, counts: IntCounterVec, lookup: Lookup) -> Self {
        touch(&counts);
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export::run(rx, counts.clone(), lookup));
        Self {
            tx: Some(tx),
            providers: ArcSwap::from_pointee(providers),
            counts,
        }
    }

    /// Traces nothing (tests and tools).
    pub fn off(counts: IntCounterVec) -> Self {
        touch(&counts);
        Self {
            tx: None,
            providers: ArcSwap::from_pointee(Providers::default()),
            counts,
        }
    }

    pub fn set_providers(&self, p: Providers) {
        self.providers.store(Arc::new(p));
    }

    /// This hop's span for a request with `headers`, when its workload is
    /// traced on side `mode`: the caller's context continued (or a new
    /// trace) and the sampling decided. The caller injects `ctx` into the
    /// request it sends on, sampled or not, so the next hop follows.
    pub fn begin(&self, plan: &TracePlan, mode: Mode, headers: &http::HeaderMap) -> Option<Active> {
        self.tx.as_ref()?;
        let how = plan.resolve(mode, &self.providers.load())?;
        Some(Active {
            ctx: context::child(headers, how.sampling),
            how,
            start: SystemTime::now(),
        })
    }

    /// Queues a finished span of a sampled, reported trace; never waits.
    pub fn finish(&self, span: Span, how: &Resolved) {
        if !span.ctx.sampled || !how.report {
            return;
        }
        let Some(tx) = &self.tx else { return };
        if tx.try_send((span, how.target.clone())).is_err() {
            self.counts.with_label_values(&["dropped"]).inc();
        }
    }
}

/// The custom tags of `how` for a request with `headers`: literal values,
/// request headers and environment variables, with their defaults.
pub fn custom_tags(how: &Resolved, headers: &http::HeaderMap) -> Vec<(String, String)> {
    how.custom_tags
        .iter()
        .filter_map(|(name, t)| {
            let v = if let Some(l) = &t.literal {
                Some(l.value.clone())
            } else if let Some(h) = &t.header {
                headers
                    .get(h.name.to_ascii_lowercase())
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| (!h.default_value.is_empty()).then(|| h.default_value.clone()))
            } else if let Some(e) = &t.environment {
                std::env::var(&e.name)
                    .ok()
                    .or_else(|| (!e.default_value.is_empty()).then(|| e.default_value.clone()))
            } else {
                None
            };
            v.map(|v| (name.clone(), v))
        })
        .collect()
}
