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
                    // Valid Istio configuration the agent cannot serve yet:
                    // said once per MeshConfig, and Telemetry naming it
                    // traces nothing (no headers are changed either).
                    tracing::warn!(provider = %p.name, "mesh config: OTLP over gRPC is not supported yet (give `http` for OTLP/HTTP); Telemetry naming this provider traces nothing");
                    continue;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn providers() -> Providers {
        Providers::from_mesh(
            &MeshConfig::parse(
                "defaultProviders: {tracing: [zipkin]}
extensionProviders:
- {name: zipkin, zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}}
- {name: otel, opentelemetry: {service: 10.0.0.9, port: 4318, http: {path: /v1/traces, timeout: 1s}}}
- {name: otel-grpc, opentelemetry: {service: 10.0.0.9, port: 4317}}
",
            )
            .unwrap(),
        )
        .unwrap()
    }

    fn tracing(yaml: &str) -> Vec<Tracing> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn providers_take_istio_defaults_and_skip_grpc() {
        let p = providers();
        let z = &p.targets["zipkin"];
        assert_eq!(
            (z.protocol.clone(), z.path.as_str(), z.max_tag_length),
            (Protocol::Zipkin, "/api/v2/spans", 256)
        );
        let o = &p.targets["otel"];
        assert_eq!(
            (o.protocol.clone(), o.timeout),
            (Protocol::OtlpHttp, Duration::from_secs(1))
        );
        assert!(
            !p.targets.contains_key("otel-grpc"),
            "gRPC is not served yet"
        );
    }

    #[test]
    fn levels_merge_as_istio_does() {
        let p = providers();
        // No Telemetry: the default provider at Istio's 1 %.
        let none = TracePlan::new(std::iter::empty());
        let r = none.resolve(Mode::Client, &p).unwrap();
        assert_eq!(
            (r.target.name.as_str(), r.sampling),
            ("zipkin", DEFAULT_SAMPLING)
        );
        // The mesh sets 100 %, the namespace names another provider for the
        // server side only and turns reporting off for clients.
        let mesh = tracing("[{randomSamplingPercentage: 100}]");
        let ns = tracing(
            "[{match: {mode: SERVER}, providers: [{name: otel}]}, {match: {mode: CLIENT}, disableSpanReporting: true}]",
        );
        let plan = TracePlan::new([mesh.as_slice(), ns.as_slice()]);
        let server = plan.resolve(Mode::Server, &p).unwrap();
        assert_eq!(
            (server.target.name.as_str(), server.sampling, server.report),
            ("otel", 100.0, true)
        );
        let client = plan.resolve(Mode::Client, &p).unwrap();
        assert_eq!(
            (client.target.name.as_str(), client.report),
            ("zipkin", false)
        );
        // A provider the MeshConfig does not have: no tracing.
        let unknown = tracing("[{providers: [{name: nope}]}]");
        assert!(
            TracePlan::new([unknown.as_slice()])
                .resolve(Mode::Client, &p)
                .is_none()
        );
    }
}
