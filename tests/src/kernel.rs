//! What the kernel says is attached and pinned, read with bpftool and aya
//! rather than trusting the agent's own account.

use std::{os::unix::fs::MetadataExt, path::Path, process::Command};

use serde_json::Value;

/// `bpftool -j ARGS`, parsed. Output that does not parse (or a failed
/// command) fails the test: it must never read as "nothing attached".
fn bpftool(args: &[&str]) -> Value {
    let out = crate::sys::run(Command::new("bpftool").arg("-j").args(args));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool -j {}: output is not JSON ({e}):\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    v
}

/// `bpftool … ` output that must be a JSON array.
fn bpftool_list(args: &[&str]) -> Vec<Value> {
    match bpftool(args) {
        Value::Array(a) => a,
        other => panic!(
            "bpftool -j {}: expected a list, got {other}",
            args.join(" ")
        ),
    }
}

/// Programs attached to a cgroup (`bpftool cgroup show`).
pub fn cgroup_programs(cgroup: &Path) -> Vec<String> {
    assert!(cgroup.is_dir(), "no cgroup {}", cgroup.display());
    let args = ["cgroup", "show", cgroup.to_str().unwrap()];
    // bpftool (7.1) prints nothing at all, not `[]`, for a cgroup with no
    // programs (checked by hand); anything it does print must parse.
    let out = crate::sys::run(Command::new("bpftool").arg("-j").args(args));
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    bpftool_list(&args)
        .iter()
        .map(|p| {
            p["name"]
                .as_str()
                .unwrap_or_else(|| panic!("a program without a name in bpftool's list: {p}"))
                .to_owned()
        })
        .collect()
}

/// BPF links whose target is this cgroup or this network namespace.
pub fn links_on(cgroup: &Path, netns: &Path) -> Vec<Value> {
    let ino = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .ino()
    };
    let (cg_id, ns_ino) = (ino(cgroup), ino(netns));
    bpftool_list(&["link", "list"])
        .into_iter()
        .filter(|l| {
            l["cgroup_id"].as_u64() == Some(cg_id) || l["netns_ino"].as_u64() == Some(ns_ino)
        })
        .collect()
}

/// The programs the agent attaches to each enrolled pod's cgroup.
pub const CAPTURE_PROGRAMS: [&str; 6] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_getpeer4",
    "mesh_getpeer6",
    "mesh_sock_release",
    "mesh_sockops",
];

/// Asserts `pod` is captured as the agent promises, as the kernel tells it:
/// the capture programs on its cgroup, their six links and `sk_lookup`'s
/// link on its network namespace.
pub fn assert_captured(pod: &crate::Pod) {
    let mut programs = cgroup_programs(&pod.cgroup);
    programs.sort();
    assert_eq!(programs, CAPTURE_PROGRAMS, "programs on {}", pod.name);
    assert_eq!(
        links_on(&pod.cgroup, &pod.netns_path()).len(),
        7,
        "links of {}: 6 cgroup links and sk_lookup's",
        pod.name
    );
}

/// Asserts nothing of the agent is attached to `pod`. Call it only after
/// [`assert_captured`] saw the same pod captured: an absence is worth
/// something only from a probe shown to see a presence.
pub fn assert_released(pod: &crate::Pod) {
    assert_eq!(
        cgroup_programs(&pod.cgroup),
        Vec::<String>::new(),
        "programs left on {}",
        pod.name
    );
    assert_eq!(
        links_on(&pod.cgroup, &pod.netns_path()),
        Vec::<Value>::new(),
        "links left on {}",
        pod.name
    );
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

/// Sets `abi_version` in the pinned `mesh_config` under `pin_dir` (as an
/// agent of another map layout would write it); returns the one it held.
pub fn set_config_abi(pin_dir: &Path, abi: u32) -> u32 {
    use aya::maps::{Array, Map, MapData};
    use mesh_common::config::MeshConfig;
    let p = pin_dir.join("mesh_config");
    let map = Map::from_map_data(
        MapData::from_pin(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut config: Array<_, MeshConfig> = Array::try_from(map).expect("mesh_config layout");
    let mut c = config.get(&0, 0).expect("read mesh_config");
    let old = std::mem::replace(&mut c.abi_version, abi);
    config.set(0, c, 0).expect("write mesh_config");
    old
}
