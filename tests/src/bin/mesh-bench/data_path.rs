//! `data-path`: what the mesh costs on the wire, side by side in one run.
//! Two simulated nodes with a CA; a client pod on node a, a server pod on
//! each node. The same loads go, alternating, to:
//!
//! - **direct**: the client pod's network, outside its cgroup (not
//!   captured), to the server on node b;
//! - **same-node**: captured, to the server on node a (L4 through the agent);
//! - **HBONE**: captured, to the server on node b (L4, mutual TLS between
//!   the agents);
//! - **L7**: captured, to a Service address with an HTTP port and a
//!   VirtualService, so every request is routed by the agent, then HBONE.
//!
//! Loads: wrk with 32 keep-alive connections; wrk with a new connection per
//! request; a fixed rate of 2,000 requests/s for latency percentiles;
//! iperf3 for one TCP stream (not for L7: it is not HTTP). The agents' CPU
//! time and resident memory come from /proc.

use std::{path::PathBuf, process::Command, time::Duration};

use mesh_tests::{Agent, AgentOptions, Env, Node, Pod, ca::Ca, sys};
use serde_json::{Value, json};

use super::machine;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    SameNode,
    Hbone,
    L7,
}

const PATHS: [Path; 4] = [Path::Direct, Path::SameNode, Path::Hbone, Path::L7];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::SameNode => "same-node L4",
            Path::Hbone => "cross-node HBONE (mTLS)",
            Path::L7 => "cross-node L7 + HBONE",
        }
    }
}

/// One load's figure per path (the median of the repetitions).
#[derive(Default)]
struct Row {
    values: Vec<Option<f64>>,
}

pub struct DataPathResult {
    quick: bool,
    secs: u64,
    keepalive: Row,
    new_conns: Row,
    stream_gbps: Row,
    p50: Row,
    p90: Row,
    p99: Row,
    /// Agent CPU per 1,000 requests/s, per agent, under the keep-alive load.
    cpu_per_krps: Row,
    rss_idle_mb: f64,
    rss_peak_mb: f64,
}

struct Bench<'a> {
    client: &'a Pod,
    wrk: PathBuf,
    iperf: PathBuf,
    agents: [u32; 2],
    local: &'a Pod,
    remote: &'a Pod,
}

const VIP: &str = "10.96.0.100";

impl Bench<'_> {
    fn http_url(&self, p: Path) -> String {
        match p {
            Path::Direct | Path::Hbone => format!("http://{}/", self.remote.v4(8080)),
            Path::SameNode => format!("http://{}/", self.local.v4(8080)),
            Path::L7 => format!("http://{VIP}:80/"),
        }
    }

    fn iperf_host(&self, p: Path) -> Option<String> {
        match p {
            Path::Direct | Path::Hbone => Some(self.remote.ip4.to_string()),
            Path::SameNode => Some(self.local.ip4.to_string()),
            Path::L7 => None,
        }
    }

    fn command(&self, p: Path, bin: &std::path::Path, args: &[&str]) -> Command {
        if p == Path::Direct {
            self.client.command_outside_cgroup(bin, args)
        } else {
            self.client.command(bin, args)
        }
    }

    /// The agents' CPU seconds so far (user + system).
    fn agent_cpu(&self) -> f64 {
        self.agents.iter().map(|pid| cpu_secs(*pid)).sum()
    }

    /// Requests per second from wrk, and the agents' CPU seconds meanwhile.
    fn wrk(&self, p: Path, secs: u64, new_connection_each: bool) -> (f64, f64) {
        let d = format!("{secs}s");
        let url = self.http_url(p);
        let mut args = vec!["-t2", "-c32", "-d", &d];
        if new_connection_each {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let before = self.agent_cpu();
        let out = output(self.command(p, &self.wrk, &args));
        let cpu = self.agent_cpu() - before;
        let rps = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Requests/sec from wrk:\n{out}"));
        (rps, cpu)
    }

    fn iperf(&self, p: Path, secs: u64) -> Option<f64> {
        let host = self.iperf_host(p)?;
        let t = secs.to_string();
        let out =
            output(self.command(p, &self.iperf, &["-c", &host, "-p", "5201", "-t", &t, "-J"]));
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 JSON: {e}\n{out}"));
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
    }

    fn latency(&self, p: Path, secs: u64) -> (f64, f64, f64) {
        let url = self.http_url(p);
        let s = secs.to_string();
        let out = output(self.command(p, &sys::testapp_bin(), &["fixed-rate", &url, "2000", &s]));
        let v: Value = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no latency JSON:\n{out}"));
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        (f("p50_ms"), f("p90_ms"), f("p99_ms"))
    }
}

/// Runs `c` to completion; its stdout (panics with stderr on failure).
fn output(mut c: Command) -> String {
    let out = c.output().expect("spawn load generator");
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is 3rd, utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// (VmRSS, VmHWM) in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn server(env: &Env, node: &Node, name: &str) -> Pod {
    let p = env.pod(node, name);
    let mut http = p.command(&sys::testapp_bin(), &["http", name, &p.v4(8080)]);
    http.env("MESH_TESTAPP_QUIET", "1")
        .stdout(std::process::Stdio::null());
    env.track(http.spawn().expect("spawn server"));
    let iperf = sys::which("iperf3").expect("iperf3 (cargo xtask setup installs it)");
    let mut s = p.command(&iperf, &["-s", "-p", "5201"]);
    s.stdout(std::process::Stdio::null());
    env.track(s.spawn().expect("spawn iperf3 server"));
    p
}

pub fn run(env: &Env, quick: bool) -> DataPathResult {
    let (secs, reps) = if quick { (2, 1) } else { (8, 3) };
    let a = env.node("a");
    let b = env.node("b");
    let client = env.pod(&a, "client");
    let local = server(env, &a, "local");
    let remote = server(env, &b, "remote");
    let fabric = env.connect_nodes(&[&a, &b]);
    let registry = [&client, &local, &remote];
    let ca = Ca::start(env, &fabric, "ca", &registry);
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": VIP, "selector": {"app": "remote"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    });
    let vs = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"hosts": ["web"], "http": [
            {"match": [{"headers": {"x-canary": {"exact": "1"}}}],
             "route": [{"destination": {"host": "web"}}]},
            {"route": [{"destination": {"host": "web"}}]}]},
    });
    std::fs::write(config.join("web.yaml"), format!("{svc}\n---\n{vs}\n")).expect("config");
    let opts = |node: &Node| {
        let mut args = ca.agent_args(node);
        args.extend(["--config".into(), config.display().to_string()]);
        AgentOptions {
            args,
            log: Some("warn".into()),
            ..Default::default()
        }
    };
    let agent_a = Agent::start(env, &a, &registry, opts(&a));
    let agent_b = Agent::start(env, &b, &registry, opts(&b));
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle_mb = rss_mb(agent_a.pid()).0;
    let bench = Bench {
        client: &client,
        wrk: sys::which("wrk").expect("wrk (cargo xtask setup installs it)"),
        iperf: sys::which("iperf3").expect("iperf3 (cargo xtask setup installs it)"),
        agents: [agent_a.pid(), agent_b.pid()],
        local: &local,
        remote: &remote,
    };

    // Per path: keep-alive, new connections, stream, p50, p90, p99, CPU.
    let mut samples: Vec<[Vec<f64>; 7]> = PATHS.iter().map(|_| Default::default()).collect();
    for rep in 0..reps {
        // Alternate: each repetition visits every path, so drift in the
        // machine's speed affects all of them alike.
        for (i, p) in PATHS.iter().enumerate() {
            eprintln!("rep {}/{reps}: {}", rep + 1, p.name());
            let (rps, cpu) = bench.wrk(*p, secs, false);
            samples[i][0].push(rps);
            // vCPU per 1,000 req/s, per agent in the path.
            let agents_in_path = match p {
                Path::Direct => 0.0,
                Path::SameNode => 1.0,
                Path::Hbone | Path::L7 => 2.0,
            };
            if agents_in_path > 0.0 {
                samples[i][6].push(cpu / secs as f64 / (rps / 1000.0) / agents_in_path);
            }
            samples[i][1].push(bench.wrk(*p, secs, true).0);
            if let Some(g) = bench.iperf(*p, secs) {
                samples[i][2].push(g);
            }
            let (p50, p90, p99) = bench.latency(*p, secs);
            samples[i][3].push(p50);
            samples[i][4].push(p90);
            samples[i][5].push(p99);
        }
    }
    let row = |k: usize| Row {
        values: samples.iter().map(|s| median(s[k].clone())).collect(),
    };
    let rss_peak_mb = rss_mb(agent_a.pid()).1.max(rss_mb(agent_b.pid()).1);
    DataPathResult {
        quick,
        secs,
        keepalive: row(0),
        new_conns: row(1),
        stream_gbps: row(2),
        p50: row(3),
        p90: row(4),
        p99: row(5),
        cpu_per_krps: row(6),
        rss_idle_mb,
        rss_peak_mb,
    }
}

impl DataPathResult {
    pub fn markdown(&self) -> String {
        let ratio = |r: &Row, unit: &str, target: &str| {
            let direct = r.values[0];
            let mut line = match direct {
                Some(d) => format!("{d:.1} {unit}"),
                None => "n/a".into(),
            };
            for v in &r.values[1..] {
                line.push_str(" | ");
                line.push_str(&match (v, direct) {
                    (Some(v), Some(d)) if d > 0.0 => format!("{:.2}×", v / d),
                    _ => "n/a".into(),
                });
            }
            format!("{line} | {target} |")
        };
        let added = |r: &Row, target: &str| {
            let direct = r.values[0].unwrap_or(f64::NAN);
            let mut line = format!("{direct:.3} ms");
            for v in &r.values[1..] {
                line.push_str(&match v {
                    Some(v) => format!(" | +{:.3} ms", v - direct),
                    None => " | n/a".into(),
                });
            }
            format!("{line} | {target} |")
        };
        let cpu = {
            let mut line = "–".to_string();
            for v in &self.cpu_per_krps.values[1..] {
                line.push_str(&match v {
                    Some(v) => format!(" | {v:.3}"),
                    None => " | n/a".into(),
                });
            }
            format!("{line} | ≤ 0.045 |")
        };
        format!(
            "\n## Data path ({}, {} s per load{}; {})\n\n\
             | load | direct | same-node L4 | cross-node HBONE (mTLS) | cross-node L7 + HBONE | target (two agents, mTLS) |\n\
             |---|---|---|---|---|---|\n\
             | HTTP/1.1 keep-alive, 32 connections | {} \n\
             | new connection per request (32 clients) | {} \n\
             | single TCP stream (iperf3) | {} \n\
             | latency at 2,000 req/s, p50 | {} \n\
             | latency at 2,000 req/s, p90 | {} \n\
             | latency at 2,000 req/s, p99 | {} \n\
             | agent vCPU per 1,000 req/s (keep-alive load, per agent) | {} \n\n\
             Ratios are to direct in the same run. Agent resident memory: {:.1} MB idle (with mTLS certificates), {:.1} MB peak (target ≤ 12 MB idle).\n",
            if self.quick { "quick" } else { "full" },
            self.secs,
            if self.quick { "" } else { ", median of 3" },
            machine(),
            ratio(&self.keepalive, "req/s", "≥ 0.5×"),
            ratio(&self.new_conns, "conn/s", "≥ 0.5×"),
            ratio(&self.stream_gbps, "Gbit/s", "≥ 0.4×"),
            added(&self.p50, "≤ +0.15 ms"),
            added(&self.p90, ""),
            added(&self.p99, ""),
            cpu,
            self.rss_idle_mb,
            self.rss_peak_mb,
        )
    }

    pub fn json(&self) -> Value {
        let row = |r: &Row| {
            PATHS
                .iter()
                .zip(&r.values)
                .map(|(p, v)| (p.name().to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "case": "data-path",
            "machine": machine(),
            "quick": self.quick,
            "seconds_per_load": self.secs,
            "keepalive_rps": row(&self.keepalive),
            "new_connections_per_s": row(&self.new_conns),
            "stream_gbit_s": row(&self.stream_gbps),
            "latency_p50_ms": row(&self.p50),
            "latency_p90_ms": row(&self.p90),
            "latency_p99_ms": row(&self.p99),
            "agent_vcpu_per_krps": row(&self.cpu_per_krps),
            "agent_rss_idle_mb": self.rss_idle_mb,
            "agent_rss_peak_mb": self.rss_peak_mb,
        })
    }
}
