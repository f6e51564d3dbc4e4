//! Attaching the programs to one pod: its cgroup gets the capture programs,
//! its network namespace gets `sk_lookup`. Every link is pinned under
//! `<bpffs dir>/links/<namespace>_<name>/`, so capture survives an agent
//! restart (and fails closed while no agent listens).

use std::{
    fs::{self, File},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode,
    links::{FdLink, PinnedLink},
};

use super::{
    Error,
    loader::{Hook, Loaded, PROGRAMS},
};

/// The pinned links of one pod. Dropping it detaches them: whatever path
/// leads here, nothing stays attached unless `keep()` said so.
#[derive(Debug)]
pub struct PodLinks {
    dir: PathBuf,
    /// Each pin with its inode (a successor that took the pod over pins
    /// its own links at the same paths, and those are not ours to remove)
    /// and the link's ID (to pin it again after a bpffs remount).
    pins: Vec<(PathBuf, PinnedLink, u64, u32)>,
    keep: bool,
}

impl Loaded {
    /// Attaches every program for the pod whose links live in `links/<name>`.
    ///
    /// A link already pinned there (left by a previous agent) is replaced
    /// without a gap: the new link is attached and pinned beside it, then
    /// renamed over it, which releases the old one.
    pub fn attach_pod(
        &mut self,
        name: &str,
        cgroup: (&Path, &File),
        netns: (&Path, &File),
    ) -> Result<PodLinks, Error> {
        let dir = self.links_dir().join(name);
        fs::create_dir_all(&dir).map_err(|source| Error::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut links = PodLinks {
            dir,
            pins: Vec::new(),
            keep: false,
        };
        for (program, hook) in PROGRAMS {
            let target = match hook {
                Hook::Cgroup => cgroup.0,
                Hook::Netns => netns.0,
                Hook::SockMap => continue,
            };
            let attach_err = |source| Error::Attach {
                program,
                target: target.into(),
                source,
            };
            let prog = self
                .bpf
                .program_mut(program)
                .ok_or(Error::MissingProgram(program))?;
            // The cgroup programs attach and link alike, whatever their type.
            macro_rules! cgroup_link {
                ($p:expr) => {{
                    let id = $p
                        .attach(cgroup.1, CgroupAttachMode::Single)
                        .map_err(attach_err)?;
                    let link = $p.take_link(id).map_err(attach_err)?;
                    link.try_into()
                        .map_err(|source| Error::Link { program, source })?
                }};
            }
            let fd_link: FdLink = match prog {
                aya::programs::Program::CgroupSockAddr(p) => cgroup_link!(p),
                aya::programs::Program::CgroupSock(p) => cgroup_link!(p),
                aya::programs::Program::SockOps(p) => cgroup_link!(p),
                aya::programs::Program::SkLookup(p) => {
                    let id = p.attach(netns.1).map_err(attach_err)?;
                    p.take_link(id).map_err(attach_err)?.into()
                }
                _ => unreachable!("program table and object disagree on {program}"),
            };
            let id = fd_link.info().map(|i| i.id()).unwrap_or(0);
            let path = links.dir.join(program);
            // bpffs refuses names with a dot.
            let staging = links.dir.join(format!("staging_{program}"));
            let _ = fs::remove_file(&staging);
            let pinned = fd_link.pin(&staging).map_err(|e| Error::Pin {
                path: staging.clone(),
                source: std::io::Error::other(super::chain(&e)),
            })?;
            if let Err(source) = fs::rename(&staging, &path) {
                let _ = fs::remove_file(&staging);
                return Err(Error::Pin { path, source });
            }
            let ino = fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
            links.pins.push((path, pinned, ino, id));
        }
        Ok(links)
    }

    /// Detaches links pinned for pods that are not in `keep` (left behind by
    /// an agent that was killed or told to keep its pins).
    pub fn prune_links(&self, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut pruned = Vec::new();
        let Ok(entries) = fs::read_dir(self.links_dir()) else {
            return pruned;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep(&name) {
                continue;
            }
            remove_pin_dir(&e.path());
            pruned.push(name);
        }
        pruned
    }
}

impl PodLinks {
    /// Pinned paths, for `/config_dump`.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.pins.iter().map(|(p, ..)| p.clone()).collect()
    }

    /// Pins again the links whose pins are gone (bpffs remounted); how
    /// many. The links themselves never went (this process holds them):
    /// each is pinned again from its ID, so a failure leaves it attached.
    pub fn repin(&mut self) -> Result<usize, Error> {
        fs::create_dir_all(&self.dir).map_err(|source| Error::PinDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut pinned = 0;
        for (path, _, ino, id) in &mut self.pins {
            if path.exists() {
                continue;
            }
            crate::sys::pin_by_id(crate::sys::BpfObject::Link, *id, path).map_err(|source| {
                Error::Pin {
                    path: path.clone(),
                    source,
                }
            })?;
            *ino = fs::metadata(&*path).map(|m| m.ino()).unwrap_or(0);
            pinned += 1;
        }
        Ok(pinned)
    }

    /// Leaves the links pinned (and so attached) after this process exits.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for PodLinks {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Removing the pin drops the last reference but ours; dropping ours
        // then detaches the program.
        let mut replaced = false;
        for (path, link, ino, _) in self.pins.drain(..) {
            match fs::metadata(&path) {
                Ok(m) if m.ino() != ino => replaced = true,
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
            drop(link);
        }
        if !replaced {
            remove_pin_dir(&self.dir);
        }
    }
}

fn remove_pin_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}
