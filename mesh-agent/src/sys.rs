//! The few raw system calls the agent needs that no safe wrapper offers.
//! With `ebpf`, the only module allowed `unsafe`.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

/// `statfs.f_type` of bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `statfs.f_type` of cgroup v2.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `statfs.f_type` of nsfs (`/proc/<pid>/ns/*`, `/run/netns/*` bind mounts).
pub const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `SO_NETNS_COOKIE` (Linux 5.14); not in the libc crate yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Hands freed heap pages back to the kernel. Loading the eBPF object parses
/// the kernel's BTF (megabytes) and frees it, and a burst of connections
/// leaves freed buffers behind; without this the allocator keeps those
/// pages and the agent stays that much bigger at rest.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Heap bytes the allocator holds free (in its arenas, not yet returned).
pub fn free_heap_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    m.fordblks
}

/// Whether the process runs with effective UID 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The filesystem type (`statfs.f_type`) of `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid C string and `st` points to writable memory of
    // the right size; the kernel fills it on success.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so the struct is initialised.
    Ok(unsafe { st.assume_init() }.f_type)
}

/// Moves the calling thread into the network namespace behind `ns`.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `ns` is an open file descriptor; setns only changes this
    // thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of the network namespace a socket lives in, the same value
/// `bpf_get_netns_cookie` returns in the kernel programs.
pub fn netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Writes `bytes` to `path` through a temporary file beside it, synced,
/// then renamed over it: a reader sees the old file or the new one, never
/// half of one. `private` files are 0600, others 0644.
pub fn replace_file(path: &Path, bytes: &[u8], private: bool) -> io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address before
/// `connect` gets its port at `connect`, chosen by the whole 4-tuple (and
/// free to reuse a loopback TIME_WAIT), not at `bind` — where every port
/// a TIME_WAIT holds is taken, and a few hundred connections a second to
/// one application exhaust the range within a minute.
pub fn set_bind_address_no_port(sock: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the size passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `bpf(2)` commands used here (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// What [`pin_by_id`] pins.
#[derive(Debug, Clone, Copy)]
pub enum BpfObject {
    Map,
    Link,
}

/// `bpf(2)` with a zeroed `union bpf_attr` (128 bytes, little-endian
/// fields set by the caller).
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Pins the BPF map or link with ID `id` at `path` (on bpffs), from a
/// descriptor of its own: the caller's handle on the object is never given
/// up, so a failure leaves it as it was.
pub fn pin_by_id(kind: BpfObject, id: u32, path: &Path) -> io::Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id); // map_id or link_id; open_flags 0 (read-write)
    let get = match kind {
        BpfObject::Map => BPF_MAP_GET_FD_BY_ID,
        BpfObject::Link => BPF_LINK_GET_FD_BY_ID,
    };
    let fd = bpf(get, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64; // pathname
    attr[1] = u64::from(fd.as_raw_fd() as u32); // bpf_fd; file_flags 0
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// How many keys the map behind `fd` holds (`BPF_MAP_GET_NEXT_KEY` from
/// the start; at most `max + 1` steps, so a map changing under the walk
/// cannot keep it going).
pub fn map_key_count(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: u32,
    max: u32,
) -> io::Result<usize> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0usize;
    let mut first = true;
    while n <= max as usize {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(fd.as_raw_fd() as u32); // map_fd
        attr[1] = if first { 0 } else { key.as_ptr() as u64 }; // key
        attr[2] = next.as_mut_ptr() as u64; // next_key
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                n += 1;
                first = false;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The link pinned at `path`: its ID and its program's ID.
pub fn pinned_link_ids(path: &Path) -> io::Result<(u32, u32)> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64; // pathname; bpf_fd 0, file_flags 0
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info starts with type, id, prog_id (u32 each).
    let mut info = [0u64; 32];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32); // bpf_fd, info_len
    attr[1] = info.as_mut_ptr() as u64; // info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let id = (info[0] >> 32) as u32;
    let prog_id = (info[1] & 0xffff_ffff) as u32;
    Ok((id, prog_id))
}
