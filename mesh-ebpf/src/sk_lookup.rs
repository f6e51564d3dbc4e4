//! `sk_lookup` on each pod's network namespace: plaintext TCP arriving for
//! any of the pod's ports is handed to the agent's inbound listener
//! (`:15006`) in that pod, which then sees the original destination as its
//! local address.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        bpf_sk_lookup,
        sk_action::{SK_DROP, SK_PASS},
    },
    macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::{debug, error};
use mesh_common::{
    addr::{AF_INET, Addr},
    config::{AGENT_INBOUND_SRC_V6, POD_FAIL_OPEN},
    exclusion::EXCLUDE_INBOUND,
    stats::PROG_SK_LOOKUP,
};

use crate::{
    ctx::{is_local_only, load, load_ip6, v4_word_to_addr},
    maps::{INBOUND, Outcome, POD_IPS, Settings, count, excluded, settings},
};

const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let (outcome, verdict) = try_sk_lookup(&ctx);
    count(PROG_SK_LOOKUP, outcome);
    verdict
}

fn try_sk_lookup(ctx: &SkLookupContext) -> (Outcome, u32) {
    let c = ctx.as_ptr();
    let (protocol, family) = (
        load!(c, bpf_sk_lookup, protocol),
        load!(c, bpf_sk_lookup, family),
    );
    // Host order.
    let local_port = load!(c, bpf_sk_lookup, local_port);
    if protocol != IPPROTO_TCP {
        return (Outcome::Passed, SK_PASS);
    }
    let cfg = match settings() {
        Settings::Unset => return (Outcome::Passed, SK_PASS),
        Settings::Ours(cfg) => cfg,
        // Another build's settings: no port or address in the maps can be
        // trusted. Only loopback connections (which never leave the pod)
        // go on.
        Settings::Foreign => return foreign(ctx, family),
    };
    let port = local_port as u16;
    if port == cfg.outbound_port || port == cfg.inbound_port || port == cfg.hbone_port {
        return (Outcome::Passed, SK_PASS);
    }
    let (local, remote): (Addr, Addr) = if family == u32::from(AF_INET) {
        (
            v4_word_to_addr(load!(c, bpf_sk_lookup, local_ip4)),
            v4_word_to_addr(load!(c, bpf_sk_lookup, remote_ip4)),
        )
    } else {
        (
            load_ip6!(c, bpf_sk_lookup, local_ip6),
            load_ip6!(c, bpf_sk_lookup, remote_ip6),
        )
    };
    // The agent's own connections to the application (from 127.0.0.6 or
    // ::6), and loopback sources, which cannot come from outside the pod.
    if is_local_only(&remote)
        || remote == AGENT_INBOUND_SRC_V6
        || excluded(&local, port, EXCLUDE_INBOUND)
    {
        return (Outcome::Passed, SK_PASS);
    }
    match INBOUND.redirect_sk_lookup(ctx, local, 0) {
        Ok(()) => {
            debug!(ctx, "sk_lookup: [{:i}]:{} -> agent", local, port);
            (Outcome::Redirected, SK_PASS)
        }
        // SAFETY: the flags are a u32 read once.
        Err(e)
            if e == -ENOENT
                && unsafe { POD_IPS.get(local) }.is_none_or(|f| f & POD_FAIL_OPEN != 0) =>
        {
            // Not an enrolled pod; or one whose agent is away and which
            // asked to fail open: the application gets the connection.
            (Outcome::Passed, SK_PASS)
        }
        Err(e) => {
            // An enrolled pod without its listener: the agent is gone or
            // restarting. Refuse rather than bypass the mesh.
            error!(
                ctx,
                "sk_lookup: no inbound listener for [{:i}]:{} ({})", local, port, e
            );
            (Outcome::Error, SK_DROP)
        }
    }
}

/// `mesh_config` is another build's: refuse every connection from outside
/// the pod rather than let it reach the application unchecked.
#[inline(always)]
fn foreign(ctx: &SkLookupContext, family: u32) -> (Outcome, u32) {
    let c = ctx.as_ptr();
    let remote = if family == u32::from(AF_INET) {
        v4_word_to_addr(load!(c, bpf_sk_lookup, remote_ip4))
    } else {
        load_ip6!(c, bpf_sk_lookup, remote_ip6)
    };
    if is_local_only(&remote) {
        return (Outcome::Passed, SK_PASS);
    }
    error!(
        ctx,
        "sk_lookup: refused: mesh_config is another build's (map ABI mismatch)"
    );
    (Outcome::Error, SK_DROP)
}
