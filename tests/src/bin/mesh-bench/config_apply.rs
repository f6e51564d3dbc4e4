//! `config-apply`: how long a change to the configuration directory takes
//! to reach the data plane. A pod polls a Service's address every
//! millisecond while the Service's selector is flipped between two
//! deployments; each round is the time from the file's rename to the first
//! connection answered by the newly selected deployment. The agent runs
//! with its default settings (file notifications, a 1 s re-read).

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_tests::{Agent, AgentOptions, Env};
use serde_json::json;

use super::machine;

pub struct ApplyResult {
    /// Milliseconds from the rename to the first answer of the new target.
    samples: Vec<f64>,
    /// Answers that were neither deployment (failed requests): must be 0.
    other_answers: Vec<String>,
}

pub fn run(env: &Env, rounds: usize) -> ApplyResult {
    let node = env.node("a");
    let client = env.pod(&node, "client");
    let v1 = env.pod(&node, "web-v1");
    let v2 = env.pod(&node, "web-v2");
    v1.spawn_app(env, &["http", "v1", &v1.v4(8080)]);
    v2.spawn_app(env, &["http", "v2", &v2.v4(8080)]);
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    write_service(&config, "web-v1");
    let _agent = Agent::start(
        env,
        &node,
        &[&client, &v1, &v2],
        AgentOptions {
            args: vec!["--config".into(), config.display().to_string()],
            // The default, not the tests' faster re-read.
            config_poll_interval: Some("1s".into()),
            ..Default::default()
        },
    );
    let stop = env.dir.join("stop-watching");
    let watcher = client.spawn_app(
        env,
        &[
            "watch-get",
            "http://10.96.0.10:80/",
            &stop.display().to_string(),
        ],
    );
    watcher.wait_for(|v| v["body"] == "hello from v1", Duration::from_secs(10));

    let mut samples = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let target = if r % 2 == 0 { "v2" } else { "v1" };
        // Spread the changes so they do not line up with the re-read timer.
        std::thread::sleep(Duration::from_millis(150 + (r as u64 * 37) % 100));
        let t0 = unix_ns();
        write_service(&config, &format!("web-{target}"));
        let want = format!("hello from {target}");
        let seen = watcher.wait_for(
            |v| v["body"] == want.as_str() && v["unix_ns"].as_u64().is_some_and(|t| t > t0),
            Duration::from_secs(10),
        );
        let t = seen["unix_ns"].as_u64().expect("unix_ns");
        samples.push((t - t0) as f64 / 1e6);
        eprint!("\rround {}/{rounds}: {:.1} ms   ", r + 1, samples[r]);
    }
    eprintln!();
    std::fs::write(&stop, b"").expect("stop file");
    let other_answers = watcher
        .lines()
        .into_iter()
        .filter(|v| v["event"] == "answer")
        .filter_map(|v| v["body"].as_str().map(String::from))
        .filter(|b| b != "hello from v1" && b != "hello from v2")
        .collect();
    ApplyResult {
        samples,
        other_answers,
    }
}

/// The Service `web` (10.96.0.10:80 → 8080) selecting `app: selector`,
/// written by rename as a careful operator (or a ConfigMap) does.
fn write_service(dir: &Path, selector: &str) {
    let doc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "selector": {"app": selector},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    });
    let tmp = dir.join(".service.yaml.tmp");
    std::fs::write(&tmp, doc.to_string()).expect("write service");
    std::fs::rename(&tmp, dir.join("service.yaml")).expect("rename service");
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

impl ApplyResult {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i]
    }

    pub fn markdown(&self) -> String {
        let s = self.sorted();
        let max = s[s.len() - 1];
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        format!(
            "\n## Configuration change → data plane ({} rounds, {})\n\n\
             | | p50 | p90 | max | mean |\n|---|---|---|---|---|\n\
             | file renamed → first connection to the new endpoints | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n\n\
             Target ≤ 1000 ms: {} (max {max:.1} ms). Failed requests while the selector flipped: {}.\n",
            s.len(),
            machine(),
            Self::percentile(&s, 0.5),
            Self::percentile(&s, 0.9),
            max,
            mean,
            if max <= 1000.0 { "met" } else { "NOT met" },
            self.other_answers.len(),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let s = self.sorted();
        json!({
            "case": "config-apply",
            "machine": machine(),
            "unit": "ms",
            "samples": self.samples,
            "p50": Self::percentile(&s, 0.5),
            "p90": Self::percentile(&s, 0.9),
            "max": s[s.len() - 1],
            "failed_requests": self.other_answers,
        })
    }
}
