//! `cgroup/sock_release`: forgets a captured socket's original destination
//! when the socket goes, however it went. `sock_ops` removes it at TCP
//! close; a connect that failed before TCP started (refused by a later
//! program, no free port) never gets there, and without this its record
//! would stay and fill `mesh_orig_dst`, which is not LRU.

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::maps::ORIG_DST;

#[cgroup_sock(sock_release)]
pub fn mesh_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Most sockets were never captured: nothing to remove.
    let _ = ORIG_DST.remove(cookie);
    1
}
