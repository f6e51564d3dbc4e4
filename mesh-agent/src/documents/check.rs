//! `mesh-agent validate`: every problem of a set of files, the way
//! `istioctl validate` reports them, plus what the agent accepts without
//! acting on yet. The agent's own loading uses the same functions, so what
//! this command accepts is what the agent accepts.

use std::{collections::BTreeMap, path::PathBuf};

use super::{Document, Parsed};
use crate::istio::{Problem, Severity, validate};

/// What validating a set of files found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    /// Documents read (Istio resources, Kubernetes objects, registries).
    pub documents: usize,
    /// Sorted by file and line.
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.count(Severity::Error)
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, s: Severity) -> usize {
        self.problems.iter().filter(|p| p.severity == s).count()
    }
}

/// Validates every configuration file under `paths` (files, or directories
/// walked recursively).
pub fn paths(paths: &[PathBuf]) -> Report {
    let mut report = Report::default();
    let mut parsed = Parsed::default();
    for p in paths {
        // `-`: standard input (`kubectl get … -o yaml | mesh-agent validate -`).
        let read = if p.as_os_str() == "-" {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                .map(|_| vec![(PathBuf::from("<stdin>"), bytes)])
        } else {
            crate::watch::read(p)
        };
        match read {
            Ok(snapshot) => {
                report.files += snapshot.len();
                for (file, bytes) in &snapshot {
                    super::parse_file(file, bytes, &mut parsed);
                }
            }
            Err(e) => parsed.problems.push(Problem {
                severity: Severity::Error,
                file: p.clone(),
                line: 0,
                resource: "file".into(),
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    report.documents = parsed.documents.len();
    report.problems = documents(&parsed);
    report
}

/// Problems of parsed documents: those found while parsing, each resource's
/// own, and those between resources (duplicates).
pub fn documents(parsed: &Parsed) -> Vec<Problem> {
    let mut problems = parsed.problems.clone();
    let mut seen: BTreeMap<String, (PathBuf, usize)> = BTreeMap::new();
    for d in &parsed.documents {
        let (id, origin) = match d {
            Document::Istio(r) => {
                problems.extend(validate::check(r));
                problems.extend(validate::not_enforced(r));
                (r.id(), &r.origin)
            }
            Document::Kube(k, origin) => (k.id(), origin),
            Document::Workloads(..) => continue,
        };
        match seen.get(&id) {
            Some((file, line)) => problems.push(Problem {
                severity: Severity::Error,
                file: origin.file.clone(),
                line: origin.line,
                resource: id,
                field: "metadata.name".into(),
                message: format!("defined twice (also at {}:{line})", file.display()),
            }),
            None => {
                seen.insert(id, (origin.file.clone(), origin.line));
            }
        }
    }
    problems.sort_by(|a, b| (&a.file, a.line, a.severity).cmp(&(&b.file, b.line, b.severity)));
    problems
}
