//! Watching configuration on disk by content: a file, or a directory of
//! `.yaml`/`.yml`/`.json` files. A change is reported once, whatever the
//! editor did to the files (rewrites, renames, touches).

use std::{
    io,
    path::{Path, PathBuf},
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
}
