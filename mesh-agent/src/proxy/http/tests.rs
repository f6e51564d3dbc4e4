//! The L7 path in process: HTTP/1.1 from a "captured" client connection,
//! routed by VirtualService and DestinationRule to HTTP servers on
//! loopback, with the agent's own answers (local replies) and flags.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testing::{self, Agent, get, http_client, http_server, metric, workload_yaml};

/// The client pod at 127.0.0.`n`; `web` (an HTTP ServiceEntry at
/// 10.96.0.`n`:80) with endpoints v1 at 127.0.0.`n+1` and v2 at
/// 127.0.0.`n+2` (port 9000); subsets v1 and v2; these `http` routes.
fn config(n: u8, routes: &str) -> String {
    format!(
        r#"workloads:
{client}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.example.internal]
  addresses: [10.96.0.{n}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 9000}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
    - {{address: 127.0.0.{v1}, labels: {{version: v1}}}}
    - {{address: 127.0.0.{v2}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: default}}
spec:
  host: web.example.internal
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.example.internal]
  http: {routes}
"#,
        client = workload_yaml("client", &format!("127.0.0.{n}"), "client", "app: client"),
        v1 = n + 1,
        v2 = n + 2,
    )
}

struct Web {
    agent: Agent,
    listener: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    v1: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    v2: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

async fn web(n: u8, routes: &str) -> Web {
    let v1 = http_server("v1", &format!("127.0.0.{}:9000", n + 1)).await;
    let v2 = http_server("v2", &format!("127.0.0.{}:9000", n + 2)).await;
    let agent = Agent::new(testing::snapshot(&config(n, routes)), None);
    let pod = agent.pod("default/client");
    let listener = agent.outbound(&pod).await;
    Web {
        listener,
        dst: format!("10.96.0.{n}:80").parse().unwrap(),
        agent,
        v1,
        v2,
    }
}

impl Web {
    async fn client(
        &self,
    ) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
        http_client(self.agent.dial(self.listener, self.dst).await).await
    }
}

#[tokio::test]
async fn requests_are_routed_by_header_to_subsets_on_one_connection() {
    let w = web(
        60,
        r#"[{match: [{headers: {end-user: {exact: jason}}}], route: [{destination: {host: web.example.internal, subset: v2}}]},
            {route: [{destination: {host: web.example.internal, subset: v1}}]}]"#,
    )
    .await;
    let mut c = w.client().await;
    for _ in 0..3 {
        assert_eq!(get(&mut c, "/", &[]).await.2, "hello from v1");
        assert_eq!(
            get(&mut c, "/", &[("end-user", "jason")]).await.2,
            "hello from v2"
        );
    }
    assert_eq!(w.v1.lock().unwrap().len(), 3);
    assert_eq!(w.v2.lock().unwrap().len(), 3);
    let m = w.agent.metrics();
    let mut served = None;
    for _ in 0..100 {
        served = metric(
            &w.agent.metrics(),
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_service", "web.example.internal"),
                ("response_code", "200"),
                ("request_protocol", "http"),
            ],
        );
        if served == Some(6.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served, Some(6.0), "{m}");
}

#[tokio::test]
async fn the_agent_answers_itself_with_a_status_and_a_flag() {
    let w = web(
        63,
        r#"[{match: [{uri: {exact: /old}}], redirect: {uri: /new}},
            {match: [{uri: {prefix: /teapot}}], directResponse: {status: 418, body: {string: short and stout}}},
            {match: [{uri: {prefix: /nosuch}}], route: [{destination: {host: web.example.internal, subset: v3}}]},
            {match: [{uri: {prefix: /elsewhere}}], route: [{destination: {host: nowhere.example.internal}}]},
            {match: [{uri: {prefix: /abort}}], fault: {abort: {httpStatus: 503, percentage: {value: 100}}}, route: [{destination: {host: web.example.internal}}]},
            {match: [{uri: {prefix: /v1}}], route: [{destination: {host: web.example.internal, subset: v1}}]}]"#,
    )
    .await;
    let mut c = w.client().await;
    let (status, flags, _) = get(&mut c, "/old", &[]).await;
    assert_eq!((status, flags.as_str()), (301, ""));
    let (status, _, body) = get(&mut c, "/teapot", &[]).await;
    assert_eq!((status, body.as_str()), (418, "short and stout"));
    for (path, want_status, want_flag) in [
        ("/unrouted", 404, "NR"),
        ("/nosuch", 503, "NC"),
        ("/elsewhere", 503, "NC"),
        ("/abort", 503, "FI"),
    ] {
        let (status, flags, _) = get(&mut c, path, &[]).await;
        assert_eq!((status, flags.as_str()), (want_status, want_flag), "{path}");
    }
    // None of them reached an upstream; a routed request does.
    assert_eq!(get(&mut c, "/v1", &[]).await.0, 200);
    assert_eq!(*w.v1.lock().unwrap(), ["GET /v1"]);
    assert!(w.v2.lock().unwrap().is_empty());
}

#[tokio::test]
async fn retries_recover_a_flaky_upstream() {
    let w = web(
        66,
        r#"[{retries: {attempts: 2, retryOn: 5xx}, route: [{destination: {host: web.example.internal, subset: v1}}]}]"#,
    )
    .await;
    let mut c = w.client().await;
    for _ in 0..10 {
        let (status, flags, body) = get(&mut c, "/", &[("x-fail-every", "2")]).await;
        assert_eq!(
            (status, flags.as_str(), body.as_str()),
            (200, "", "hello from v1")
        );
    }
    // The server fails its 2nd, 4th… request: the first answer took one
    // attempt, each of the other nine two.
    assert_eq!(w.v1.lock().unwrap().len(), 19);
}

#[tokio::test]
async fn a_malformed_request_is_refused_before_the_upstream() {
    let w = web(
        69,
        r#"[{route: [{destination: {host: web.example.internal, subset: v1}}]}]"#,
    )
    .await;
    let mut s = w.agent.dial(w.listener, w.dst).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A good request after it is the only one the upstream saw.
    let mut c = w.client().await;
    get(&mut c, "/after", &[("x-mark", "barrier")]).await;
    assert_eq!(*w.v1.lock().unwrap(), ["GET /after x-mark=barrier"]);
}

#[tokio::test]
async fn no_endpoint_left_is_503_uh() {
    let w = web(
        72,
        r#"[{route: [{destination: {host: web.example.internal, subset: v1}}]}]"#,
    )
    .await;
    // An outlier-free way to have no endpoint: the subset's only endpoint
    // is of the other address family than the client's.
    let snap = w.agent.ctx.store.load();
    assert!(!snap.registry.services.is_empty());
    drop(snap);
    let mut c = w.client().await;
    assert_eq!(get(&mut c, "/", &[]).await.0, 200, "the path works");
    w.agent.ctx.store.swap(testing::snapshot(
        &config(
            72,
            r#"[{route: [{destination: {host: web.example.internal, subset: v1}}]}]"#,
        )
        .replace("address: 127.0.0.73", "address: ::1"),
    ));
    let mut c = w.client().await;
    let (status, flags, _) = get(&mut c, "/", &[]).await;
    assert_eq!((status, flags.as_str()), (503, "UH"));
}
