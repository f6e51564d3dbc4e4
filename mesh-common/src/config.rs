//! Settings the agent writes for the kernel programs (map `mesh_config`,
//! a one-element array), so ports and marks are not compiled in.

/// The agent's view of the data plane, as the kernel programs need it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MeshConfig {
    /// Outbound listener port inside each pod (15001).
    pub outbound_port: u16,
    /// Inbound plaintext listener port inside each pod (15006).
    pub inbound_port: u16,
    /// Inbound HBONE listener port inside each pod (15008).
    pub hbone_port: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// `SO_MARK` the agent sets on its own sockets; `connect4/6` leave sockets
    /// carrying it alone, so the agent's upstream connections are not captured
    /// even if the agent runs inside a captured cgroup.
    pub agent_mark: u32,
    /// Which bits of the socket mark `agent_mark` is compared on.
    pub agent_mark_mask: u32,
    /// [`MAP_ABI_VERSION`](crate::MAP_ABI_VERSION) of the agent that wrote
    /// this record; zero means "not configured yet" and every program passes.
    pub abi_version: u32,
}
const _: () = assert!(core::mem::size_of::<MeshConfig>() == 20);

crate::user_pod!(MeshConfig);

/// Flag of a pod (the values of `mesh_pod_ips` and `mesh_pod_flags`): its
/// traffic goes direct while its agent is away, instead of being refused.
pub const POD_FAIL_OPEN: u32 = 1;

/// [`MeshConfig::flags`]: splice application → agent bytes on the same
/// node in the kernel (`sock_ops` files the sockets, `sk_msg` redirects).
pub const FLAG_FAST_PATH: u16 = 1;

/// Source address the agent uses for its IPv4 connections to the
/// application (Istio's `127.0.0.6`). Packets from a loopback address cannot
/// arrive from outside the pod, so `sk_lookup` can pass them safely.
pub const AGENT_INBOUND_SRC_V4: [u8; 4] = [127, 0, 0, 6];

/// The IPv6 counterpart, `::6` (Istio's choice too), which the agent adds to
/// the pod's `lo`. Not `::1`: the kernel never delivers a reset to `::1` from
/// a pod address, so a connection to a closed port would hang instead of
/// being refused. A spoofed `::6` from outside cannot complete a handshake:
/// the SYN-ACK goes to the pod's own `lo`.
pub const AGENT_INBOUND_SRC_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];
