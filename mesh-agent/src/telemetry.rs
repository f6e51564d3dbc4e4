//! What the agent tells operators: Prometheus metrics and logs.

pub mod accesslog;
pub mod audit;
mod ebpf;
pub mod logging;
pub mod metrics;
mod series;
pub mod trace;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?}: {reason}")]
    LogFilter { filter: String, reason: String },
    #[error("cannot install the logger: {0}")]
    LogInit(String),
    #[error("cannot register metric: {0}")]
    Metric(#[from] prometheus::Error),
}
