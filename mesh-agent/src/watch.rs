//! Watching configuration on disk by content: a file, or a directory of
//! `.yaml`/`.yml`/`.json` files. A change is reported once, whatever the
//! editor did to the files (rewrites, renames, touches).
//!
//! [`Notifier`] wakes the reader as soon as the kernel reports a change
//! (inotify), so an edit applies within milliseconds; reading on a timer
//! stays as the safety net for file systems without inotify.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};

/// The files of a source and their bytes, in name order.
pub type Snapshot = Vec<(PathBuf, Vec<u8>)>;

/// Reads `path`: one file, or every configuration file under a directory
/// (recursively). Names starting with `.` are skipped: a Kubernetes
/// ConfigMap volume keeps its real files under `..data/` and exposes them
/// again as symlinks at the top, which are what we read.
pub fn read(path: &Path) -> io::Result<Snapshot> {
    if !path.is_dir() {
        return Ok(vec![(path.to_path_buf(), std::fs::read(path)?)]);
    }
    let mut files = Vec::new();
    collect(path, 0, &mut files)?;
    files.sort();
    files
        .into_iter()
        .map(|f| std::fs::read(&f).map(|b| (f, b)))
        .collect()
}

/// Deep enough for any layout people use, and bounded against symlink loops.
const MAX_DEPTH: usize = 8;

fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.file_name()
            .is_none_or(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        if p.is_dir() {
            if depth < MAX_DEPTH {
                collect(&p, depth + 1, out)?;
            }
        } else if p.is_file()
            && p.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Reports a source's new content when it changes.
#[derive(Debug)]
pub struct Watch {
    path: PathBuf,
    last: Option<Snapshot>,
}

impl Watch {
    /// Starts watching `path`, whose current content `initial` was loaded.
    pub fn new(path: PathBuf, initial: Snapshot) -> Self {
        Self {
            path,
            last: Some(initial),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None` when unchanged; otherwise the new content, or the read error
    /// (reported once, until the source comes back).
    pub fn poll(&mut self) -> Option<io::Result<Snapshot>> {
        match read(&self.path) {
            Ok(s) if self.last.as_ref() == Some(&s) => None,
            Ok(s) => {
                self.last = Some(s.clone());
                Some(Ok(s))
            }
            Err(e) => self.last.take().map(|_| Err(e)),
        }
    }
}

/// How long after a change notification the files are read: long enough
/// for an editor's truncate-then-write or a ConfigMap's symlink swap to
/// finish, short enough to stay far below the 1 s a change may take to
/// reach the data plane.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// Signals that something under the watched paths may have changed. The
/// content comparison in [`Watch::poll`] decides whether it really did.
pub struct Notifier {
    // Dropping the watcher ends the inotify watches.
    _watcher: notify::RecommendedWatcher,
    changed: Arc<tokio::sync::Notify>,
}

impl Notifier {
    pub fn new(paths: &[PathBuf]) -> Result<Self, notify::Error> {
        let changed = Arc::new(tokio::sync::Notify::new());
        let wake = changed.clone();
        let targets: Vec<Target> = paths.iter().map(|p| Target::of(p)).collect();
        let relevant = targets.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                match event {
                    // Reading the files (ours included) is not a change;
                    // without this filter every read would cause the next.
                    Ok(notify::Event {
                        kind:
                            EventKind::Access(
                                AccessKind::Open(_)
                                | AccessKind::Read
                                | AccessKind::Close(AccessMode::Read),
                            ),
                        ..
                    }) => {}
                    // Something else in a watched file's directory (a log
                    // written next to it, say).
                    Ok(e)
                        if !e.paths.is_empty()
                            && !e.paths.iter().any(|p| relevant.iter().any(|t| t.covers(p))) => {}
                    // A change, or the watch lost track (queue overflow):
                    // either way, read again.
                    _ => wake.notify_one(),
                }
            })?;
        for t in &targets {
            match t {
                Target::Dir(d) => watcher.watch(d, RecursiveMode::Recursive)?,
                Target::File { dir, .. } => watcher.watch(dir, RecursiveMode::NonRecursive)?,
            }
        }
        Ok(Self {
            _watcher: watcher,
            changed,
        })
    }

    /// Returns when a change was reported since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// What one configured path makes the notifier watch.
#[derive(Clone)]
enum Target {
    /// A directory, recursively: any change under it counts.
    Dir(PathBuf),
    /// A file, watched through its directory: editors and ConfigMap
    /// updates replace files by rename, which a watch on the file itself
    /// would not follow.
    File { dir: PathBuf, file: PathBuf },
}

impl Target {
    fn of(p: &Path) -> Self {
        if p.is_dir() {
            return Self::Dir(p.to_path_buf());
        }
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        // Events name paths as the watch was given, so build the file's
        // path the same way.
        let file = dir.join(p.file_name().unwrap_or_default());
        Self::File { dir, file }
    }

    /// Whether an event on `p` may change this target's content.
    fn covers(&self, p: &Path) -> bool {
        match self {
            Self::Dir(d) => p.starts_with(d),
            Self::File { dir, file } => {
                p == file
                    // A ConfigMap volume swaps its `..data` symlink.
                    || (p.parent() == Some(dir.as_path())
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("..")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_change_once_for_files_and_directories() {
        let dir = std::env::temp_dir().join(format!("mesh-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1").unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut w = Watch::new(dir.clone(), read(&dir).unwrap());
        assert!(w.poll().is_none());
        std::fs::write(dir.join("notes.txt"), "still ignored").unwrap();
        assert!(w.poll().is_none(), "non-config files do not count");
        std::fs::write(dir.join("b.yml"), "b: 2").unwrap();
        let s = w.poll().unwrap().unwrap();
        assert_eq!(
            s.iter()
                .map(|(p, _)| p.file_name().unwrap().to_str().unwrap())
                .collect::<Vec<_>>(),
            ["a.yaml", "b.yml"]
        );
        assert!(w.poll().is_none());
        let file = dir.join("a.yaml");
        let mut f = Watch::new(file.clone(), read(&file).unwrap());
        std::fs::remove_file(&file).unwrap();
        assert!(f.poll().unwrap().is_err());
        assert!(f.poll().is_none(), "a missing file is reported once");
        std::fs::write(&file, "a: 3").unwrap();
        assert_eq!(f.poll().unwrap().unwrap()[0].1, b"a: 3");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_target_covers_the_file_and_configmap_swaps_only() {
        let t = Target::File {
            dir: "/etc/mesh".into(),
            file: "/etc/mesh/mesh.yaml".into(),
        };
        assert!(t.covers(Path::new("/etc/mesh/mesh.yaml")));
        assert!(t.covers(Path::new("/etc/mesh/..data")));
        assert!(!t.covers(Path::new("/etc/mesh/other.yaml")));
        assert!(!t.covers(Path::new("/etc/mesh/sub/..data")));
        let d = Target::Dir("/etc/mesh".into());
        assert!(d.covers(Path::new("/etc/mesh/sub/x.yaml")));
        assert!(!d.covers(Path::new("/etc/meshy/x.yaml")));
    }

    /// Waits for a wake-up, at most `secs`.
    async fn woke(n: &Notifier, secs: u64) -> bool {
        tokio::time::timeout(std::time::Duration::from_secs(secs), n.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn notifier_wakes_on_changes_not_on_reads() {
        let dir = std::env::temp_dir().join(format!("mesh-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let single = dir.join("single.yaml");
        std::fs::write(&single, "a: 1").unwrap();
        let watched = dir.join("sub");
        let n = Notifier::new(&[watched.clone(), single.clone()]).unwrap();

        // A ConfigMap-style update: a new directory swapped in by rename.
        std::fs::create_dir_all(watched.join("..2026_tmp")).unwrap();
        std::fs::write(watched.join("..2026_tmp/x.yaml"), "x: 1").unwrap();
        std::fs::rename(watched.join("..2026_tmp"), watched.join("..data")).unwrap();
        assert!(woke(&n, 5).await, "a rename under a watched directory");
        while woke(&n, 1).await {} // drain the burst

        // Reading, as the agent does after each wake-up, is not a change,
        // and neither is a log written next to a watched file.
        let _ = read(&watched).unwrap();
        let _ = read(&single).unwrap();
        std::fs::write(dir.join("agent.log"), "a log line").unwrap();
        assert!(!woke(&n, 1).await, "reads or a neighbour woke the notifier");

        // A single file replaced by rename (what editors do) is seen
        // through its directory.
        std::fs::write(dir.join("single.tmp"), "a: 2").unwrap();
        std::fs::rename(dir.join("single.tmp"), &single).unwrap();
        assert!(woke(&n, 5).await, "a file replaced by rename");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
