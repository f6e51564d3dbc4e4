//! The guest's initramfs: busybox, the kernel modules the guest needs
//! before it can reach the host's files (virtio, 9p) or build the tests'
//! networks (veth, bridge), and an init script.
//!
//! Written here as an uncompressed `newc` cpio archive (the format the
//! kernel unpacks, a 110-byte ASCII header per file) instead of through
//! `cpio` and `gzip`: a few dozen lines, no tools to install, and the
//! kernel takes an uncompressed archive as it is.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Modules loaded in the guest, with their dependencies, when the kernel
/// has them as modules (a kernel with one built in has no `.ko`: skipped).
/// virtio and 9p reach the host's root; veth and bridge build the tests'
/// nodes and pods; sch_netem serves the fault tests.
pub const MODULES: [&str; 6] = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "bridge",
    "sch_netem",
];

/// A file to put in the archive.
pub enum Entry {
    Dir(&'static str),
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
}

/// The archive's bytes: `entries` in order, then the trailer.
pub fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, e) in entries.iter().enumerate() {
        let (path, mode, data): (&str, u32, &[u8]) = match e {
            Entry::Dir(p) => (p, 0o040_755, &[]),
            Entry::File { path, mode, data } => (path, 0o100_000 | mode, data),
        };
        header(&mut out, ino as u32 + 1, mode, path, data.len());
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    header(&mut out, 0, 0, "TRAILER!!!", 0);
    out
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, size: usize) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        size as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A module to load: its file name in the archive (`name.ko`) and its
/// bytes, uncompressed.
pub struct Module {
    pub file: String,
    pub bytes: Vec<u8>,
}

/// The modules to load, dependencies first, found under `modules` (the
/// kernel's `lib/modules/<release>`). A wanted module the kernel does not
/// have as a file is taken to be built in.
pub fn modules_in_order(modules: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let mut files = HashMap::new();
    index(modules, &mut files)?;
    let mut order = Vec::new();
    for name in wanted {
        visit(name, &files, &mut order, 0)?;
    }
    Ok(order)
}

fn index(dir: &Path, files: &mut HashMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        // Not through symbolic links (`build`, `source` point at the
        // kernel's headers, possibly on the host).
        if e.file_type()?.is_dir() {
            index(&p, files)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            let stem = [".ko", ".ko.xz", ".ko.zst"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext));
            if let Some(stem) = stem {
                // modinfo names use `_` where file names may use `-`.
                files.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(())
}

/// A module file's bytes, decompressed when the distribution compresses
/// its modules (Debian does from 6.12 on, with xz): busybox's `insmod`
/// loads plain ELF only.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return Ok(std::fs::read(path)?),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("{tool} (to decompress {})", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn visit(
    name: &str,
    files: &HashMap<String, PathBuf>,
    order: &mut Vec<Module>,
    depth: usize,
) -> Result<()> {
    if depth > 32 {
        bail!("module dependencies of {name} loop");
    }
    let Some(path) = files.get(name) else {
        return Ok(()); // built in
    };
    let file = format!("{name}.ko");
    if order.iter().any(|m| m.file == file) {
        return Ok(());
    }
    let bytes = read_module(path)?;
    for dep in depends(&bytes) {
        visit(&dep, files, order, depth + 1)?;
    }
    order.push(Module { file, bytes });
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` section: NUL-separated
/// `key=value` strings, found by their bytes rather than by parsing the
/// ELF file (the key is unique to that section).
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// The guest's `/init`: mounts what the tests need, loads the modules,
/// mounts the host's root read-only over 9p at /host with tmpfs where the
/// tests write, and runs `/run-tests.sh` chrooted there, so the host's
/// dynamically linked binaries (tests, agent, iproute2, bpftool) run
/// unchanged. Powers off at the end; the host reads the markers.
pub fn init_script(modules: &[String]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "MESH-VM-BOOTED $(uname -r)"
"#,
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /modules/{m} || echo \"MESH-VM-ERROR insmod {m} failed\"\n"
        ));
    }
    s.push_str(
        r#"mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host; then
    echo "MESH-VM-ERROR cannot mount the host's root over 9p"
    poweroff -f
fi
for d in tmp run var/tmp; do mount -t tmpfs tmpfs /host/$d; done
mount -o bind /proc /host/proc
mount -o bind /sys /host/sys
mount -o bind /dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t bpf bpf /host/sys/fs/bpf
mount -t tmpfs tmpfs /host/sys/fs/cgroup
mkdir -p /host/sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup/unified
cp /run-tests.sh /host/tmp/run-tests.sh
ip link set lo up
chroot /host /bin/sh /tmp/run-tests.sh
echo "MESH-VM-DONE rc=$?"
poweroff -f
"#,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_headers_are_aligned_and_end_with_the_trailer() {
        let a = archive(&[
            Entry::Dir("bin"),
            Entry::File {
                path: "init".into(),
                mode: 0o755,
                data: b"abc".to_vec(),
            },
        ]);
        assert!(a.starts_with(b"070701"));
        // Header (110) + "bin\0" padded to 116; then the file's header.
        assert_eq!(&a[116..122], b"070701");
        assert_eq!(a.len() % 4, 0);
        let tail = String::from_utf8_lossy(&a[a.len() - 124..]);
        assert!(tail.contains("TRAILER!!!"), "{tail}");
        // The file's size field (7th) is 3.
        let size = &a[116 + 6 + 6 * 8..116 + 6 + 7 * 8];
        assert_eq!(size, b"00000003");
    }

    #[test]
    fn depends_reads_the_modinfo_entry() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,9pnet,virtio_ring\0name=x\0";
        assert_eq!(depends(ko), ["virtio", "9pnet", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"nothing").is_empty());
    }
}
