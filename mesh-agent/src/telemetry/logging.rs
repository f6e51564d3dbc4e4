//! `tracing` setup: an env-filter that `/logging` can change at runtime,
//! text or JSON on stderr, and the `log` bridge that carries aya-log records
//! from the kernel programs.

use std::sync::Mutex;

use tracing_subscriber::{
    EnvFilter, Layer as _, Registry, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _,
};

use super::Error;
use crate::config::LogFormat;

/// Changes the log filter of the running agent.
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

fn filter(spec: &str) -> Result<EnvFilter, Error> {
    EnvFilter::builder()
        .parse(spec)
        .map_err(|e| Error::LogFilter {
            filter: spec.into(),
            reason: e.to_string(),
        })
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(spec: &str, format: LogFormat) -> Result<LogHandle, Error> {
    let (filter_layer, reload) = reload::Layer::new(filter(spec)?);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours for a terminal only, not for log files and collectors.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(output)
        .try_init()
        .map_err(|e| Error::LogInit(e.to_string()))?;
    Ok(LogHandle {
        reload,
        current: Mutex::new(spec.into()),
    })
}

impl LogHandle {
    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().expect("log lock").clone()
    }

    /// Replaces the filter; a bad one is rejected and the old one stays.
    pub fn set(&self, spec: &str) -> Result<(), Error> {
        let f = filter(spec)?;
        self.reload
            .reload(f)
            .map_err(|e| Error::LogInit(e.to_string()))?;
        *self.current.lock().expect("log lock") = spec.into();
        Ok(())
    }
}

/// aya-log's level (1 error … 5 trace, 0 off) matching the most verbose
/// level the filter enables anywhere; kernel programs skip log statements
/// above it without formatting them.
pub fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}
