//! `Env`: one test's private world, and the guard that removes it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use crate::sys::{self, cgroup2_root, pid_alive};

/// Names of everything a test creates start with this.
const PREFIX: &str = "mt-";

/// A test's netns, cgroups, pins, files and processes; `Drop` removes them
/// all, in reverse order of creation, whether the test passed or not.
pub struct Env {
    /// `mt-<pid>-<test>`, or the demo's fixed name.
    pub name: String,
    /// The test's own cgroup (pods get children of it).
    pub cgroup: PathBuf,
    /// The agent's pin directory on bpffs.
    pub bpffs: PathBuf,
    /// Scratch files (workload file, logs).
    pub dir: PathBuf,
    netns: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
    agents: Arc<Mutex<Vec<u32>>>,
    next_node: AtomicU8,
    /// Distinguishes the environments of one test process (tests of one
    /// binary run in parallel), so what must be unique on the machine —
    /// pod UIDs, which the agent looks up in the whole cgroup tree — is.
    pub(crate) seq: u16,
}

/// Numbers the environments created by this process.
static NEXT_ENV: AtomicU16 = AtomicU16::new(0);

impl Env {
    /// Creates the environment of test `test`. Panics (failing the test)
    /// unless it runs as root on a kernel with what the tests need.
    pub fn new(test: &str) -> Self {
        sys::require_privileges();
        sweep_stale();
        let short: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let name = format!("{PREFIX}{}-{short}", std::process::id());
        let bpffs = Path::new("/sys/fs/bpf").join(&name);
        Self::create(name, bpffs)
    }

    /// An environment with a fixed name and pin directory (the demo).
    /// Leftovers of an earlier run with the same name are removed first.
    pub fn named(name: &str, bpffs: PathBuf) -> Self {
        sys::require_privileges();
        remove_leftovers(name, &bpffs);
        Self::create(name.into(), bpffs)
    }

    fn create(name: String, bpffs: PathBuf) -> Self {
        let cgroup = cgroup2_root().join(&name);
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.display()));
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self {
            name,
            cgroup,
            bpffs,
            dir,
            netns: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            agents: Arc::new(Mutex::new(Vec::new())),
            next_node: AtomicU8::new(1),
            seq: NEXT_ENV.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Creates a network namespace `<env>-<short>` with loopback up.
    pub(crate) fn add_netns(&self, short: &str) -> String {
        let ns = format!("{}-{short}", self.name);
        sys::ip(&format!("netns add {ns}"));
        self.netns.lock().unwrap().push(ns.clone());
        sys::ip(&format!("-n {ns} link set lo up"));
        ns
    }

    pub(crate) fn next_node_index(&self) -> u8 {
        self.next_node.fetch_add(1, Ordering::Relaxed)
    }

    /// The pin directory of the agent on `node`: one per node, so that two
    /// agents in one test never share (and prune) each other's pins.
    pub fn pin_dir(&self, node: &crate::Node) -> PathBuf {
        // bpffs names may not contain a dot.
        PathBuf::from(format!("{}--{}", self.bpffs.display(), node.name))
    }

    /// Keeps a started process so that `Drop` ends it (by PID).
    pub fn track(&self, child: Child) -> u32 {
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Remembers an agent's PID so `cleanup` can stop it (the `Agent` guard
    /// normally does, but not when a signal ends the program).
    /// The returned list is shared with the `Agent`, which takes its PID out
    /// once it has reaped the process (so a reused PID is never signalled).
    /// Where the agents of `node` offer their sockets to the next agent.
    pub fn handover_socket(&self, node: &crate::Node) -> PathBuf {
        self.dir.join(format!("handover-{}.sock", node.name))
    }

    pub(crate) fn track_agent(&self, pid: u32) -> Arc<Mutex<Vec<u32>>> {
        self.agents.lock().unwrap().push(pid);
        self.agents.clone()
    }

    /// Ends a process this environment started.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut c = children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Env {
    /// For programs (the demo, the benchmarks): on SIGINT or SIGTERM,
    /// remove everything and exit 130, so Ctrl-C leaves nothing behind.
    pub fn cleanup_on_signal(env: &Arc<Env>) {
        let env = env.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .expect("signal handlers");
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                eprintln!("\ninterrupted: cleaning up");
                env.cleanup();
                std::process::exit(130);
            }
        });
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Env {
    /// Removes everything; safe to call more than once and from a signal
    /// handler thread (the demo's Ctrl-C).
    pub fn cleanup(&self) {
        for pid in self.agents.lock().unwrap().drain(..) {
            // SIGTERM lets the agent detach and unpin on its own.
            sys::signal(pid, "TERM");
            let deadline = Instant::now() + crate::sys::scaled(Duration::from_secs(10));
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // One still draining (a long --drain-timeout) must not outlive
            // the test: its pins and cgroup go below all the same.
            if pid_alive(pid) {
                sys::signal(pid, "KILL");
            }
        }
        for mut c in self.children.lock().unwrap().drain(..).rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Pins first: unpinning the links detaches anything an agent left.
        let _ = fs::remove_dir_all(&self.bpffs);
        let per_node = format!(
            "{}--",
            self.bpffs.file_name().unwrap_or_default().to_string_lossy()
        );
        if let Ok(rd) = fs::read_dir(self.bpffs.parent().unwrap_or(Path::new("/sys/fs/bpf"))) {
            for e in rd
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&per_node))
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        for ns in self.netns.lock().unwrap().drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        remove_cgroup_tree(&self.cgroup);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes a cgroup and its children, deepest first. Processes that just
/// died may keep a cgroup busy for a moment, so retry briefly.
fn remove_cgroup_tree(root: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        dirs.push(d);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in dirs.iter().rev() {
        while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The PID in a name `mt-<pid>-…`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes what killed test runs left behind: only names of our scheme
/// whose owning process is gone.
fn sweep_stale() {
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| !pid_alive(pid));
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                let _ = Command::new("ip").args(["netns", "del", &n]).output();
            }
        }
    }
    for base in [cgroup2_root(), PathBuf::from("/sys/fs/bpf")] {
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if stale(&n) {
                    if base.starts_with("/sys/fs/bpf") {
                        let _ = fs::remove_dir_all(e.path());
                    } else {
                        remove_cgroup_tree(&e.path());
                    }
                }
            }
        }
    }
}

/// Removes resources named `name` (and `name-*`) from an earlier run.
fn remove_leftovers(name: &str, bpffs: &Path) {
    let _ = fs::remove_dir_all(bpffs);
    let per_node = format!(
        "{}--",
        bpffs.file_name().unwrap_or_default().to_string_lossy()
    );
    if let Ok(rd) = fs::read_dir(bpffs.parent().unwrap_or(Path::new("/sys/fs/bpf"))) {
        for e in rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&per_node))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == name || n.starts_with(&format!("{name}-")) {
                let _ = Command::new("ip").args(["netns", "del", &n]).output();
            }
        }
    }
    remove_cgroup_tree(&cgroup2_root().join(name));
}
