//! The mesh CLI against running agents: each subcommand's table, its JSON,
//! and the errors it gives when there is nothing to ask.

use std::process::Command;

use super::*;

/// `mesh-agent args…` in `agent`'s node: stdout, or the failure.
fn cli(agent: &Agent, args: &[&str]) -> Result<String, String> {
    // nsenter, not `ip netns exec`, which mounts a sysfs of its own and
    // hides bpffs.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", agent.node.netns))
        .arg("--")
        .arg(mesh_tests::sys::agent_bin())
        .args(args)
        .output()
        .expect("mesh-agent");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "exit {:?}: {stdout}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ok(agent: &Agent, args: &[&str]) -> String {
    cli(agent, args).unwrap_or_else(|e| panic!("mesh-agent {}: {e}", args.join(" ")))
}

#[test]
fn the_cli_shows_status_workloads_services_policies_certs_connections_and_bpf() {
    let m = Mesh::start("tel-cli", &|_| String::new(), true);
    let web = &m.c.servers[0];
    // A connection that stays open while the CLI looks.
    let held =
        m.c.client
            .spawn_app(&m.c.env, &["hold", &web.v4(9100), "60"]);
    held.wait_for(|v| v["event"] == "holding", Duration::from_secs(10));
    assert_eq!(m.get("/cli", &[]), 200);

    let status = ok(&m.agent_b, &["status"]);
    for want in [
        "Ready:          yes",
        "Mutual TLS:     on",
        "Workloads:      1 enrolled, 0 pending",
        "Last rejected:  none",
        "Certificates:   1, first expiry",
        "eBPF:",
        "Map entries:",
        "programErrors",
    ] {
        assert!(status.contains(want), "no {want:?} in\n{status}");
    }
    let s: Value = serde_json::from_str(&ok(&m.agent_b, &["status", "-o", "json"])).unwrap();
    assert_eq!(s["ready"], true);
    assert!(s["programs"].as_u64().unwrap() > 0, "{s}");
    assert!(s["config"]["version"].as_u64().unwrap() >= 1, "{s}");

    let w = ok(&m.agent_b, &["workloads"]);
    assert!(
        w.lines().any(|l| l.starts_with("default")
            && l.contains(" web ")
            && l.contains(&web.ip4.to_string())
            && l.contains("spiffe://cluster.local/ns/default/sa/web-sa")),
        "{w}"
    );
    let svc = ok(&m.agent_b, &["services"]);
    assert!(
        svc.lines()
            .any(|l| l.contains("web.default.svc.cluster.local")
                && l.contains(VIP)
                && l.contains("80/HTTP")
                && l.contains("2/2")),
        "{svc}"
    );
    let pol = ok(&m.agent_b, &["policies"]);
    assert!(
        pol.lines()
            .any(|l| l.starts_with("default/web") && l.contains("PERMISSIVE") && l.contains(" 1 ")),
        "one AuthorizationPolicy for web:\n{pol}"
    );
    let certs = ok(&m.agent_b, &["certs"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/default/sa/web-sa")
            && certs.contains("Trust bundle:"),
        "{certs}"
    );

    // The held connection, on both agents, with both identities and its
    // bytes (4 each way).
    let conns: Value =
        serde_json::from_str(&ok(&m.agent_a, &["connections", "-o", "json"])).unwrap();
    let out = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["destination"] == web.v4(9100).as_str())
        .unwrap_or_else(|| panic!("the held connection is not listed: {conns}"));
    assert_eq!(out["direction"], "outbound");
    assert_eq!(
        out["sourceIdentity"],
        "spiffe://cluster.local/ns/default/sa/client-sa"
    );
    assert_eq!(
        out["destinationIdentity"],
        "spiffe://cluster.local/ns/default/sa/web-sa"
    );
    assert_eq!(
        (
            out["bytesFromSource"].as_u64(),
            out["bytesToSource"].as_u64()
        ),
        (Some(4), Some(4))
    );
    let table = ok(&m.agent_b, &["connections"]);
    assert!(
        table.lines().any(|l| l.starts_with("inbound")
            && l.contains(&web.v4(9100))
            && l.contains("spiffe://cluster.local/ns/default/sa/client-sa")
            && l.contains("4/4")),
        "{table}"
    );

    // The log level, shown and changed.
    assert_eq!(ok(&m.agent_b, &["log-level"]).trim(), "level: info");
    assert_eq!(
        ok(&m.agent_b, &["log-level", "info,mesh_agent::proxy=debug"]).trim(),
        "level: info,mesh_agent::proxy=debug"
    );
    assert!(cli(&m.agent_b, &["log-level", "not a filter=="]).is_err());
    let dump: Value = serde_json::from_str(&ok(&m.agent_b, &["config-dump"])).unwrap();
    assert!(dump["snapshot"]["version"].as_u64().is_some());
    let yaml = ok(&m.agent_b, &["workloads", "-o", "yaml"]);
    assert!(yaml.contains("name: web"), "{yaml}");

    // The pins: the maps with their entries, the programs behind each
    // pod's links.
    let pins = m.c.env.pin_dir(&m.c.b).display().to_string();
    let maps = ok(&m.agent_b, &["bpf", "maps", "--bpffs-dir", &pins]);
    assert!(
        maps.lines()
            .any(|l| l.starts_with("mesh_pod_ips ") && l.contains("Hash")),
        "{maps}"
    );
    let maps: Value = serde_json::from_str(&ok(
        &m.agent_b,
        &["bpf", "maps", "--bpffs-dir", &pins, "-o", "json"],
    ))
    .unwrap();
    let pod_ips = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["pin"] == "mesh_pod_ips")
        .expect("mesh_pod_ips");
    // web's IPv4 and IPv6 addresses.
    assert_eq!(pod_ips["entries"], 2, "{pod_ips}");
    let progs = ok(&m.agent_b, &["bpf", "progs", "--bpffs-dir", &pins]);
    assert!(
        progs.lines().filter(|l| l.contains("web")).count() >= 3,
        "web's links and programs:\n{progs}"
    );

    // Nothing to ask: a clear error, exit status 69.
    let e = cli(&m.agent_b, &["status", "--admin", "http://127.0.0.1:1"]).unwrap_err();
    assert!(
        e.contains("exit Some(69)") && e.contains("cannot reach the agent"),
        "{e}"
    );
    let e = cli(&m.agent_b, &["bpf", "maps", "--bpffs-dir", "/nonexistent"]).unwrap_err();
    assert!(e.contains("/nonexistent"), "{e}");
}
