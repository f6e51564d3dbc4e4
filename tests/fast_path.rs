//! The same-node fast path on the real kernel: `sock_ops` files both ends of
//! each application ⇄ agent connection inside a pod, `sk_msg` moves the
//! bytes between them. Proof: a capture on each pod's `lo` sees the
//! connections open and close but carry no payload, while 1 GB goes through
//! intact; switched off, the same capture sees the bytes.
//!
//! The test app's `stream` reads again when a blocking read returns EAGAIN
//! with nothing to read: Linux does that on sockets in a sockmap, which is
//! why the fast path is opt-in (`--fast-path true`).

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    Agent, AgentOptions, Env, Pod, ca::Capture, pcap::payload_bytes, sys::wait_until,
};
use serde_json::Value;

const GIB: u64 = 1 << 30;

/// Streams `bytes` from the client to the echo server through the agent
/// while capturing both pods' `lo`; returns the client's report and the
/// payload bytes per direction seen on each `lo`.
fn stream_captured(
    env: &Env,
    client: &Pod,
    server: &Pod,
    dst: &str,
    bytes: u64,
) -> (Value, Flows, Flows) {
    let cap_client = Capture::headers(env, &client.netns, "lo", "tcp");
    let cap_server = Capture::headers(env, &server.netns, "lo", "tcp");
    let report = client.run_app(&["stream", dst, &bytes.to_string()]).json();
    // Let the closing segments reach the capture.
    std::thread::sleep(Duration::from_millis(200));
    let on_client = payload_bytes(&cap_client.stop(env));
    let on_server = payload_bytes(&cap_server.stop(env));
    (report, on_client, on_server)
}

type Flows = HashMap<(SocketAddr, SocketAddr), u64>;

/// Payload bytes on the flows with an end matching `end`, and how many such
/// directions the capture saw at all.
fn payload_where(flows: &Flows, end: impl Fn(&SocketAddr) -> bool) -> (u64, usize) {
    let hits: Vec<u64> = flows
        .iter()
        .filter(|((s, d), _)| end(s) || end(d))
        .map(|(_, b)| *b)
        .collect();
    (hits.iter().sum(), hits.len())
}

/// Flows of the client's connection to the agent's outbound listener.
fn on_port(flows: &Flows, port: u16) -> (u64, usize) {
    payload_where(flows, |a| a.port() == port)
}

/// Flows of the agent's connection (from its loopback source) to the app.
fn from_agent(flows: &Flows) -> (u64, usize) {
    payload_where(flows, |a| a.ip() == std::net::Ipv4Addr::new(127, 0, 0, 6))
}

/// A node with a client pod and an echo server pod, both enrolled by an
/// agent with the fast path on.
struct SameNode {
    env: Env,
    client: Pod,
    server: Pod,
    dst: String,
    agent: Agent,
}

fn same_node(test: &str) -> SameNode {
    let env = Env::new(test);
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    let dst = server.v4(9000);
    server.spawn_app(&env, &["echo", &dst]);
    let agent = Agent::start(
        &env,
        &node,
        &[&client, &server],
        AgentOptions::args(&["--fast-path", "true"]),
    );
    SameNode {
        env,
        client,
        server,
        dst,
        agent,
    }
}

#[test]
fn same_node_bytes_skip_the_loopback_stack_and_arrive_intact() {
    let SameNode {
        env,
        client,
        server,
        dst,
        agent,
    } = same_node("fast-path");

    // 1 GB each way: application → agent in the client pod, agent → echo
    // server in the server pod, and the echo all the way back.
    let (r, on_client, on_server) = stream_captured(&env, &client, &server, &dst, GIB);
    assert_eq!(r["intact"], true, "{r}");
    assert_eq!(r["received"].as_u64(), Some(GIB), "{r}");
    assert!(
        r["pauses"].as_u64() > Some(0),
        "the reader never paused: {r}"
    );

    let (bytes, dirs) = on_port(&on_client, 15001);
    assert!(
        dirs >= 2,
        "no client ⇄ agent connection on the client pod's lo: {on_client:?}"
    );
    assert_eq!(
        bytes, 0,
        "payload crossed the client pod's lo: {on_client:?}"
    );
    let (bytes, dirs) = from_agent(&on_server);
    assert!(
        dirs >= 2,
        "no agent ⇄ server connection on the server pod's lo: {on_server:?}"
    );
    assert_eq!(
        bytes, 0,
        "payload crossed the server pod's lo: {on_server:?}"
    );

    let m = agent.metrics();
    let redirected = m.value(
        "mesh_ebpf_program_events_total",
        &[("program", "sk_msg"), ("outcome", "redirected")],
    );
    assert!(redirected > 0.0, "sk_msg redirected nothing");
    assert_eq!(
        m.value(
            "mesh_ebpf_program_events_total",
            &[("program", "sk_msg"), ("outcome", "errors")]
        ),
        0.0
    );
    // Sockets leave the map with their connections.
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .metrics()
            .value("mesh_ebpf_map_entries", &[("map", "mesh_fast_socks")])
            == 0.0),
        "fast-path sockets left behind after the connections closed"
    );

    // Switched off, the same capture sees every byte on both `lo`s: the
    // capture above could have seen them.
    let off = agent
        .try_post("http://127.0.0.1:15000/fast_path?enabled=false")
        .expect("switch the fast path off");
    assert!(off.contains("off"), "{off}");
    let small = 8u64 << 20;
    let (r, on_client, on_server) = stream_captured(&env, &client, &server, &dst, small);
    assert_eq!(r["intact"], true, "{r}");
    // At least every byte (a retransmitted segment counts twice).
    assert!(on_port(&on_client, 15001).0 >= 2 * small, "{on_client:?}");
    assert!(from_agent(&on_server).0 >= 2 * small, "{on_server:?}");
}

/// Switching the fast path off while a connection is streaming moves its
/// sockets to TCP mid-stream; byte order must survive the switch.
#[test]
fn switching_off_mid_stream_keeps_the_bytes_in_order() {
    // Bound, not `..`: the rest of a destructured temporary would be dropped
    // at once, and with it the environment.
    let SameNode {
        env: _env,
        client,
        server: _server,
        dst,
        agent,
    } = same_node("fast-path-switch");

    let bytes = (4 * GIB / 10).to_string();
    let r = std::thread::scope(|s| {
        let streaming = s.spawn(|| client.run_app(&["stream", &dst, &bytes]));
        std::thread::sleep(Duration::from_millis(300));
        agent
            .try_post("http://127.0.0.1:15000/fast_path?enabled=false")
            .expect("switch the fast path off");
        streaming.join().expect("stream thread")
    });
    let r = r.json();
    assert_eq!(r["intact"], true, "{r}");
    assert!(
        r["secs"].as_f64() > Some(0.3),
        "the stream ended before the switch: {r}"
    );
    let m = agent.metrics();
    let passed = m.value(
        "mesh_ebpf_program_events_total",
        &[("program", "sk_msg"), ("outcome", "passed")],
    );
    assert!(
        passed > 0.0,
        "the switch came after the stream ended; nothing was tested"
    );
}
