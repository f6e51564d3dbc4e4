//! The mesh CA as a process in the tests: a root made with `ca init`, the
//! server in a netns of the test's choosing, node credentials from
//! `ca join`, arbitrary certificates from `ca issue` for rogue peers.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    agent::write_workloads,
    env::Env,
    pod::{FABRIC_ADDR, Node, Pod},
    sys::{self, wait_until},
};

pub const TRUST_DOMAIN: &str = "cluster.local";

/// Runs a `mesh-agent ca …` tool command (not the server); returns stdout.
pub fn tool(args: &[&str]) -> String {
    let out = sys::run(Command::new(sys::agent_bin()).arg("ca").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a new root CA in `dir`.
pub fn init_root(dir: &Path) {
    tool(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--trust-domain",
        TRUST_DOMAIN,
    ]);
}

/// A certificate and key written by `ca issue` / `ca join`, with the roots.
pub struct Credential {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

/// A running CA.
pub struct Ca {
    pub dir: PathBuf,
    pub addr: String,
    pub workloads: PathBuf,
    pub log_path: PathBuf,
    pid: u32,
}

impl Ca {
    /// A new root in `<env dir>/<name>`, served in `netns` at the fabric
    /// address, placing `pods` (the registry, with their nodes).
    pub fn start(env: &Env, netns: &str, name: &str, pods: &[&Pod]) -> Self {
        let dir = env.dir.join(name);
        init_root(&dir);
        Self::serve(env, netns, &dir, pods, &[])
    }

    /// Serves the CA whose files are in `dir`.
    pub fn serve(env: &Env, netns: &str, dir: &Path, pods: &[&Pod], extra: &[&str]) -> Self {
        Self::serve_with_env(env, netns, dir, pods, extra, &[])
    }

    /// Like `serve`, with environment variables (e.g. KUBECONFIG).
    pub fn serve_with_env(
        env: &Env,
        netns: &str,
        dir: &Path,
        pods: &[&Pod],
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Self {
        let workloads = dir.join("placement.yaml");
        write_workloads(&workloads, pods);
        let log_path = dir.join("ca.log");
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(sys::agent_bin())
            .args(["ca", "run", "--dir"])
            .arg(dir)
            .args([
                "--trust-domain",
                TRUST_DOMAIN,
                "--listen",
                &format!("{FABRIC_ADDR}:15012"),
                "--config",
            ])
            .arg(&workloads)
            .args(extra)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn mesh-agent ca run");
        let pid = env.track(child);
        let ca = Self {
            dir: dir.into(),
            addr: format!("{FABRIC_ADDR}:15012"),
            workloads,
            log_path,
            pid,
        };
        assert!(
            wait_until(Duration::from_secs(20), || ca
                .log()
                .contains("certificate authority ready")),
            "the CA did not start:\n{}",
            ca.log()
        );
        ca
    }

    /// The CA process's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The CA's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A node credential for `node`.
    pub fn join(&self, node: &Node) -> Credential {
        let out = self.dir.join("nodes");
        tool(&[
            "join",
            "--dir",
            self.dir.to_str().unwrap(),
            "--trust-domain",
            TRUST_DOMAIN,
            "--node",
            &node.name,
            "--out",
            out.to_str().unwrap(),
        ]);
        Credential {
            cert: out.join(format!("{}.crt", node.name)),
            key: out.join(format!("{}.key", node.name)),
            root: out.join("root-cert.pem"),
        }
    }

    /// A certificate for any SPIFFE ID, signed by this CA.
    pub fn issue(&self, name: &str, identity: &str, expired: bool) -> Credential {
        issue(&self.dir, name, identity, expired)
    }

    /// The agent flags for mutual TLS on `node` with this CA.
    pub fn agent_args(&self, node: &Node) -> Vec<String> {
        let c = self.join(node);
        [
            "--ca-addr",
            &self.addr,
            "--ca-root",
            c.root.to_str().unwrap(),
            "--node-cert",
            c.cert.to_str().unwrap(),
            "--node-key",
            c.key.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// A certificate for `identity` from the CA in `dir` (any CA directory).
pub fn issue(dir: &Path, name: &str, identity: &str, expired: bool) -> Credential {
    let out = dir.join("issued");
    let mut args = vec![
        "issue",
        "--dir",
        dir.to_str().unwrap(),
        "--trust-domain",
        TRUST_DOMAIN,
        "--identity",
        identity,
        "--out",
        out.to_str().unwrap(),
        "--name",
        name,
    ];
    if expired {
        args.push("--expired");
    }
    tool(&args);
    Credential {
        cert: out.join(format!("{name}.crt")),
        key: out.join(format!("{name}.key")),
        root: out.join("root-cert.pem"),
    }
}

/// A packet capture with tcpdump inside a netns.
pub struct Capture {
    pid: u32,
    pub file: PathBuf,
}

impl Capture {
    /// Captures on `iface` of `netns` what matches `filter` (a pcap filter).
    pub fn start(env: &Env, netns: &str, iface: &str, filter: &str) -> Self {
        Self::start_with(env, netns, iface, filter, 0)
    }

    /// Like `start`, keeping only each frame's first 128 bytes (headers):
    /// for counting what crossed (`pcap::payload_bytes`) in bulk transfers.
    pub fn headers(env: &Env, netns: &str, iface: &str, filter: &str) -> Self {
        Self::start_with(env, netns, iface, filter, 128)
    }

    fn start_with(env: &Env, netns: &str, iface: &str, filter: &str, snaplen: u32) -> Self {
        assert!(
            sys::which("tcpdump").is_some(),
            "tcpdump is missing: run `cargo xtask setup`"
        );
        let file = env.dir.join(format!("{netns}-{iface}.pcap"));
        let log = env.dir.join(format!("{netns}-{iface}.tcpdump.log"));
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            // --immediate-mode: hand packets over as they come, not in
            // blocks a second apart.
            .args([
                "--",
                "tcpdump",
                "-i",
                iface,
                "-n",
                "--immediate-mode",
                "-U",
                "-s",
                &snaplen.to_string(),
                "-w",
            ])
            .arg(&file)
            .args(filter.split_whitespace())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tcpdump");
        let pid = env.track(child);
        assert!(
            wait_until(Duration::from_secs(10), || fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")),
            "tcpdump did not start: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Self { pid, file }
    }

    /// Stops the capture (SIGINT: tcpdump writes what it holds) and returns
    /// the pcap file's bytes.
    pub fn stop(self, env: &Env) -> Vec<u8> {
        sys::signal(self.pid, "INT");
        wait_until(Duration::from_secs(5), || !sys::pid_alive(self.pid));
        env.kill(self.pid);
        fs::read(&self.file).unwrap_or_default()
    }
}
