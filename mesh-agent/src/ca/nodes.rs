//! The CA's record of node credentials, in `<dir>/nodes.json`: every one
//! it issued (by `ca join`, or a renewal by the agent), until when, and
//! which are revoked. `ca nodes` lists it, `ca revoke --node N` marks
//! every credential of N revoked, and the CA server refuses a caller whose
//! credential is revoked on every request (it re-reads the file when it
//! changes, so a revocation needs no restart).
//!
//! Records of credentials that have expired are dropped when the file is
//! next written: an expired credential is refused anyway, and the file
//! stays as small as the number of nodes.

use std::{
    collections::HashSet,
    fs::File,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::Error;

/// The file, next to the CA's certificates.
pub const FILE: &str = "nodes.json";

/// One node credential the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub node: String,
    /// The certificate's serial number, in hex as `openssl x509 -serial`
    /// prints it (without the colons).
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    pub not_after: u64,
    pub how: How,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// How a credential came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// `mesh-agent ca join`.
    Join,
    /// The agent renewed its own credential with the CA.
    Renewal,
}

impl Record {
    pub fn new(node: &str, serial: &str, not_after: SystemTime, how: How) -> Self {
        Self {
            node: node.into(),
            serial: serial.into(),
            issued_at: secs(SystemTime::now()),
            not_after: secs(not_after),
            how,
            revoked_at: None,
        }
    }

    /// `valid`, `expired` or `revoked`, now.
    pub fn status(&self, now: SystemTime) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.not_after < secs(now) {
            "expired"
        } else {
            "valid"
        }
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A time of a record, as RFC 3339 (UTC, seconds).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .to_string()
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    nodes: Vec<Record>,
}

fn problem(path: &Path, reason: impl ToString) -> Error {
    Error::NodeRecords {
        path: path.into(),
        reason: reason.to_string(),
    }
}

/// Every record in `dir` (none when the file does not exist yet).
pub fn list(dir: &Path) -> Result<Vec<Record>, Error> {
    read(&dir.join(FILE)).map(|c| c.nodes)
}

fn read(path: &Path) -> Result<Contents, Error> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| problem(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contents::default()),
        Err(source) => Err(Error::Read {
            path: path.into(),
            source,
        }),
    }
}

/// Reads, changes and writes the records under an exclusive lock: `ca
/// join`, `ca revoke` and the CA server's renewals may run at once.
fn update<T>(dir: &Path, change: impl FnOnce(&mut Vec<Record>) -> T) -> Result<T, Error> {
    let path = dir.join(FILE);
    let lock_path = dir.join(".nodes.lock");
    let lock = File::create(&lock_path).map_err(|source| Error::Write {
        path: lock_path.clone(),
        source,
    })?;
    lock.lock().map_err(|source| Error::Write {
        path: lock_path,
        source,
    })?;
    let mut contents = read(&path)?;
    let out = change(&mut contents.nodes);
    let now = secs(SystemTime::now());
    contents.nodes.retain(|r| r.not_after >= now);
    let mut text = serde_json::to_vec_pretty(&contents).map_err(|e| problem(&path, e))?;
    text.push(b'\n');
    // The CA server reads it on every request: never half a file.
    crate::sys::replace_file(&path, &text, false)
        .map_err(|source| Error::Write { path, source })?;
    Ok(out)
}

/// Records a credential the CA issued.
pub fn add(dir: &Path, record: Record) -> Result<(), Error> {
    update(dir, |nodes| nodes.push(record))
}

/// Marks every credential of `node` revoked; returns how many were not
/// revoked before. A node with no record is an error (a typo must not look
/// like a revocation).
pub fn revoke(dir: &Path, node: &str) -> Result<usize, Error> {
    let now = secs(SystemTime::now());
    let (known, newly) = update(dir, |nodes| {
        let mut newly = 0;
        let mut known = false;
        for r in nodes.iter_mut().filter(|r| r.node == node) {
            known = true;
            if r.revoked_at.is_none() {
                r.revoked_at = Some(now);
                newly += 1;
            }
        }
        (known, newly)
    })?;
    if known {
        Ok(newly)
    } else {
        Err(Error::UnknownNode {
            node: node.into(),
            dir: dir.into(),
        })
    }
}

/// The revoked serials as the CA server sees them: re-read when the file
/// changes (its size or modification time), checked on every request.
pub struct Revocations {
    path: PathBuf,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Modification time and size of the file last read.
    stamp: Option<(SystemTime, u64)>,
    revoked: HashSet<String>,
}

impl Revocations {
    pub fn new(dir: &Path) -> Result<Self, Error> {
        let r = Self {
            path: dir.join(FILE),
            seen: Mutex::new(Seen::default()),
        };
        r.refresh()?;
        Ok(r)
    }

    fn refresh(&self) -> Result<(), Error> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut seen = self.seen.lock().expect("revocations lock");
        if seen.stamp.is_some() && seen.stamp == stamp {
            return Ok(());
        }
        let revoked = read(&self.path)?
            .nodes
            .into_iter()
            .filter(|r| r.revoked_at.is_some())
            .map(|r| r.serial)
            .collect();
        *seen = Seen { stamp, revoked };
        Ok(())
    }

    /// Whether the credential with this serial is revoked. A file that no
    /// longer parses keeps the last list (and is logged): revocations are
    /// never forgotten by a bad write.
    pub fn is_revoked(&self, serial: &str) -> bool {
        if let Err(e) = self.refresh() {
            tracing::error!("CA: the node records do not load; keeping the last revocations: {e}");
        }
        self.seen
            .lock()
            .expect("revocations lock")
            .revoked
            .contains(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> crate::testing::TempDir {
        crate::testing::TempDir::new("nodes")
    }

    fn later(h: u64) -> SystemTime {
        SystemTime::now() + Duration::from_secs(h * 3600)
    }

    #[test]
    fn revoking_a_node_revokes_each_of_its_credentials_and_only_those() {
        let d = dir();
        add(&d.0, Record::new("n1", "aa", later(1), How::Join)).unwrap();
        add(&d.0, Record::new("n1", "bb", later(2), How::Renewal)).unwrap();
        add(&d.0, Record::new("n2", "cc", later(1), How::Join)).unwrap();
        let seen = Revocations::new(&d.0).unwrap();
        assert!(!seen.is_revoked("aa"));
        assert_eq!(revoke(&d.0, "n1").unwrap(), 2);
        // The server sees it on the next request, without a reload signal.
        assert!(seen.is_revoked("aa") && seen.is_revoked("bb"));
        assert!(!seen.is_revoked("cc"));
        assert_eq!(revoke(&d.0, "n1").unwrap(), 0, "already revoked");
        let now = SystemTime::now();
        let status: Vec<_> = list(&d.0)
            .unwrap()
            .iter()
            .map(|r| (r.serial.clone(), r.status(now)))
            .collect();
        assert_eq!(
            status,
            [
                ("aa".into(), "revoked"),
                ("bb".into(), "revoked"),
                ("cc".into(), "valid")
            ]
        );
    }

    #[test]
    fn a_node_without_records_is_an_error_not_a_revocation() {
        let d = dir();
        add(&d.0, Record::new("n1", "aa", later(1), How::Join)).unwrap();
        let e = revoke(&d.0, "n11").unwrap_err().to_string();
        assert!(e.contains("no node credential of n11"), "{e}");
    }

    #[test]
    fn expired_records_are_dropped_when_the_file_is_written() {
        let d = dir();
        let past = SystemTime::now() - Duration::from_secs(10);
        add(&d.0, Record::new("old", "aa", past, How::Join)).unwrap();
        add(&d.0, Record::new("new", "bb", later(1), How::Join)).unwrap();
        let nodes: Vec<_> = list(&d.0).unwrap().into_iter().map(|r| r.node).collect();
        assert_eq!(nodes, ["new"]);
    }

    #[test]
    fn a_damaged_file_keeps_the_revocations_already_known() {
        let d = dir();
        add(&d.0, Record::new("n1", "aa", later(1), How::Join)).unwrap();
        revoke(&d.0, "n1").unwrap();
        let seen = Revocations::new(&d.0).unwrap();
        std::fs::write(d.0.join(FILE), "{ not json").unwrap();
        assert!(seen.is_revoked("aa"));
        assert!(list(&d.0).is_err(), "the damage is reported to `ca nodes`");
    }
}
