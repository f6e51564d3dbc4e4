//! The same-node fast path on the real kernel: `sock_ops` files both ends of
//! each application ⇄ agent connection inside a pod, `sk_msg` moves what the
//! application sends straight into the agent's socket; what the agent sends
//! back takes TCP. Proof: a capture on each pod's `lo` sees the application
//! → agent direction carry no payload while the agent → application
//! direction carries every byte, the echo arrives intact, and a writer whose
//! reader stops is held by flow control, as it would be without the mesh.
//!
//! The applications here are blocking clients and servers, but their reads
//! retry an early EAGAIN (counted in the report): Linux returns one from a
//! blocking read on any socket in a sockmap when a wakeup finds nothing to
//! read (`tcp_bpf_recvmsg`), and an application's socket must be in one for
//! `sk_msg` to see what it sends. That is why the fast path is opt-in. Their
//! writes must never see one.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    Agent, AgentOptions, Env, Pod, ca::Capture, pcap::payload_bytes, sys::wait_until,
};
use serde_json::Value;

const GIB: u64 = 1 << 30;

/// Runs the client app with `args` while capturing both pods' `lo`;
/// returns its report and the payload bytes per direction seen on each.
fn run_captured(env: &Env, client: &Pod, server: &Pod, args: &[&str]) -> (Value, Flows, Flows) {
    let cap_client = Capture::headers(env, &client.netns, "lo", "tcp");
    let cap_server = Capture::headers(env, &server.netns, "lo", "tcp");
    let report = client.run_app(args).json();
    // Let the closing segments reach the capture.
    std::thread::sleep(Duration::from_millis(200));
    let on_client = payload_bytes(&cap_client.stop(env));
    let on_server = payload_bytes(&cap_server.stop(env));
    (report, on_client, on_server)
}

/// Streams `bytes` from the client to the echo server through the agent,
/// captured (see `run_captured`).
fn stream_captured(
    env: &Env,
    client: &Pod,
    server: &Pod,
    dst: &str,
    bytes: u64,
) -> (Value, Flows, Flows) {
    run_captured(env, client, server, &["stream", dst, &bytes.to_string()])
}

/// Asserts that the applications' bytes crossed neither pod's `lo` while
/// the agent's (at least `bytes` each way) took TCP there.
fn assert_one_way(on_client: &Flows, on_server: &Flows, bytes: u64) {
    for (app, flows, ends) in [
        ("client", on_client, client_agent(on_client)),
        ("server", on_server, server_agent(on_server)),
    ] {
        let (to_agent, from_agent) = ends;
        assert!(
            to_agent.1 >= 1 && from_agent.1 >= 1,
            "no {app} ⇄ agent connection on the {app} pod's lo: {flows:?}"
        );
        assert_eq!(
            to_agent.0, 0,
            "{app} → agent payload crossed the {app} pod's lo: {flows:?}"
        );
        assert!(
            from_agent.0 >= bytes,
            "the agent's bytes to the {app} did not take TCP: {flows:?}"
        );
    }
}

type Flows = HashMap<(SocketAddr, SocketAddr), u64>;

/// Payload bytes on the flows from an address matching `from` to one
/// matching `to`, and how many such flows the capture saw.
fn payload(
    flows: &Flows,
    from: impl Fn(&SocketAddr) -> bool,
    to: impl Fn(&SocketAddr) -> bool,
) -> (u64, usize) {
    let hits: Vec<u64> = flows
        .iter()
        .filter(|((s, d), _)| from(s) && to(d))
        .map(|(_, b)| *b)
        .collect();
    (hits.iter().sum(), hits.len())
}

const OUTBOUND: u16 = 15001;
const AGENT_SRC: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

/// The client's connection to the agent's outbound listener: (client →
/// agent, agent → client).
fn client_agent(flows: &Flows) -> ((u64, usize), (u64, usize)) {
    let agent = |a: &SocketAddr| a.port() == OUTBOUND;
    let app = |a: &SocketAddr| a.port() != OUTBOUND;
    (payload(flows, app, agent), payload(flows, agent, app))
}

/// The agent's connection (from its loopback source) to the server:
/// (server → agent, agent → server).
fn server_agent(flows: &Flows) -> ((u64, usize), (u64, usize)) {
    let agent = |a: &SocketAddr| a.ip() == AGENT_SRC;
    let app = |a: &SocketAddr| a.ip() != AGENT_SRC;
    (payload(flows, app, agent), payload(flows, agent, app))
}

fn fast_path_events(agent: &Agent, outcome: &str) -> f64 {
    agent.metrics().value(
        "mesh_ebpf_program_events_total",
        &[("program", "sk_msg"), ("outcome", outcome)],
    )
}

/// Asserts that a stream report shows every byte back, in order, through
/// blocking writes that never returned EAGAIN early or failed.
fn assert_clean(r: &Value, bytes: u64) {
    assert_eq!(r["intact"], true, "{r}");
    assert_eq!(r["received"].as_u64(), Some(bytes), "{r}");
    assert_eq!(
        r["write_eagain"], 0,
        "a blocking write returned EAGAIN: {r}"
    );
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
    same_node_serving(test, "echo")
}

/// The same, with the server pod running the test app's `server` mode.
fn same_node_serving(test: &str, server_mode: &str) -> SameNode {
    let env = Env::new(test);
    let node = env.node("node");
    let client = env.pod(&node, "client");
    let server = env.pod(&node, "server");
    let dst = server.v4(9000);
    server.spawn_app(&env, &[server_mode, &dst]);
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

    // Under one window (`mesh_common::fast::FAST_WINDOW`), so every byte the
    // applications send is redirected whatever the agent's pace: application
    // → agent in the client pod, and the echo server → agent in the server
    // pod. The agent's bytes to each application take TCP.
    let small = 768u64 << 10;
    let (r, on_client, on_server) = stream_captured(&env, &client, &server, &dst, small);
    assert_clean(&r, small);
    assert_one_way(&on_client, &on_server, small);
    assert!(
        fast_path_events(&agent, "redirected") > 0.0,
        "sk_msg redirected nothing"
    );

    // 1 GB each way, as fast as the applications go: whatever the agent's
    // pace, every byte arrives, in order, with no error.
    let r = client.run_app(&["stream", &dst, &GIB.to_string()]).json();
    assert_clean(&r, GIB);
    assert!(
        r["pauses"].as_u64() > Some(0),
        "the reader never paused: {r}"
    );
    assert_eq!(fast_path_events(&agent, "errors"), 0.0);

    // Sockets leave the maps with their connections.
    for map in ["mesh_fast_socks", "mesh_fast_apps"] {
        assert!(
            wait_until(Duration::from_secs(5), || agent
                .metrics()
                .value("mesh_ebpf_map_entries", &[("map", map)])
                == 0.0),
            "fast-path sockets left behind in {map} after the connections closed"
        );
    }

    // Switched off, the same capture sees the applications' bytes on both
    // `lo`s: the capture above could have seen them.
    let off = agent
        .try_post("http://127.0.0.1:15000/fast_path?enabled=false")
        .expect("switch the fast path off");
    assert!(off.contains("off"), "{off}");
    let (r, on_client, on_server) = stream_captured(&env, &client, &server, &dst, small);
    assert_clean(&r, small);
    // At least every byte (a retransmitted segment counts twice).
    assert!(client_agent(&on_client).0.0 >= small, "{on_client:?}");
    assert!(server_agent(&on_server).0.0 >= small, "{on_server:?}");
}

/// A conversation of 4 MiB in 64 KiB round trips, four times the fast-path
/// window: the agent reports what it reads, so the applications' credit is
/// renewed and their bytes never leave the fast path (without the reports
/// each would settle on TCP after its first window).
#[test]
fn the_agents_reads_keep_a_long_conversation_on_the_fast_path() {
    let SameNode {
        env,
        client,
        server,
        dst,
        agent: _agent,
    } = same_node("fast-path-credit");
    let (chunk, rounds) = (64u64 << 10, 64u64);
    let (r, on_client, on_server) = run_captured(
        &env,
        &client,
        &server,
        &["pingpong", &dst, &chunk.to_string(), &rounds.to_string()],
    );
    let bytes = chunk * rounds;
    assert_eq!(r["bytes"].as_u64(), Some(bytes), "{r}");
    assert_eq!(r["write_eagain"], 0, "{r}");
    assert_one_way(&on_client, &on_server, bytes);
}

/// A server that never reads: the client's writes must stop once the
/// buffers on the way are full, as without the mesh, instead of queueing
/// without bound in the agent's socket (where the kernel would end them
/// with `ENOMEM` once the machine's TCP memory ran out).
#[test]
fn a_reader_that_stops_holds_the_writer_back() {
    let SameNode {
        env: _env,
        client,
        server: _server,
        dst,
        agent,
    } = same_node_serving("fast-path-stall", "sink");
    let r = client
        .run_app(&["flood", &dst, &GIB.to_string(), "3"])
        .json();
    assert_eq!(r["stalled"], true, "the writes never stopped: {r}");
    // The buffers on the way: both TCP connections' send and receive
    // buffers (a few MiB each at most), the agent's copy buffer, and one
    // fast-path window.
    let written = r["written"].as_u64().expect("written");
    assert!(
        written < 64 << 20,
        "{written} bytes went in before the writer was held: {r}"
    );
    assert!(
        fast_path_events(&agent, "redirected") > 0.0,
        "sk_msg redirected nothing"
    );
    assert_eq!(fast_path_events(&agent, "errors"), 0.0);
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
    assert_clean(&r, 4 * GIB / 10);
    assert!(
        r["secs"].as_f64() > Some(0.3),
        "the stream ended before the switch: {r}"
    );
    let passed = fast_path_events(&agent, "passed");
    assert!(
        passed > 0.0,
        "the switch came after the stream ended; nothing was tested"
    );
}
