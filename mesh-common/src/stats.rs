//! Per-program counters (map `mesh_stats`, a per-CPU array indexed by
//! program). The agent sums the CPUs and exports them as
//! `mesh_ebpf_program_events_total{program, outcome}`.

/// What one program did, per CPU.
///
/// * `connect4/6`: `redirected` = rewritten to the agent's outbound listener;
///   `passed` = left alone (not TCP, loopback, excluded, the agent's own);
///   `errors` = refused: the original destination could not be stored, or
///   `mesh_config` holds another map layout's settings (ABI mismatch).
/// * `getpeername4/6`: `redirected` = peer address restored to the original
///   destination.
/// * `sock_ops`: `redirected` = original destination linked to an established
///   4-tuple; `passed` = link removed when the connection closed.
/// * `sk_lookup`: `redirected` = assigned to the agent's inbound listener;
///   `passed` = left to the normal socket lookup; `errors` also counts
///   connections refused because the pod's listener was missing, or
///   `mesh_config` holds another map layout's settings (fail closed).
/// * `sk_msg`: `redirected` = application messages spliced into the agent's
///   socket; `passed` = messages left to TCP (peer not filed, fast path off,
///   the credit window overrun, or the socket settled on TCP earlier);
///   `errors` = no per-socket state could be allocated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProgStats {
    pub redirected: u64,
    pub passed: u64,
    pub errors: u64,
}
const _: () = assert!(core::mem::size_of::<ProgStats>() == 24);

crate::user_pod!(ProgStats);

pub const PROG_CONNECT4: u32 = 0;
pub const PROG_CONNECT6: u32 = 1;
pub const PROG_GETPEERNAME4: u32 = 2;
pub const PROG_GETPEERNAME6: u32 = 3;
pub const PROG_SOCK_OPS: u32 = 4;
pub const PROG_SK_LOOKUP: u32 = 5;
pub const PROG_SK_MSG: u32 = 6;
/// Number of slots in `mesh_stats`.
pub const PROG_COUNT: u32 = 7;

/// Program names by stats index, as exported in metric labels.
pub const PROG_NAMES: [&str; PROG_COUNT as usize] = [
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
    "sock_ops",
    "sk_lookup",
    "sk_msg",
];
