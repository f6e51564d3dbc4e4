//! Who logs what: the access-log providers of the MeshConfig, and each
//! workload's Telemetry `accessLogging`, merged as Istio merges them.
//!
//! The Telemetries that apply to a workload come in Istio's order — the
//! root namespace's without a selector, then its namespace's without a
//! selector, then those of its namespace that select it — and, for the
//! side (client or server) being logged:
//!
//! * the providers in scope start as `defaultProviders.accessLogging`; a
//!   Telemetry naming providers replaces them; an entry without providers
//!   speaks for those in scope;
//! * `disabled: true` turns a provider off, a later entry turns it on;
//! * a provider's filter is the one of the last entry naming it (none
//!   clears it);
//! * when no Telemetry entry applies, MeshConfig's legacy `accessLogFile`
//!   logs everything in the mesh's encoding and format.
//!
//! The merge depends on the MeshConfig's default providers, which change
//! on their own; so a plan keeps the Telemetry entries and caches the
//! merge per provider generation.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwapOption;

use super::{Error, Format, Mode, filter::Filter};
use crate::{
    istio::telemetry::{AccessLogging, WorkloadMode},
    mesh_config::{ENVOY_PROVIDER, Encoding, FileAccessLog, MeshConfig},
};

/// Where a provider writes, and how.
#[derive(Debug)]
pub struct Target {
    pub name: String,
    /// A file; `/dev/stdout` is the agent's standard output.
    pub path: PathBuf,
    pub format: Format,
    pub omit_empty: bool,
}

/// The access-log providers of one MeshConfig, compiled.
#[derive(Debug, Default)]
pub struct Providers {
    /// Bumped on every MeshConfig, so plans know their cached merge is old.
    pub generation: u64,
    pub targets: BTreeMap<String, Arc<Target>>,
    pub defaults: Vec<String>,
    /// `accessLogFile`, for workloads no Telemetry configures.
    pub legacy: Option<Arc<Target>>,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

impl Providers {
    /// Compiles the access-log providers of `mesh`; a bad format names its
    /// provider and field.
    pub fn from_mesh(mesh: &MeshConfig) -> Result<Self, Error> {
        let mesh_format = |path: &str, omit_empty| -> Result<Target, Error> {
            Ok(Target {
                name: ENVOY_PROVIDER.into(),
                path: PathBuf::from(if path.is_empty() { "/dev/stdout" } else { path }),
                format: mesh_format(mesh).map_err(|reason| Error::Provider {
                    provider: "accessLogFormat".into(),
                    reason,
                })?,
                omit_empty,
            })
        };
        let mut targets = BTreeMap::new();
        // Istio's default MeshConfig defines `envoy`; a MeshConfig may
        // redefine it.
        targets.insert(
            ENVOY_PROVIDER.to_owned(),
            Arc::new(mesh_format("/dev/stdout", false)?),
        );
        for p in &mesh.extension_providers {
            if let Some(f) = &p.envoy_file_access_log {
                let t = file_target(&p.name, f, mesh).map_err(|reason| Error::Provider {
                    provider: p.name.clone(),
                    reason,
                })?;
                targets.insert(p.name.clone(), Arc::new(t));
            } else {
                targets.remove(&p.name);
            }
        }
        let legacy = (!mesh.access_log_file.is_empty())
            .then(|| mesh_format(&mesh.access_log_file, false))
            .transpose()?
            .map(Arc::new);
        Ok(Self {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            targets,
            defaults: mesh.default_providers.access_logging.clone(),
            legacy,
        })
    }

    /// Providers with only the legacy log to standard output in Istio's
    /// format (`--access-log`, no MeshConfig).
    pub fn stdout() -> Self {
        let mesh = MeshConfig {
            access_log_file: "/dev/stdout".into(),
            ..Default::default()
        };
        Self::from_mesh(&mesh).expect("the default formats compile")
    }
}

/// The MeshConfig's own format: `accessLogFormat` in `accessLogEncoding`.
fn mesh_format(mesh: &MeshConfig) -> Result<Format, String> {
    let f = mesh.access_log_format.trim();
    match mesh.access_log_encoding {
        Encoding::Text if f.is_empty() => Ok(Format::istio_default(false)),
        Encoding::Text => Format::text(&mesh.access_log_format).map_err(|e| e.to_string()),
        Encoding::Json if f.is_empty() => Ok(Format::istio_default(true)),
        Encoding::Json => {
            let labels: BTreeMap<String, String> = serde_json::from_str(f)
                .map_err(|e| format!("accessLogFormat is not a JSON object of strings: {e}"))?;
            Format::json(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| e.to_string())
        }
    }
}

fn file_target(name: &str, f: &FileAccessLog, mesh: &MeshConfig) -> Result<Target, String> {
    let format = match &f.log_format {
        Some(lf) => match (&lf.text, &lf.labels) {
            (Some(t), None) => Format::text(t).map_err(|e| e.to_string())?,
            (None, Some(l)) if l.is_empty() => Format::istio_default(true),
            (None, Some(l)) => {
                let labels = l
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => Ok((k.as_str(), s.as_str())),
                        _ => Err(format!("logFormat.labels.{k}: not a format string")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Format::json(labels).map_err(|e| e.to_string())?
            }
            (None, None) => mesh_format(mesh)?,
            (Some(_), Some(_)) => return Err("logFormat: text and labels are exclusive".into()),
        },
        None => mesh_format(mesh)?,
    };
    Ok(Target {
        name: name.to_owned(),
        path: PathBuf::from(if f.path.is_empty() {
            "/dev/stdout"
        } else {
            &f.path
        }),
        format,
        omit_empty: f.omit_empty_values,
    })
}

/// One `accessLogging` entry of a Telemetry, compiled.
#[derive(Debug)]
struct Entry {
    /// The Telemetry it came from (entries of one Telemetry are one level).
    level: usize,
    mode: Option<WorkloadMode>,
    providers: Vec<String>,
    disabled: Option<bool>,
    filter: Option<Arc<Filter>>,
}

/// The providers a record of one side goes to, each with its filter.
#[derive(Debug, Default)]
pub struct Resolved {
    pub client: Vec<(Arc<Target>, Option<Arc<Filter>>)>,
    pub server: Vec<(Arc<Target>, Option<Arc<Filter>>)>,
}

impl Resolved {
    pub fn side(&self, mode: Mode) -> &[(Arc<Target>, Option<Arc<Filter>>)] {
        match mode {
            Mode::Client => &self.client,
            Mode::Server => &self.server,
        }
    }
}

/// A workload's access logging.
#[derive(Debug, Default)]
pub struct LogPlan {
    entries: Vec<Entry>,
    /// `Telemetry namespace/name` of each Telemetry, in order.
    pub sources: Vec<String>,
    cached: ArcSwapOption<(u64, Arc<Resolved>)>,
}

impl LogPlan {
    /// The plan of the Telemetries `(id, accessLogging)` that apply, in
    /// Istio's order. A filter that does not compile is an error (the
    /// validator reports it first, with its file and field).
    pub fn new<'a>(
        telemetries: impl IntoIterator<Item = (String, &'a [AccessLogging])>,
    ) -> Result<Self, Error> {
        let mut plan = Self::default();
        for (level, (id, logging)) in telemetries.into_iter().enumerate() {
            if logging.is_empty() {
                continue;
            }
            plan.sources.push(id);
            for a in logging {
                plan.entries.push(Entry {
                    level,
                    mode: a.matches.as_ref().and_then(|m| m.mode),
                    providers: a.providers.iter().map(|p| p.name.clone()).collect(),
                    disabled: a.disabled,
                    filter: a
                        .filter
                        .as_ref()
                        .map(|f| Filter::compile(&f.expression).map(Arc::new))
                        .transpose()?,
                });
            }
        }
        Ok(plan)
    }

    /// The merge for `providers`, cached until they change.
    pub fn resolve(&self, providers: &Providers) -> Arc<Resolved> {
        if let Some(c) = &*self.cached.load()
            && c.0 == providers.generation
        {
            return c.1.clone();
        }
        let r = Arc::new(Resolved {
            client: self.merge(Mode::Client, providers),
            server: self.merge(Mode::Server, providers),
        });
        self.cached
            .store(Some(Arc::new((providers.generation, r.clone()))));
        r
    }

    fn merge(&self, mode: Mode, providers: &Providers) -> Vec<(Arc<Target>, Option<Arc<Filter>>)> {
        let applies = |e: &Entry| {
            matches!(
                (e.mode, mode),
                (None | Some(WorkloadMode::ClientAndServer), _)
                    | (Some(WorkloadMode::Client), Mode::Client)
                    | (Some(WorkloadMode::Server), Mode::Server)
            )
        };
        if !self.entries.iter().any(applies) {
            return providers.legacy.iter().map(|t| (t.clone(), None)).collect();
        }
        let mut scope: Vec<String> = providers.defaults.clone();
        let mut on: BTreeMap<String, (bool, Option<Arc<Filter>>)> = BTreeMap::new();
        let mut level_named: Option<(usize, Vec<String>)> = None;
        for e in &self.entries {
            if !e.providers.is_empty() {
                // Names replace the scope of the levels above; within one
                // Telemetry they add up.
                match &mut level_named {
                    Some((l, names)) if *l == e.level => names.extend(e.providers.clone()),
                    _ => level_named = Some((e.level, e.providers.clone())),
                }
                scope = level_named
                    .as_ref()
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
            }
            if !applies(e) {
                continue;
            }
            let explicit = !e.providers.is_empty();
            let names = if explicit { &e.providers } else { &scope };
            for p in names {
                let slot = on.entry(p.clone()).or_insert((true, None));
                slot.0 = e.disabled != Some(true);
                if explicit {
                    slot.1 = e.filter.clone();
                }
            }
        }
        on.into_iter()
            .filter(|(name, (enabled, _))| *enabled && scope.contains(name))
            .filter_map(|(name, (_, filter))| {
                let t = providers.targets.get(&name);
                if t.is_none() {
                    tracing::debug!(provider = %name, "access log: no such access-log provider in the MeshConfig");
                }
                t.map(|t| (t.clone(), filter))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
