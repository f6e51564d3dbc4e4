//! Loading the embedded object: check bpffs, adopt compatible pinned maps,
//! load every program, and configure the maps for this agent.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    EbpfLoader,
    maps::MapInfo,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SkMsg, SockOps},
};
use serde::Serialize;

use super::{
    Error, OBJECT, features,
    maps::{Maps, PINNED, TRACKED},
};
use crate::{config::Config, sys};

/// How each program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    /// To the pod's cgroup.
    Cgroup,
    /// To the pod's network namespace.
    Netns,
    /// To the fast path's socket map, once per agent.
    SockMap,
}

/// Every program in the object, by the name `bpftool prog list` shows.
pub(crate) const PROGRAMS: [(&str, Hook); 8] = [
    ("mesh_connect4", Hook::Cgroup),
    ("mesh_connect6", Hook::Cgroup),
    ("mesh_getpeer4", Hook::Cgroup),
    ("mesh_getpeer6", Hook::Cgroup),
    ("mesh_sockops", Hook::Cgroup),
    ("mesh_sock_release", Hook::Cgroup),
    ("mesh_sk_lookup", Hook::Netns),
    ("mesh_sk_msg", Hook::SockMap),
];

/// A program as loaded, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramInfo {
    pub name: &'static str,
    pub id: u32,
}

/// The loaded object: programs ready to attach, maps pinned.
pub struct Loaded {
    pub(super) bpf: aya::Ebpf,
    maps: Arc<Maps>,
    pin_dir: PathBuf,
    created: Vec<PathBuf>,
    programs: Vec<ProgramInfo>,
    /// Each pinned map's kernel ID, to pin it again (`repin_maps`).
    map_ids: Vec<(&'static str, u32)>,
}

impl Loaded {
    /// Loads the programs and pins (or adopts) the maps under `cfg.bpffs_dir`.
    /// `kernel_log_level` is aya-log's level (0 off … 5 trace) below which
    /// the programs skip their log statements.
    pub fn load(cfg: &Config, kernel_log_level: u8) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        let pin_dir = cfg.bpffs_dir.clone();
        check_bpffs(&pin_dir)?;
        for dir in [pin_dir.clone(), pin_dir.join("links")] {
            fs::create_dir_all(&dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        check_compatible(&pin_dir, cfg.max_tracked_connections)?;
        // Pins this agent creates (as opposed to adopts): the only ones a
        // failed start may remove.
        let created: Vec<PathBuf> = PINNED
            .iter()
            .map(|(n, ..)| pin_dir.join(n))
            .filter(|p| !p.exists())
            .collect();
        let loaded = Self::load_pinned(cfg, kernel_log_level, &pin_dir, created.clone());
        if loaded.is_err() {
            remove_pins(&pin_dir, &created);
        }
        loaded
    }

    fn load_pinned(
        cfg: &Config,
        kernel_log_level: u8,
        pin_dir: &Path,
        created: Vec<PathBuf>,
    ) -> Result<Self, Error> {
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> =
            PINNED.iter().map(|(n, ..)| (*n, pin_dir.join(n))).collect();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for name in TRACKED {
            loader.map_max_entries(name, cfg.max_tracked_connections);
        }
        loader.override_global("AYA_LOG_LEVEL", &kernel_log_level, false);
        let mut bpf = loader.load(OBJECT).map_err(Error::Load)?;

        let mut programs = Vec::new();
        let mut fast_path_missing = None;
        for (name, _) in PROGRAMS {
            let prog = bpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
            let perr = |source: aya::programs::ProgramError| {
                tracing::debug!(program = name, "load failed: {source}");
                refused(name, &source)
            };
            let info = match prog {
                aya::programs::Program::CgroupSockAddr(p) => load_one::<CgroupSockAddr>(p, perr),
                aya::programs::Program::CgroupSock(p) => load_one::<CgroupSock>(p, perr),
                aya::programs::Program::SockOps(p) => load_one::<SockOps>(p, perr),
                aya::programs::Program::SkLookup(p) => load_one::<SkLookup>(p, perr),
                aya::programs::Program::SkMsg(p) => load_one::<SkMsg>(p, perr),
                other => unreachable!("unexpected program type {:?} for {name}", other.prog_type()),
            };
            match info {
                Ok(id) => programs.push(ProgramInfo { name, id }),
                // The fast path is an optimisation: on a kernel without
                // what it needs, same-node bytes take loopback TCP (said at
                // start-up). Any other refusal is a bug, and fatal.
                Err(e @ Error::Unsupported { .. }) if features::optional(name) => {
                    fast_path_missing = Some(e.to_string())
                }
                Err(e) => return Err(e),
            }
        }
        let mut maps = Maps::take(&mut bpf)?;
        if let Some(why) = fast_path_missing {
            maps.set_fast_path_missing(why);
        } else {
            // The attachment lives with this process: a restarted agent
            // attaches its own program to the adopted map, replacing this one.
            let sk_msg: &mut SkMsg = bpf
                .program_mut("mesh_sk_msg")
                .ok_or(Error::MissingProgram("mesh_sk_msg"))?
                .try_into()
                .map_err(|source| Error::Attach {
                    program: "mesh_sk_msg",
                    target: pin_dir.join("mesh_fast_apps"),
                    source,
                })?;
            sk_msg
                .attach(maps.fast_apps_fd())
                .map_err(|source| Error::Attach {
                    program: "mesh_sk_msg",
                    target: pin_dir.join("mesh_fast_apps"),
                    source,
                })?;
        }
        maps.configure(cfg)?;
        let map_ids = PINNED
            .iter()
            .filter_map(|(name, ..)| {
                let info = MapInfo::from_pin(pin_dir.join(name)).ok()?;
                Some((*name, info.id()))
            })
            .collect();
        Ok(Self {
            bpf,
            maps: Arc::new(maps),
            pin_dir: pin_dir.to_path_buf(),
            created,
            programs,
            map_ids,
        })
    }

    /// Attaches `sock_ops` to the agent's own cgroup, so the agent's ends of
    /// application connections (accepted on the outbound listener, connected
    /// from its loopback source) are filed for the fast path as they are
    /// established. Held by this process, never pinned: the sockets it
    /// files are this process's own.
    pub fn attach_agent_cgroup(&mut self, cgroup: &Path) -> Result<(), Error> {
        let attach_err = |source| Error::Attach {
            program: "mesh_sockops",
            target: cgroup.into(),
            source,
        };
        let file = fs::File::open(cgroup).map_err(|io_error| {
            attach_err(
                aya::sys::SyscallError {
                    call: "open",
                    io_error,
                }
                .into(),
            )
        })?;
        let prog: &mut SockOps = self
            .bpf
            .program_mut("mesh_sockops")
            .ok_or(Error::MissingProgram("mesh_sockops"))?
            .try_into()
            .map_err(attach_err)?;
        // A BPF link, which is always multi-attach: another agent (an
        // overlapping restart) may be attached there too.
        prog.attach(&file, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        Ok(())
    }

    /// Lets `sock_ops` see the agent's own sockets, whether or not the fast path
    /// starts on (it can be switched at run time). The fast path is an
    /// optimisation: where it cannot work, say why and carry on without it.
    pub fn attach_fast_path(&mut self, config: &Config) {
        if let Some(why) = self.maps().fast_path_unavailable() {
            // Said whether or not it was asked for: the operator may turn it
            // on at run time and should know beforehand that it cannot be.
            tracing::warn!("fast path unavailable, running without it: {why}");
            if let Err(e) = self.maps().set_fast_path(false) {
                tracing::warn!("cannot turn the fast path off: {e}");
            }
            return;
        }
        let own = config.agent_cgroup.clone().or_else(|| {
            crate::discover::own_cgroup(&config.cgroup_root, config.pod_uid.as_deref())
        });
        let problem = match own {
            None => "the agent's own cgroup is unknown or the root cgroup (set --agent-cgroup or \
                     MESH_POD_UID)"
                .to_string(),
            Some(cg) => match self.attach_agent_cgroup(&cg) {
                Ok(()) => {
                    let state = if config.fast_path {
                        "on"
                    } else {
                        "off (--fast-path)"
                    };
                    tracing::info!(cgroup = %cg.display(), "fast path {state}");
                    return;
                }
                Err(e) => e.to_string(),
            },
        };
        if !config.fast_path {
            tracing::debug!("fast path unavailable: {problem}");
            return;
        }
        tracing::warn!("fast path off: {problem}");
        if let Err(e) = self.maps().set_fast_path(false) {
            tracing::warn!("cannot turn the fast path off: {e}");
        }
    }

    /// Map pins this agent created rather than adopted.
    pub fn created_pins(&self) -> &[PathBuf] {
        &self.created
    }

    pub fn maps(&self) -> Arc<Maps> {
        self.maps.clone()
    }

    pub fn programs(&self) -> &[ProgramInfo] {
        &self.programs
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub(super) fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    /// Whether every map pin is where this agent put it. A remount of bpffs
    /// (or someone removing the directory) loses them while the maps, the
    /// programs and their links live on in this process.
    pub fn pins_present(&self) -> bool {
        PINNED
            .iter()
            .all(|(name, ..)| self.pin_dir.join(name).exists())
    }

    /// Pins again the maps whose pins are gone (see [`Self::pins_present`]),
    /// the directories first; how many.
    pub fn repin_maps(&self) -> Result<usize, Error> {
        check_bpffs(&self.pin_dir)?;
        for dir in [self.pin_dir.clone(), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })?;
        }
        let mut pinned = 0;
        for (name, id) in &self.map_ids {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            sys::pin_by_id(sys::BpfObject::Map, *id, &path)
                .map_err(|source| Error::Pin { path, source })?;
            pinned += 1;
        }
        Ok(pinned)
    }

    /// Removes the map pins and the (then empty) pin directory. Programs stay
    /// loaded until this process drops them; attached links were removed
    /// before this by detaching every pod.
    pub fn unpin_maps(&self) {
        unpin_maps(&self.pin_dir);
    }
}

/// Removes the map pins under `pin_dir` and the directory once empty.
pub fn unpin_maps(pin_dir: &Path) {
    let all: Vec<PathBuf> = PINNED.iter().map(|(n, ..)| pin_dir.join(n)).collect();
    remove_pins(pin_dir, &all);
}

/// What `uninstall` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub dir: PathBuf,
    /// Pods whose links were pinned.
    pub pods: usize,
    /// Link pins: each one's removal detached its program (nothing else
    /// holds a link once its agent is gone).
    pub links: usize,
    pub maps: usize,
}

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "removed {} link(s) of {} pod(s) and {} map pin(s) under {}",
            self.links,
            self.pods,
            self.maps,
            self.dir.display()
        )
    }
}

/// Unpins every link and map an agent left under `pin_dir`, whichever
/// agent (version) made them: links are found by walking `links/`, maps by
/// listing the directory (every agent names its maps `mesh_*`), not from
/// this agent's own list. Refuses a directory that is not on bpffs, a
/// symbolic link anywhere, and a directory holding anything else (another
/// program's pins, say `--bpffs-dir /sys/fs/bpf` by mistake) — before
/// removing anything.
pub fn uninstall(pin_dir: &Path) -> Result<Removed, Error> {
    let mut removed = Removed {
        dir: pin_dir.to_path_buf(),
        ..Removed::default()
    };
    if !pin_dir.exists() {
        return Ok(removed);
    }
    if sys::fs_magic(pin_dir).ok() != Some(sys::BPF_FS_MAGIC) {
        return Err(Error::NotBpffs {
            path: pin_dir.into(),
        });
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Pin { path, source }
    };
    let foreign = |path: &Path, what: &str| Error::Pin {
        path: path.to_path_buf(),
        source: io::Error::other(format!(
            "{what}: not an agent's pin; nothing was removed (is --bpffs-dir the agent's own directory?)"
        )),
    };
    // What to remove, checked in full first.
    let (mut maps, mut pods) = (Vec::new(), Vec::new());
    for e in fs::read_dir(pin_dir).map_err(io_err(pin_dir))?.flatten() {
        let (path, kind) = (e.path(), e.file_type().map_err(io_err(&e.path()))?);
        let name = e.file_name().to_string_lossy().into_owned();
        if kind.is_file() && name.starts_with("mesh_") {
            maps.push(path);
        } else if kind.is_dir() && name == "links" {
            for pod in fs::read_dir(&path).map_err(io_err(&path))?.flatten() {
                let (dir, kind) = (pod.path(), pod.file_type().map_err(io_err(&pod.path()))?);
                if !kind.is_dir() {
                    return Err(foreign(&dir, "not a pod's link directory"));
                }
                let mut links = Vec::new();
                for link in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
                    if !link.file_type().map_err(io_err(&link.path()))?.is_file() {
                        return Err(foreign(&link.path(), "not a pinned link"));
                    }
                    links.push(link.path());
                }
                pods.push((dir, links));
            }
        } else {
            return Err(foreign(&path, "unexpected entry"));
        }
    }
    for (dir, links) in pods {
        for link in links {
            fs::remove_file(&link).map_err(io_err(&link))?;
            removed.links += 1;
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
        removed.pods += 1;
    }
    let links = pin_dir.join("links");
    if links.exists() {
        fs::remove_dir(&links).map_err(io_err(&links))?;
    }
    for map in maps {
        fs::remove_file(&map).map_err(io_err(&map))?;
        removed.maps += 1;
    }
    fs::remove_dir(pin_dir).map_err(io_err(pin_dir))?;
    Ok(removed)
}

/// Removes `pins`, then `pin_dir` and its `links/` if nothing else is left.
pub fn remove_pins(pin_dir: &Path, pins: &[PathBuf]) {
    for p in pins {
        let _ = fs::remove_file(p);
    }
    let _ = fs::remove_dir(pin_dir.join("links"));
    let _ = fs::remove_dir(pin_dir);
}

trait Loadable {
    fn load_prog(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn prog_id(&self) -> Result<u32, aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($($t:ty),+) => {$(
        impl Loadable for $t {
            fn load_prog(&mut self) -> Result<(), aya::programs::ProgramError> { self.load() }
            fn prog_id(&self) -> Result<u32, aya::programs::ProgramError> { Ok(self.info()?.id()) }
        }
    )+};
}
loadable!(CgroupSock, CgroupSockAddr, SockOps, SkLookup, SkMsg);

fn load_one<P: Loadable>(
    p: &mut P,
    err: impl Fn(aya::programs::ProgramError) -> Error,
) -> Result<u32, Error> {
    p.load_prog().map_err(&err)?;
    p.prog_id().map_err(err)
}

/// Why the kernel refused program `name`: a feature it lacks, named with
/// the release that has it, or else the verifier's own verdict.
fn refused(name: &'static str, source: &aya::programs::ProgramError) -> Error {
    let (log, type_unknown) = match source {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let einval = io_error.raw_os_error() == Some(libc::EINVAL);
            let unknown = einval && log.trim().is_empty();
            (log, unknown)
        }
        _ => (String::new(), false),
    };
    match features::missing(name, &log, type_unknown) {
        Some(feature) => Error::Unsupported {
            program: name,
            feature,
            release: features::kernel_release(),
        },
        None => Error::Program {
            name,
            reason: super::summarize(source),
        },
    }
}

/// The pin directory, or its nearest existing parent, must be on bpffs.
fn check_bpffs(dir: &Path) -> Result<(), Error> {
    let mut probe = Some(dir);
    while let Some(p) = probe {
        match sys::fs_magic(p) {
            Ok(sys::BPF_FS_MAGIC) => return Ok(()),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => probe = p.parent(),
            Err(_) => break,
        }
    }
    Err(Error::NotBpffs { path: dir.into() })
}

/// Refuses to adopt a pinned map whose layout is not this agent's (or
/// whose capacity is not the one asked for: `--max-tracked-connections`
/// changes need `mesh-agent uninstall` first).
fn check_compatible(dir: &Path, tracked: u32) -> Result<(), Error> {
    for (name, key, value, entries) in PINNED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let entries = if TRACKED.contains(&name) {
            // Hash maps since map ABI 4 (LRU before): same sizes, other
            // semantics.
            if !matches!(info.map_type(), Ok(aya::maps::MapType::Hash)) {
                return Err(Error::IncompatiblePin {
                    path,
                    found: (info.key_size(), info.value_size(), info.max_entries()),
                    want: (key as u32, value as u32, tracked),
                });
            }
            tracked
        } else {
            entries
        };
        if info.key_size() as usize != key
            || info.value_size() as usize != value
            || info.max_entries() != entries
        {
            return Err(Error::IncompatiblePin {
                path,
                found: (info.key_size(), info.value_size(), info.max_entries()),
                want: (key as u32, value as u32, entries),
            });
        }
    }
    Ok(())
}
