//! `cargo xtask demo exec POD -- CMD`: the command runs as one of the
//! pod's processes, so the mesh captures its connections, and service
//! names resolve to their ClusterIP; with the pod's network alone (`ip
//! netns exec`) the same request is not captured and reaches nothing.

use std::process::Command;

use mesh_tests::{Agent, AgentOptions, Env, demo, sys};

/// `curl -s --max-time 3 URL`.
fn curl_args(url: &str) -> Vec<String> {
    ["curl", "-s", "--max-time", "3", url]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn a_command_run_in_a_demo_pod_is_captured_and_finds_services_by_name() {
    let env = Env::new("demo-exec");
    let a = env.node("a");
    let client = env.pod(&a, "client");
    let server = env.pod(&a, "server");
    server.spawn_app(&env, &["http", "server", &server.v4(8080)]);
    let config = env.dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("svc.yaml"), demo::HTTPBIN_SERVICE).unwrap();
    let agent = Agent::start(
        &env,
        &a,
        &[&client, &server],
        AgentOptions::args(&["--config", config.to_str().unwrap()]),
    );
    demo::State {
        pid: std::process::id(),
        pods: [&client, &server]
            .into_iter()
            .map(demo::PodPlace::of)
            .collect(),
        hosts: demo::service_hosts("10.96.0.80", "httpbin", "default"),
    }
    .write(&env.dir)
    .unwrap();

    let state = demo::State::read(&env.dir).expect("the state just written");
    let out = state
        .command(&env.dir, "client", &curl_args("http://httpbin:8000/"))
        .unwrap()
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.starts_with("hello from server"),
        "{out:?}\n{}",
        agent.log()
    );
    // Through the agent: it routed the request to the service.
    let routed = agent.metrics().value(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service_name", "httpbin"),
        ],
    );
    assert_eq!(routed, 1.0);

    // The pod's network without its cgroup: not captured, and the
    // ClusterIP exists nowhere on the network.
    let curl = sys::which("curl").expect("curl");
    let bypass = Command::new("nsenter")
        .arg(format!("--net={}", client.netns_path().display()))
        .arg(curl)
        .args(&curl_args("http://10.96.0.80:8000/")[1..])
        .output()
        .unwrap();
    assert!(!bypass.status.success(), "{bypass:?}");
    assert_eq!(
        agent.metrics().value(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service_name", "httpbin")
            ]
        ),
        1.0,
        "the bypass went through the agent"
    );

    let e = state
        .command(&env.dir, "nope", &curl_args("http://httpbin:8000/"))
        .unwrap_err();
    assert_eq!(e, "no pod nope in the demo; its pods are client, server");
    std::fs::remove_file(env.dir.join(demo::STATE_FILE)).unwrap();
    let e = demo::State::read(&env.dir).unwrap_err();
    assert!(e.starts_with("no demo is holding"), "{e}");
}
