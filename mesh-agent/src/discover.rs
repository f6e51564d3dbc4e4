//! Finding a Kubernetes pod on this node from its UID: its cgroup (the
//! directory the kubelet names after the UID — `pod<uid>` with the
//! cgroupfs driver, `kubepods-…-pod<uid_with_underscores>.slice` with
//! systemd's) and its network namespace (that of any process in it: every
//! container of a pod shares the pause container's).

use std::{
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no cgroup for pod UID {uid} under {root} (not started yet, or another --cgroup-root?)"
    )]
    NoCgroup { uid: String, root: PathBuf },
    #[error("pod UID {uid}: no process in {cgroup} yet (its network namespace is not known)")]
    NoProcess { uid: String, cgroup: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How deep under the root the pod's cgroup may be
/// (`kubepods.slice/kubepods-burstable.slice/…pod<uid>.slice` is 3).
const MAX_DEPTH: usize = 6;

/// The pod's cgroup directory and a path to its network namespace.
pub fn pod(cgroup_root: &Path, uid: &str) -> Result<(PathBuf, PathBuf), Error> {
    let cgroup = cgroup(cgroup_root, uid)?;
    let pid = first_pid(&cgroup, 0)?.ok_or_else(|| Error::NoProcess {
        uid: uid.into(),
        cgroup: cgroup.clone(),
    })?;
    Ok((cgroup, PathBuf::from(format!("/proc/{pid}/ns/net"))))
}

/// The pod's cgroup directory alone (the kubelet makes it before the
/// runtime sets the pod's network up, so it is there at CNI ADD).
pub fn cgroup(cgroup_root: &Path, uid: &str) -> Result<PathBuf, Error> {
    let names = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    find_dir(cgroup_root, &names, 0).ok_or_else(|| Error::NoCgroup {
        uid: uid.into(),
        root: cgroup_root.into(),
    })
}

/// The agent's own cgroup: its pod's (by `pod_uid`), else this process's
/// from `/proc/self/cgroup` under `cgroup_root`. `None` for the root
/// cgroup (inside a cgroup namespace every process looks like it is there),
/// where nothing of the mesh may attach.
pub fn own_cgroup(cgroup_root: &Path, pod_uid: Option<&str>) -> Option<PathBuf> {
    if let Some(uid) = pod_uid {
        let names = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
        return find_dir(cgroup_root, &names, 0);
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = rel.trim().trim_start_matches('/');
    (!rel.is_empty()).then(|| cgroup_root.join(rel))
}

/// The first directory under `dir` whose name ends with one of `names`
/// (systemd adds `.slice`, so that is stripped first).
fn find_dir(dir: &Path, names: &[String], depth: usize) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".slice").unwrap_or(&name);
        if names.iter().any(|n| stem.ends_with(n.as_str())) {
            return Some(e.path());
        }
        subdirs.push(e.path());
    }
    if depth >= MAX_DEPTH {
        return None;
    }
    subdirs.iter().find_map(|d| find_dir(d, names, depth + 1))
}

/// A process in `cgroup` or one of its children (the containers).
fn first_pid(cgroup: &Path, depth: usize) -> Result<Option<u32>, Error> {
    let procs = cgroup.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(|source| Error::Read {
        path: procs,
        source,
    })?;
    if let Some(pid) = text.lines().find_map(|l| l.trim().parse().ok()) {
        return Ok(Some(pid));
    }
    if depth >= 2 {
        return Ok(None);
    }
    for e in std::fs::read_dir(cgroup)
        .map_err(|source| Error::Read {
            path: cgroup.into(),
            source,
        })?
        .flatten()
    {
        if e.file_type().is_ok_and(|t| t.is_dir())
            && let Some(pid) = first_pid(&e.path(), depth + 1)?
        {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroupfs_and_systemd_layouts() {
        let root = std::env::temp_dir().join(format!("mesh-discover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "0d2c6a1e-7f4b-4a8e-9c61-3f1f0b1b2c3d";
        let systemd = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let container = systemd.join("cri-containerd-abc.scope");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(systemd.join("cgroup.procs"), "").unwrap();
        std::fs::write(container.join("cgroup.procs"), "4242\n").unwrap();
        let (cg, netns) = pod(&root, uid).unwrap();
        assert_eq!(cg, systemd);
        assert_eq!(netns, PathBuf::from("/proc/4242/ns/net"));

        let cgroupfs = root.join("kubepods/burstable/pod1234");
        std::fs::create_dir_all(&cgroupfs).unwrap();
        std::fs::write(cgroupfs.join("cgroup.procs"), "").unwrap();
        assert!(matches!(pod(&root, "1234"), Err(Error::NoProcess { .. })));
        assert!(matches!(pod(&root, "99"), Err(Error::NoCgroup { .. })));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
