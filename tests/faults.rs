//! What the agent does when something goes wrong around it, each fault
//! made for real in the test's own namespaces: limits reached.

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, Env};

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
