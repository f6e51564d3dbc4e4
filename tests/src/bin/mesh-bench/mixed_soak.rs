//! `soak`: the agents of two nodes under mixed load for a while — HTTP/1.1
//! keep-alive requests through a Service (routed by the client's agent,
//! authorized by the server's), new connections back to back, three
//! long-lived streams — while the configuration changes every 10 s and
//! the certificates rotate every `rotation` (their lifetime is twice it:
//! renewed at half-life). Every `sample`, each agent's resident memory,
//! open descriptors and tracking-map entries. It fails when a request, a
//! connection or a stream was lost, or when memory or descriptors grew by
//! 5 % or more from the end of the warm-up (the first fifth) to the end
//! (each the mean of three samples).

use std::time::{Duration, Instant};

use std::path::Path;

use mesh_tests::{
    Agent, AgentOptions, Env,
    ca::Ca,
    cluster::{service, web_get_and_echo_policy, write_yaml},
    kernel,
};
use serde_json::{Value, json};

use super::{data_path::rss_mb, machine};

/// How often the configuration changes.
const CONFIG_EVERY: Duration = Duration::from_secs(10);
/// The most growth allowed after the warm-up.
const MAX_GROWTH: f64 = 0.05;

pub struct Settings {
    pub duration: Duration,
    pub sample: Duration,
    pub rotation: Duration,
}

/// One reading of both agents (client's node first).
struct Sample {
    at: Duration,
    rss_mb: [f64; 2],
    fds: [usize; 2],
    /// `mesh_orig_dst` and `mesh_conn_dst` entries.
    tracked: [(usize, usize); 2],
    config_version: f64,
    certificates: f64,
}

pub struct SoakResult {
    settings: (Duration, Duration, Duration),
    samples: Vec<Sample>,
    warm: usize,
    /// (ok, failed) of the HTTP requests and of the new connections.
    requests: (u64, u64),
    connections: (u64, u64),
    /// Rounds of each long-lived stream; none failed.
    streams: Vec<u64>,
}

fn web_config(dir: &Path, round: u64) {
    write_yaml(
        &dir.join("web.yaml"),
        &[
            service("web", "10.96.0.70", "web", ("http", 80, 8080)),
            web_get_and_echo_policy(),
            // What changes every round: a response header the route sets.
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"hosts": ["web"], "http": [{
                    "headers": {"response": {"set": {"x-soak-round": round.to_string()}}},
                    "route": [{"destination": {"host": "web"}}],
                }]},
            }),
        ],
    );
}

pub fn run(env: &Env, s: &Settings) -> SoakResult {
    let (node_a, node_b) = (env.node("a"), env.node("b"));
    let mut client = env.pod(&node_a, "client");
    client.service_account = "client-sa".into();
    let mut server = env.pod(&node_b, "server");
    server.service_account = "web-sa".into();
    server.labels = vec![("app".into(), "web".into())];
    let fabric = env.connect_nodes(&[&node_a, &node_b]);
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).expect("config directory");
    server.spawn_app(env, &["echo", &server.v4(9000)]);
    server.spawn_app(env, &["http", "web", &server.v4(8080)]);
    web_config(&config, 0);
    let registry = [&client, &server];
    let ca = Ca::start(env, &fabric, "ca", &registry);
    let ttl = format!("{}s", (s.rotation * 2).as_secs());
    let options = |node| {
        let mut args = ca.agent_args(node);
        args.extend(
            [
                "--config",
                config.to_str().unwrap(),
                "--workload-cert-ttl",
                &ttl,
            ]
            .map(String::from),
        );
        AgentOptions {
            args,
            log: Some("warn".into()),
            ..Default::default()
        }
    };
    let a = Agent::start(env, &node_a, &registry, options(&node_a));
    let b = Agent::start(env, &node_b, &registry, options(&node_b));
    let agents = [&a, &b];
    let pins = [env.pin_dir(&node_a), env.pin_dir(&node_b)];

    let stop = env.dir.join("stop-soak");
    let stop_s = stop.to_str().unwrap();
    let target = server.v4(9000);
    let http = client.spawn_app(env, &["http-load", "http://10.96.0.70:80/", stop_s]);
    let conns = client.spawn_app(env, &["load", &target, stop_s]);
    let streams: Vec<_> = (0..3)
        .map(|_| client.spawn_app(env, &["chatter", &target, stop_s]))
        .collect();
    for st in &streams {
        st.wait_for(|v| v["event"] == "echoed", Duration::from_secs(30));
    }

    let read = |at: Duration| Sample {
        at,
        rss_mb: agents.map(|ag| rss_mb(ag.pid()).0),
        fds: agents.map(|ag| {
            std::fs::read_dir(format!("/proc/{}/fd", ag.pid()))
                .map(|d| d.count())
                .unwrap_or(0)
        }),
        tracked: [
            kernel::tracking_entries(&pins[0]),
            kernel::tracking_entries(&pins[1]),
        ],
        config_version: a.metrics().value("mesh_config_version", &[]),
        certificates: a
            .metrics()
            .value("mesh_certificate_requests_total", &[("result", "issued")]),
    };
    let started = Instant::now();
    let mut samples = vec![read(Duration::ZERO)];
    let (mut next_config, mut next_sample) = (CONFIG_EVERY, s.sample);
    let mut round = 0;
    while started.elapsed() < s.duration {
        // Pacing, not synchronisation: the load runs on its own.
        let next = next_config.min(next_sample).min(s.duration);
        std::thread::sleep(next.saturating_sub(started.elapsed()));
        let now = started.elapsed();
        if now >= next_config {
            round += 1;
            web_config(&config, round);
            next_config += CONFIG_EVERY;
        }
        if now >= next_sample {
            let smp = read(now);
            eprintln!(
                "  {:>5.0} s  rss {:.1} / {:.1} MB  fds {} / {}  tracked {:?} / {:?}  config v{} certs {}",
                now.as_secs_f64(),
                smp.rss_mb[0],
                smp.rss_mb[1],
                smp.fds[0],
                smp.fds[1],
                smp.tracked[0],
                smp.tracked[1],
                smp.config_version,
                smp.certificates
            );
            samples.push(smp);
            next_sample += s.sample;
        }
    }
    std::fs::write(&stop, "").expect("stop marker");
    let done = |app: &mesh_tests::pod::App| {
        app.wait_for(
            |v| v["event"] == "done" || v["event"] == "failed",
            Duration::from_secs(60),
        )
    };
    let (h, l) = (done(&http), done(&conns));
    for (what, v) in [("HTTP requests", &h), ("new connections", &l)] {
        if v["failed"].as_u64() != Some(0) {
            eprintln!("  {what}: {v}");
        }
    }
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    let result = SoakResult {
        settings: (s.duration, s.sample, s.rotation),
        warm: samples.len().div_ceil(5).max(1),
        samples,
        requests: (count(&h, "ok"), count(&h, "failed")),
        connections: (count(&l, "ok"), count(&l, "failed")),
        streams: streams
            .iter()
            .map(|st| {
                let d = done(st);
                assert_eq!(d["event"], "done", "a long-lived stream was lost: {d}");
                d["rounds"].as_u64().unwrap_or(0)
            })
            .collect(),
    };
    result.check(round);
    result
}

impl SoakResult {
    /// (from, to, growth) of agent `i`'s memory and descriptors after the
    /// warm-up: the mean of the first (up to) three samples after it
    /// against the mean of the last three, so that a connection in flight
    /// at one sample is not taken for growth.
    fn growth(&self, i: usize) -> ((f64, f64, f64), (f64, f64, f64)) {
        let n = self.samples.len();
        let k = ((n - self.warm) / 2).clamp(1, 3);
        let (head, tail) = (
            &self.samples[self.warm..self.warm + k],
            &self.samples[n - k..],
        );
        let mean = |xs: &[Sample], f: &dyn Fn(&Sample) -> f64| {
            xs.iter().map(f).sum::<f64>() / xs.len() as f64
        };
        let both = |f: &dyn Fn(&Sample) -> f64| {
            let (a, b) = (mean(head, f), mean(tail, f));
            (a, b, (b - a) / a)
        };
        (both(&|s| s.rss_mb[i]), both(&|s| s.fds[i] as f64))
    }

    fn check(&self, rounds: u64) {
        assert!(
            self.samples.len() > self.warm + 1,
            "too few samples ({}) for a warm-up of {}",
            self.samples.len(),
            self.warm
        );
        assert!(
            self.requests.0 > 0 && self.requests.1 == 0,
            "requests: {:?}",
            self.requests
        );
        assert!(
            self.connections.0 > 0 && self.connections.1 == 0,
            "connections: {:?}",
            self.connections
        );
        let last = self.samples.last().expect("samples");
        // The last change may be read the moment it is written.
        assert!(
            last.config_version + 1.0 >= rounds as f64,
            "{rounds} configuration changes, version {}",
            last.config_version
        );
        let rotations = self.settings.0.as_secs() / self.settings.2.as_secs();
        assert!(
            last.certificates - self.samples[0].certificates >= rotations.saturating_sub(1) as f64,
            "certificates did not rotate every {:?}: {} issued",
            self.settings.2,
            last.certificates - self.samples[0].certificates
        );
        for i in 0..2 {
            let ((r0, r1, rg), (f0, f1, fg)) = self.growth(i);
            assert!(
                rg < MAX_GROWTH,
                "agent {i}: memory grew {:.1} % ({r0:.1} → {r1:.1} MB) after the warm-up",
                rg * 100.0
            );
            assert!(
                fg < MAX_GROWTH,
                "agent {i}: descriptors grew {:.1} % ({f0:.1} → {f1:.1}) after the warm-up",
                fg * 100.0
            );
        }
    }

    pub fn markdown(&self) -> String {
        let (d, smp, rot) = self.settings;
        let mut out = format!(
            "\n## Mixed-load soak ({} s, a sample every {} s, certificates every {} s, configuration every {} s; {})\n\n\
             | time | client's agent RSS | fds | tracked (orig, conn) | server's agent RSS | fds | tracked | config version | certificates issued |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            d.as_secs(),
            smp.as_secs(),
            rot.as_secs(),
            CONFIG_EVERY.as_secs(),
            machine()
        );
        for (i, s) in self.samples.iter().enumerate() {
            let mark = if i == self.warm { " (warm)" } else { "" };
            out.push_str(&format!(
                "| {:.0} s{mark} | {:.1} MB | {} | {:?} | {:.1} MB | {} | {:?} | {} | {} |\n",
                s.at.as_secs_f64(),
                s.rss_mb[0],
                s.fds[0],
                s.tracked[0],
                s.rss_mb[1],
                s.fds[1],
                s.tracked[1],
                s.config_version,
                s.certificates
            ));
        }
        for (i, name) in ["client's", "server's"].iter().enumerate() {
            let ((r0, r1, rg), (f0, f1, fg)) = self.growth(i);
            out.push_str(&format!(
                "\n{name} agent after the warm-up (means of up to three samples): memory {r0:.1} → {r1:.1} MB ({:+.1} %), descriptors {f0:.1} → {f1:.1} ({:+.1} %)",
                rg * 100.0,
                fg * 100.0
            ));
        }
        out.push_str(&format!(
            "\n\nLost: 0 of {} HTTP requests, 0 of {} new connections, 0 of {} long-lived streams ({:?} rounds).\n",
            self.requests.0,
            self.connections.0,
            self.streams.len(),
            self.streams
        ));
        out
    }

    pub fn json(&self) -> Value {
        json!({
            "case": "soak",
            "machine": machine(),
            "duration_secs": self.settings.0.as_secs(),
            "rotation_secs": self.settings.2.as_secs(),
            "requests_ok": self.requests.0,
            "connections_ok": self.connections.0,
            "stream_rounds": self.streams,
            "samples": self.samples.iter().map(|s| json!({
                "at_secs": s.at.as_secs_f64(),
                "rss_mb": s.rss_mb,
                "fds": s.fds,
                "tracked": s.tracked,
                "config_version": s.config_version,
                "certificates_issued": s.certificates,
            })).collect::<Vec<_>>(),
            "warm_sample": self.warm,
        })
    }
}
