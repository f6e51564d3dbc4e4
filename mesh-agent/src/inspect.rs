//! `mesh-agent status|workloads|services|policies|certs|connections|
//! log-level|config-dump`: ask a running agent on its admin port and print
//! human tables (or `-o json|yaml`), as `istioctl ztunnel-config` and
//! `cilium status` do; `mesh-agent bpf progs|maps` reads the pins.

mod bpf;
mod client;
mod tables;

use serde_json::Value;

pub use self::bpf::{maps, progs};
use crate::config::{Inspect, Output};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the agent at {url}: {reason} (is it running? --admin names its admin address)"
    )]
    Unreachable { url: String, reason: String },
    #[error("{url}: {status} {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: not JSON: {reason}")]
    NotJson { url: String, reason: String },
    #[error("--admin {0:?}: expected http://host:port")]
    BadAdmin(String),
    #[error("{path}: {reason}")]
    Pins { path: String, reason: String },
}

/// What to show, from which endpoints.
#[derive(Debug, Clone, Copy)]
pub enum View {
    Status,
    Workloads,
    Services,
    Policies,
    Certs,
    Connections,
    ConfigDump,
}

/// Prints `view` of the agent `inspect` names.
pub fn show(view: View, inspect: &Inspect) -> Result<String, Error> {
    let admin = client::Admin::parse(&inspect.admin)?;
    let dump = || admin.json("/config_dump");
    let data: Value = match view {
        View::Status => tables::status_data(&dump()?, &admin.text("/metrics")?, &admin),
        View::Workloads => dump()?["workloads"].clone(),
        View::Services => dump()?["snapshot"]["registry"]["services"].clone(),
        View::Policies => dump()?["snapshot"]["policies"].clone(),
        View::Certs => dump()?["certificates"].clone(),
        View::Connections => admin.json("/connections")?,
        View::ConfigDump => dump()?,
    };
    Ok(match inspect.output {
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&data).unwrap_or_default()
        ),
        Output::Yaml => serde_yaml::to_string(&data).unwrap_or_default(),
        Output::Table => match view {
            View::Status => tables::status(&data),
            View::Workloads => tables::workloads(&data),
            View::Services => tables::services(&data),
            View::Policies => tables::policies(&data),
            View::Certs => tables::certs(&data),
            View::Connections => tables::connections(&data),
            View::ConfigDump => format!(
                "{}\n",
                serde_json::to_string_pretty(&data).unwrap_or_default()
            ),
        },
    })
}

/// Shows the log filter, or sets it.
pub fn log_level(level: Option<&str>, inspect: &Inspect) -> Result<String, Error> {
    let admin = client::Admin::parse(&inspect.admin)?;
    let body = match level {
        None => admin.text("/logging")?,
        Some(l) => admin.post(&format!("/logging?level={}", client::query_escape(l)))?,
    };
    Ok(format!("{}\n", body.trim_end()))
}
