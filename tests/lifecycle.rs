//! Enrolment, removal, shutdown and restart leave the kernel in the state
//! they promise, checked with bpftool and aya, not the agent's word.

use std::time::Duration;

use mesh_tests::{
    Agent, AgentOptions, Env, kernel,
    sys::{self, wait_until},
};

use kernel::CAPTURE_PROGRAMS;

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn removing_a_pod_detaches_it_and_closes_its_listeners() {
    let env = Env::new("remove-pod");
    let node = env.node("node");
    let a = env.pod(&node, "a");
    let b = env.pod(&node, "b");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&a, &b], AgentOptions::default());
    kernel::assert_captured(&a);
    let r = a.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured while enrolled: {r}"
    );

    assert!(
        agent.pin_dir.join("links/default_a").exists(),
        "link pins while enrolled"
    );
    agent.set_pods(&[&b]);
    kernel::assert_released(&a);
    assert!(
        !agent.pin_dir.join("links/default_a").exists(),
        "link pins removed"
    );
    // The listeners in a's netns are closed.
    let refused = a.run_app_outside_cgroup(&["connect", "127.0.0.1:15001"]);
    assert!(
        !refused.ok() && refused.describe().contains("refused"),
        "{}",
        refused.describe()
    );
    // a talks directly now; b is still captured.
    let r = a.run_app(&["connect", &server.v4(9000)]).json();
    assert!(!r["local"].as_str().unwrap().starts_with("127."), "{r}");
    let r = b.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    assert_eq!(sorted(kernel::cgroup_programs(&b.cgroup)), CAPTURE_PROGRAMS);

    // And it can come back.
    agent.set_pods(&[&a, &b]);
    let r = a.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
}

#[test]
fn shutdown_leaves_no_program_attached_and_no_pin_behind() {
    let env = Env::new("shutdown");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let mut agent = Agent::start(&env, &node, &[&client, &server], AgentOptions::default());
    client.run_app(&["connect", &server.v4(9000)]).json();
    let ids: Vec<u64> = agent.config_dump()["ebpf"]["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 8);
    assert!(ids.iter().all(|id| kernel::program_loaded(*id)));
    for pod in [&client, &server] {
        kernel::assert_captured(pod);
    }
    let agent_cgroup = env.cgroup.join("agent-node");
    assert_eq!(
        kernel::cgroup_programs(&agent_cgroup),
        ["mesh_sockops"],
        "the fast path's sock_ops on the agent's own cgroup"
    );

    let status = agent.stop();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", agent.log());
    assert!(agent.log().contains("SIGTERM: shutting down"));
    for pod in [&client, &server] {
        kernel::assert_released(pod);
    }
    // The fast path's sock_ops on the agent's own cgroup went with it.
    assert!(kernel::cgroup_programs(&agent_cgroup).is_empty());
    assert!(
        !agent.pin_dir.exists(),
        "pin directory {} left behind",
        agent.pin_dir.display()
    );
    for id in ids {
        assert!(!kernel::program_loaded(id), "program {id} still loaded");
    }
    // Traffic flows directly again.
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(!r["local"].as_str().unwrap().starts_with("127."), "{r}");
}

#[test]
fn sigint_shuts_down_cleanly_too() {
    let env = Env::new("sigint");
    let node = env.node("node");
    let pod = env.pod(&node, "pod");
    let mut agent = Agent::start(&env, &node, &[&pod], AgentOptions::default());
    kernel::assert_captured(&pod);
    assert!(agent.pin_dir.exists());
    assert!(agent.stop_with("INT").success());
    assert!(
        agent.log().contains("SIGINT: shutting down"),
        "{}",
        agent.log()
    );
    kernel::assert_released(&pod);
    assert!(!agent.pin_dir.exists());
}

#[test]
fn keep_pins_fails_closed_and_the_next_agent_adopts_the_maps() {
    let env = Env::new("keep-pins");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    let outsider = env.pod(&node, "outsider");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let mut first = Agent::start(
        &env,
        &node,
        &[&client, &server],
        AgentOptions::args(&["--keep-pins"]),
    );
    client.run_app(&["connect", &server.v4(9000)]).json();
    let stats_id = kernel::pinned_map_id(&first.pin_dir.join("mesh_stats"));
    assert!(first.stop().success());

    // Still captured with no agent: connects fail at once instead of
    // leaking around the mesh, both ways.
    assert_eq!(
        sorted(kernel::cgroup_programs(&client.cgroup)),
        CAPTURE_PROGRAMS
    );
    let out = client.run_app(&["connect", &server.v4(9000)]);
    assert!(
        !out.ok() && out.describe().contains("refused"),
        "outbound must be refused: {}",
        out.describe()
    );
    let inb = outsider.run_app(&["connect", &server.v4(9000)]);
    assert!(
        !inb.ok(),
        "inbound must not reach the app without the agent: {}",
        inb.describe()
    );

    // The next agent adopts the pinned maps and replaces the links.
    let second = Agent::start(&env, &node, &[&client, &server], AgentOptions::default());
    assert_eq!(
        kernel::pinned_map_id(&second.pin_dir.join("mesh_stats")),
        stats_id,
        "pinned map adopted, not recreated"
    );
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    assert_eq!(
        kernel::cgroup_programs(&client.cgroup).len(),
        6,
        "old links replaced, not doubled"
    );
    outsider.run_app(&["connect", &server.v4(9000)]).json();
    let m = second.metrics();
    // Counters live in the adopted map: the first agent's connection and the
    // one refused while no agent ran count too.
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "connect4"), ("outcome", "redirected")]
        ),
        3.0
    );
}

/// Programs that find another build's settings in `mesh_config` (an agent
/// of another map layout wrote them) refuse captured traffic both ways
/// rather than pass it untouched, count it, and capture again once the
/// settings are theirs.
#[test]
fn settings_of_another_map_layout_fail_closed_both_ways() {
    let env = Env::new("abi-mismatch");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    let outsider = env.pod(&node, "outsider");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&client, &server], AgentOptions::default());
    client.run_app(&["connect", &server.v4(9000)]).json();
    let errors = |program| {
        agent.metrics().value(
            "mesh_ebpf_program_events_total",
            &[("program", program), ("outcome", "errors")],
        )
    };
    let (connect_errors, lookup_errors) = (errors("connect4"), errors("sk_lookup"));

    let ours = kernel::set_config_abi(&agent.pin_dir, 0xdead);
    let out = client.run_app(&["connect", &server.v4(9000)]);
    assert!(
        !out.ok() && out.describe().contains("not permitted"),
        "outbound must be refused: {}",
        out.describe()
    );
    let inb = outsider.run_app(&["connect", &server.v4(9000)]);
    assert!(
        !inb.ok() && inb.describe().contains("refused"),
        "inbound must be refused: {}",
        inb.describe()
    );
    assert_eq!(errors("connect4"), connect_errors + 1.0);
    assert_eq!(errors("sk_lookup"), lookup_errors + 1.0);

    kernel::set_config_abi(&agent.pin_dir, ours);
    let r = client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(
        r["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured again: {r}"
    );
}

/// A killed agent (SIGKILL: no shutdown ran) leaves its pods captured and
/// its pins behind; `mesh-agent uninstall` (a cleanup Job's, once the
/// DaemonSet is gone) detaches everything, as bpftool sees it.
#[test]
fn uninstall_after_a_killed_agent_leaves_nothing_in_the_kernel() {
    let env = Env::new("uninstall");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let mut agent = Agent::start(&env, &node, &[&client, &server], AgentOptions::default());
    client.run_app(&["connect", &server.v4(9000)]).json();
    assert!(!agent.stop_with("KILL").success());
    kernel::assert_captured(&client);
    kernel::assert_captured(&server);
    assert!(agent.pin_dir.join("mesh_stats").exists());

    let run = || {
        std::process::Command::new(sys::agent_bin())
            .arg("uninstall")
            .arg("--bpffs-dir")
            .arg(&agent.pin_dir)
            .output()
            .unwrap()
    };
    let uninstall = || {
        let out = run();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "uninstall failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said
    };
    // Something not an agent's in the directory (a mistaken --bpffs-dir):
    // refused, and nothing removed.
    let other = agent.pin_dir.join("other");
    std::fs::create_dir(&other).unwrap();
    let out = run();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unexpected entry"),
        "{out:?}"
    );
    kernel::assert_captured(&client);
    std::fs::remove_dir(&other).unwrap();
    let said = uninstall();
    // Seven links per pod: six on its cgroup, sk_lookup's on its netns.
    assert!(said.contains("removed 14 link(s) of 2 pod(s)"), "{said}");
    kernel::assert_released(&client);
    kernel::assert_released(&server);
    assert!(!agent.pin_dir.exists(), "pin directory left behind");
    // Again: nothing left, nothing to fail on.
    assert!(uninstall().contains("removed 0 link(s) of 0 pod(s) and 0 map pin(s)"));
}

#[test]
fn tracking_maps_return_to_baseline_after_10000_connections() {
    let env = Env::new("map-churn");
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    server.spawn_app(&env, &["echo", &server.v4(9000)]);
    let agent = Agent::start(&env, &node, &[&client], AgentOptions::default());
    let baseline = kernel::tracking_entries(&agent.pin_dir);
    assert_eq!(baseline, (0, 0));
    // The probe sees an open captured connection in both maps (held for
    // 2 s, then closed).
    let _held = client.spawn_app(&env, &["hold", &server.v4(9000), "2"]);
    assert!(
        wait_until(Duration::from_secs(10), || kernel::tracking_entries(
            &agent.pin_dir
        ) == (1, 1)),
        "a held connection: {:?}",
        kernel::tracking_entries(&agent.pin_dir)
    );
    assert!(
        wait_until(Duration::from_secs(10), || kernel::tracking_entries(
            &agent.pin_dir
        ) == baseline),
        "the held connection's entries stay after it closed"
    );

    let r = client.run_app(&["churn", &server.v4(9000), "10000"]).json();
    assert_eq!(r["ok"], 10000, "{r}");
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "connect4"), ("outcome", "redirected")]
        ),
        10001.0,
        "the held connection and 10,000 more"
    );
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "sock_ops"), ("outcome", "redirected")]
        ),
        10001.0,
        "the held connection and 10,000 more"
    );

    let back = || kernel::tracking_entries(&agent.pin_dir) == baseline;
    assert!(
        wait_until(Duration::from_secs(30), back),
        "maps still hold {:?} entries (baseline {baseline:?})",
        kernel::tracking_entries(&agent.pin_dir)
    );
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "sock_ops"), ("outcome", "passed")]
        ),
        10001.0,
        "one removal per connection"
    );
    assert_eq!(
        m.value("mesh_ebpf_map_entries", &[("map", "mesh_conn_dst")]),
        0.0
    );
}
