//! The hand-over's wire: a Unix `SOCK_SEQPACKET` connection carrying one
//! JSON message per record, with the listening sockets it names attached
//! as `SCM_RIGHTS`. Seqpacket keeps records and their descriptors
//! together, so no framing of our own is needed. Blocking calls with
//! socket timeouts: the hand-over runs on its own thread.

use std::{
    ffi::OsStr,
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The largest record either side sends (a pod's message is a few hundred
/// bytes).
const MAX_RECORD: usize = 64 * 1024;
/// The most descriptors one record carries (a pod: two loopback listeners
/// and two per address).
pub const MAX_FDS: usize = 32;

/// What the agents say to each other, in order: `Hello` (new), then
/// `Endpoint`s and `Pod`s with their sockets and `End` (old); `Ready` (new)
/// once it serves; `Leaving` (old) as it stops accepting.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Message {
    Hello {
        version: String,
        pid: u32,
    },
    /// One of the agent's own HTTP endpoints; one socket.
    Endpoint {
        addr: SocketAddr,
    },
    /// A pod's listeners; one socket per entry, in order.
    Pod {
        key: String,
        listeners: Vec<Listener>,
    },
    End,
    Ready,
    Leaving,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    Outbound,
    Inbound,
    Hbone,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Listener {
    pub role: Role,
    pub addr: SocketAddr,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path longer than {} bytes", addr.sun_path.len() - 1),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Listens at `path`, replacing whatever is there in one rename (a
/// predecessor's socket stays reachable until then). Only root may connect.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(OsStr::new(".new"));
    let tmp = Path::new(&tmp);
    let _ = std::fs::remove_file(tmp);
    let fd = seqpacket()?;
    let (addr, len) = sockaddr(tmp)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    std::fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    // SAFETY: listen(2) on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
    std::fs::rename(tmp, path)?;
    Ok(fd)
}

pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    Ok(fd)
}

pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: accept4(2) without an address; the result is owned from here on.
    let fd = cvt(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by accept4(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bounds every later send and receive on `fd` (`None`: wait forever).
pub fn set_timeout(fd: &OwnedFd, timeout: Option<Duration>) -> io::Result<()> {
    let t = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval for the size given.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// Sends `msg` with `fds` attached.
pub fn send(conn: &OwnedFd, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} sockets in one record (at most {MAX_FDS})", fds.len()),
        ));
    }
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let data_len = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(data_len) } as usize];
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    if !raw.is_empty() {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = control.len() as _;
        // SAFETY: `control` is CMSG_SPACE(data_len) bytes, room for one
        // header and `raw`; CMSG_FIRSTHDR of a buffer that size is non-null.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len as usize,
            );
        }
    }
    // SAFETY: `hdr` points at `iov`, `body` and `control`, all alive here.
    let sent = unsafe { libc::sendmsg(conn.as_raw_fd(), &raw const hdr, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one record; `None` when the other side has gone.
pub fn recv(conn: &OwnedFd) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_RECORD];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    let space = (MAX_FDS * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(space) } as usize];
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = control.len() as _;
    // SAFETY: `hdr` points at buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &raw mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Descriptors first, so they are closed on every error below.
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg(2) filled in, within
    // `msg_controllen`; each SCM_RIGHTS payload is an array of descriptors
    // now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const hdr, cmsg);
        }
    }
    if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a hand-over record was truncated",
        ));
    }
    if n == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&body[..n as usize])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fds)))
}

/// Only a process of our own user may take or offer listeners (the socket
/// is also mode 0600).
pub fn same_user(conn: &OwnedFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid(2) cannot fail.
    if cred.uid != unsafe { libc::geteuid() } {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer pid {} runs as uid {}", cred.pid, cred.uid),
        ));
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::fs::PermissionsExt};

    use super::*;

    #[test]
    fn records_carry_their_sockets() {
        let dir = std::env::temp_dir().join(format!("mesh-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.sock");
        let l = listen(&path).unwrap();
        let client = connect(&path).unwrap();
        let server = accept(&l).unwrap();
        set_timeout(&server, Some(Duration::from_secs(5))).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let msg = Message::Pod {
            key: "default/a".into(),
            listeners: vec![Listener {
                role: Role::Outbound,
                addr,
            }],
        };
        send(&client, &msg, &[tcp.as_fd()]).unwrap();
        send(&client, &Message::End, &[]).unwrap();
        let (got, fds) = recv(&server).unwrap().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        // The very socket: its address, and a connect reaches it.
        let passed = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(passed.local_addr().unwrap(), addr);
        drop(tcp);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        passed.accept().unwrap();
        let (end, fds) = recv(&server).unwrap().unwrap();
        assert_eq!((end, fds.len()), (Message::End, 0));
        drop(client);
        assert!(recv(&server).unwrap().is_none(), "end of stream");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
