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
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps},
};
use serde::Serialize;

use super::{
    Error, OBJECT,
    maps::{Maps, PINNED},
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
pub(super) const PROGRAMS: [(&str, Hook); 7] = [
    ("mesh_connect4", Hook::Cgroup),
    ("mesh_connect6", Hook::Cgroup),
    ("mesh_getpeer4", Hook::Cgroup),
    ("mesh_getpeer6", Hook::Cgroup),
    ("mesh_sockops", Hook::Cgroup),
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
        check_compatible(&pin_dir)?;
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
        loader.override_global("AYA_LOG_LEVEL", &kernel_log_level, false);
        let mut bpf = loader.load(OBJECT).map_err(Error::Load)?;

        let mut programs = Vec::new();
        for (name, _) in PROGRAMS {
            let prog = bpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
            let perr = |source: aya::programs::ProgramError| {
                tracing::debug!(program = name, "load failed: {source}");
                Error::Program {
                    name,
                    reason: super::summarize(&source),
                }
            };
            let info = match prog {
                aya::programs::Program::CgroupSockAddr(p) => load_one::<CgroupSockAddr>(p, perr)?,
                aya::programs::Program::SockOps(p) => load_one::<SockOps>(p, perr)?,
                aya::programs::Program::SkLookup(p) => load_one::<SkLookup>(p, perr)?,
                aya::programs::Program::SkMsg(p) => load_one::<SkMsg>(p, perr)?,
                other => unreachable!("unexpected program type {:?} for {name}", other.prog_type()),
            };
            programs.push(ProgramInfo { name, id: info });
        }
        let maps = Maps::take(&mut bpf)?;
        // The attachment lives with this process: a restarted agent attaches
        // its own program to the adopted map, replacing this one.
        let sk_msg: &mut SkMsg = bpf
            .program_mut("mesh_sk_msg")
            .ok_or(Error::MissingProgram("mesh_sk_msg"))?
            .try_into()
            .map_err(|source| Error::Attach {
                program: "mesh_sk_msg",
                target: pin_dir.join("mesh_fast_socks"),
                source,
            })?;
        sk_msg
            .attach(maps.fast_socks_fd())
            .map_err(|source| Error::Attach {
                program: "mesh_sk_msg",
                target: pin_dir.join("mesh_fast_socks"),
                source,
            })?;
        maps.configure(cfg)?;
        Ok(Self {
            bpf,
            maps: Arc::new(maps),
            pin_dir: pin_dir.to_path_buf(),
            created,
            programs,
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
loadable!(CgroupSockAddr, SockOps, SkLookup, SkMsg);

fn load_one<P: Loadable>(
    p: &mut P,
    err: impl Fn(aya::programs::ProgramError) -> Error,
) -> Result<u32, Error> {
    p.load_prog().map_err(&err)?;
    p.prog_id().map_err(err)
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

/// Refuses to adopt a pinned map whose layout is not this agent's.
fn check_compatible(dir: &Path) -> Result<(), Error> {
    for (name, key, value, entries) in PINNED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
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
