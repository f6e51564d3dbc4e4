//! `cgroup/connect4` and `cgroup/connect6`: send a pod's outbound TCP
//! connections to the agent's listener inside the same pod, remembering where
//! they were going.
//!
//! Attached to each enrolled pod's own cgroup, so they run before any
//! socket-level load balancer a CNI attaches higher up the hierarchy.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_addr, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, error};
use mesh_common::{
    addr::{AF_INET, AF_INET6, Addr, from_v4_octets, is_v4_mapped},
    capture::OrigDst,
    config::{MeshConfig, POD_FAIL_OPEN},
    exclusion::EXCLUDE_OUTBOUND,
    stats::{PROG_CONNECT4, PROG_CONNECT6},
};

use crate::{
    ctx::{is_local_only, load, load_ip6, load_ptr, load32, store, store_ip6, v4_word_to_addr},
    maps::{ORIG_DST, Outcome, POD_FLAGS, Settings, count, excluded, settings},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Return values of a sock_addr program: 1 lets the call go on, 0 fails it
/// with EPERM.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// The error of a connect refused because `mesh_config` is another build's.
const FOREIGN_SETTINGS: i32 = -71; // EPROTO

const LOOPBACK_V4: Addr = from_v4_octets([127, 0, 0, 1]);
const LOOPBACK_V6: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    finish(&ctx, PROG_CONNECT4, try_connect4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    finish(&ctx, PROG_CONNECT6, try_connect6(&ctx))
}

#[inline(always)]
fn finish(ctx: &SockAddrContext, prog: u32, r: Result<Outcome, i32>) -> i32 {
    match r {
        Ok(outcome) => {
            count(prog, outcome);
            ALLOW
        }
        Err(FOREIGN_SETTINGS) => {
            count(prog, Outcome::Error);
            error!(
                ctx,
                "connect: refused: mesh_config is another build's (map ABI mismatch)"
            );
            REJECT
        }
        Err(e) => {
            count(prog, Outcome::Error);
            // Fail closed: a connection whose destination we could not record
            // would reach the agent with nowhere to go, or leak in plaintext.
            error!(ctx, "connect: cannot record original destination: {}", e);
            REJECT
        }
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<Outcome, i32> {
    let c = ctx.as_ptr();
    let Some(cfg) = capture_applies(ctx)? else {
        return Ok(Outcome::Passed);
    };
    let ip4 = load!(c, bpf_sock_addr, user_ip4);
    let dst = v4_word_to_addr(ip4);
    // `user_port` is network order in the low 16 bits.
    let port = u16::from_be(load!(c, bpf_sock_addr, user_port) as u16);
    if is_local_only(&dst) || excluded(&dst, port, EXCLUDE_OUTBOUND) {
        return Ok(Outcome::Passed);
    }
    if agent_away_and_fail_open(ctx, AF_INET, cfg.outbound_port) {
        return Ok(Outcome::Passed);
    }
    record(ctx, dst, port, AF_INET)?;
    store!(
        c,
        bpf_sock_addr,
        user_ip4,
        u32::from_ne_bytes([127, 0, 0, 1])
    );
    store!(
        c,
        bpf_sock_addr,
        user_port,
        u32::from(cfg.outbound_port.to_be())
    );
    debug!(ctx, "connect4: {:i}:{} -> agent", ip4.to_ne_bytes(), port);
    Ok(Outcome::Redirected)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<Outcome, i32> {
    let c = ctx.as_ptr();
    let Some(cfg) = capture_applies(ctx)? else {
        return Ok(Outcome::Passed);
    };
    let dst = load_ip6!(c, bpf_sock_addr, user_ip6);
    let port = u16::from_be(load!(c, bpf_sock_addr, user_port) as u16);
    if is_local_only(&dst) || excluded(&dst, port, EXCLUDE_OUTBOUND) {
        return Ok(Outcome::Passed);
    }
    // A v4-mapped destination on a dual-stack socket goes to the agent's IPv4
    // listener; rewriting it to ::1 would turn an IPv4 connection into IPv6.
    let (target, family) = if is_v4_mapped(&dst) {
        (LOOPBACK_V4, AF_INET)
    } else {
        (LOOPBACK_V6, AF_INET6)
    };
    if agent_away_and_fail_open(ctx, family, cfg.outbound_port) {
        return Ok(Outcome::Passed);
    }
    record(ctx, dst, port, family)?;
    store_ip6!(c, bpf_sock_addr, user_ip6, &target);
    store!(
        c,
        bpf_sock_addr,
        user_port,
        u32::from(cfg.outbound_port.to_be())
    );
    debug!(ctx, "connect6: [{:i}]:{} -> agent", dst, port);
    Ok(Outcome::Redirected)
}

/// The mesh settings if this is a TCP connect the mesh should look at: the
/// agent has configured the maps, and the socket is not one of the agent's
/// own. Settings of another build refuse the connect.
#[inline(always)]
fn capture_applies(ctx: &SockAddrContext) -> Result<Option<&'static MeshConfig>, i32> {
    let c = ctx.as_ptr();
    if load!(c, bpf_sock_addr, type_) != SOCK_STREAM
        || load!(c, bpf_sock_addr, protocol) != IPPROTO_TCP
    {
        return Ok(None);
    }
    let cfg = match settings() {
        Settings::Unset => return Ok(None),
        Settings::Foreign => return Err(FOREIGN_SETTINGS),
        Settings::Ours(cfg) => cfg,
    };
    // `sk` is a non-null PTR_TO_SOCKET in sock_addr programs.
    let sk = load_ptr::<{ core::mem::offset_of!(bpf_sock_addr, __bindgen_anon_1) }>(c);
    let mark = load32::<{ core::mem::offset_of!(bpf_sock, mark) }>(sk);
    if cfg.agent_mark != 0 && mark & cfg.agent_mark_mask == cfg.agent_mark {
        return Ok(None);
    }
    Ok(Some(cfg))
}

/// Whether this pod asked to fail open (`POD_FAIL_OPEN`) and nothing
/// listens on its outbound port on loopback (`family`): its agent is away,
/// and the connect goes where it was going. Looked up for such pods only.
#[inline(always)]
fn agent_away_and_fail_open(ctx: &SockAddrContext, family: u16, port: u16) -> bool {
    // SAFETY: helper valid for sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the flags are a u32 read once.
    if !unsafe { POD_FLAGS.get(netns) }.is_some_and(|f| f & POD_FAIL_OPEN != 0) {
        return false;
    }
    // SAFETY: a zeroed tuple is valid; the fields are plain integers.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if family == AF_INET {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: 0,
            daddr: u32::from_ne_bytes([127, 0, 0, 1]),
            sport: 0,
            dport: port.to_be(),
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        let mut daddr = [0u32; 4];
        daddr[3] = u32::from_ne_bytes([0, 0, 0, 1]);
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: [0; 4],
            daddr,
            sport: 0,
            dport: port.to_be(),
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    // SAFETY: helper valid for sock_addr programs; the socket it returns,
    // if any, is released at once.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        debug!(ctx, "connect: agent away; fail-open pod: passing");
        return true;
    }
    // SAFETY: `sk` came from bpf_sk_lookup_tcp and is released once.
    unsafe { bpf_sk_release(sk as *mut _) };
    false
}

#[inline(always)]
fn record(ctx: &SockAddrContext, addr: Addr, port: u16, family: u16) -> Result<(), i32> {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        family,
        _pad: 0,
    };
    ORIG_DST.insert(cookie, orig, 0)
}
