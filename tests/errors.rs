//! Every startup failure the agent can meet ends with one clear line, a
//! non-zero exit code, and nothing left attached or pinned.

use std::{os::unix::fs::PermissionsExt, process::Command};

use mesh_tests::{Agent, AgentOptions, Env, Pod, kernel, sys};

/// Runs the agent expecting failure; returns (exit code, the one line it printed).
fn fails(env: &Env, node: &mesh_tests::Node, pods: &[&Pod], opts: AgentOptions) -> (i32, String) {
    let mut opts = opts;
    opts.log = Some("error".into());
    let (status, stderr) = Agent::run_expecting_exit(env, node, pods, opts);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line of output, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("mesh-agent: "), "{stderr}");
    (status.code().expect("exit code"), lines[0].to_owned())
}

/// An agent that enrols `pods` attaches to each of them — so the probes
/// of `nothing_left` are shown to see attachments on these very pods —
/// and leaves nothing when it stops.
fn probes_see_the_pods_captured(env: &Env, node: &mesh_tests::Node, pods: &[&Pod]) {
    let mut agent = Agent::start(env, node, pods, AgentOptions::default());
    assert!(env.pin_dir(node).join("mesh_stats").exists());
    for p in pods {
        kernel::assert_captured(p);
    }
    assert!(agent.stop().success());
    nothing_left(env, node, pods);
}

/// Nothing of the agent is left on these pods or on bpffs.
fn nothing_left(env: &Env, node: &mesh_tests::Node, pods: &[&Pod]) {
    for p in pods {
        kernel::assert_released(p);
    }
    let pins = env.pin_dir(node);
    assert!(!pins.exists(), "pins left in {}", pins.display());
}

/// Runs the agent expecting failure on a pod enrolled after `good`
/// (listed first, and first by name): the one line it ends with, its exit
/// code, and proof from its log that `good` was enrolled before the failure.
fn fails_after_enrolling(
    env: &Env,
    node: &mesh_tests::Node,
    good: &Pod,
    bad: &Pod,
) -> (i32, String) {
    let opts = AgentOptions {
        log: Some("info".into()),
        ..Default::default()
    };
    let (status, stderr) = Agent::run_expecting_exit(env, node, &[good, bad], opts);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("mesh-agent: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    let enrolled_good = stderr
        .lines()
        .position(|l| l.contains("enrolled") && l.contains(&format!("pod=default/{}", good.name)));
    let failed = stderr.lines().position(|l| l.starts_with("mesh-agent: "));
    assert!(
        enrolled_good.is_some() && enrolled_good < failed,
        "{} must be enrolled before {} fails, or the rollback is not tested:\n{stderr}",
        good.name,
        bad.name
    );
    (status.code().expect("exit code"), errors[0].to_owned())
}

#[test]
fn not_root() {
    let env = Env::new("not-root");
    let node = env.node("node");
    // A copy nobody may execute (the build directory may be private).
    let bin = env.dir.join("mesh-agent");
    std::fs::copy(sys::agent_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", node.netns))
        .args([
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(&bin)
        .args([
            "run",
            "--workloads",
            "/nonexistent",
            "--insecure-no-mtls",
            "--log-level",
            "warn",
        ]);
    let (status, stderr) = Agent::run_to_exit(cmd);
    assert_eq!(status.code(), Some(77), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "mesh-agent: error: mesh-agent must run as root (it loads eBPF programs, attaches them to pod cgroups and enters pod network namespaces)"
    );
}

#[test]
fn bpffs_missing() {
    let env = Env::new("no-bpffs");
    let node = env.node("node");
    let pod = env.pod(&node, "pod");
    probes_see_the_pods_captured(&env, &node, &[&pod]);
    let not_bpffs = env.dir.join("plain-dir/mesh");
    let (code, line) = fails(
        &env,
        &node,
        &[&pod],
        AgentOptions {
            pin_dir: Some(not_bpffs),
            ..Default::default()
        },
    );
    assert_eq!(code, 69);
    assert!(
        line.contains("is not on a bpffs mount") && line.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{line}"
    );
    nothing_left(&env, &node, &[&pod]);
}

#[test]
fn workload_netns_missing_rolls_back_the_pods_already_enrolled() {
    let env = Env::new("no-netns");
    let node = env.node("node");
    let good = env.pod(&node, "a-good");
    let mut bad = env.pod(&node, "z-bad");
    probes_see_the_pods_captured(&env, &node, &[&good, &bad]);
    bad.netns = "mesh-test-does-not-exist".into();
    let (code, line) = fails_after_enrolling(&env, &node, &good, &bad);
    assert_eq!(code, 69);
    assert_eq!(
        line,
        "mesh-agent: error: workload default/z-bad: network namespace /run/netns/mesh-test-does-not-exist does not exist"
    );
    nothing_left(&env, &node, &[&good]);
}

#[test]
fn workload_cgroup_missing_rolls_back_the_pods_already_enrolled() {
    let env = Env::new("no-cgroup");
    let node = env.node("node");
    let good = env.pod(&node, "a-good");
    let mut bad = env.pod(&node, "z-bad");
    probes_see_the_pods_captured(&env, &node, &[&good, &bad]);
    bad.cgroup = env.cgroup.join("never-created");
    let (code, line) = fails_after_enrolling(&env, &node, &good, &bad);
    assert_eq!(code, 69);
    assert!(
        line.contains("workload default/z-bad: cgroup")
            && line.contains("never-created does not exist"),
        "{line}"
    );
    nothing_left(&env, &node, &[&good]);
}

#[test]
fn cgroup_v1_directory_is_refused() {
    let env = Env::new("cgroup-v1");
    let node = env.node("node");
    let mut pod = env.pod(&node, "pod");
    pod.cgroup = env.dir.clone(); // exists, but not cgroup v2
    let (code, line) = fails(&env, &node, &[&pod], AgentOptions::default());
    assert_eq!(code, 69);
    assert!(line.contains("is not a cgroup v2 directory"), "{line}");
    assert!(!env.pin_dir(&node).exists());
}

#[test]
fn port_in_use_inside_the_pod() {
    let env = Env::new("port-in-use");
    let node = env.node("node");
    let pod = env.pod(&node, "pod");
    probes_see_the_pods_captured(&env, &node, &[&pod]);
    pod.spawn_app(&env, &["listen", &pod.v4(15006)]);
    let (code, line) = fails(&env, &node, &[&pod], AgentOptions::default());
    assert_eq!(code, 69);
    assert_eq!(
        line,
        format!(
            "mesh-agent: error: workload default/pod: port 15006 is already in use on {} in default/pod's network namespace",
            pod.ip4
        )
    );
    nothing_left(&env, &node, &[&pod]);
}

#[test]
fn admin_port_in_use_on_the_node() {
    let env = Env::new("admin-in-use");
    let node = env.node("node");
    let pod = env.pod(&node, "pod");
    probes_see_the_pods_captured(&env, &node, &[&pod]);
    let _first = Agent::start(&env, &node, &[], AgentOptions::default());
    // Same node, same default ports; its own pin directory and hand-over
    // socket (not a successor of the first).
    let other = env.dir.join("unused");
    let handover = env.dir.join("other-handover.sock");
    let (code, line) = fails(
        &env,
        &node,
        &[&pod],
        AgentOptions {
            pin_dir: Some(other),
            args: vec!["--handover-socket".into(), handover.display().to_string()],
            ..Default::default()
        },
    );
    assert_eq!(code, 69);
    assert!(
        line.contains("cannot listen on 127.0.0.1:15000 for the admin endpoint")
            && line.contains("is another mesh-agent running?"),
        "{line}"
    );
    kernel::assert_released(&pod);
}

#[test]
fn invalid_workload_file_names_file_line_and_field() {
    let env = Env::new("bad-workloads");
    let node = env.node("node");
    let file = env.dir.join("bad.yaml");
    std::fs::write(
        &file,
        "workloads:\n  - name: web\n    namespace: default\n    ip: [10.0.0.1]\n",
    )
    .unwrap();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", node.netns))
        .arg("--")
        .arg(sys::agent_bin())
        .args([
            "run",
            "--insecure-no-mtls",
            "--log-level",
            "error",
            "--bpffs-dir",
        ])
        .arg(env.pin_dir(&node))
        .arg("--workloads")
        .arg(&file);
    let (status, stderr) = Agent::run_to_exit(cmd);
    assert_eq!(status.code(), Some(64), "{stderr}");
    let want = format!(
        "{}:4: error: workload registry: workloads[0].ip: unknown field `ip`",
        file.display()
    );
    assert!(
        stderr.starts_with("mesh-agent: error: files configuration rejected (1 error)")
            && stderr.contains(&want),
        "{stderr}"
    );
    assert!(!env.pin_dir(&node).exists());
}
