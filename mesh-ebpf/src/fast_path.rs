//! `sk_msg` on the applications' sockets in `mesh_fast_apps`: bytes an
//! application writes to the agent on the same node go straight into the
//! agent socket's receive queue, skipping the loopback TCP/IP stack. Bytes
//! from the agent to an application always take TCP, so an application's
//! socket is never a redirect target and its reads see plain TCP.
//!
//! Ordering is the one thing to get right. A redirected message lands in the
//! peer's psock queue, which the kernel reads *before* its TCP receive queue
//! when both hold data. So a socket that ever sent through TCP must never
//! redirect afterwards, or newer bytes would overtake older ones. Each socket
//! therefore settles once, on its first message: redirect if its peer is
//! already filed, TCP otherwise, and only ever moves from redirect to TCP,
//! which keeps order (older redirected bytes are read first).
//!
//! Bounds: the kernel does not limit a redirect target's queue, so a socket
//! moves to TCP once its redirected bytes would run more than `FAST_WINDOW`
//! ahead of what the agent reported reading (`mesh_fast_read`), or when the
//! fast path is switched off. TCP's flow control then holds the writer.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, sk_action::SK_PASS, sk_msg_md},
    helpers::{bpf_get_netns_cookie, generated::bpf_sk_storage_get},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::{
    addr::AF_INET,
    capture::ConnKey,
    config::FLAG_FAST_PATH,
    fast::{FAST_REDIRECT, FAST_TCP, FAST_WINDOW, FastState},
    stats::PROG_SK_MSG,
};

use crate::{
    ctx::{load, load_ip6, load_ptr, v4_word_to_addr},
    maps::{FAST_READ, FAST_SOCKS, FAST_STATE, Outcome, config, count},
};

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    count(PROG_SK_MSG, redirect(&ctx));
    // With a redirect set, SK_PASS means "deliver there"; without, "send
    // through TCP as usual". Never drop an application's bytes.
    SK_PASS
}

#[inline(always)]
fn redirect(ctx: &SkMsgContext) -> Outcome {
    let c = ctx.as_ptr();
    let sk = load_ptr::<{ core::mem::offset_of!(sk_msg_md, __bindgen_anon_3) }>(c);
    if sk.is_null() {
        return Outcome::Error;
    }
    // SAFETY: `sk` is the message's socket (checked non-null); storage is
    // created zeroed (undecided, nothing sent) on first use and freed with
    // the socket.
    let state = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&FAST_STATE).cast_mut().cast(),
            sk.cast_mut().cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<FastState>();
    if state.is_null() {
        return Outcome::Error;
    }
    // SAFETY: `state` points at this socket's storage; messages on one
    // socket are sent under its lock, so nothing races these read-modify-
    // writes.
    let state = unsafe { &mut *state };
    let on = config().is_some_and(|cfg| cfg.flags & FLAG_FAST_PATH != 0);
    if state.decision == FAST_TCP || !on {
        state.decision = FAST_TCP;
        return Outcome::Passed;
    }
    let mut peer = peer_key(c);
    // Credit: what the agent has read, as it last reported (none yet: 0).
    // SAFETY: the value is copied out at once.
    let read = unsafe { FAST_READ.get(&peer).copied() }.unwrap_or(0);
    let size = u64::from(load!(c, sk_msg_md, size));
    if state.sent + size > read + FAST_WINDOW {
        state.decision = FAST_TCP;
        return Outcome::Passed;
    }
    let found = FAST_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS.into()) == SK_PASS.into();
    if !found {
        // Peer not filed (or gone): TCP from now on, whatever came before.
        state.decision = FAST_TCP;
        return Outcome::Passed;
    }
    state.decision = FAST_REDIRECT;
    state.sent += size;
    Outcome::Redirected
}

/// The key the peer socket was filed under: its local end is our remote one.
#[inline(always)]
fn peer_key(c: *mut core::ffi::c_void) -> ConnKey {
    let (local, remote) = if load!(c, sk_msg_md, family) == u32::from(AF_INET) {
        (
            v4_word_to_addr(load!(c, sk_msg_md, local_ip4)),
            v4_word_to_addr(load!(c, sk_msg_md, remote_ip4)),
        )
    } else {
        (
            load_ip6!(c, sk_msg_md, local_ip6),
            load_ip6!(c, sk_msg_md, remote_ip6),
        )
    };
    ConnKey {
        // SAFETY: helper valid for sk_msg programs (Linux 5.15+).
        netns_cookie: unsafe { bpf_get_netns_cookie(c) },
        src_addr: remote,
        dst_addr: local,
        // Network order in the upper 16 bits.
        src_port: u32::from_be(load!(c, sk_msg_md, remote_port)) as u16,
        // Host order.
        dst_port: load!(c, sk_msg_md, local_port) as u16,
        _pad: 0,
    }
}
