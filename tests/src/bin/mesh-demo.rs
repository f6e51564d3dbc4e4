//! `cargo xtask demo`: two simulated nodes with a pod each, a host outside
//! the mesh, a CA, an agent per node configured with Istio YAML and a
//! Kubernetes Service; real HTTP and TCP through the agents over mutual
//! TLS, a rejected configuration edit, and what the agents and the kernel
//! saw. Everything is removed at the end, also on Ctrl-C.
//!
//! `mesh-demo exec POD -- CMD…` runs CMD in a pod of a demo that holds
//! (see `mesh_tests::demo`).

use std::{os::unix::process::CommandExt as _, process::Command, sync::Arc, time::Duration};

use mesh_tests::{
    Agent, AgentOptions, Env,
    ca::{Ca, Capture},
    demo, kernel,
    pod::Pod,
    sys,
};

/// The demo's name: its netns, cgroup and directory carry it.
const NAME: &str = "mesh-demo";

const PIN_DIR: &str = "/sys/fs/bpf/mesh";

/// The demo's configuration directory (after `demo::HTTPBIN_SERVICE`):
/// what an operator would `kubectl apply`, read from files here.
const MESH_YAML: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin]
  http:
    - name: testers-see-v2
      match: [{headers: {end-user: {exact: jason}}}]
      route: [{destination: {host: httpbin, subset: v2}}]
    - name: canary
      route:
        - {destination: {host: httpbin, subset: v1}, weight: 90}
        - {destination: {host: httpbin, subset: v2}, weight: 10}
";

/// Access logs for requests that ask for them (`x-demo: log`), in a
/// format of our own, to a file (the provider comes from the MeshConfig).
const TELEMETRY_YAML: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
    - providers: [{name: demo-log}]
      filter: {expression: \"request.headers['x-demo'] == 'log'\"}
";

/// The agents' MeshConfig: the `demo-log` provider (`LOG_FILE` is replaced).
const MESH_CONFIG: &str = "\
extensionProviders:
  - name: demo-log
    envoyFileAccessLog:
      path: LOG_FILE
      logFormat:
        text: '%START_TIME(%H:%M:%S)% %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %UPSTREAM_CLUSTER% peer=%DOWNSTREAM_PEER_URI_SAN% id=%REQ(X-REQUEST-ID)% %DURATION%ms'
";

/// What the server's agent decides (`JWKS` is replaced by the demo's key).
const POLICY_YAML: &str = "\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: httpbin, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
    - issuer: https://issuer.demo
      jwks: 'JWKS'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  # ports too: on a TCP port a DENY ignores its HTTP fields (as Istio)
  rules: [{to: [{operation: {ports: [\"8080\"], paths: [\"/admin/*\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
      to: [{operation: {notPaths: [\"/api/*\"]}}, {operation: {ports: [\"9000\"]}}]
    - from: [{source: {requestPrincipals: [\"https://issuer.demo/*\"]}}]
      to: [{operation: {paths: [\"/api/*\"]}}]
";

/// A canary split with a typo'd weight.
const BROKEN_YAML: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: canary, namespace: default}
spec:
  hosts: [httpbin]
  http:
    - route:
        - destination: {host: httpbin, subset: v1}
          weight: 90
        - destination: {host: httpbin, subset: v2}
          weight: 01O
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("exec") {
        exec(&args[1..]);
    }
    let hold = args.iter().any(|a| a == "--hold");
    let env = Arc::new(Env::named(NAME, PIN_DIR.into()));
    Env::cleanup_on_signal(&env);
    {
        // Also cleans up if the demo panics part-way.
        let _guard = CleanupOnDrop(env.clone());
        run(&env, hold);
    }
    check_clean(&env);
}

/// `exec POD [--] CMD…` in the demo that holds.
fn exec(args: &[String]) -> ! {
    let fail = |why: String| -> ! {
        eprintln!("mesh-demo exec: {why}");
        std::process::exit(2)
    };
    let Some((pod, rest)) = args.split_first() else {
        fail("usage: cargo xtask demo exec POD -- CMD…".into())
    };
    let cmd = match rest.first().map(String::as_str) {
        Some("--") => &rest[1..],
        _ => rest,
    };
    let dir = std::env::temp_dir().join(NAME);
    let state = demo::State::read(&dir).unwrap_or_else(|e| fail(e));
    let mut c = state.command(&dir, pod, cmd).unwrap_or_else(|e| fail(e));
    fail(format!("cannot run {cmd:?}: {}", c.exec()))
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
    step("Two simulated nodes joined by a fabric, pods on each, a host outside the mesh");
    let node_a = env.node("node-a");
    let node_b = env.node("node-b");
    let mut client = env.pod(&node_a, "client");
    client.service_account = "sleep".into();
    let mut server = env.pod(&node_b, "server");
    server.service_account = "httpbin".into();
    server.labels.push(("version".into(), "v1".into()));
    let mut server_v2 = env.pod(&node_b, "server-v2");
    server_v2.service_account = "httpbin".into();
    server_v2.labels = vec![
        ("app".into(), "server".into()),
        ("version".into(), "v2".into()),
    ];
    let external = env.pod(&node_a, "external");
    let fabric = env.connect_nodes(&[&node_a, &node_b]);
    for p in [&client, &server, &server_v2, &external] {
        println!(
            "  {:9} on {:7} netns {:20} ip {} / {}  sa {}",
            p.name, p.node, p.netns, p.ip4, p.ip6, p.service_account
        );
    }
    println!("  client and server are in the mesh; external stands for anything outside it");
    server.spawn_app(env, &["http", "server", &server.v4(8080)]);
    server_v2.spawn_app(env, &["http", "server-v2", &server_v2.v4(8080)]);
    server.spawn_app(env, &["echo", &server.v4(9000), &server.v6(9000)]);
    external.spawn_app(env, &["http", "external", &external.v4(80)]);
    let registry = [&client, &server, &server_v2];

    step(
        "Configuration the Istio way: a Service, mesh-wide STRICT mTLS, subsets, a canary VirtualService",
    );
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    let mesh_yaml = format!(
        "{}---\n{MESH_YAML}---\n{TELEMETRY_YAML}",
        demo::HTTPBIN_SERVICE
    );
    let access_log = env.dir.join("access.log");
    let mesh_config = env.dir.join("mesh-config.yaml");
    std::fs::write(
        &mesh_config,
        MESH_CONFIG.replace("LOG_FILE", &access_log.display().to_string()),
    )
    .unwrap();
    std::fs::write(config.join("mesh.yaml"), &mesh_yaml).unwrap();
    for l in mesh_yaml.lines().filter(|l| !l.starts_with('#')) {
        println!("  | {l}");
    }
    shell(
        "mesh-agent validate config/",
        Command::new(sys::agent_bin()).arg("validate").arg(&config),
    );

    step("A certificate authority for the mesh (mesh-agent ca init + ca run), on the fabric");
    let ca = Ca::start(env, &fabric, "ca", &registry);
    for l in ca.log().lines().filter(|l| l.contains("ready")) {
        println!("  {}", strip_ansi(l));
    }

    step(
        "mesh-agent on each node, with a node credential from the CA (pins under /sys/fs/bpf/mesh)",
    );
    let opts = |node: &mesh_tests::Node, pins: std::path::PathBuf| {
        let mut args = ca.agent_args(node);
        args.extend(["--config".into(), config.display().to_string()]);
        args.extend(["--mesh-config".into(), mesh_config.display().to_string()]);
        AgentOptions {
            args,
            pin_dir: Some(pins),
            ..Default::default()
        }
    };
    let agent_a = Agent::start(env, &node_a, &registry, opts(&node_a, PIN_DIR.into()));
    let agent_b = Agent::start(env, &node_b, &registry, opts(&node_b, env.pin_dir(&node_b)));
    for (name, a) in [("node-a", &agent_a), ("node-b", &agent_b)] {
        for l in a.log().lines().filter(|l| l.contains("enrolled")) {
            println!(
                "  {name}: {}",
                strip_ansi(l).split("INFO ").nth(1).unwrap_or(l)
            );
        }
    }
    let capture = Capture::start(env, &node_a.netns, "up0", "tcp port 15008");

    step(
        "1. HTTP from client (node-a) to server (node-b): captured, carried over HBONE (mutual TLS)",
    );
    curl(&client, &format!("http://{}/", server.v4(8080)));
    println!(
        "  (the app sees 127.0.0.6: the destination agent's connection inside the server pod)"
    );

    step(
        "1b. The same server by its Service address: 10.96.0.80 exists nowhere on the network, the agent picks an endpoint",
    );
    curl(&client, "http://10.96.0.80:8000/");

    step(
        "1c. A canary split in the node agent, no waypoint: 1,000 requests on one keep-alive connection, then as end-user jason",
    );
    for (who, headers) in [("anyone", vec![]), ("jason", vec!["end-user: jason"])] {
        let mut args = vec!["http-count", "http://10.96.0.80:8000/", "1000"];
        args.extend(headers);
        let j = client.run_app(&args).json();
        println!("$ [in pod client] mesh-testapp {}", args.join(" "));
        println!("  {who:6}: {}", j["answers"]);
    }
    println!("  (weights 90/10 to subsets v1/v2; the header match sends jason to v2 only)");

    step("2. Raw TCP to the server's echo port, IPv4 and IPv6");
    for dst in [server.v4(9000), server.v6(9000)] {
        let j = client
            .run_app(&["connect", &dst, "hello through the mesh"])
            .json();
        println!("$ [in pod client] mesh-testapp connect {dst}");
        println!(
            "  sent {:?}, echoed {:?}; getpeername says {}",
            j["sent"].as_str().unwrap(),
            j["received"].as_str().unwrap(),
            j["peer"]
        );
    }

    step(
        "3. HTTP from client to a destination outside the mesh: no tunnel, straight from the client pod",
    );
    curl(&client, &format!("http://{}/", external.v4(80)));

    step("4. What crossed the wire between the nodes (tcpdump on node-a's uplink, port 15008)");
    let pcap = capture.stop(env);
    let flows = mesh_tests::pcap::tcp_flows(&pcap);
    let bytes: usize = flows.iter().map(|f| f.bytes.len()).sum();
    let all_tls = flows
        .iter()
        .all(|f| mesh_tests::pcap::tls_records(&f.bytes).is_ok());
    let leaked = ["hello through the mesh", "hello from server"]
        .iter()
        .any(|p| pcap.windows(p.len()).any(|w| w == p.as_bytes()));
    let handshakes = pcap
        .windows(6)
        .filter(|w| *w == [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04])
        .count();
    println!(
        "  {} TCP streams, {bytes} bytes; TLS records only: {}; TLS 1.3 handshakes: {handshakes}; any payload in clear: {}",
        flows.len(),
        yes(all_tls),
        yes(leaked)
    );
    println!("  (three requests, one pooled connection: the HBONE streams share it)");

    step(
        "5. A broken edit is rejected with file, line and field; the last good configuration keeps serving",
    );
    let version = |a: &Agent| a.metrics().value("mesh_config_version", &[]);
    let before = version(&agent_a);
    let broken = config.join("canary.yaml");
    std::fs::write(&broken, BROKEN_YAML).unwrap();
    let rejected = || {
        agent_a
            .metrics()
            .value("mesh_config_rejected_total", &[("source", "files")])
            >= 1.0
    };
    sys::wait_until(Duration::from_secs(5), rejected);
    for l in agent_a.log().lines().filter(|l| l.contains("canary.yaml")) {
        println!(
            "  node-a: {}",
            strip_ansi(l).split("ERROR ").nth(1).unwrap_or(l)
        );
    }
    println!(
        "  configuration version still {before}; mesh_config_rejected_total{{source=\"files\"}} = {}",
        agent_a
            .metrics()
            .value("mesh_config_rejected_total", &[("source", "files")])
    );
    curl(&client, "http://10.96.0.80:8000/");
    std::fs::remove_file(&broken).unwrap();

    step(
        "5b. Who may do what, decided by the server's own agent: a DENY rule, and an API that needs a JWT",
    );
    let key = mesh_tests::jwt::Key::rsa("demo", jsonwebtoken::Algorithm::RS256);
    let token = key.sign(&mesh_tests::jwt::claims(
        "https://issuer.demo",
        "alice",
        "httpbin",
    ));
    let policy_yaml = POLICY_YAML.replace("JWKS", &mesh_tests::jwt::jwks(&[&key]));
    for l in policy_yaml.lines().filter(|l| !l.contains("jwks:")) {
        println!("  | {l}");
    }
    let version_b = version(&agent_b);
    std::fs::write(config.join("policy.yaml"), &policy_yaml).unwrap();
    sys::wait_until(Duration::from_secs(5), || version(&agent_b) > version_b);
    curl(&client, "http://10.96.0.80:8000/admin/users");
    curl(&client, "http://10.96.0.80:8000/api/orders");
    // The token is long: shown by what it is.
    let with_token = |what: &str, token: &str| {
        let header = format!("Authorization: Bearer {token}");
        let url = "http://10.96.0.80:8000/api/orders";
        shell(
            &format!("[in pod client] curl -s -H 'Authorization: Bearer <{what}>' {url}"),
            &mut client.command(
                &sys::which("curl").expect("curl"),
                &[
                    "-s",
                    "--max-time",
                    "10",
                    "-w",
                    "(HTTP %{http_code})\\n",
                    "-H",
                    &header,
                    url,
                ],
            ),
        );
    };
    with_token("a token from https://issuer.demo", &token);
    with_token(
        "the same token, one character changed",
        &mesh_tests::jwt::tampered(&token),
    );
    println!("  node-b's decisions (mesh_authz_decisions_total, mesh_jwt_rejections_total):");
    for l in agent_b.metrics().0.lines().filter(|l| {
        (l.starts_with("mesh_authz_decisions_total") || l.starts_with("mesh_jwt_rejections_total"))
            && !l.ends_with(" 0")
    }) {
        println!("    {l}");
    }

    step("6. A long-lived connection, so the maps have something to show");
    let held = client.spawn_app(env, &["hold", &server.v4(9000), "600"]);
    let h = held.wait_for(|v| v["event"] == "holding", Duration::from_secs(5));
    println!(
        "  client {} ⇄ server {} (held open)",
        h["local"].as_str().unwrap_or("?"),
        h["peer"].as_str().unwrap_or("?")
    );

    step(
        "7. Access logs: one request asking for it (x-demo: log), as both agents wrote it (Telemetry + MeshConfig, a format of our own)",
    );
    let j = client
        .run_app(&[
            "http-count",
            "http://10.96.0.80:8000/headers",
            "1",
            "x-demo: log",
        ])
        .json();
    println!(
        "$ [in pod client] curl -H 'x-demo: log' http://10.96.0.80:8000/headers   → {}",
        j["last"]["status"]
    );
    let logged = || {
        std::fs::read_to_string(&access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("/headers"))
            .count()
    };
    if !sys::wait_until(Duration::from_secs(5), || logged() >= 2) {
        println!("  (the access log has {} of the 2 lines)", logged());
    }
    for l in std::fs::read_to_string(&access_log)
        .unwrap_or_default()
        .lines()
    {
        println!("  {l}");
    }
    println!(
        "  (client side: the source agent's route; server side: who the certificate proved; one x-request-id)"
    );

    step("8. Ask the agent on node-b: mesh-agent status, mesh-agent connections");
    for args in [&["status"][..], &["connections"]] {
        shell(
            &format!("[on node-b] mesh-agent {}", args.join(" ")),
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", node_b.netns))
                .arg("--")
                .arg(sys::agent_bin())
                .args(args),
        );
    }

    step("What the agents counted (GET :15020/metrics, Istio's metric names)");
    for (name, a) in [("node-a", &agent_a), ("node-b", &agent_b)] {
        println!("  {name}:");
        print_tcp_table(&a.metrics().0);
    }

    step("Certificates the agents hold (GET :15000/config_dump; never keys)");
    for (name, a) in [("node-a", &agent_a), ("node-b", &agent_b)] {
        let d = a.config_dump();
        for c in d["certificates"]["certificates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!(
                "  {name}: {}  serial {}  valid until {}",
                c["identity"].as_str().unwrap_or("?"),
                c["serial"].as_str().unwrap_or("-"),
                c["notAfter"].as_str().unwrap_or("-")
            );
        }
    }

    step("What the kernel has on node-a: our programs, where they are attached, and the maps");
    println!("$ bpftool prog show id <id>   (for each program listed in /config_dump)");
    for p in agent_a.config_dump()["ebpf"]["programs"]
        .as_array()
        .unwrap()
    {
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
        &format!("bpftool map dump pinned {PIN_DIR}/mesh_conn_dst"),
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(format!("{PIN_DIR}/mesh_conn_dst")),
    );
    print_stats();
    let (orig, conn) = kernel::tracking_entries(&agent_a.pin_dir);
    println!(
        "  mesh_orig_dst holds {orig} entr(y/ies), mesh_conn_dst {conn}: one per open captured connection"
    );

    if hold {
        step("The demo keeps running");
        let hosts = [
            "127.0.0.1 localhost\n".to_owned(),
            demo::service_hosts("10.96.0.80", "httpbin", "default"),
        ]
        .concat();
        demo::State {
            pid: std::process::id(),
            pods: [&client, &server, &server_v2, &external]
                .into_iter()
                .map(demo::PodPlace::of)
                .collect(),
            hosts,
        }
        .write(&env.dir)
        .expect("write the demo's state");
        println!("  your own traffic, from a pod (its cgroup and netns: the mesh captures it):");
        println!("        cargo xtask demo exec client -- curl -s http://httpbin:8000/");
        println!(
            "        cargo xtask demo exec client -- curl -s -H 'end-user: jason' http://httpbin.default.svc.cluster.local:8000/"
        );
        println!(
            "        cargo xtask demo exec external -- curl -s http://{}/   # from outside the mesh: STRICT refuses it",
            server.v4(8080)
        );
        println!("  the agents' logs and inputs:");
        for (name, a) in [("node-a", &agent_a), ("node-b", &agent_b)] {
            println!(
                "        {name}: log {}  registry {}  pins {}",
                a.log_path.display(),
                a.workloads.display(),
                a.pin_dir.display()
            );
        }
        println!("        Istio configuration: {}", config.display());
        println!("  and the kernel:");
        println!("        bpftool prog list | grep -A3 mesh_");
        println!("        bpftool map dump pinned {PIN_DIR}/mesh_orig_dst");
        println!(
            "        nsenter --net=/run/netns/{} curl -s 127.0.0.1:15020/metrics | grep istio_tcp",
            node_a.netns
        );
        println!(
            "        nsenter --net=/run/netns/{} curl -s 127.0.0.1:15000/config_dump",
            node_a.netns
        );
        println!("  press Enter (or Ctrl-C) to clean up");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    env.kill(held.pid);
    step("Clean up: SIGTERM to the agents, then remove the pods, nodes and CA");
    drop(agent_a);
    drop(agent_b);
}

/// `mesh_stats`, one line per program: bpftool shows the key as a number
/// (the index in `mesh_common::stats::PROG_NAMES`) and a value per CPU.
fn print_stats() {
    let path = format!("{PIN_DIR}/mesh_stats");
    println!("$ bpftool map dump pinned {path}   (per-CPU values summed; key = program)");
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned", &path])
        .output()
        .expect("bpftool");
    let dump: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => {
            println!("  (cannot read bpftool's output: {e})");
            return;
        }
    };
    for entry in dump.as_array().into_iter().flatten() {
        let key = entry["key"].as_u64().unwrap_or(u64::MAX);
        let name = mesh_common::stats::PROG_NAMES
            .get(key as usize)
            .copied()
            .unwrap_or("?");
        let sum = |field: &str| -> u64 {
            entry["values"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v["value"][field].as_u64().unwrap_or(0))
                .sum()
        };
        println!(
            "  key {key} = {name:<12} redirected {:>5}  passed {:>5}  errors {:>3}",
            sum("redirected"),
            sum("passed"),
            sum("errors")
        );
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
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
        let key = (
            label("reporter"),
            format!(
                "{} [{}]",
                label("source_workload"),
                label("connection_security_policy")
            ),
            dst,
        );
        rows.entry(key).or_default()[col] += value.parse::<f64>().unwrap_or(0.0);
    }
    println!(
        "    {:<12} {:<44} {:>6} {:>6} {:>10} {:>10}",
        "reporter",
        "source [security] -> destination",
        "opened",
        "closed",
        "bytes req",
        "bytes resp"
    );
    for ((reporter, src, dst), v) in rows {
        println!(
            "    {:<12} {:<44} {:>6} {:>6} {:>10} {:>10}",
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
