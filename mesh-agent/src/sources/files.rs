//! The file source: files and directories of YAML/JSON (Istio resources,
//! Kubernetes objects, workload registries), re-read when their content
//! changes. One update is all the files at once: if any of them has an
//! error, none of the change is applied.

use std::{
    hash::Hasher,
    path::{Path, PathBuf},
};

use super::Rejection;
use crate::{
    documents::{self as parse, Parsed, check},
    istio::{Problem, Severity},
    snapshot::SourceDocs,
    watch::{self, Watch},
};

pub const NAME: &str = "files";

/// Watches every configured path.
pub struct FileSource {
    watches: Vec<Watch>,
    contents: Vec<watch::Snapshot>,
}

impl FileSource {
    /// Reads `paths` for the first time.
    pub fn open(paths: &[PathBuf]) -> (Self, Result<SourceDocs, Rejection>) {
        let mut contents = Vec::new();
        let mut unreadable = Vec::new();
        for p in paths {
            match watch::read(p) {
                Ok(s) => contents.push(s),
                Err(e) => {
                    unreadable.push(read_problem(p, &e));
                    contents.push(Vec::new());
                }
            }
        }
        let watches = paths
            .iter()
            .zip(&contents)
            .map(|(p, c)| Watch::new(p.clone(), c.clone()))
            .collect();
        let me = Self { watches, contents };
        let result = if unreadable.is_empty() {
            me.docs()
        } else {
            Err(Rejection {
                source: NAME,
                problems: unreadable,
            })
        };
        (me, result)
    }

    /// `None` when nothing changed; otherwise the new documents, or why
    /// they are refused.
    pub fn poll(&mut self) -> Option<Result<SourceDocs, Rejection>> {
        let mut changed = false;
        let mut unreadable = Vec::new();
        for (i, w) in self.watches.iter_mut().enumerate() {
            match w.poll() {
                None => {}
                Some(Ok(s)) => {
                    self.contents[i] = s;
                    changed = true;
                }
                Some(Err(e)) => {
                    unreadable.push(read_problem(w.path(), &e));
                    changed = true;
                }
            }
        }
        if !changed {
            return None;
        }
        if !unreadable.is_empty() {
            return Some(Err(Rejection {
                source: NAME,
                problems: unreadable,
            }));
        }
        Some(self.docs())
    }

    fn docs(&self) -> Result<SourceDocs, Rejection> {
        read_documents(self.contents.iter().flatten())
    }
}

/// Parses and validates file contents into one source update.
pub fn read_documents<'a>(
    files: impl IntoIterator<Item = &'a (PathBuf, Vec<u8>)>,
) -> Result<SourceDocs, Rejection> {
    let mut parsed = Parsed::default();
    let mut hash = Fnv::default();
    for (file, bytes) in files {
        hash.write(file.as_os_str().as_encoded_bytes());
        hash.write(bytes);
        parse::parse_file(file, bytes, &mut parsed);
    }
    let problems = check::documents(&parsed);
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(Rejection {
            source: NAME,
            problems,
        });
    }
    Ok(SourceDocs {
        name: NAME,
        revision: format!("{:016x}", hash.finish()),
        documents: parsed.documents,
        notes: problems,
    })
}

fn read_problem(path: &Path, e: &std::io::Error) -> Problem {
    Problem {
        severity: Severity::Error,
        file: path.into(),
        line: 0,
        resource: "file".into(),
        field: String::new(),
        message: format!("cannot read: {e}"),
    }
}

/// FNV-1a: a stable content fingerprint for the revision (not security).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_change_is_rejected_whole_and_recovers() {
        let dir = std::env::temp_dir().join(format!("mesh-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pa = |mode: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: istio-system}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
            )
        };
        std::fs::write(dir.join("pa.yaml"), pa("STRICT")).unwrap();
        let (mut src, first) = FileSource::open(std::slice::from_ref(&dir));
        let first = first.unwrap();
        assert_eq!(first.documents.len(), 1);
        assert!(src.poll().is_none());
        std::fs::write(dir.join("pa.yaml"), pa("STRICTER")).unwrap();
        let e = src.poll().unwrap().unwrap_err();
        assert!(
            e.to_string().contains(
                "pa.yaml:4: error: PeerAuthentication istio-system/default: spec.mtls.mode"
            ),
            "{e}"
        );
        std::fs::write(dir.join("pa.yaml"), pa("PERMISSIVE")).unwrap();
        let ok = src.poll().unwrap().unwrap();
        assert_ne!(ok.revision, first.revision);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            src.poll().unwrap().is_err(),
            "a vanished directory is an error, not an empty mesh"
        );
    }
}
