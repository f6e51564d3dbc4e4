//! Where configuration comes from: files on disk and the Kubernetes API.
//! Each source turns what it reads into validated documents
//! ([`SourceDocs`]); the agent merges the latest of every source into a
//! snapshot. A source's update that does not validate is rejected whole
//! and its previous content stays in force.

pub mod files;
pub mod kube;

use crate::istio::{Problem, Severity};

/// A source update that was refused, and why.
#[derive(Debug)]
pub struct Rejection {
    pub source: &'static str,
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errors: Vec<&Problem> = self
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .collect();
        let n = errors.len();
        let s = if n == 1 { "" } else { "s" };
        write!(f, "{} configuration rejected ({n} error{s})", self.source)?;
        for p in errors {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}
