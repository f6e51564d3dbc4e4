//! The agent under test, run as a real process inside a node's netns with
//! a workload file the test controls.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    env::Env,
    pod::{Node, Pod, wait_with_timeout},
    sys,
};

/// Extra settings for one agent.
#[derive(Clone, Default)]
pub struct AgentOptions {
    /// More `mesh-agent run` flags.
    pub args: Vec<String>,
    /// Log filter (`--log-level`); default `info`.
    pub log: Option<String>,
    /// Pin directory instead of the environment's.
    pub pin_dir: Option<PathBuf>,
    /// The agent is not expected to become ready (some pod cannot get a
    /// certificate): start-up waits for its admin endpoint instead.
    pub unready: bool,
    /// Environment variables for the agent (e.g. KUBECONFIG).
    pub env: Vec<(String, String)>,
    /// `--config-poll-interval`; tests default to 100 ms so that changes
    /// apply quickly even where file notifications were missed.
    pub config_poll_interval: Option<String>,
    /// The agent takes over from one running on the same node: start-up
    /// waits until it says it did (the endpoints answer all along).
    pub takes_over: bool,
    /// Run the second build ([`sys::second_agent_bin`]): an upgrade.
    pub second_build: bool,
}

impl AgentOptions {
    pub fn args(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }
}

/// What start-up waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// `/healthz/ready`.
    Ready,
    /// Just the admin endpoint (an agent that cannot get all its
    /// certificates never is ready).
    Serving,
    /// The agent's "took over" line (the endpoints are handed over, so they
    /// answer before it is ready).
    TookOver,
}

/// A running agent. Dropping it stops it with SIGTERM (SIGKILL if it hangs).
pub struct Agent {
    child: Option<Child>,
    tracked: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    pub node: Node,
    pub workloads: PathBuf,
    pub pin_dir: PathBuf,
    pub log_path: PathBuf,
}

/// Writes the workload file atomically (the agent polls it).
pub fn write_workloads(path: &std::path::Path, pods: &[&Pod]) {
    let doc =
        serde_json::json!({ "workloads": pods.iter().map(|p| p.workload()).collect::<Vec<_>>() });
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// `sh … nsenter … --`: what follows runs in `cgroup` and in `node`'s
/// network namespace, where an agent runs.
fn in_agent_place(cgroup: &std::path::Path, node: &Node) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"cg=$1; shift; echo $$ > "$cg/cgroup.procs" && exec "$@""#)
        .arg("sh")
        .arg(cgroup)
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .arg("--");
    c
}

/// The agent runs in a cgroup of its own under the test's, as in its
/// DaemonSet pod, so the fast path can attach `sock_ops` there.
fn command(env: &Env, node: &Node, workloads: &std::path::Path, opts: &AgentOptions) -> Command {
    let cgroup = env.cgroup.join(format!("agent-{}", node.name));
    fs::create_dir_all(&cgroup)
        .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.display()));
    let mut c = in_agent_place(&cgroup, node);
    let bin = if opts.second_build {
        sys::second_agent_bin()
    } else {
        sys::agent_bin()
    };
    c.arg(bin)
        .arg("run")
        .arg("--config")
        .arg(workloads)
        .arg("--bpffs-dir")
        .arg(opts.pin_dir.clone().unwrap_or_else(|| env.pin_dir(node)))
        // Per node and test: agents of other tests are not to be replaced.
        .args(
            (!opts.args.iter().any(|a| a == "--handover-socket"))
                .then(|| {
                    [
                        "--handover-socket".into(),
                        env.handover_socket(node).into_os_string(),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .args([
            "--config-poll-interval",
            opts.config_poll_interval.as_deref().unwrap_or("100ms"),
            "--node-name",
            &node.name,
        ])
        // Tests drain briefly unless they say otherwise.
        .args(
            (!opts.args.iter().any(|a| a == "--drain-timeout"))
                .then_some(["--drain-timeout", "1s"])
                .into_iter()
                .flatten(),
        )
        .args(["--log-level", opts.log.as_deref().unwrap_or("info")])
        .arg("--agent-cgroup")
        .arg(&cgroup)
        .args(&opts.args)
        // Tests without a CA say so, as an operator must.
        .args(
            (!opts
                .args
                .iter()
                .any(|a| a == "--ca-addr" || a == "--insecure-no-mtls"))
            .then_some("--insecure-no-mtls"),
        )
        .envs(opts.env.iter().map(|(k, v)| (k, v)));
    c
}

impl Agent {
    /// Starts an agent on `node` enrolling `pods`, and waits until it is ready.
    pub fn start(env: &Env, node: &Node, pods: &[&Pod], opts: AgentOptions) -> Self {
        let workloads = env.dir.join(format!("workloads-{}.yaml", node.index));
        write_workloads(&workloads, pods);
        let pin_dir = opts.pin_dir.clone().unwrap_or_else(|| env.pin_dir(node));
        let cmd = command(env, node, &workloads, &opts);
        let wait = if opts.takes_over {
            Wait::TookOver
        } else if opts.unready {
            Wait::Serving
        } else {
            Wait::Ready
        };
        Self::spawn(env, node, cmd, workloads, pin_dir, wait)
    }

    /// Starts `program args…` as an agent on `node` exactly as given (no
    /// flag of the harness's added): in its own cgroup and the node's
    /// network namespace, with `vars` as its environment's additions, and
    /// waits until it is ready. `program` may be a wrapper (`setpriv`)
    /// whose arguments end with the agent binary. `pin_dir` is where the
    /// given flags pin.
    pub fn start_command(
        env: &Env,
        node: &Node,
        program: &[String],
        vars: &[(String, String)],
        pin_dir: PathBuf,
    ) -> Self {
        let cgroup = env.cgroup.join(format!("agent-{}", node.name));
        fs::create_dir_all(&cgroup).unwrap();
        let mut cmd = in_agent_place(&cgroup, node);
        cmd.args(program).envs(vars.iter().map(|(k, v)| (k, v)));
        Self::spawn(env, node, cmd, PathBuf::new(), pin_dir, Wait::Ready)
    }

    /// Runs `cmd` (an agent) with its log in the environment's directory,
    /// tracked for cleanup, and waits as `wait` says.
    fn spawn(
        env: &Env,
        node: &Node,
        mut cmd: Command,
        workloads: PathBuf,
        pin_dir: PathBuf,
        wait: Wait,
    ) -> Self {
        // One log per agent process: a node's later agents get their own.
        let log_path = (0..)
            .map(|n| match n {
                0 => env.dir.join(format!("agent-{}.log", node.index)),
                n => env.dir.join(format!("agent-{}.{n}.log", node.index)),
            })
            .find(|p| !p.exists())
            .expect("a free log name");
        let log = fs::File::create(&log_path).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn mesh-agent");
        let tracked = env.track_agent(child.id());
        let mut agent = Self {
            child: Some(child),
            tracked,
            node: node.clone(),
            workloads,
            pin_dir,
            log_path,
        };
        agent.wait_ready(wait);
        agent
    }

    /// Runs an agent that is expected to fail at startup; returns its exit
    /// status and stderr.
    pub fn run_expecting_exit(
        env: &Env,
        node: &Node,
        pods: &[&Pod],
        opts: AgentOptions,
    ) -> (ExitStatus, String) {
        let workloads = env.dir.join("workloads-fail.yaml");
        write_workloads(&workloads, pods);
        Self::run_to_exit(command(env, node, &workloads, &opts))
    }

    /// Runs `cmd` (an agent command line) to completion, at most 60 s.
    pub fn run_to_exit(mut cmd: Command) -> (ExitStatus, String) {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mesh-agent");
        let out = wait_with_timeout(child, Duration::from_secs(60));
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("agent running")
    }

    /// Waits until the agent is as `wait` says.
    fn wait_ready(&mut self, wait: Wait) {
        let probe = match wait {
            Wait::Serving => "http://127.0.0.1:15000/config_dump",
            Wait::Ready => "http://127.0.0.1:15021/healthz/ready",
            Wait::TookOver => "",
        };
        let deadline = Instant::now() + sys::scaled(Duration::from_secs(30));
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let pid = self.child.take().map(|c| c.id());
                self.tracked.lock().unwrap().retain(|p| Some(*p) != pid);
                panic!(
                    "mesh-agent exited during startup ({status}):\n{}",
                    self.log()
                );
            }
            let done = match wait {
                Wait::TookOver => self.log().contains("took over"),
                _ => self.try_get(probe).is_ok(),
            };
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mesh-agent not ready after 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// An HTTP GET from inside the node's netns.
    pub fn try_get(&self, url: &str) -> Result<String, String> {
        self.http("get", url)
    }

    /// An HTTP POST (empty body) from inside the node's netns.
    pub fn try_post(&self, url: &str) -> Result<String, String> {
        self.http("post", url)
    }

    fn http(&self, method: &str, url: &str) -> Result<String, String> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.node.netns))
            .arg("--")
            .arg(sys::testapp_bin())
            .args([method, url]);
        let out = wait_with_timeout(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(20),
        );
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(body)
        } else {
            // The body of an error answer, then what went wrong.
            Err(format!("{body}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    pub fn metrics(&self) -> Metrics {
        Metrics(
            self.try_get("http://127.0.0.1:15020/metrics")
                .unwrap_or_else(|e| panic!("GET /metrics: {e}")),
        )
    }

    pub fn config_dump(&self) -> Value {
        let body = self
            .try_get("http://127.0.0.1:15000/config_dump")
            .unwrap_or_else(|e| panic!("GET /config_dump: {e}"));
        serde_json::from_str(&body).expect("config_dump is JSON")
    }

    /// Replaces the workload file with `pods` and waits until the agent
    /// shows exactly those in `/config_dump`.
    pub fn set_pods(&self, pods: &[&Pod]) {
        write_workloads(&self.workloads, pods);
        let mut want: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        want.sort();
        let enrolled = || {
            let dump = self.config_dump();
            let mut have: Vec<String> = dump["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w["name"].as_str().map(str::to_owned))
                .collect();
            have.sort();
            have
        };
        assert!(
            sys::wait_until(Duration::from_secs(20), || enrolled() == want),
            "agent enrolled {:?}, expected {want:?}:\n{}",
            enrolled(),
            self.log()
        );
    }

    /// The agent's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after 15 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends `signal` (e.g. "INT") and waits for the exit (SIGKILL after 15 s).
    pub fn stop_with(&mut self, signal: &str) -> ExitStatus {
        self.stop_within(signal, Duration::from_secs(15))
    }

    /// Sends `signal` and waits for the exit at most `grace` (then SIGKILL,
    /// and a panic), as the kubelet does with a pod's termination grace
    /// period.
    pub fn stop_within(&mut self, signal: &str, grace: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let pid = child.id();
        sys::signal(pid, signal);
        // Reaped below: forget the PID so it is never signalled again.
        let forget =
            |tracked: &std::sync::Mutex<Vec<u32>>| tracked.lock().unwrap().retain(|p| *p != pid);
        let deadline = Instant::now() + sys::scaled(grace);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                forget(&self.tracked);
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                forget(&self.tracked);
                panic!(
                    "mesh-agent ignored SIG{signal} for {}s:\n{}",
                    grace.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A panic here while a failed test unwinds would abort the process
        // and skip the environment's cleanup: then the environment stops it.
        if self.child.is_some() && !std::thread::panicking() {
            let _ = self.stop();
        }
    }
}

/// A Prometheus text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// Sum of the samples of `name` whose labels include all of `labels`.
    /// Panics when no series matches: a misspelt metric or label, or a
    /// series that was never created, must fail a check, never read as 0.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.try_value(name, labels)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Metrics::value`], with the missing series as an error (for
    /// polls that wait for a series to appear).
    pub fn try_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        let mut family = Vec::new();
        let mut sum = None;
        for l in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = l.rsplit_once(' ') else {
                return Err(format!("unparsable exposition line {l:?}"));
            };
            let (n, lbls) = series
                .split_once('{')
                .map_or((series, ""), |(n, rest)| (n, rest));
            if n != name {
                continue;
            }
            family.push(l);
            if labels
                .iter()
                .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")))
            {
                let v: f64 = value
                    .parse()
                    .map_err(|e| format!("{l:?}: value {value:?}: {e}"))?;
                *sum.get_or_insert(0.0) += v;
            }
        }
        sum.ok_or_else(|| {
            if family.is_empty() {
                format!("no series of {name} at all (misspelt, or never recorded)")
            } else {
                format!(
                    "no series of {name} with {labels:?}; there are:\n  {}",
                    family.join("\n  ")
                )
            }
        })
    }

    /// The first sample line of `name`.
    pub fn line(&self, name: &str) -> Option<&str> {
        self.0
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
    }
}
