//! `cargo xtask demo`: two pods and an outside host on one simulated node,
//! the agent enrolling the pods, real HTTP and TCP through it, and what the
//! agent and the kernel saw. Everything is removed at the end, also on
//! Ctrl-C.

use std::{process::Command, sync::Arc, time::Duration};

use mesh_tests::{Agent, AgentOptions, Env, kernel, pod::Pod, sys};

const PIN_DIR: &str = "/sys/fs/bpf/mesh";

fn main() {
    let hold = std::env::args().any(|a| a == "--hold");
    let env = Arc::new(Env::named("mesh-demo", PIN_DIR.into()));
    let on_signal = env.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .expect("signal handlers");
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\ninterrupted: cleaning up");
            on_signal.cleanup();
            std::process::exit(130);
        }
    });
    {
        // Also cleans up if the demo panics part-way.
        let _guard = CleanupOnDrop(env.clone());
        run(&env, hold);
    }
    check_clean(&env);
}

struct CleanupOnDrop(Arc<Env>);

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        self.0.cleanup();
    }
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn shell(show: &str, cmd: &mut Command) -> String {
    println!("$ {show}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{show}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text.lines() {
        println!("  {l}");
    }
    text
}

/// curl run as one of `pod`'s processes.
fn curl(pod: &Pod, url: &str) -> String {
    let curl = sys::which("curl").expect("curl (cargo xtask setup installs it)");
    shell(
        &format!("[in pod {}] curl -s {url}", pod.name),
        &mut pod.command(
            &curl,
            &[
                "-s",
                "--max-time",
                "10",
                "-w",
                "(HTTP %{http_code}, connected to %{remote_ip}:%{remote_port})\\n",
                url,
            ],
        ),
    )
}

fn run(env: &Env, hold: bool) {
    step("A simulated node with two pods and a host outside the mesh");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let mut server = env.pod(&node, "server");
    server.labels.push(("version".into(), "v1".into()));
    let external = env.pod(&node, "external");
    for p in [&client, &server, &external] {
        println!(
            "  {:9} netns {:22} ip {} / {}  cgroup {}",
            p.name,
            p.netns,
            p.ip4,
            p.ip6,
            p.cgroup.display()
        );
    }
    println!(
        "  only client and server are enrolled; external stands for anything outside the mesh"
    );
    server.spawn_app(env, &["http", "server", &server.v4(8080)]);
    server.spawn_app(env, &["echo", &server.v4(9000), &server.v6(9000)]);
    external.spawn_app(env, &["http", "external", &external.v4(80)]);

    step("Start mesh-agent in the node (pins under /sys/fs/bpf/mesh)");
    let agent = Agent::start(env, &node, &[&client, &server], AgentOptions::default());
    for l in agent
        .log()
        .lines()
        .filter(|l| l.contains("enrolled") || l.contains("ready"))
    {
        println!("  {}", strip_ansi(l));
    }

    step("1. HTTP from client to server: captured on the way out and on the way in");
    curl(&client, &format!("http://{}/", server.v4(8080)));
    println!("  (the app sees 127.0.0.6: the agent's inbound connection, as with Istio's sidecar)");

    step("2. Raw TCP from client to server's echo port, IPv4 and IPv6");
    for dst in [server.v4(9000), server.v6(9000)] {
        let r = client.run_app(&["connect", &dst, "hello through the mesh"]);
        let j = r.json();
        println!("$ [in pod client] mesh-testapp connect {dst}");
        println!(
            "  sent {:?}, echoed {:?}; the socket's peer reads {} (getpeername restored)",
            j["sent"].as_str().unwrap(),
            j["received"].as_str().unwrap(),
            j["peer"]
        );
    }

    step("3. HTTP from client to a destination outside the mesh");
    curl(&client, &format!("http://{}/", external.v4(80)));
    println!(
        "  (the agent carried it out of the client pod's own netns, so external sees the client's address)"
    );

    step("4. A long-lived connection, so the maps have something to show");
    let held = client.spawn_app(env, &["hold", &server.v4(9000), "600"]);
    let h = held.wait_for(|v| v["event"] == "holding", Duration::from_secs(5));
    println!(
        "  client {} ⇄ server {} (held open)",
        h["local"].as_str().unwrap_or("?"),
        h["peer"].as_str().unwrap_or("?")
    );

    step("What the agent counted (GET :15020/metrics, Istio's metric names)");
    print_tcp_table(&agent.metrics().0);
    let m = agent.metrics();
    let mut kernel_counts = Vec::new();
    for line in
        m.0.lines()
            .filter(|l| l.starts_with("mesh_ebpf_program_events_total{") && !l.ends_with(" 0"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?")
                .to_owned()
        };
        kernel_counts.push(format!(
            "{} {} {}",
            label("program"),
            label("outcome"),
            line.rsplit(' ').next().unwrap_or("?")
        ));
    }
    println!(
        "  kernel programs (mesh_ebpf_program_events_total): {}",
        kernel_counts.join(", ")
    );

    step("What the kernel has: our programs, where they are attached, and the maps");
    println!("$ bpftool prog show id <id>   (for each program listed in /config_dump)");
    for p in agent.config_dump()["ebpf"]["programs"].as_array().unwrap() {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &p["id"].to_string()])
            .output()
            .unwrap();
        if let Some(first) = String::from_utf8_lossy(&out.stdout).lines().next() {
            println!("  {first}");
        }
    }
    shell(
        &format!("bpftool cgroup tree {}", env.cgroup.display()),
        Command::new("bpftool")
            .args(["cgroup", "tree"])
            .arg(&env.cgroup),
    );
    shell(
        &format!("ls {PIN_DIR} {PIN_DIR}/links/default_client"),
        Command::new("ls")
            .arg(PIN_DIR)
            .arg(format!("{PIN_DIR}/links/default_client")),
    );
    shell(
        &format!("bpftool map dump pinned {PIN_DIR}/mesh_conn_dst"),
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(format!("{PIN_DIR}/mesh_conn_dst")),
    );
    let (orig, conn) = kernel::tracking_entries(&agent.pin_dir);
    println!(
        "  mesh_orig_dst holds {orig} entr(y/ies), mesh_conn_dst {conn}: one per open captured connection"
    );

    step("What the agent shows at :15000/config_dump (excerpt)");
    let d = agent.config_dump();
    for w in d["workloads"].as_array().unwrap() {
        println!(
            "  {}/{}  ips {}  netnsCookie {}  listeners {}",
            w["namespace"].as_str().unwrap(),
            w["name"].as_str().unwrap(),
            w["ips"],
            w["netnsCookie"],
            w["listeners"].as_array().map_or(0, Vec::len)
        );
    }

    if hold {
        step("The demo keeps running");
        println!("  try:  bpftool prog list | grep -A3 mesh_");
        println!("        bpftool map dump pinned {PIN_DIR}/mesh_orig_dst");
        println!(
            "        nsenter --net=/run/netns/{} curl -s 127.0.0.1:15020/metrics | grep istio_tcp",
            node.netns
        );
        println!("  press Enter (or Ctrl-C) to clean up");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    env.kill(held.pid);
    step("Clean up: SIGTERM to the agent, then remove the pods and the node");
    drop(agent);
}

fn check_clean(env: &Env) {
    let leftovers: Vec<String> = [
        (
            std::path::Path::new(PIN_DIR).exists(),
            format!("pins in {PIN_DIR}"),
        ),
        (
            env.cgroup.exists(),
            format!("cgroup {}", env.cgroup.display()),
        ),
        (
            std::fs::read_dir("/run/netns")
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("mesh-demo"))
                })
                .unwrap_or(false),
            "network namespaces".into(),
        ),
    ]
    .into_iter()
    .filter(|(left, _)| *left)
    .map(|(_, what)| what)
    .collect();
    if leftovers.is_empty() {
        println!(
            "  done: agent stopped, programs detached, pins, cgroups and network namespaces removed"
        );
    } else {
        eprintln!("  left behind: {}", leftovers.join(", "));
        std::process::exit(1);
    }
}

/// The `istio_tcp_*` series as one row per (reporter, source, destination).
fn print_tcp_table(text: &str) {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<(String, String, String), [f64; 4]> = BTreeMap::new();
    let names = [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ];
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(col) = names
            .iter()
            .position(|n| series.starts_with(&format!("{n}{{")))
        else {
            continue;
        };
        let label = |k: &str| {
            series
                .split(&format!(",{k}=\""))
                .nth(1)
                .or_else(|| series.split(&format!("{{{k}=\"")).nth(1))
                .and_then(|r| r.split('"').next())
                .unwrap_or("?")
                .to_owned()
        };
        let dst = match label("destination_workload").as_str() {
            "unknown" => format!("{} (outside)", label("destination_service")),
            w => w.to_owned(),
        };
        let key = (label("reporter"), label("source_workload"), dst);
        rows.entry(key).or_default()[col] += value.parse::<f64>().unwrap_or(0.0);
    }
    println!(
        "  {:<12} {:<28} {:>6} {:>6} {:>10} {:>10}",
        "reporter", "source -> destination", "opened", "closed", "bytes req", "bytes resp"
    );
    for ((reporter, src, dst), v) in rows {
        println!(
            "  {:<12} {:<28} {:>6} {:>6} {:>10} {:>10}",
            reporter,
            format!("{src} -> {dst}"),
            v[0],
            v[1],
            v[2],
            v[3]
        );
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
