//! Every map the programs share with the agent. Names are what `bpftool map
//! list` shows and what the agent pins under its bpffs directory.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage, SockHash},
    macros::btf_map,
};
use mesh_common::{
    addr::Addr,
    capture::{ConnKey, OrigDst},
    config::MeshConfig,
    fast::FastState,
    stats::{PROG_COUNT, ProgStats},
};

/// Written by the agent before it attaches anything.
#[btf_map(name = "mesh_config")]
pub static CONFIG: Array<MeshConfig, 1> = Array::new();

/// Socket cookie → original destination, from connect until the socket is
/// released. Not LRU, on purpose: when it is full a new connect is refused
/// (and counted), rather than silently evicting a live connection's record.
/// The capacity is the agent's `--max-tracked-connections`.
#[btf_map(name = "mesh_orig_dst")]
pub static ORIG_DST: HashMap<u64, OrigDst, 65536> = HashMap::new();

/// Established 4-tuple (with netns cookie) → original destination, until
/// the connection closes. Not LRU either: a connection that cannot be filed
/// here is refused by the agent, which finds no original destination.
#[btf_map(name = "mesh_conn_dst")]
pub static CONN_DST: HashMap<ConnKey, OrigDst, 65536> = HashMap::new();

/// Port → `mesh_common::exclusion` flags.
#[btf_map(name = "mesh_excl_ports")]
pub static EXCL_PORTS: HashMap<u16, u32, 1024> = HashMap::new();

/// CIDR → `mesh_common::exclusion` flags.
#[btf_map(name = "mesh_excl_cidrs")]
pub static EXCL_CIDRS: LpmTrie<Addr, u32, 1024> = LpmTrie::new();

/// Pod address → the agent's inbound plaintext listener in that pod.
#[btf_map(name = "mesh_inbound")]
pub static INBOUND: SockHash<Addr, 4096> = SockHash::new();

/// Addresses of enrolled pods → the pod's flags (`POD_FAIL_OPEN`). An
/// address here with no listener in `mesh_inbound` means the agent is gone:
/// refuse rather than let plaintext reach the application unchecked, unless
/// the pod asked to fail open.
#[btf_map(name = "mesh_pod_ips")]
pub static POD_IPS: HashMap<Addr, u32, 4096> = HashMap::new();

/// Enrolled pods by network namespace cookie → the pod's flags, for the
/// programs that see a pod's sockets before they have an address
/// (`connect4/6`).
#[btf_map(name = "mesh_pod_flags")]
pub static POD_FLAGS: HashMap<u64, u32, 4096> = HashMap::new();

/// The fast path's redirect targets: the agent's own ends of application ⇄
/// agent connections inside pods, each filed under its connection (netns
/// cookie, local, remote), so `sk_msg` finds them under the sender's reversed
/// key. No program is attached to this map: the agent's sockets send through
/// TCP as usual. Entries leave with their sockets.
#[btf_map(name = "mesh_fast_socks")]
pub static FAST_SOCKS: SockHash<ConnKey, 65536> = SockHash::new();

/// The applications' ends of those connections, filed only so that `sk_msg`
/// (attached to this map) runs on what they send. Never a redirect target:
/// an application only ever receives through TCP.
#[btf_map(name = "mesh_fast_apps")]
pub static FAST_APPS: SockHash<ConnKey, 65536> = SockHash::new();

/// Per-application-socket fast-path record, freed with the socket. Pinned,
/// so a restarted agent's programs keep earlier decisions.
#[btf_map(name = "mesh_fast_state")]
pub static FAST_STATE: SkStorage<FastState> = SkStorage::new();

/// Agent socket (its `mesh_fast_socks` key) → bytes the agent has read from
/// it, written by the agent every `FAST_CREDIT_EVERY` bytes. LRU: an entry
/// the agent could not remove ages out; a missing one only means "no credit"
/// and sends the application to TCP, which is always safe.
#[btf_map(name = "mesh_fast_read")]
pub static FAST_READ: LruHashMap<ConnKey, u64, 65536> = LruHashMap::new();

/// Per-program counters, indexed by `mesh_common::stats::PROG_*`.
#[btf_map(name = "mesh_stats")]
pub static STATS: PerCpuArray<ProgStats, { PROG_COUNT as usize }> = PerCpuArray::new();

/// What the programs find in `mesh_config`.
pub enum Settings {
    /// Nothing yet: the agent writes its settings before it attaches
    /// anything, so no pod is captured and every program passes.
    Unset,
    /// This build's settings.
    Ours(&'static MeshConfig),
    /// Settings written for another map layout (`MAP_ABI_VERSION`): an
    /// agent and programs of different builds share these maps. Nothing in
    /// them can be trusted, so capture fails closed rather than let a pod's
    /// traffic pass in plaintext.
    Foreign,
}

#[inline(always)]
pub fn settings() -> Settings {
    match CONFIG.get(0) {
        None => Settings::Unset,
        Some(c) if c.abi_version == 0 => Settings::Unset,
        Some(c) if c.abi_version == mesh_common::MAP_ABI_VERSION => Settings::Ours(c),
        Some(_) => Settings::Foreign,
    }
}

/// This build's settings, if the agent wrote them (for the programs that
/// only add to what the others decided: on anything else they do nothing).
#[inline(always)]
pub fn config() -> Option<&'static MeshConfig> {
    match settings() {
        Settings::Ours(c) => Some(c),
        _ => None,
    }
}

/// Counts one outcome for program `prog`.
#[inline(always)]
pub fn count(prog: u32, outcome: Outcome) {
    if let Some(s) = STATS.get_ptr_mut(prog) {
        // SAFETY: per-CPU slot of a preallocated array; BPF programs are not
        // preempted on the same CPU while they run.
        unsafe {
            match outcome {
                Outcome::Redirected => (*s).redirected += 1,
                Outcome::Passed => (*s).passed += 1,
                Outcome::Error => (*s).errors += 1,
            }
        }
    }
}

/// What a program did with one event.
#[derive(Clone, Copy)]
pub enum Outcome {
    Redirected,
    Passed,
    Error,
}

/// Whether traffic to `addr:port` is excluded in `direction`
/// (`mesh_common::exclusion::EXCLUDE_*`).
#[inline(always)]
pub fn excluded(addr: &Addr, port: u16, direction: u32) -> bool {
    // SAFETY: the value is a plain u32 read once.
    if let Some(flags) = unsafe { EXCL_PORTS.get(port) }
        && flags & direction != 0
    {
        return true;
    }
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(128, *addr);
    matches!(EXCL_CIDRS.get(&key), Some(flags) if flags & direction != 0)
}
