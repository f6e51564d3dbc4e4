//! What the agent does when something goes wrong around it, each fault
//! made for real in the test's own namespaces: limits reached, the kernel's
//! tracking maps full, the agent gone (fail closed, or open on purpose),
//! the CA away past a renewal and past the expiry.

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, Env, kernel, sys};

/// A pod that holds all the connections it may (`--max-connections-per-pod`,
/// counted both ways: its clients' and its own) gets its next one reset at
/// once, counted; another pod is not affected; once the pod closes some, it
/// connects again.
#[test]
fn a_pod_over_its_connection_limit_is_refused_and_counted() {
    let env = Env::new("conn-limit");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let other = env.pod(&node, "other");
    // The limit counts a pod's connections both ways: the held ones go to
    // `held`, the others to `echo`, which holds none.
    let held = env.pod(&node, "held");
    let echo = env.pod(&node, "echo");
    held.spawn_app(&env, &["echo", &held.v4(9000)]);
    echo.spawn_app(&env, &["echo", &echo.v4(9001)]);
    let agent = Agent::start(
        &env,
        &node,
        &[&client, &other, &held, &echo],
        AgentOptions::args(&["--max-connections-per-pod", "3"]),
    );
    // Three connections, each held for 5 s, then closed.
    let holders: Vec<_> = (0..3)
        .map(|_| client.spawn_app(&env, &["hold", &held.v4(9000), "5"]))
        .collect();
    for h in &holders {
        h.wait_for(|v| v["event"] == "holding", Duration::from_secs(10));
    }
    let reached = || {
        agent.metrics().value(
            "mesh_limit_reached_total",
            &[("limit", "connections_per_pod")],
        )
    };
    assert_eq!(reached(), 0.0);

    let out = client.run_app(&["connect", &echo.v4(9001)]);
    assert!(
        !out.ok() && out.describe().contains("reset"),
        "the fourth connection must be reset: {}",
        out.describe()
    );
    assert_eq!(reached(), 1.0);
    // Another pod has its own share.
    let r = other.run_app(&["connect", &echo.v4(9001)]).json();
    assert_eq!(r["received"], "hello mesh");

    // Once the holders closed, the agent sees the closes and gives their
    // places back.
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(20), || client
            .run_app(&["connect", &echo.v4(9001)])
            .ok()),
        "the pod's places were not given back"
    );
}

/// With `mesh_orig_dst` full (`--max-tracked-connections` held open), a
/// new captured connect is refused at once (EPERM), counted, and nothing
/// leaves in plaintext; once connections close, connects work again. A
/// connect refused by the kernel leaves no record behind (`sock_release`).
#[test]
fn full_tracking_maps_fail_closed_and_recover() {
    let env = Env::new("maps-full");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(
        &env,
        &node,
        &[&client, &server],
        AgentOptions::args(&["--max-tracked-connections", "4"]),
    );
    let holders: Vec<_> = (0..4)
        .map(|_| client.spawn_app(&env, &["hold", &server.v4(9000), "5"]))
        .collect();
    for h in &holders {
        h.wait_for(|v| v["event"] == "holding", Duration::from_secs(10));
    }
    assert_eq!(
        kernel::tracking_entries(&agent.pin_dir).0,
        4,
        "mesh_orig_dst holds the four open connections"
    );
    let errors = || {
        agent.metrics().value(
            "mesh_ebpf_program_events_total",
            &[("program", "connect4"), ("outcome", "errors")],
        )
    };
    let before = errors();
    for _ in 0..3 {
        let out = client.run_app(&["connect", &server.v4(9000)]);
        assert!(
            !out.ok() && out.describe().contains("not permitted"),
            "a connect with the map full must be refused: {}",
            out.describe()
        );
    }
    assert_eq!(errors(), before + 3.0);
    // Refused connects left nothing behind.
    assert_eq!(kernel::tracking_entries(&agent.pin_dir).0, 4);
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(20), || client
            .run_app(&["connect", &server.v4(9000)])
            .ok()),
        "connects did not recover once the held connections closed: {:?} entries",
        kernel::tracking_entries(&agent.pin_dir)
    );
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured: {r}"
    );
}

/// While no agent runs (stopped with its pins kept), a pod annotated
/// `mesh-agent.io/fail-open: "true"` talks and is reached directly, as if
/// outside the mesh; any other pod stays fail-closed, both ways. The next
/// agent captures them all again.
#[test]
fn a_fail_open_pod_goes_direct_without_the_agent_and_the_others_are_refused() {
    let env = Env::new("fail-open");
    let node = env.node("node");
    let open_pod = |name| {
        let mut p = env.pod(&node, name);
        p.annotations = vec![("mesh-agent.io/fail-open".into(), "true".into())];
        p
    };
    let (client, server) = (open_pod("client"), open_pod("server"));
    let (strict, strict_server) = (env.pod(&node, "strict"), env.pod(&node, "strict-server"));
    let outsider = env.pod(&node, "outsider");
    server.spawn_app(&env, &["echo", &server.v4(9000), &server.v6(9000)]);
    strict_server.spawn_app(&env, &["echo", &strict_server.v4(9000)]);
    let pods = [&client, &server, &strict, &strict_server];
    let mut agent = Agent::start(&env, &node, &pods, AgentOptions::args(&["--keep-pins"]));
    // With the agent there, a fail-open pod is captured like any other,
    // both families (the kernel finds the agent's listener).
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured: {r}"
    );
    let r = client.run_app(&["connect", &server.v6(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("[::1]:"),
        "captured: {r}"
    );
    assert!(agent.stop().success());

    // Fail-open: out directly (the pod's own address), in directly.
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert_eq!(
        r["local"].as_str().unwrap().split(':').next().unwrap(),
        client.ip4.to_string(),
        "direct from the pod: {r}"
    );
    assert_eq!(
        outsider.run_app(&["connect", &server.v4(9000)]).json()["received"],
        "hello mesh"
    );
    let r = client.run_app(&["connect", &format!("[{}]:9000", server.ip6)]);
    assert!(r.ok(), "IPv6 too: {}", r.describe());
    // Fail-closed, the default: refused both ways.
    let out = strict.run_app(&["connect", &server.v4(9000)]);
    assert!(
        !out.ok() && out.describe().contains("refused"),
        "outbound must be refused: {}",
        out.describe()
    );
    let out = outsider.run_app(&["connect", &strict_server.v4(9000)]);
    assert!(!out.ok(), "inbound must be refused: {}", out.describe());

    let _next = Agent::start(&env, &node, &pods, AgentOptions::default());
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured again: {r}"
    );
}

/// The CA goes away (killed: its port refuses) for longer than a renewal
/// period. The certificates in hand serve until they expire: every new
/// connection meanwhile works, and the failed renewals are retried with
/// backoff (a few requests, not a loop). Past the expiry the client's
/// connections are refused at once (fail closed), with one clear log line.
/// When the CA is back, a renewal succeeds and traffic resumes.
#[test]
fn the_ca_away_past_a_renewal_and_then_past_expiry() {
    use mesh_tests::ca::Ca;
    let c = mesh_tests::cluster::cluster("ca-away", &[("server", &[("app", "server")])]);
    let server = &c.servers[0];
    server.spawn_app(&c.env, &["echo", &server.v4(9000)]);
    let (ca, agent_a, _agent_b) = c.mesh_with(&["--workload-cert-ttl", "8s"]);
    let connect = || c.client.run_app(&["connect", &server.v4(9000)]);
    assert_eq!(connect().json()["received"], "hello mesh");

    let not_after = || -> std::time::SystemTime {
        let dump = agent_a.config_dump();
        let at = dump["certificates"]["certificates"][0]["notAfter"]
            .as_str()
            .unwrap_or_else(|| panic!("no notAfter in {dump}"))
            .to_owned();
        humantime::parse_rfc3339(&at).unwrap()
    };
    let failed = || {
        agent_a
            .metrics()
            .value("mesh_certificate_requests_total", &[("result", "failed")])
    };
    // Just after a renewal: the most lifetime left.
    let first = not_after();
    assert!(
        sys::wait_until(Duration::from_secs(10), || not_after() > first),
        "no renewal of an 8 s certificate"
    );
    c.env.kill(ca.pid());
    let expiry = not_after();
    let failed_before = failed();

    // Until the expiry (less a margin for this machine), every connection
    // works on the certificate in hand.
    let mut made = 0;
    while std::time::SystemTime::now() + Duration::from_millis(1500) < expiry {
        let out = connect();
        assert!(
            out.ok(),
            "a connection failed while the certificate was valid: {}\n{}",
            out.describe(),
            agent_a.log()
        );
        made += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(made >= 5, "only {made} connections before the expiry");
    let retries = failed() - failed_before;
    assert!(
        (1.0..=8.0).contains(&retries),
        "{retries} renewal attempts while the CA was away: backoff expected"
    );

    // Past the expiry: refused at once, said once.
    while std::time::SystemTime::now() < expiry + Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = std::time::Instant::now();
    let out = connect();
    assert!(!out.ok(), "a connection passed on an expired certificate");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert!(
        sys::wait_until(Duration::from_secs(10), || agent_a
            .log()
            .contains("certificate expired and the CA cannot renew it")),
        "no log line at expiry:\n{}",
        agent_a.log()
    );

    // The CA is back (same keys, same address): renewed, traffic resumes.
    let _ca = Ca::serve(&c.env, &c.fabric, &ca.dir, &c.registry(), &[]);
    assert!(
        sys::wait_until(Duration::from_secs(20), || connect().ok()),
        "traffic did not resume once the CA was back:\n{}",
        agent_a.log()
    );
    assert!(
        agent_a
            .log()
            .contains("certificate renewed after it expired")
    );
}

/// The server node's agent is killed (SIGKILL) while a client streams to a
/// pod there through it. The client's connection is reset within a
/// second or two, not left hanging; the client node's pooled HBONE
/// connection to it goes; outlier detection ejects the dead endpoint at
/// its first failure, and new connections to the Service go to the
/// endpoint on the client's node; and once an agent runs there again, a new HBONE connection is
/// dialled to it.
#[test]
fn a_peer_agent_killed_mid_stream_resets_fast_and_its_endpoint_is_ejected() {
    use mesh_tests::{
        ca::Ca,
        cluster::{cluster, service, write_yaml},
    };
    let c = cluster("peer-killed", &[("web-b", &[("app", "web")])]);
    let web_b = &c.servers[0];
    let mut web_a = c.env.pod(&c.a, "web-a");
    web_a.service_account = "web-sa".into();
    web_a.labels = vec![("app".into(), "web".into())];
    for w in [web_b, &web_a] {
        w.spawn_app(&c.env, &["echo", &w.v4(9000)]);
    }
    write_yaml(
        &c.config.join("web.yaml"),
        &[
            service("web", "10.96.0.90", "web", ("tcp-echo", 80, 9000)),
            serde_json::json!({
                "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"host": "web.default.svc.cluster.local", "trafficPolicy": {
                    "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s",
                                         "baseEjectionTime": "60s", "maxEjectionPercent": 50}}},
            }),
        ],
    );
    let registry = [&c.client, web_b, &web_a];
    let ca = Ca::start(&c.env, &c.fabric, "ca", &registry);
    let agent_a = Agent::start(&c.env, &c.a, &registry, c.agent_options(&ca, &c.a, &[]));
    let mut agent_b = Agent::start(&c.env, &c.b, &registry, c.agent_options(&ca, &c.b, &[]));
    let pooled = || {
        agent_a
            .metrics()
            .value("mesh_hbone_pooled_connections", &[])
    };

    let stream = c
        .client
        .spawn_app(&c.env, &["chatter", &web_b.v4(9000), "60"]);
    stream.wait_for(|v| v["event"] == "echoed", Duration::from_secs(10));
    assert_eq!(pooled(), 1.0);

    assert!(!agent_b.stop_with("KILL").success());
    let killed = std::time::Instant::now();
    let failed = stream.wait_for(|v| v["event"] == "failed", Duration::from_secs(10));
    let reset_after = killed.elapsed();
    println!("  the client's stream was reset {reset_after:?} after the peer agent was killed");
    assert!(
        reset_after < Duration::from_secs(2),
        "the stream hung {reset_after:?}: {failed}"
    );
    assert!(
        sys::wait_until(Duration::from_secs(5), || pooled() == 0.0),
        "the dead peer's pooled connection was kept"
    );

    // The Service: a connection the balancer sends to the dead endpoint is
    // reset at once (one connect attempt per connection, as Envoy's TCP
    // proxy makes), which ejects it (consecutive5xxErrors: 1); every other
    // connection works.
    let failed: Vec<usize> = (0..10)
        .filter(|_| !c.client.run_app(&["connect", "10.96.0.90:80"]).ok())
        .collect();
    assert!(
        failed.len() <= 1,
        "connections {failed:?} to the Service failed"
    );
    let ejected = format!("{}", web_b.ip4);
    assert!(
        agent_a
            .log()
            .lines()
            .any(|l| l.contains("outlier detection: endpoint ejected") && l.contains(&ejected)),
        "the dead endpoint {ejected} was not ejected:\n{}",
        agent_a.log()
    );

    // An agent on b again: a new HBONE connection to it (beside the one
    // the Service's connections to web-a opened).
    let _agent_b = Agent::start(&c.env, &c.b, &registry, c.agent_options(&ca, &c.b, &[]));
    let before = pooled();
    let r = c.client.run_app(&["connect", &web_b.v4(9000)]);
    assert!(r.ok(), "{}", r.describe());
    assert_eq!(pooled(), before + 1.0);
}

/// Waits the agent bounds: a TCP connection to an upstream that accepts
/// and never answers is closed at the DestinationRule's
/// `connectionPool.tcp.idleTimeout`; an HTTP request to one gets 504
/// (`SI`) at `--stream-idle-timeout`; clients that send a request head one
/// byte at a time (slowloris) are cut at `--request-header-timeout`, while
/// other requests go on, and the agent's memory and descriptors come back.
#[test]
fn silent_upstreams_and_slow_clients_are_bounded_by_timeouts() {
    use mesh_tests::cluster::{service, write_yaml};
    let env = Env::new("slow");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    // Bound, never accepted: the kernel completes the handshakes, nothing
    // ever answers.
    server.spawn_app(&env, &["listen", &server.v4(9100)]);
    server.spawn_app(&env, &["listen", &server.v4(9101)]);
    server.spawn_app(&env, &["http", "web", &server.v4(9102)]);
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    write_yaml(
        &config.join("services.yaml"),
        &[
            service(
                "silent-tcp",
                "10.96.0.91",
                "server",
                ("tcp-silent", 80, 9100),
            ),
            service(
                "silent-http",
                "10.96.0.92",
                "server",
                ("http-silent", 80, 9101),
            ),
            service("web", "10.96.0.93", "server", ("http-web", 80, 9102)),
            serde_json::json!({
                "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "silent-tcp", "namespace": "default"},
                "spec": {"host": "silent-tcp.default.svc.cluster.local", "trafficPolicy":
                         {"connectionPool": {"tcp": {"idleTimeout": "1s"}}}},
            }),
        ],
    );
    let agent = Agent::start(
        &env,
        &node,
        &[&client, &server],
        AgentOptions::args(&[
            "--config",
            config.to_str().unwrap(),
            "--stream-idle-timeout",
            "1s",
            "--request-header-timeout",
            "1s",
        ]),
    );

    // TCP: closed after a second of silence (raw gives up on its own at 5).
    let started = std::time::Instant::now();
    let out = client.run_app(&["raw", "10.96.0.91:80", "anyone there?"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "the silent TCP connection lasted {took:?}: {}",
        out.describe()
    );

    // HTTP: 504 with flag SI after a second.
    let r = client
        .run_app(&["http-count", "http://10.96.0.92:80/", "1"])
        .json();
    assert_eq!(r["last"]["status"], 504, "{r}");
    assert_eq!(r["last"]["headers"]["x-mesh-response-flags"], "SI", "{r}");

    // Slowloris: 200 connections, a byte every 250 ms each.
    let pid = agent.pid();
    let rss_kb = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    };
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // The baseline with the web's upstream connections in the agent's pool.
    let web = || {
        client
            .run_app(&["http-count", "http://10.96.0.93:80/", "5"])
            .json()
    };
    assert_eq!(web()["last"]["status"], 200);
    let (rss_before, fds_before) = (rss_kb(), fds());
    let slow = client.spawn_app(&env, &["slowloris", "10.96.0.93:80", "200", "250"]);
    slow.wait_for(|v| v["event"] == "connected", Duration::from_secs(10));
    let mut rss_peak = rss_kb();
    // Other clients are served meanwhile.
    let r = web();
    assert_eq!(r["last"]["status"], 200, "{r}");
    let done = loop {
        rss_peak = rss_peak.max(rss_kb());
        if let Some(d) = slow.lines().into_iter().find(|v| v["event"] == "done") {
            break d;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "  200 slow clients: all closed by {} ms; agent RSS {rss_before} kB before, {rss_peak} kB at most",
        done["last_closed_ms"]
    );
    assert_eq!(done["closed"], 200, "{done}");
    assert!(
        done["last_closed_ms"].as_u64().unwrap() < 4000,
        "slow clients held on: {done}"
    );
    assert!(
        rss_peak < rss_before + 30 * 1024,
        "RSS grew from {rss_before} kB to {rss_peak} kB with 200 slow clients"
    );
    assert!(
        sys::wait_until(Duration::from_secs(5), || fds() <= fds_before),
        "descriptors: {} now, {fds_before} before",
        fds()
    );
}

/// A pod deleted as the kubelet deletes one, before the agent hears of it:
/// its processes gone, its cgroup removed, its network namespace deleted.
/// A connection another pod had open to it ends at once; the agent keeps
/// serving the other pods; when the pod's record goes, the agent releases
/// it without error and nothing of it is left (links, pins, the listeners
/// that kept its namespace alive).
#[test]
fn a_pod_deleted_under_the_agent_is_released_cleanly() {
    let env = Env::new("pod-deleted");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    let victim = env.pod(&node, "victim");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let app = victim.spawn_app(&env, &["echo", &victim.v4(9001)]);
    let agent = Agent::start(
        &env,
        &node,
        &[&client, &server, &victim],
        AgentOptions::default(),
    );
    let pid = agent.pid();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let links = env.pin_dir(&node).join("links/default_victim");
    assert!(links.exists());

    let stream = client.spawn_app(&env, &["chatter", &victim.v4(9001), "60"]);
    stream.wait_for(|v| v["event"] == "echoed", Duration::from_secs(10));
    let fds_enrolled = fds();

    // The kubelet's part: processes, cgroup, namespace.
    env.kill(app.pid);
    std::fs::remove_dir(&victim.cgroup).expect("remove the pod's cgroup");
    let out = std::process::Command::new("ip")
        .args(["netns", "del", &victim.netns])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let failed = stream.wait_for(|v| v["event"] == "failed", Duration::from_secs(5));
    println!("  the open connection to the deleted pod ended: {failed}");
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert_eq!(r["received"], "hello mesh", "other pods are served");

    // Then the pod's record goes.
    agent.set_pods(&[&client, &server]);
    assert!(!links.exists(), "the deleted pod's links are still pinned");
    assert!(
        agent.log().contains("pod=default/victim") && agent.log().contains("removed"),
        "{}",
        agent.log()
    );
    assert!(
        !agent
            .log()
            .lines()
            .any(|l| l.contains("ERROR") || l.contains("panicked")),
        "{}",
        agent.log()
    );
    assert!(
        sys::wait_until(Duration::from_secs(5), || fds() < fds_enrolled),
        "the deleted pod's listeners were kept ({} descriptors, {fds_enrolled} before)",
        fds()
    );
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert_eq!(r["received"], "hello mesh");
}

/// Unmounts `.0` when dropped (lazily: nothing may keep it busy), so a
/// failing test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn mount_bpffs(dir: &std::path::Path) -> Mounted {
    std::fs::create_dir_all(dir).unwrap();
    let s = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(s.success(), "cannot mount a bpffs at {}", dir.display());
    Mounted(dir.into())
}

/// bpffs remounted under a running agent (a bpffs of the test's own,
/// mounted afresh, empty): capture never stops — the agent holds the
/// maps, programs and links — and the agent pins every map and link
/// again, so SIGTERM still finds and removes them all.
#[test]
fn bpffs_remounted_under_the_agent_gets_its_pins_back() {
    let env = Env::new("bpffs-remount");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let mnt = env.dir.join("bpffs");
    let mut mounted = mount_bpffs(&mnt);
    let pin_dir = mnt.join("mesh");
    let mut agent = Agent::start(
        &env,
        &node,
        &[&client],
        AgentOptions {
            pin_dir: Some(pin_dir.clone()),
            ..AgentOptions::default()
        },
    );
    let captured = || {
        let r = client.run_app(&["connect", &server.v4(9000)]).json();
        r["local"].as_str().is_some_and(|l| l.starts_with("127."))
    };
    assert!(captured());
    let link = pin_dir.join("links/default_client/mesh_connect4");
    assert!(link.exists());

    drop(mounted);
    mounted = mount_bpffs(&mnt);
    assert!(captured(), "capture stopped with the pins gone");
    assert!(
        sys::wait_until(Duration::from_secs(10), || link.exists()
            && pin_dir.join("mesh_orig_dst").exists()),
        "the pins were not put back:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("pinned again"), "{}", agent.log());
    let pinned: Vec<_> = std::fs::read_dir(pin_dir.join("links/default_client"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(pinned.len(), 7, "links pinned again: {pinned:?}");
    assert!(captured());

    // The pins are the real ones: SIGTERM unpins them all.
    assert!(agent.stop().success());
    assert!(!pin_dir.exists(), "pins left after SIGTERM");
    drop(mounted);
}
