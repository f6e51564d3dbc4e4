//! Commands, binaries and preconditions.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

/// Fails the test unless it runs as root with what the namespaced tests
/// need; privileged tests never pass silently.
pub fn require_privileges() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned));
    if uid.as_deref() != Some("0") {
        panic!(
            "namespaced tests need root (they create network namespaces and cgroups and load eBPF \
             programs): run them as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    if !is_mounted("/sys/fs/bpf", "bpf") {
        panic!(
            "bpffs is not mounted at /sys/fs/bpf: run `cargo xtask setup` (or `mount -t bpf bpf /sys/fs/bpf`)"
        );
    }
    cgroup2_root();
    for tool in ["ip", "nsenter", "bpftool"] {
        if which(tool).is_none() {
            panic!("`{tool}` is missing: run `cargo xtask setup`");
        }
    }
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == path && f[2] == fstype
        })
}

/// The cgroup v2 mount: `/sys/fs/cgroup/unified` on hybrid systems,
/// `/sys/fs/cgroup` on pure v2 ones.
pub fn cgroup2_root() -> PathBuf {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if is_mounted(p, "cgroup2") {
            return p.into();
        }
    }
    panic!(
        "no cgroup v2 hierarchy is mounted (looked at /sys/fs/cgroup/unified and /sys/fs/cgroup)"
    );
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `ip` with `args` (split on whitespace), e.g.
/// `ip("-n pod addr add 10.0.0.2/24 dev eth0")`.
pub fn ip(args: &str) {
    run(Command::new("ip").args(args.split_whitespace()));
}

/// Sets `key=value` sysctls inside network namespace `netns`.
pub fn sysctl(netns: &str, settings: &[&str]) {
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["sysctl", "-qw"])
        .args(settings));
}

/// Polls `done()` every 50 ms until it holds (true) or `timeout` passes
/// (false). For state that has no event to await: a metric, a map's size,
/// a log line. Callers assert on the result with their own message.
pub fn wait_until(timeout: std::time::Duration, done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + scaled(timeout);
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A harness timeout, stretched by `MESH_TEST_TIMEOUT_SCALE` (a whole
/// number, default 1): `cargo xtask vm-test` sets it where the guest's CPU
/// is emulated and everything runs several times slower. Timeouts bound
/// waits for events; they never measure speed, so stretching them changes
/// no verdict, only how long a failure takes to show.
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    static SCALE: OnceLock<u32> = OnceLock::new();
    let k = *SCALE.get_or_init(|| {
        std::env::var("MESH_TEST_TIMEOUT_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|k| *k >= 1)
            .unwrap_or(1)
    });
    d * k
}

/// A binary next to the running test executable (`target/<profile>/`).
pub fn sibling_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir, dir.parent()?]
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The agent binary under test: `$MESH_AGENT_BIN`, else built (or brought
/// up to date) with the cargo that built these tests, so a test never runs
/// a stale agent.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_agent("MESH_AGENT_BIN", &[]))
}

/// The second build of the agent (feature `second-build`, which calls
/// itself `<version>+second`), which the upgrade test replaces agents
/// with: `$MESH_AGENT_SECOND_BIN`, else built like [`agent_bin`].
pub fn second_agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_agent("MESH_AGENT_SECOND_BIN", &["second-build"]))
}

/// The CNI plugin (`mesh-cni`): `$MESH_CNI_BIN`, else the one built beside
/// the agent under test.
pub fn cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_CNI_BIN") {
        return p.into();
    }
    let p = agent_bin().with_file_name("mesh-cni");
    assert!(
        p.is_file(),
        "{} not built: run `cargo build -p mesh-agent --bins`",
        p.display()
    );
    p
}

fn built_agent(var: &str, features: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut target = nested_target_dir();
    if !features.is_empty() {
        // Its own directory: one build would replace the other's binary.
        target.push(features.join("-"));
    }
    let out = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "mesh-agent",
            // The CNI plugin too: it goes beside the agent.
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .args(
            (!features.is_empty())
                .then(|| ["--features".to_string(), features.join(",")])
                .into_iter()
                .flatten(),
        )
        .arg("--manifest-path")
        .arg(&manifest)
        // Its own target directory: built alone, mesh-agent unifies
        // shared dependencies' features differently from the tests, and
        // one directory for both would rebuild them on every run.
        .arg("--target-dir")
        .arg(target)
        .output()
        .expect("run cargo");
    if !out.status.success() {
        panic!(
            "building mesh-agent failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .find(|p| p.file_name().is_some_and(|n| n == "mesh-agent"))
        .unwrap_or_else(|| {
            panic!("cargo build did not report the mesh-agent executable:\n{stdout}")
        })
}

/// `<target>/agent-under-test`, next to the tests' own profile directories.
fn nested_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let target = exe
        .ancestors()
        .find(|a| a.join("CACHEDIR.TAG").exists())
        .map(Path::to_path_buf);
    target
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("agent-under-test")
}

/// The pod application (`mesh-testapp`).
pub fn testapp_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_TESTAPP_BIN") {
        return p.into();
    }
    sibling_bin("mesh-testapp")
        .expect("mesh-testapp not built: run `cargo build -p mesh-tests --bins`")
}

/// Whether a process with this PID exists and has not exited (a zombie
/// waiting to be reaped counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Sends `signal` (e.g. "TERM") to one process we started.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .output();
}
