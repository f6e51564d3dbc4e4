//! Who traces what: the tracing providers of the MeshConfig (`zipkin`,
//! `opentelemetry`), and each workload's Telemetry `tracing`, merged as
//! Istio merges them. For the side being traced, going through the
//! Telemetries in Istio's order (root, namespace, selector):
//!
//! * the provider is the first one the last entry naming providers names,
//!   else the first of `defaultProviders.tracing`; none means no tracing;
//! * `randomSamplingPercentage`, `disableSpanReporting` and `customTags`
//!   are the last ones set (tags replace, they do not merge);
//! * sampling defaults to 1 %, as Istio's.
//!
//! Like the access-log plan, the merge depends on the MeshConfig, so it is
//! cached per provider generation.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;

use super::Error;
use crate::{
    istio::telemetry::{CustomTag, Tracing, WorkloadMode},
    mesh_config::MeshConfig,
    telemetry::accesslog::Mode,
};

/// Istio's default sampling when nothing says otherwise.
pub const DEFAULT_SAMPLING: f64 = 1.0;

/// Where a provider sends spans, and in which format.
#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    /// Zipkin v2 JSON, POSTed to `path`.
    Zipkin,
    /// OTLP, HTTP/protobuf POSTed to `path`.
    OtlpHttp,
}

#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub protocol: Protocol,
    /// A Service's hostname, a DNS name or an address.
    pub service: String,
    pub port: u16,
    pub path: String,
    pub timeout: Duration,
    /// Tags longer than this are cut (Istio's `maxTagLength`, 256).
    pub max_tag_length: usize,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Default)]
pub struct Providers {
    pub generation: u64,
    pub targets: BTreeMap<String, Arc<Target>>,
    pub defaults: Vec<String>,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

impl Providers {
    pub fn from_mesh(mesh: &MeshConfig) -> Result<Self, Error> {
        let mut targets = BTreeMap::new();
        for p in &mesh.extension_providers {
            let fail = |reason: &str| Error::Provider {
                provider: p.name.clone(),
                reason: reason.to_owned(),
            };
            let t = if let Some(z) = &p.zipkin {
                Target {
                    name: p.name.clone(),
                    protocol: Protocol::Zipkin,
                    service: z.service.clone(),
                    port: z.port,
                    path: z.path.clone().unwrap_or_else(|| "/api/v2/spans".into()),
                    timeout: z.timeout.unwrap_or(Duration::from_secs(3)),
                    max_tag_length: z.max_tag_length.unwrap_or(256) as usize,
                    headers: Vec::new(),
                }
            } else if let Some(o) = &p.opentelemetry {
                let Some(http) = &o.http else {
                    return Err(fail(
                        "OTLP over gRPC is not supported yet: give `http` (OTLP/HTTP)",
                    ));
                };
                Target {
                    name: p.name.clone(),
                    protocol: Protocol::OtlpHttp,
                    service: o.service.clone(),
                    port: o.port,
                    path: http.path.clone().unwrap_or_else(|| "/v1/traces".into()),
                    timeout: http.timeout.unwrap_or(Duration::from_secs(3)),
                    max_tag_length: o.max_tag_length.unwrap_or(256) as usize,
                    headers: http
                        .headers
                        .iter()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                }
            } else {
                continue;
            };
            if t.service.is_empty() || t.port == 0 {
                return Err(fail("service and port are required"));
            }
            targets.insert(p.name.clone(), Arc::new(t));
        }
        Ok(Self {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            targets,
            defaults: mesh.default_providers.tracing.clone(),
        })
    }
}

/// How one side of a workload traces.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub target: Arc<Target>,
    pub sampling: f64,
    pub report: bool,
    pub custom_tags: BTreeMap<String, CustomTag>,
}

#[derive(Debug, Default)]
struct Sides {
    client: Option<Resolved>,
    server: Option<Resolved>,
}

/// A workload's tracing.
#[derive(Debug, Default)]
pub struct TracePlan {
    entries: Vec<Tracing>,
    cached: ArcSwapOption<(u64, Arc<Sides>)>,
}

impl TracePlan {
    /// The plan of the `tracing` entries of the Telemetries that apply, in
    /// Istio's order.
    pub fn new<'a>(levels: impl IntoIterator<Item = &'a [Tracing]>) -> Self {
        Self {
            entries: levels.into_iter().flatten().cloned().collect(),
            cached: ArcSwapOption::empty(),
        }
    }

    /// How `mode` is traced under `providers`; `None`: not at all.
    pub fn resolve(&self, mode: Mode, providers: &Providers) -> Option<Resolved> {
        let sides = match &*self.cached.load() {
            Some(c) if c.0 == providers.generation => c.1.clone(),
            _ => {
                let s = Arc::new(Sides {
                    client: self.merge(Mode::Client, providers),
                    server: self.merge(Mode::Server, providers),
                });
                self.cached
                    .store(Some(Arc::new((providers.generation, s.clone()))));
                s
            }
        };
        match mode {
            Mode::Client => sides.client.clone(),
            Mode::Server => sides.server.clone(),
        }
    }

    fn merge(&self, mode: Mode, providers: &Providers) -> Option<Resolved> {
        let mut provider = providers.defaults.first().cloned();
        let mut sampling = None;
        let mut report = true;
        let mut custom_tags = BTreeMap::new();
        for e in &self.entries {
            let applies = matches!(
                (e.matches.as_ref().and_then(|m| m.mode), mode),
                (None | Some(WorkloadMode::ClientAndServer), _)
                    | (Some(WorkloadMode::Client), Mode::Client)
                    | (Some(WorkloadMode::Server), Mode::Server)
            );
            if !applies {
                continue;
            }
            if let Some(p) = e.providers.first() {
                provider = Some(p.name.clone());
            }
            if let Some(s) = e.random_sampling_percentage {
                sampling = Some(s);
            }
            if let Some(d) = e.disable_span_reporting {
                report = !d;
            }
            if !e.custom_tags.is_empty() {
                custom_tags = e.custom_tags.clone();
            }
        }
        let target = providers.targets.get(&provider?)?.clone();
        Some(Resolved {
            target,
            sampling: sampling.unwrap_or(DEFAULT_SAMPLING),
            report,
            custom_tags,
        })
    }
}
