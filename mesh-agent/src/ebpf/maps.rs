//! Typed handles on the shared maps, and the conversions between socket
//! addresses and the maps' address form.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
};

use aya::maps::{
    Array, HashMap, Map, MapData, PerCpuArray, SockHash,
    lpm_trie::{Key, LpmTrie},
};
use mesh_common::{
    addr::{Addr, from_v4_octets, is_v4_mapped},
    capture::{ConnKey, OrigDst},
    config::{FLAG_FAST_PATH, MeshConfig},
    exclusion::{EXCLUDE_INBOUND, EXCLUDE_OUTBOUND},
    fast::FastState,
    stats::{PROG_COUNT, PROG_NAMES, ProgStats},
};
use serde::Serialize;

use super::Error;
use crate::config::{Cidr, Config};

/// The connection-tracking maps, whose capacity is
/// `--max-tracked-connections` (the capacities below are the defaults).
pub(super) const TRACKED: [&str; 2] = ["mesh_orig_dst", "mesh_conn_dst"];

/// Name, key size, value size and capacity of every map the agent pins. A
/// pinned map that differs belongs to an incompatible agent and is not
/// adopted.
pub(super) const PINNED: [(&str, usize, usize, u32); 13] = [
    ("mesh_config", 4, size_of::<MeshConfig>(), 1),
    ("mesh_orig_dst", 8, size_of::<OrigDst>(), 65536),
    (
        "mesh_conn_dst",
        size_of::<ConnKey>(),
        size_of::<OrigDst>(),
        65536,
    ),
    ("mesh_excl_ports", 2, 4, 1024),
    // LPM keys carry a 4-byte prefix length before the address.
    ("mesh_excl_cidrs", 4 + 16, 4, 1024),
    ("mesh_inbound", 16, 4, 4096),
    ("mesh_pod_ips", 16, 4, 4096),
    ("mesh_pod_flags", 8, 4, 4096),
    ("mesh_stats", 4, size_of::<ProgStats>(), PROG_COUNT),
    ("mesh_fast_socks", size_of::<ConnKey>(), 4, 65536),
    ("mesh_fast_apps", size_of::<ConnKey>(), 4, 65536),
    // Socket storage has no capacity of its own.
    ("mesh_fast_state", 4, size_of::<FastState>(), 0),
    ("mesh_fast_read", size_of::<ConnKey>(), 8, 65536),
];

/// The key of the connection `src` → `dst` in the namespace `netns_cookie`,
/// as `sock_ops` files it.
fn conn_key(netns_cookie: u64, src: SocketAddr, dst: SocketAddr) -> ConnKey {
    ConnKey {
        netns_cookie,
        src_addr: map_addr(src.ip()),
        dst_addr: map_addr(dst.ip()),
        src_port: src.port(),
        dst_port: dst.port(),
        _pad: 0,
    }
}

/// The map form of an IP address.
pub fn map_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.octets(), |v4| from_v4_octets(v4.octets())),
    }
}

/// The IP address behind a map address (v4-mapped becomes IPv4).
pub fn addr_from_map(a: &Addr) -> IpAddr {
    if is_v4_mapped(a) {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

/// Handles on the maps the agent reads and writes while it runs.
pub struct Maps {
    config: Mutex<Array<MapData, MeshConfig>>,
    orig_dst: HashMap<MapData, u64, OrigDst>,
    conn_dst: HashMap<MapData, ConnKey, OrigDst>,
    excl_ports: Mutex<HashMap<MapData, u16, u32>>,
    excl_cidrs: Mutex<LpmTrie<MapData, Addr, u32>>,
    inbound: Mutex<SockHash<MapData, Addr>>,
    pod_ips: Mutex<HashMap<MapData, Addr, u32>>,
    pod_flags: Mutex<HashMap<MapData, u64, u32>>,
    stats: PerCpuArray<MapData, ProgStats>,
    fast_socks: SockHash<MapData, ConnKey>,
    fast_apps: SockHash<MapData, ConnKey>,
    /// Bytes the agent has read from each of its fast-path sockets.
    fast_read: Mutex<HashMap<MapData, ConnKey, u64>>,
    /// Why the fast path cannot run on this kernel, if it cannot.
    fast_path_missing: Option<String>,
}

/// How many entries the connection-tracking maps hold (for `/metrics`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MapEntries {
    pub orig_dst: usize,
    pub conn_dst: usize,
    /// The agent's sockets filed for the fast path (redirect targets).
    pub fast_socks: usize,
    /// The applications' sockets filed for the fast path (senders).
    pub fast_apps: usize,
}

fn take(bpf: &mut aya::Ebpf, name: &'static str) -> Result<Map, Error> {
    bpf.take_map(name).ok_or(Error::MissingMap(name))
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Maps {
    pub(super) fn take(bpf: &mut aya::Ebpf) -> Result<Self, Error> {
        macro_rules! typed {
            ($name:literal) => {
                take(bpf, $name)?.try_into().map_err(map_err($name))?
            };
        }
        Ok(Self {
            config: Mutex::new(typed!("mesh_config")),
            orig_dst: typed!("mesh_orig_dst"),
            conn_dst: typed!("mesh_conn_dst"),
            excl_ports: Mutex::new(typed!("mesh_excl_ports")),
            excl_cidrs: Mutex::new(typed!("mesh_excl_cidrs")),
            inbound: Mutex::new(typed!("mesh_inbound")),
            pod_ips: Mutex::new(typed!("mesh_pod_ips")),
            pod_flags: Mutex::new(typed!("mesh_pod_flags")),
            stats: typed!("mesh_stats"),
            fast_socks: typed!("mesh_fast_socks"),
            fast_apps: typed!("mesh_fast_apps"),
            fast_read: Mutex::new(typed!("mesh_fast_read")),
            fast_path_missing: None,
        })
    }

    /// Makes the exclusion maps say exactly what `cfg` says (an adopted map
    /// may hold a previous agent's settings), then turns the programs on.
    pub(super) fn configure(&self, cfg: &Config) -> Result<(), Error> {
        let mut ports = std::collections::HashMap::<u16, u32>::new();
        for p in &cfg.exclude_outbound_ports {
            *ports.entry(*p).or_default() |= EXCLUDE_OUTBOUND;
        }
        for p in &cfg.exclude_inbound_ports {
            *ports.entry(*p).or_default() |= EXCLUDE_INBOUND;
        }
        {
            let mut m = self.excl_ports.lock().expect("map lock");
            let stale: Vec<u16> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !ports.contains_key(k))
                .collect();
            for k in stale {
                m.remove(&k).map_err(map_err("mesh_excl_ports"))?;
            }
            for (p, f) in &ports {
                m.insert(p, f, 0).map_err(map_err("mesh_excl_ports"))?;
            }
        }
        {
            let mut m = self.excl_cidrs.lock().expect("map lock");
            let stale: Vec<Key<Addr>> = m.keys().filter_map(Result::ok).collect();
            for k in stale {
                m.remove(&k).map_err(map_err("mesh_excl_cidrs"))?;
            }
            for c in &cfg.exclude_outbound_cidrs {
                m.insert(&cidr_key(c), EXCLUDE_OUTBOUND, 0)
                    .map_err(map_err("mesh_excl_cidrs"))?;
            }
        }
        let mc = MeshConfig {
            outbound_port: cfg.outbound_port,
            inbound_port: cfg.inbound_port,
            hbone_port: cfg.hbone_port,
            flags: if cfg.fast_path { FLAG_FAST_PATH } else { 0 },
            agent_mark: cfg.agent_mark,
            agent_mark_mask: u32::MAX,
            abi_version: mesh_common::MAP_ABI_VERSION,
        };
        self.config
            .lock()
            .expect("map lock")
            .set(0, mc, 0)
            .map_err(map_err("mesh_config"))
    }

    /// Turns the fast path on or off for new messages (`sk_msg` reads the
    /// flag on every message; a socket that was redirecting falls back to
    /// TCP, which keeps byte order).
    pub fn set_fast_path(&self, on: bool) -> Result<(), Error> {
        if let (true, Some(why)) = (on, &self.fast_path_missing) {
            return Err(Error::FastPathUnavailable(why.clone()));
        }
        let mut m = self.config.lock().expect("map lock");
        let mut mc = m.get(&0, 0).map_err(map_err("mesh_config"))?;
        mc.flags = if on {
            mc.flags | FLAG_FAST_PATH
        } else {
            mc.flags & !FLAG_FAST_PATH
        };
        m.set(0, mc, 0).map_err(map_err("mesh_config"))
    }

    /// Why the fast path cannot run on this kernel (its program was
    /// refused), if it cannot.
    pub fn fast_path_unavailable(&self) -> Option<&str> {
        self.fast_path_missing.as_deref()
    }

    pub(super) fn set_fast_path_missing(&mut self, why: String) {
        self.fast_path_missing = Some(why);
    }

    /// Whether the fast path is on.
    pub fn fast_path(&self) -> bool {
        let m = self.config.lock().expect("map lock");
        m.get(&0, 0).is_ok_and(|mc| mc.flags & FLAG_FAST_PATH != 0)
    }

    /// The applications' fast-path sockets, for attaching `sk_msg`.
    pub(super) fn fast_apps_fd(&self) -> &aya::maps::sock::SockMapFd {
        self.fast_apps.fd()
    }

    /// Reports that the agent has read `total` bytes from its socket `local`
    /// ⇄ `peer` in the network namespace `netns_cookie`: credit for the
    /// application's sender (see `mesh_common::fast`). A failed update only
    /// sends that application to TCP.
    pub fn fast_path_read(
        &self,
        netns_cookie: u64,
        local: SocketAddr,
        peer: SocketAddr,
        total: u64,
    ) {
        let key = conn_key(netns_cookie, local, peer);
        let mut m = self.fast_read.lock().expect("map lock");
        if let Err(e) = m.insert(key, total, 0) {
            tracing::debug!("fast path: cannot record a read: {e}");
        }
    }

    /// Forgets the credit of a closed socket.
    pub fn fast_path_closed(&self, netns_cookie: u64, local: SocketAddr, peer: SocketAddr) {
        let key = conn_key(netns_cookie, local, peer);
        let _ = self.fast_read.lock().expect("map lock").remove(&key);
    }

    /// Where a captured connection was going, by the connection as the
    /// agent's outbound listener accepted it.
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = conn_key(netns_cookie, peer, local);
        let orig = self.conn_dst.get(&key, 0).ok()?;
        Some(SocketAddr::new(addr_from_map(&orig.addr), orig.port))
    }

    /// Registers a pod (by network namespace cookie) with its flags
    /// (`mesh_common::config::POD_*`).
    pub fn add_pod(&self, netns_cookie: u64, flags: u32) -> Result<(), Error> {
        self.pod_flags
            .lock()
            .expect("map lock")
            .insert(netns_cookie, flags, 0)
            .map_err(map_err("mesh_pod_flags"))
    }

    /// Forgets a pod's flags (ignores an entry already gone).
    pub fn remove_pod(&self, netns_cookie: u64) {
        let _ = self
            .pod_flags
            .lock()
            .expect("map lock")
            .remove(&netns_cookie);
    }

    /// Registers a pod address, with the pod's flags, and the agent's
    /// inbound listener for it.
    pub fn add_inbound(
        &self,
        ip: IpAddr,
        flags: u32,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), Error> {
        let a = map_addr(ip);
        self.inbound
            .lock()
            .expect("map lock")
            .insert(a, listener.as_raw_fd(), 0)
            .map_err(map_err("mesh_inbound"))?;
        self.pod_ips
            .lock()
            .expect("map lock")
            .insert(a, flags, 0)
            .map_err(map_err("mesh_pod_ips"))
    }

    /// Forgets a pod address (ignores entries already gone).
    pub fn remove_inbound(&self, ip: IpAddr) {
        let a = map_addr(ip);
        let _ = self.pod_ips.lock().expect("map lock").remove(&a);
        let _ = self.inbound.lock().expect("map lock").remove(&a);
    }

    /// Per-program counters summed over CPUs, as (program, stats).
    pub fn program_stats(&self) -> Vec<(&'static str, ProgStats)> {
        (0..PROG_COUNT)
            .map(|i| {
                let mut sum = ProgStats::default();
                if let Ok(per_cpu) = self.stats.get(&i, 0) {
                    for s in per_cpu.iter() {
                        sum.redirected += s.redirected;
                        sum.passed += s.passed;
                        sum.errors += s.errors;
                    }
                }
                (PROG_NAMES[i as usize], sum)
            })
            .collect()
    }

    /// Counts the entries of the connection-tracking maps (one syscall per
    /// entry: for scrapes and tests, not the data path).
    pub fn entries(&self) -> MapEntries {
        MapEntries {
            orig_dst: self.orig_dst.keys().filter(Result::is_ok).count(),
            conn_dst: self.conn_dst.keys().filter(Result::is_ok).count(),
            fast_socks: self.fast_socks.keys().filter(Result::is_ok).count(),
            fast_apps: self.fast_apps.keys().filter(Result::is_ok).count(),
        }
    }
}

fn cidr_key(c: &Cidr) -> Key<Addr> {
    let len = match c.addr {
        IpAddr::V4(_) => 96 + u32::from(c.len),
        IpAddr::V6(_) => u32::from(c.len),
    };
    Key::new(len, map_addr(c.addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_form() {
        for s in ["10.1.2.3", "fd10::7", "::1", "127.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(addr_from_map(&map_addr(ip)), ip);
        }
        // A v4-mapped IPv6 address is the IPv4 connection it carries.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            addr_from_map(&map_addr(mapped)),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv4_cidrs_match_under_the_mapped_prefix() {
        let k = cidr_key(&"10.96.0.0/12".parse().unwrap());
        assert_eq!(k.prefix_len(), 108);
        assert_eq!(k.data()[10..12], [0xff, 0xff]);
        assert_eq!(cidr_key(&"fd00::/8".parse().unwrap()).prefix_len(), 8);
    }
}
