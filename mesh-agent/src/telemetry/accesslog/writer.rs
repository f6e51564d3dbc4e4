//! The access-log writer thread: filters, renders and writes the queued
//! records, batching writes while the queue has more and flushing when it
//! is empty. A file that was rotated away (renamed or removed) is opened
//! again under its name.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufWriter, Write},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use prometheus::IntCounterVec;

use super::{Record, plan::Resolved};

/// How often an open file is checked for rotation.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

pub(super) type Queued = (Record, Arc<Resolved>);

pub(super) struct Writer {
    counts: IntCounterVec,
    sinks: HashMap<PathBuf, Sink>,
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File {
        out: BufWriter<File>,
        inode: (u64, u64),
        checked: Instant,
    },
    /// Could not be opened; retried after a while.
    Broken {
        since: Instant,
    },
}

impl Writer {
    pub(super) fn new(counts: IntCounterVec) -> Self {
        Self {
            counts,
            sinks: HashMap::new(),
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Queued>) {
        while let Ok(first) = rx.recv() {
            self.write(first);
            // Drain what is already queued before flushing.
            loop {
                match rx.try_recv() {
                    Ok(next) => self.write(next),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                }
            }
            self.flush();
        }
        self.flush();
    }

    fn write(&mut self, (record, to): Queued) {
        for (target, filter) in to.side(record.mode) {
            if filter.as_ref().is_some_and(|f| !f.accepts(&record)) {
                self.counts.with_label_values(&["filtered"]).inc();
                continue;
            }
            let line = target.format.render(&record, target.omit_empty);
            let result = match self.sink(&target.path) {
                Some(s) => s.write_all(line.as_bytes()),
                None => Err(io::Error::other("not open")),
            };
            match result {
                Ok(()) => self.counts.with_label_values(&["written"]).inc(),
                Err(e) => {
                    self.counts.with_label_values(&["failed"]).inc();
                    if !matches!(self.sinks.get(&target.path), Some(Sink::Broken { .. })) {
                        tracing::warn!(provider = %target.name, path = %target.path.display(), "access log: cannot write: {e}");
                        self.sinks.insert(
                            target.path.clone(),
                            Sink::Broken {
                                since: Instant::now(),
                            },
                        );
                    }
                }
            }
        }
    }

    /// The open sink for `path`, opened (again) when needed.
    fn sink(&mut self, path: &Path) -> Option<&mut dyn Write> {
        let reopen = match self.sinks.get_mut(path) {
            None => true,
            Some(Sink::Stdout(_)) => false,
            Some(Sink::Broken { since }) => since.elapsed() >= REOPEN_CHECK,
            Some(Sink::File {
                out,
                inode,
                checked,
            }) => {
                if checked.elapsed() >= REOPEN_CHECK {
                    *checked = Instant::now();
                    let now = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
                    if now != Some(*inode) {
                        let _ = out.flush();
                        true
                    } else {
                        false
                    }
                } else {
                    false
                }
            }
        };
        if reopen {
            let sink = open(path).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "access log: cannot open: {e}");
                Sink::Broken {
                    since: Instant::now(),
                }
            });
            self.sinks.insert(path.to_path_buf(), sink);
        }
        match self.sinks.get_mut(path)? {
            Sink::Stdout(w) => Some(w),
            Sink::File { out, .. } => Some(out),
            Sink::Broken { .. } => None,
        }
    }

    fn flush(&mut self) {
        for (path, s) in &mut self.sinks {
            let r = match s {
                Sink::Stdout(w) => w.flush(),
                Sink::File { out, .. } => out.flush(),
                Sink::Broken { .. } => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(path = %path.display(), "access log: cannot write: {e}");
            }
        }
    }
}

fn open(path: &Path) -> io::Result<Sink> {
    if path == Path::new("/dev/stdout") {
        return Ok(Sink::Stdout(BufWriter::new(io::stdout())));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let m = f.metadata()?;
    Ok(Sink::File {
        out: BufWriter::new(f),
        inode: (m.dev(), m.ino()),
        checked: Instant::now(),
    })
}
