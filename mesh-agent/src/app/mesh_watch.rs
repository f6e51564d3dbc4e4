//! The MeshConfig file (`--mesh-config`): read at start (a bad one stops
//! the agent), then watched; a change applies at once to the CUSTOM
//! action's providers, the access-log and the tracing providers, and a
//! change that
//! does not parse is refused, logged with its file and field, and counted
//! (`mesh_config_rejected_total{source="mesh-config"}`), the last good one
//! staying in force.

use std::{path::Path, sync::Arc, time::Duration};

use crate::{
    mesh_config::{Error, MeshConfig},
    proxy::ProxyContext,
    telemetry::{accesslog, trace},
    watch,
};

/// A MeshConfig and what it compiles to.
pub struct Loaded {
    pub mesh: MeshConfig,
    pub logs: accesslog::Providers,
    pub traces: trace::Providers,
}

/// The `source` label of this file's metrics.
const SOURCE: &str = "mesh-config";

/// Reads the MeshConfig and compiles its access-log providers. With
/// `--access-log` and no `accessLogFile`, the legacy log goes to standard
/// output.
pub fn load(path: Option<&Path>, access_log: bool) -> Result<Loaded, Error> {
    let mut mesh = match path {
        Some(p) => MeshConfig::read(p)?,
        None => MeshConfig::default(),
    };
    compile(&mut mesh, access_log, path)
}

fn compile(mesh: &mut MeshConfig, access_log: bool, path: Option<&Path>) -> Result<Loaded, Error> {
    if access_log && mesh.access_log_file.is_empty() {
        mesh.access_log_file = "/dev/stdout".into();
    }
    let fail = |reason: String| Error::Read {
        path: path.map_or("--access-log".into(), |p| p.display().to_string()),
        reason,
    };
    let logs = accesslog::Providers::from_mesh(mesh).map_err(|e| fail(e.to_string()))?;
    let traces = trace::Providers::from_mesh(mesh).map_err(|e| fail(e.to_string()))?;
    mesh.report_unsupported();
    Ok(Loaded {
        mesh: mesh.clone(),
        logs,
        traces,
    })
}

/// Applies changes of the file at `path` to `ctx` until the agent stops.
pub fn spawn(path: &Path, ctx: Arc<ProxyContext>, poll: Duration) {
    let path = path.to_path_buf();
    let Ok(initial) = watch::read(&path) else {
        return;
    };
    ctx.metrics.config_source(SOURCE);
    let mut w = watch::Watch::new(path.clone(), initial);
    let notifier = watch::Notifier::new(std::slice::from_ref(&path))
        .inspect_err(|e| tracing::warn!(path = %path.display(), "cannot watch the mesh config for changes; reading it on a timer only: {e}"))
        .ok();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = async {
                    match &notifier {
                        Some(n) => n.changed().await,
                        None => std::future::pending().await,
                    }
                } => tokio::time::sleep(watch::SETTLE).await,
            }
            match w.poll() {
                None => {}
                Some(Err(e)) => {
                    tracing::error!(path = %path.display(), "mesh config cannot be read: {e}; the last good one stays");
                    ctx.metrics.config_rejected(SOURCE);
                }
                Some(Ok(_)) => {
                    let loaded = MeshConfig::read(&path)
                        .and_then(|mut m| compile(&mut m, ctx.config.access_log, Some(&path)));
                    match loaded {
                        Ok(l) => {
                            ctx.mesh.store(Arc::new(l.mesh));
                            ctx.access_log.set_providers(l.logs);
                            ctx.tracer.set_providers(l.traces);
                            tracing::info!(path = %path.display(), "mesh config applied");
                        }
                        Err(e) => {
                            tracing::error!("mesh config refused: {e}; the last good one stays");
                            ctx.metrics.config_rejected(SOURCE);
                        }
                    }
                }
            }
        }
    });
}
