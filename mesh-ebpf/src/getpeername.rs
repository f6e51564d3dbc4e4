//! `cgroup/getpeername4` and `getpeername6`: an application that asks whom
//! its captured socket is connected to sees the original destination, not the
//! agent's listener (what iptables REDIRECT shows under Istio's sidecar too).

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie,
    macros::cgroup_sock_addr, programs::SockAddrContext,
};
use mesh_common::{
    capture::OrigDst,
    stats::{PROG_GETPEERNAME4, PROG_GETPEERNAME6},
};

use crate::{
    ctx::{store, store_ip6},
    maps::{ORIG_DST, Outcome, count},
};

/// getpeername programs must return 1.
const DONE: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeer4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = lookup(&ctx) {
        let c = ctx.as_ptr();
        let o = &orig.addr;
        store!(
            c,
            bpf_sock_addr,
            user_ip4,
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]])
        );
        store!(c, bpf_sock_addr, user_port, u32::from(orig.port.to_be()));
        count(PROG_GETPEERNAME4, Outcome::Redirected);
    }
    DONE
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = lookup(&ctx) {
        let c = ctx.as_ptr();
        store_ip6!(c, bpf_sock_addr, user_ip6, &orig.addr);
        store!(c, bpf_sock_addr, user_port, u32::from(orig.port.to_be()));
        count(PROG_GETPEERNAME6, Outcome::Redirected);
    }
    DONE
}

#[inline(always)]
fn lookup(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out at once.
    unsafe { ORIG_DST.get(cookie).copied() }
}
