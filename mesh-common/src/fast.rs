//! The same-node fast path's shared state: what `sk_msg` keeps per
//! application socket (map `mesh_fast_state`) and the credit the agent
//! returns as it reads (map `mesh_fast_read`).
//!
//! A message `sk_msg` redirects lands in the agent socket's queue, which the
//! kernel does not bound: the sender never blocks and, once the machine's
//! TCP memory runs short, gets `ENOMEM`. So the application may run at most
//! [`FAST_WINDOW`] bytes ahead of what the agent has read; past that its
//! socket settles on TCP, whose flow control bounds everything after.

/// An application socket's fast-path record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FastState {
    /// `FAST_UNDECIDED`, `FAST_REDIRECT` or `FAST_TCP`.
    pub decision: u32,
    pub _pad: u32,
    /// Bytes redirected into the agent's socket so far.
    pub sent: u64,
}
const _: () = assert!(core::mem::size_of::<FastState>() == 16);

crate::user_pod!(FastState);

/// No message sent yet.
pub const FAST_UNDECIDED: u32 = 0;
/// Messages go into the agent's socket.
pub const FAST_REDIRECT: u32 = 1;
/// Messages go through TCP, for good (order: see `mesh-ebpf`'s `fast_path`).
pub const FAST_TCP: u32 = 2;

/// How far an application's redirected bytes may run ahead of the agent's
/// reads: about one TCP receive window, so the fast path holds no more than
/// the loopback path would.
pub const FAST_WINDOW: u64 = 1 << 20;

/// The agent reports its reads every this many bytes (one map update per
/// quarter window), so credit lags by at most a quarter of the window.
pub const FAST_CREDIT_EVERY: u64 = FAST_WINDOW / 4;
