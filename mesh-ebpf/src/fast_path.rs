//! `sk_msg` on the sockets in `mesh_fast_socks`: bytes an application writes
//! to the agent (or the agent to an application) on the same node go straight
//! into the peer socket's receive queue, skipping the loopback TCP/IP stack.
//!
//! Ordering is the one thing to get right. A redirected message lands in the
//! peer's psock queue, which the kernel reads *before* its TCP receive queue
//! when both hold data. So a socket that ever sent through TCP must never
//! redirect afterwards, or newer bytes would overtake older ones. Each socket
//! therefore settles once, on its first message: redirect if its peer is
//! already filed, TCP otherwise, and only ever moves from redirect to TCP
//! (the fast path switched off), which keeps order (older redirected bytes
//! are read first).

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, sk_action::SK_PASS, sk_msg_md},
    helpers::{bpf_get_netns_cookie, generated::bpf_sk_storage_get},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::{addr::AF_INET, capture::ConnKey, config::FLAG_FAST_PATH, stats::PROG_SK_MSG};

use crate::{
    ctx::{load, load_ip6, load_ptr, v4_word_to_addr},
    maps::{FAST_SOCKS, FAST_STATE, Outcome, config, count},
};

/// A socket's decision, in `mesh_fast_state`.
const UNDECIDED: u32 = 0;
const REDIRECT: u32 = 1;
const TCP: u32 = 2;

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
    // created zeroed (UNDECIDED) on first use and freed with the socket.
    let state = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&FAST_STATE).cast_mut().cast(),
            sk.cast_mut().cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<u32>();
    if state.is_null() {
        return Outcome::Error;
    }
    let on = config().is_some_and(|cfg| cfg.flags & FLAG_FAST_PATH != 0);
    // SAFETY: `state` points at this socket's storage; messages on one
    // socket are sent under its lock, so nothing races this read-modify-write.
    unsafe {
        match (*state, on) {
            (TCP, _) => return Outcome::Passed,
            (_, false) => {
                *state = TCP;
                return Outcome::Passed;
            }
            _ => {}
        }
        let mut peer = peer_key(c);
        let found = FAST_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS.into()) == SK_PASS.into();
        if *state == UNDECIDED {
            *state = if found { REDIRECT } else { TCP };
        }
        if found {
            Outcome::Redirected
        } else {
            Outcome::Passed
        }
    }
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
