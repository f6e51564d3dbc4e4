//! `idle-soak`: what an idle proxied connection costs the agents, and
//! whether their memory comes back when the connections go. A client pod on
//! node a holds N connections (each confirmed end to end) to a sink on node
//! b, over HBONE with mutual TLS; the agents' resident memory is read from
//! /proc before, while held, and after closing (once the pooled HBONE
//! connections have gone idle and closed: `--hbone-idle-timeout 3s`).

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, Env, ca::Ca};
use serde_json::{Value, json};

use super::{data_path::rss_mb, machine};

pub struct SoakResult {
    connections: usize,
    open_secs: f64,
    /// Per agent (source, destination): resident MB before, held, after.
    rss: [(f64, f64, f64); 2],
}

pub fn run(env: &Env, connections: usize) -> SoakResult {
    let a = env.node("a");
    let b = env.node("b");
    let client = env.pod(&a, "client");
    let sink = env.pod(&b, "sink");
    let fabric = env.connect_nodes(&[&a, &b]);
    let registry = [&client, &sink];
    let ca = Ca::start(env, &fabric, "ca", &registry);
    // Pooled HBONE connections (100 streams each) close 3 s after their
    // last stream, so "after" is the agent with nothing open.
    let opts = |node| AgentOptions {
        args: [
            ca.agent_args(node),
            vec!["--hbone-idle-timeout".into(), "3s".into()],
        ]
        .concat(),
        log: Some("warn".into()),
        ..Default::default()
    };
    let agent_a = Agent::start(env, &a, &registry, opts(&a));
    let agent_b = Agent::start(env, &b, &registry, opts(&b));
    // Warm up (allocator arenas, the HBONE connection, certificates), so
    // the baseline is the agent at rest, not the agent before first use.
    let warm_dst = sink.v4(9001);
    let warm_sink = sink.spawn_app(env, &["sink", &warm_dst]);
    let warm = env.dir.join("warm-done");
    let w = client.spawn_app(
        env,
        &["hold-many", &warm_dst, "200", warm.to_str().unwrap()],
    );
    w.wait_for(|v| v["event"] == "open", Duration::from_secs(60));
    std::fs::write(&warm, "").expect("warm-up marker");
    w.wait_for(|v| v["event"] == "closed", Duration::from_secs(30));
    env.kill(warm_sink.pid);
    std::thread::sleep(Duration::from_secs(8));

    let dst = sink.v4(9000);
    let server = sink.spawn_app(env, &["sink", &dst]);
    let pids = [agent_a.pid(), agent_b.pid()];
    let before = pids.map(|p| rss_mb(p).0);

    let done = env.dir.join("soak-done");
    let held = client.spawn_app(
        env,
        &[
            "hold-many",
            &dst,
            &connections.to_string(),
            done.to_str().unwrap(),
        ],
    );
    let open = held.wait_for(|v| v["event"] == "open", Duration::from_secs(300));
    // Let the agents settle (timers, pool sweeps) before reading.
    std::thread::sleep(Duration::from_secs(2));
    let during = pids.map(|p| rss_mb(p).0);
    std::fs::write(&done, "").expect("soak marker");
    held.wait_for(|v| v["event"] == "closed", Duration::from_secs(60));
    // The sink never reads, so it never sees the clients' FINs: its side of
    // each connection (half-closed, as TCP allows) stays open until it goes.
    env.kill(server.pid);
    // Pooled connections close after 3 s idle; the agents give freed heap
    // back every 2 s.
    std::thread::sleep(Duration::from_secs(8));
    let after = pids.map(|p| rss_mb(p).0);
    SoakResult {
        connections,
        open_secs: open["secs"].as_f64().unwrap_or(f64::NAN),
        rss: [0, 1].map(|i| (before[i], during[i], after[i])),
    }
}

impl SoakResult {
    fn per_connection_kb(&self, i: usize) -> f64 {
        let (before, during, _) = self.rss[i];
        (during - before) * 1024.0 / self.connections as f64
    }

    pub fn markdown(&self) -> String {
        let row = |i: usize, name: &str| {
            let (before, during, after) = self.rss[i];
            format!(
                "| {name} | {before:.1} MB | {during:.1} MB | {:.2} KB | {after:.1} MB ({:+.1} MB) |\n",
                self.per_connection_kb(i),
                after - before
            )
        };
        format!(
            "\n## Idle connections ({} held over HBONE, opened in {:.1} s; {})\n\n\
             | agent | resident before | while held | per connection (target ≤ 8 KB) | after closing |\n\
             |---|---|---|---|---|\n{}{}",
            self.connections,
            self.open_secs,
            machine(),
            row(0, "source node (a)"),
            row(1, "destination node (b)"),
        )
    }

    pub fn json(&self) -> Value {
        let agent = |i: usize| {
            let (before, during, after) = self.rss[i];
            json!({"rss_before_mb": before, "rss_held_mb": during, "rss_after_mb": after,
                   "kb_per_connection": self.per_connection_kb(i)})
        };
        json!({
            "case": "idle-soak",
            "machine": machine(),
            "connections": self.connections,
            "open_secs": self.open_secs,
            "source_agent": agent(0),
            "destination_agent": agent(1),
        })
    }
}
