//! Network namespaces of pods: the agent opens its listeners and its
//! upstream sockets *inside* each pod's namespace, as ztunnel does, so the
//! pod's own addresses are used and no node-level rules are needed.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life. `Netns::run` enters the namespace on the current thread just
//! long enough to create sockets, then returns to the agent's namespace.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {path} does not exist")]
    NotFound { path: PathBuf },
    #[error(
        "{path} is not a network namespace (expected a /run/netns/* or /proc/<pid>/ns/net path)"
    )]
    NotNetns { path: PathBuf },
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot return to the agent's own network namespace: {0}")]
    Return(#[source] io::Error),
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    /// The agent's own namespace (a host-network pod, or an in-process
    /// test): nothing to enter.
    home: bool,
}

/// The agent's own namespace, captured once before any thread moves.
fn home() -> &'static io::Result<File> {
    static HOME: OnceLock<io::Result<File>> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net"))
}

impl Netns {
    /// Opens the namespace at `path`, checking that it is one.
    pub fn open(path: &Path) -> Result<Self, Error> {
        // Resolve the agent's home namespace while still on a clean thread.
        let _ = home();
        match sys::fs_magic(path) {
            Ok(sys::NSFS_MAGIC) => {}
            Ok(_) => return Err(Error::NotNetns { path: path.into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound { path: path.into() });
            }
            Err(source) => {
                return Err(Error::Open {
                    path: path.into(),
                    source,
                });
            }
        }
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.into(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.into(),
            home: false,
        })
    }

    /// The namespace the agent itself runs in. Sockets made "inside" it are
    /// made in place, without entering anything (no privilege needed).
    pub fn current() -> Result<Self, Error> {
        let path = PathBuf::from("/proc/self/ns/net");
        let file = File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file,
            path,
            home: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace handle, e.g. for attaching `sk_lookup`.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the current thread inside this namespace. `f` should
    /// only create sockets: nothing else on this thread runs meanwhile, and
    /// the thread is back home before this returns, even if `f` panics.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, Error> {
        if self.home {
            return Ok(f());
        }
        let home = home()
            .as_ref()
            .map_err(|e| Error::Return(io::Error::new(e.kind(), e.to_string())))?;
        sys::setns_net(self.file.as_fd()).map_err(|source| Error::Enter {
            path: self.path.clone(),
            source,
        })?;
        struct GoHome<'a>(&'a File);
        impl Drop for GoHome<'_> {
            fn drop(&mut self) {
                if let Err(e) = sys::setns_net(self.0.as_fd()) {
                    // A thread stranded in a pod's namespace would create
                    // later sockets in the wrong place: stop the agent.
                    eprintln!(
                        "mesh-agent: fatal: cannot return to the agent's network namespace: {e}"
                    );
                    std::process::abort();
                }
            }
        }
        let _home = GoHome(home);
        Ok(f())
    }
}
