//! Simulated nodes and pods.
//!
//! A node is a network namespace with a bridge; a pod is a network
//! namespace joined to its node's bridge by a veth pair, with an IPv4 and an
//! IPv6 address, and a cgroup of its own under the test's cgroup. The agent
//! runs inside the node's namespace, as a DaemonSet pod with host
//! networking would.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{env::Env, sys};

/// A simulated node: a netns with bridge `br0`.
#[derive(Clone)]
pub struct Node {
    /// The node's name (`--node-name`, and `node:` of its pods).
    pub name: String,
    pub netns: String,
    /// Third octet of this node's pod subnet (`10.10.<index>.0/24`).
    pub index: u8,
    next_host: Arc<AtomicU8>,
}

/// A simulated pod.
#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// The node it runs on.
    pub node: String,
    /// Kubernetes UID; the pod's cgroup is named after it as the kubelet
    /// does (`…pod<uid>`), so the agent can find a pod it learns from the
    /// Kubernetes API.
    pub uid: String,
}

impl Env {
    /// Creates a node with an empty bridge.
    pub fn node(&self, short: &str) -> Node {
        let index = self.next_node_index();
        let ns = self.add_netns(short);
        sys::ip(&format!("-n {ns} link add br0 type bridge"));
        sys::ip(&format!("-n {ns} addr add 10.10.{index}.1/24 dev br0"));
        sys::ip(&format!(
            "-n {ns} -6 addr add fd10:0:0:{index}::1/64 dev br0 nodad"
        ));
        sys::ip(&format!("-n {ns} link set br0 up"));
        Node {
            name: short.into(),
            netns: ns,
            index,
            next_host: Arc::new(AtomicU8::new(2)),
        }
    }

    /// Creates a pod on `node`, reachable from the node's other pods.
    pub fn pod(&self, node: &Node, short: &str) -> Pod {
        let host = node.next_host.fetch_add(1, Ordering::Relaxed);
        let (n, i) = (&node.netns, node.index);
        let ns = self.add_netns(short);
        let ip4 = Ipv4Addr::new(10, 10, i, host);
        let ip6: Ipv6Addr = format!("fd10:0:0:{i}::{host:x}").parse().expect("pod IPv6");
        sys::ip(&format!(
            "-n {n} link add vp{host} type veth peer name eth0 netns {ns}"
        ));
        sys::ip(&format!("-n {n} link set vp{host} master br0 up"));
        sys::ip(&format!("-n {ns} addr add {ip4}/24 dev eth0"));
        sys::ip(&format!("-n {ns} -6 addr add {ip6}/64 dev eth0 nodad"));
        sys::ip(&format!("-n {ns} link set eth0 up"));
        sys::ip(&format!("-n {ns} route add default via 10.10.{i}.1"));
        sys::ip(&format!("-n {ns} -6 route add default via fd10:0:0:{i}::1"));
        // Unique on the machine: process, environment, node, host.
        let uid = format!(
            "{:08x}-{:04x}-4000-8000-0000{:04x}{:04x}",
            std::process::id(),
            self.seq,
            i,
            host
        );
        let cgroup = self.cgroup.join(format!("{short}_pod{uid}"));
        std::fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.display()));
        Pod {
            name: short.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            netns: ns,
            cgroup,
            ip4,
            ip6,
            labels: vec![("app".into(), short.into())],
            annotations: Vec::new(),
            node: node.name.clone(),
            uid,
        }
    }
}

impl Env {
    /// Joins `nodes` through a fabric (a netns with a bridge, like a
    /// top-of-rack switch) so their pods reach each other: node k is
    /// 10.255.0.k / fd10:ff::k on it, with routes to the other nodes' pod
    /// subnets. Returns the fabric's netns, where a control plane (the CA)
    /// can run at [`FABRIC_ADDR`].
    pub fn connect_nodes(&self, nodes: &[&Node]) -> String {
        let fab = self.add_netns("fabric");
        sys::ip(&format!("-n {fab} link add br0 type bridge"));
        sys::ip(&format!("-n {fab} addr add {FABRIC_ADDR}/24 dev br0"));
        sys::ip(&format!(
            "-n {fab} -6 addr add fd10:ff::fe/64 dev br0 nodad"
        ));
        sys::ip(&format!("-n {fab} link set br0 up"));
        for n in nodes {
            let (ns, k) = (&n.netns, n.index);
            sys::ip(&format!(
                "-n {fab} link add n{k} type veth peer name up0 netns {ns}"
            ));
            sys::ip(&format!("-n {fab} link set n{k} master br0 up"));
            sys::ip(&format!("-n {ns} addr add 10.255.0.{k}/24 dev up0"));
            sys::ip(&format!(
                "-n {ns} -6 addr add fd10:ff::{k:x}/64 dev up0 nodad"
            ));
            sys::ip(&format!("-n {ns} link set up0 up"));
            sys::sysctl(
                ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            );
        }
        for n in nodes {
            for other in nodes.iter().filter(|o| o.index != n.index) {
                let (ns, j) = (&n.netns, other.index);
                sys::ip(&format!(
                    "-n {ns} route add 10.10.{j}.0/24 via 10.255.0.{j}"
                ));
                sys::ip(&format!(
                    "-n {ns} -6 route add fd10:0:0:{j}::/64 via fd10:ff::{j:x}"
                ));
            }
        }
        fab
    }
}

/// The fabric's own address (see [`Env::connect_nodes`]).
pub const FABRIC_ADDR: &str = "10.255.0.254";

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// `ip4:port`.
    pub fn v4(&self, port: u16) -> String {
        format!("{}:{port}", self.ip4)
    }

    /// `[ip6]:port`.
    pub fn v6(&self, port: u16) -> String {
        format!("[{}]:{port}", self.ip6)
    }

    /// This pod as an entry of the agent's workload file.
    pub fn workload(&self) -> Value {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let annotations: serde_json::Map<String, Value> = self
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "name": self.name,
            "annotations": annotations,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "ips": [self.ip4.to_string(), self.ip6.to_string()],
            "netns": self.netns_path(),
            "cgroup": self.cgroup,
            "labels": labels,
            "node": self.node,
        })
    }

    /// This pod as a Kubernetes Pod object (what the API server serves).
    pub fn kubernetes(&self) -> Value {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": self.uid, "labels": labels},
            "spec": {"nodeName": self.node, "serviceAccountName": self.service_account,
                     "containers": [{"name": "app", "image": "mesh-testapp"}]},
            "status": {"phase": "Running", "podIP": self.ip4.to_string(),
                       "podIPs": [{"ip": self.ip4.to_string()}, {"ip": self.ip6.to_string()}]},
        })
    }

    /// A command that runs `bin args…` as one of this pod's processes: in its
    /// cgroup (so the capture programs see its sockets) and its netns.
    pub fn command(&self, bin: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" -- "$@""#)
            .arg("sh")
            .arg(&self.cgroup)
            .arg(self.netns_path())
            .arg(bin)
            .args(args);
        c
    }

    /// Like `command`, but outside the pod's cgroup: a process sharing the
    /// pod's network, which the capture programs must not touch.
    pub fn command_outside_cgroup(&self, bin: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(bin)
            .args(args);
        c
    }

    /// Runs `mesh-testapp args…` in the pod and waits (at most 60 s).
    pub fn run_app(&self, args: &[&str]) -> AppResult {
        AppResult::wait(self.command(&sys::testapp_bin(), args))
    }

    /// Runs `mesh-testapp args…` in the pod's netns but outside its cgroup.
    pub fn run_app_outside_cgroup(&self, args: &[&str]) -> AppResult {
        AppResult::wait(self.command_outside_cgroup(&sys::testapp_bin(), args))
    }

    /// Starts a long-running `mesh-testapp args…` in the pod and waits until
    /// it printed its first line (e.g. `listening`).
    pub fn spawn_app(&self, env: &Env, args: &[&str]) -> App {
        App::spawn(env, self.command(&sys::testapp_bin(), args))
    }

    /// Like `spawn_app`, outside the pod's cgroup (a host process in its netns).
    pub fn spawn_app_outside_cgroup(&self, env: &Env, args: &[&str]) -> App {
        App::spawn(env, self.command_outside_cgroup(&sys::testapp_bin(), args))
    }
}

/// A finished `mesh-testapp` run.
pub struct AppResult {
    pub output: Output,
}

impl AppResult {
    fn wait(mut cmd: Command) -> Self {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mesh-testapp");
        // A bound on a hung app, not a speed check: the longest loads
        // (10,000 requests) take half of it on an emulated CPU.
        Self {
            output: wait_with_timeout(child, Duration::from_secs(120)),
        }
    }

    pub fn ok(&self) -> bool {
        self.output.status.success()
    }

    /// The last JSON line printed; panics (with the output) if the run failed.
    pub fn json(&self) -> Value {
        assert!(self.ok(), "mesh-testapp failed: {}", self.describe());
        self.last_json()
            .unwrap_or_else(|| panic!("no JSON output: {}", self.describe()))
    }

    pub fn last_json(&self) -> Option<Value> {
        String::from_utf8_lossy(&self.output.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn describe(&self) -> String {
        format!(
            "{}\nstdout: {}\nstderr: {}",
            self.output.status,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

/// Waits for `child`, killing it (by PID) after `timeout`.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let timeout = sys::scaled(timeout);
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = std::io::Read::read_to_end(o, &mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = std::io::Read::read_to_end(e, &mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// A long-running `mesh-testapp` (a server, a held connection). Its JSON
/// lines are collected as they arrive; the environment ends it.
pub struct App {
    pub pid: u32,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl App {
    fn spawn(env: &Env, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mesh-testapp");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let pid = env.track(child);
        let app = Self { pid, lines };
        app.wait_for(|_| true, Duration::from_secs(10));
        app
    }

    /// Waits for a line matching `pred`; panics after `timeout`.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let deadline = Instant::now() + sys::scaled(timeout);
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)) {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "mesh-testapp (pid {}) printed no matching line; got {:?}",
                self.pid,
                self.lines()
            );
            if !sys::pid_alive(self.pid) {
                // Its last lines may still be on their way through the pipe.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)) {
                    return v.clone();
                }
                panic!(
                    "mesh-testapp (pid {}) exited; printed {:?}",
                    self.pid,
                    self.lines()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// The `accepted` events once there are `n` (the app prints each before
    /// it answers, but its output reaches the test through a pipe and a
    /// reader thread, possibly after the client got the answer).
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.accepted();
            if seen.len() >= n || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `accepted` events, i.e. connections the server saw.
    pub fn accepted(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|v| v["event"] == "accepted")
            .collect()
    }
}
