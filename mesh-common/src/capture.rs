//! Outbound capture: what `connect4/6` records and `sock_ops` links to the
//! established connection, so the agent can ask "where was this going?".

use crate::addr::Addr;

/// Where an application meant to connect before `connect4/6` rewrote the
/// destination to the agent's outbound listener.
///
/// Map `mesh_orig_dst`: socket cookie (`u64`) → `OrigDst`, written at connect
/// time, removed by `sock_ops` when the socket reaches `TCP_CLOSE` (an LRU map,
/// so a socket that never reports its close cannot leak an entry for ever).
/// Map `mesh_conn_dst`: [`ConnKey`] → `OrigDst`, the same record keyed by the
/// established 4-tuple, which is what the agent sees on `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Original destination address (map form, see [`crate::addr`]).
    pub addr: Addr,
    /// Original destination port, host byte order.
    pub port: u16,
    /// Address family of the application's socket (`AF_INET` or `AF_INET6`).
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// A TCP connection as seen from the application's side: its own address is
/// `src`, the agent's listener is `dst`.
///
/// Every pod has its own `127.0.0.1`, so the key also carries the network
/// namespace cookie; without it two pods' connections would collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// `bpf_get_netns_cookie` of the pod's network namespace.
    pub netns_cookie: u64,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 48);

crate::user_pod!(OrigDst, ConnKey);
