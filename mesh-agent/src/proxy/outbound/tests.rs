//! The outbound path in process: connections "captured" from a pod (their
//! original destination recorded by the test) carried to a service's
//! endpoints, to addresses outside the registry, and over HBONE with
//! mutual TLS to a meshed pod — real sockets on loopback.

use std::{sync::atomic::Ordering, time::Duration};

use crate::testing::{self, Agent, Identities, echo, metric, round_trip, workload_yaml};

/// The client pod at 127.0.0.`n`, and `more` configuration.
fn config(n: u8, more: &str) -> String {
    format!(
        "workloads:\n{}---\n{more}",
        workload_yaml("client", &format!("127.0.0.{n}"), "client", "app: client")
    )
}

/// A TCP ServiceEntry at `vip`:80 whose endpoints are `eps` (port 9000).
fn service(name: &str, vip: &str, eps: &[&str]) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("{{address: {e}}}")).collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.example.internal]\n  addresses: [{vip}]\n  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: 9000}}]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  endpoints: [{}]\n",
        eps.join(", ")
    )
}

#[tokio::test]
async fn a_service_address_is_carried_to_its_endpoints_in_turn() {
    let (_, a) = echo("127.0.0.41:9000").await;
    let (_, b) = echo("127.0.0.42:9000").await;
    let agent = Agent::new(
        testing::snapshot(&config(
            40,
            &service("web", "10.96.0.10", &["127.0.0.41", "127.0.0.42"]),
        )),
        None,
    );
    let pod = agent.pod("default/client");
    let listener = agent.outbound(&pod).await;
    for i in 0..4 {
        let s = agent.dial(listener, "10.96.0.10:80".parse().unwrap()).await;
        let back = round_trip(s, format!("hello {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(back, format!("hello {i}").as_bytes());
    }
    assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (2, 2));
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_service", "web.example.internal"),
                ("connection_security_policy", "unknown"),
            ]
        ),
        Some(4.0),
        "{m}"
    );
}

#[tokio::test]
async fn refusals_reset_the_client_and_are_counted_by_reason() {
    let agent = Agent::new(
        testing::snapshot(&config(43, &service("empty", "10.96.0.11", &[]))),
        None,
    );
    let pod = agent.pod("default/client");
    let listener = agent.outbound(&pod).await;
    for (dst, reason) in [
        // A service without an endpoint.
        ("10.96.0.11:80", "no_healthy_upstream"),
        // The agent's own listener: a loop.
        ("127.0.0.1:15001", "loop"),
        // Nobody listening at an address outside the registry.
        ("127.0.0.44:9000", "connect_failed"),
    ] {
        let s = agent.dial(listener, dst.parse().unwrap()).await;
        let r = round_trip(s, b"x").await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{dst}: {r:?}"
        );
        let count = || {
            metric(
                &agent.metrics(),
                "mesh_proxy_errors_total",
                &[("direction", "outbound"), ("reason", reason)],
            )
        };
        for _ in 0..100 {
            if count() == Some(1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count(), Some(1.0), "{reason}");
    }
}

#[tokio::test]
async fn tcp_max_connections_holds_one_place_per_open_connection() {
    echo("127.0.0.46:9000").await;
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: one, namespace: default}\nspec:\n  host: one.example.internal\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}\n";
    let agent = Agent::new(
        testing::snapshot(&config(
            45,
            &format!("{}---\n{dr}", service("one", "10.96.0.12", &["127.0.0.46"])),
        )),
        None,
    );
    let pod = agent.pod("default/client");
    let listener = agent.outbound(&pod).await;
    let dst = "10.96.0.12:80".parse().unwrap();
    let mut held = agent.dial(listener, dst).await;
    tokio::io::AsyncWriteExt::write_all(&mut held, b"hold")
        .await
        .unwrap();
    let mut b = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut held, &mut b)
        .await
        .unwrap();
    let second = round_trip(agent.dial(listener, dst).await, b"x").await;
    assert!(second.is_err(), "a second connection got through");
    drop(held);
    // The place comes back with the connection.
    let mut ok = false;
    for _ in 0..100 {
        if round_trip(agent.dial(listener, dst).await, b"y")
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "the place was not given back");
}

#[tokio::test]
async fn an_address_outside_the_registry_is_passed_through_and_labelled_so() {
    echo("127.0.0.48:9000").await;
    let agent = Agent::new(testing::snapshot(&config(47, "")), None);
    let pod = agent.pod("default/client");
    let listener = agent.outbound(&pod).await;
    let s = agent
        .dial(listener, "127.0.0.48:9000".parse().unwrap())
        .await;
    assert_eq!(round_trip(s, b"out").await.unwrap(), b"out");
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "unknown"),
                ("destination_service_name", "PassthroughCluster"),
                ("destination_workload", "unknown"),
            ]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_meshed_pod_is_reached_over_hbone_with_mutual_tls() {
    let reg = format!(
        "workloads:\n{}{}",
        workload_yaml("client", "127.0.0.50", "client", "app: client"),
        workload_yaml("server", "127.0.0.51", "server", "app: server")
    );
    let ids = Identities::start(&reg).await;
    let agent = Agent::new(testing::snapshot(&reg), Some(ids.manager.clone()));
    let client = agent.pod("default/client");
    let server = agent.pod("default/server");
    agent.hbone(&server).await;
    echo("127.0.0.51:9000").await;
    let listener = agent.outbound(&client).await;
    for _ in 0..3 {
        let s = agent
            .dial(listener, "127.0.0.51:9000".parse().unwrap())
            .await;
        assert_eq!(round_trip(s, b"secret").await.unwrap(), b"secret");
    }
    let m = agent.metrics();
    let opened = |reporter: &str| {
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", reporter),
                ("source_workload", "client"),
                ("destination_workload", "server"),
                ("connection_security_policy", "mutual_tls"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/default/sa/client",
                ),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/server",
                ),
            ],
        )
    };
    assert_eq!(opened("source"), Some(3.0), "{m}");
    assert_eq!(opened("destination"), Some(3.0), "{m}");
    assert_eq!(
        metric(&m, "mesh_hbone_pooled_connections", &[]),
        Some(1.0),
        "three streams, one pooled connection"
    );
}

#[tokio::test]
async fn source_ip_hashing_uses_each_pods_own_address() {
    // Every pod reaches its agent from 127.0.0.1: hashing on that would
    // send all of them to one endpoint.
    let (_, a) = echo("127.0.0.81:9000").await;
    let (_, b) = echo("127.0.0.82:9000").await;
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: sticky, namespace: default}\nspec:\n  host: sticky.example.internal\n  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}\n";
    let clients: String = (0..8)
        .map(|i| {
            workload_yaml(
                &format!("client-{i}"),
                &format!("127.0.0.{}", 90 + i),
                "client",
                "app: client",
            )
        })
        .collect();
    let agent = Agent::new(
        testing::snapshot(&format!(
            "workloads:\n{clients}---\n{}---\n{dr}",
            service("sticky", "10.96.0.13", &["127.0.0.81", "127.0.0.82"])
        )),
        None,
    );
    let dst = "10.96.0.13:80".parse().unwrap();
    for i in 0..8 {
        let pod = agent.pod(&format!("default/client-{i}"));
        let listener = agent.outbound(&pod).await;
        let before = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
        // The same pod always lands on the same endpoint.
        for _ in 0..3 {
            round_trip(agent.dial(listener, dst).await, b"x")
                .await
                .unwrap();
        }
        let after = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
        assert!(
            after == (before.0 + 3, before.1) || after == (before.0, before.1 + 3),
            "client-{i} was spread: {before:?} → {after:?}"
        );
    }
    // And the eight pods do not all land on one.
    let (a, b) = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
    assert!(
        a > 0 && b > 0,
        "all eight pods on one endpoint: {a} and {b}"
    );
}
