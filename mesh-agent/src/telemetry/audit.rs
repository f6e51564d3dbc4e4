//! The audit log: requests an AUDIT AuthorizationPolicy matches, and every
//! denial, as one JSON object per line — to the log under the
//! `mesh::audit` target, or appended to the file `--audit-log` names.
//! Writing never blocks the data path: records go through a bounded
//! queue, and what does not fit is dropped and counted
//! (`mesh_audit_dropped_total`).

use std::{io::Write, path::PathBuf};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;

/// Records waiting to be written, at most.
const QUEUE: usize = 4096;

/// One audited request or connection.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `AUDIT` (matched an AUDIT policy) or the action that denied.
    pub reason: &'a str,
    /// `namespace/name` of the policy, `none` when no ALLOW policy matched.
    pub policy: &'a str,
    pub source_principal: Option<&'a str>,
    pub source_ip: String,
    pub destination_workload: &'a str,
    pub destination: String,
    /// Absent for a connection decided without HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
}

#[derive(Clone)]
pub struct Audit {
    sink: Option<mpsc::Sender<String>>,
    dropped: IntCounter,
}

impl Audit {
    /// Writes to `file` when given, else to the log. Starts its writer
    /// on the current runtime.
    pub fn new(file: Option<PathBuf>, dropped: IntCounter) -> Self {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Self {
                sink: None,
                dropped,
            };
        };
        rt.spawn(async move {
            let mut out = file.map(|path| {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path);
                (path, f)
            });
            while let Some(line) = rx.recv().await {
                match &mut out {
                    Some((path, Ok(f))) => {
                        if let Err(e) = writeln!(f, "{line}") {
                            tracing::warn!(path = %path.display(), "audit log: {e}");
                        }
                    }
                    Some((path, Err(e))) => {
                        tracing::warn!(path = %path.display(), "audit log cannot be opened: {e}; {line}")
                    }
                    None => tracing::info!(target: "mesh::audit", "{line}"),
                }
            }
        });
        Self {
            sink: Some(tx),
            dropped,
        }
    }

    pub fn write(&self, r: &Record<'_>) {
        let Some(tx) = &self.sink else { return };
        let Ok(line) = serde_json::to_string(r) else {
            return;
        };
        if tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// The current time as RFC 3339 with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
