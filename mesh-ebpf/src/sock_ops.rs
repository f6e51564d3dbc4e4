//! `sock_ops`: when a captured connection is established, file its original
//! destination under the connection's 4-tuple (what the agent sees on
//! `accept()`); when it closes, remove both records so the maps do not grow.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use mesh_common::{addr::AF_INET, capture::ConnKey, stats::PROG_SOCK_OPS};

use crate::{
    ctx::{load, load_ip6, v4_word_to_addr},
    maps::{CONN_DST, ORIG_DST, Outcome, count},
};

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if let Err(e) = try_sockops(&ctx) {
        count(PROG_SOCK_OPS, Outcome::Error);
        error!(&ctx, "sock_ops: op {} failed: {}", ctx.op(), e);
    }
    0
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        // Ask for state callbacks on captured sockets only, from the start,
        // so a connect that never establishes still reports its close.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: presence check only.
            if unsafe { ORIG_DST.get(cookie) }.is_some() {
                ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)?;
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: the record is copied out at once.
            if let Some(orig) = unsafe { ORIG_DST.get(cookie).copied() } {
                CONN_DST.insert(conn_key(ctx), orig, 0)?;
                count(PROG_SOCK_OPS, Outcome::Redirected);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if ORIG_DST.remove(cookie).is_ok() {
                // Absent when the connect never established: nothing to do.
                let _ = CONN_DST.remove(conn_key(ctx));
                count(PROG_SOCK_OPS, Outcome::Passed);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The connection from the application's side: its own address is `src`.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let c = ctx.as_ptr();
    let (src_addr, dst_addr) = if load!(c, bpf_sock_ops, family) == u32::from(AF_INET) {
        (
            v4_word_to_addr(load!(c, bpf_sock_ops, local_ip4)),
            v4_word_to_addr(load!(c, bpf_sock_ops, remote_ip4)),
        )
    } else {
        (
            load_ip6!(c, bpf_sock_ops, local_ip6),
            load_ip6!(c, bpf_sock_ops, remote_ip6),
        )
    };
    ConnKey {
        // SAFETY: helper valid for sock_ops programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(c) },
        src_addr,
        dst_addr,
        // Host order.
        src_port: load!(c, bpf_sock_ops, local_port) as u16,
        // Network order in the upper 16 bits.
        dst_port: u32::from_be(load!(c, bpf_sock_ops, remote_port)) as u16,
        _pad: 0,
    }
}
