//! What the kernel says is attached and pinned, read with bpftool and aya
//! rather than trusting the agent's own account.

use std::{os::unix::fs::MetadataExt, path::Path, process::Command};

use serde_json::Value;

fn bpftool(args: &[&str]) -> Value {
    let out = crate::sys::run(Command::new("bpftool").arg("-j").args(args));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
}

/// Programs attached to a cgroup (`bpftool cgroup show`).
pub fn cgroup_programs(cgroup: &Path) -> Vec<String> {
    bpftool(&["cgroup", "show", cgroup.to_str().unwrap()])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// BPF links whose target is this cgroup or this network namespace.
pub fn links_on(cgroup: &Path, netns: &Path) -> Vec<Value> {
    let cg_id = std::fs::metadata(cgroup).map(|m| m.ino()).unwrap_or(0);
    let ns_ino = std::fs::metadata(netns).map(|m| m.ino()).unwrap_or(0);
    bpftool(&["link", "list"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["cgroup_id"].as_u64() == Some(cg_id) || l["netns_ino"].as_u64() == Some(ns_ino)
        })
        .cloned()
        .collect()
}

/// Whether a program with this ID is still loaded.
pub fn program_loaded(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The kernel ID of a pinned map.
pub fn pinned_map_id(path: &Path) -> u64 {
    bpftool(&["map", "show", "pinned", path.to_str().unwrap()])["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no map pinned at {}", path.display()))
}

/// `bpftool map dump pinned PATH`, as JSON.
pub fn dump_pinned(path: &Path) -> Value {
    bpftool(&["map", "dump", "pinned", path.to_str().unwrap()])
}

/// Entries in the pinned connection-tracking maps (`mesh_orig_dst`,
/// `mesh_conn_dst`) under `pin_dir`, read with aya.
pub fn tracking_entries(pin_dir: &Path) -> (usize, usize) {
    use aya::maps::{HashMap, Map, MapData};
    use mesh_common::capture::{ConnKey, OrigDst};
    let open = |name: &str| {
        let p = pin_dir.join(name);
        Map::from_map_data(
            MapData::from_pin(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let orig: HashMap<_, u64, OrigDst> =
        HashMap::try_from(open("mesh_orig_dst")).expect("mesh_orig_dst layout");
    let conn: HashMap<_, ConnKey, OrigDst> =
        HashMap::try_from(open("mesh_conn_dst")).expect("mesh_conn_dst layout");
    (orig.keys().count(), conn.keys().count())
}
