//! `sock_ops`: when a captured connection is established, file its original
//! destination under the connection's 4-tuple (what the agent sees on
//! `accept()`); when it closes, remove both records so the maps do not grow
//! (`sock_release` removes the first one too, even for a connect that never
//! reached TCP).
//!
//! With the fast path on, it also files both ends of every application ⇄
//! agent connection inside a pod, for `sk_msg`: the agent's ends (its socket
//! accepted on the outbound listener, its connection from its loopback
//! source `127.0.0.6`/`::6`) in `mesh_fast_socks`, the redirect targets; the
//! applications' ends (the captured connect, the socket that accepted the
//! agent's connection) in `mesh_fast_apps`, whose `sk_msg` program redirects
//! what they send. The agent's ends are seen because the agent attaches this
//! program to its own cgroup too.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_ops,
    },
    btf_maps::SockHash,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use mesh_common::{
    addr::{AF_INET, Addr, from_v4_octets},
    capture::ConnKey,
    config::{AGENT_INBOUND_SRC_V4, AGENT_INBOUND_SRC_V6, FLAG_FAST_PATH},
    stats::PROG_SOCK_OPS,
};

use crate::{
    ctx::{load, load_ip6, v4_word_to_addr},
    maps::{CONN_DST, FAST_APPS, FAST_SOCKS, ORIG_DST, Outcome, config, count},
};

const AGENT_SRC_V4: Addr = from_v4_octets(AGENT_INBOUND_SRC_V4);
const LOOPBACK_V4: Addr = from_v4_octets([127, 0, 0, 1]);
const LOOPBACK_V6: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

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
            let key = conn_key(ctx);
            // SAFETY: the record is copied out at once.
            if let Some(orig) = unsafe { ORIG_DST.get(cookie).copied() } {
                CONN_DST.insert(key, orig, 0)?;
                count(PROG_SOCK_OPS, Outcome::Redirected);
                file_fast(ctx, &FAST_APPS, key)?;
            } else if is_agent_src(&key.src_addr) {
                file_fast(ctx, &FAST_SOCKS, key)?;
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let key = conn_key(ctx);
            let outbound_listener = config().is_some_and(|c| key.src_port == c.outbound_port)
                && (key.src_addr == LOOPBACK_V4 || key.src_addr == LOOPBACK_V6);
            if outbound_listener {
                file_fast(ctx, &FAST_SOCKS, key)?;
            } else if is_agent_src(&key.dst_addr) {
                file_fast(ctx, &FAST_APPS, key)?;
            }
        }
        // Only captured sockets asked for state callbacks. Their
        // `mesh_orig_dst` record is usually gone already: `sock_release`
        // runs at close(), before TCP reaches CLOSE.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let orig = ORIG_DST.remove(cookie).is_ok();
            // Absent when the connect never established.
            let conn = CONN_DST.remove(conn_key(ctx)).is_ok();
            if orig || conn {
                count(PROG_SOCK_OPS, Outcome::Passed);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Files this socket in `map` for `sk_msg` when the fast path is on.
#[inline(always)]
fn file_fast(
    ctx: &SockOpsContext,
    map: &SockHash<ConnKey, 65536>,
    mut key: ConnKey,
) -> Result<(), i32> {
    if !config().is_some_and(|c| c.flags & FLAG_FAST_PATH != 0) {
        return Ok(());
    }
    // SAFETY: `ctx.ops` is the program's context, which the helper takes.
    map.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY.into())
}

/// Whether `a` is the agent's loopback source for connections to applications.
#[inline(always)]
fn is_agent_src(a: &Addr) -> bool {
    *a == AGENT_SRC_V4 || *a == AGENT_INBOUND_SRC_V6
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
