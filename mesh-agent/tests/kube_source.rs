//! The Kubernetes source against a fake API server: the real kube-rs
//! client and transport over real HTTP on loopback, through the initial
//! list, watch events, `410 Gone` and a relist, a dropped watch and a
//! reconnect, objects that fail validation, CRDs that are not installed,
//! and pods of other nodes.

use std::{sync::Arc, time::Duration};

use mesh_agent::{
    documents::Document,
    istio::Spec,
    snapshot::{self, SourceDocs},
    sources::kube::{KubeSource, Settings},
    telemetry::metrics::Metrics,
};
use mesh_tests::fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const VS: &str = "/apis/networking.istio.io/v1/virtualservices";
const PA: &str = "/apis/security.istio.io/v1/peerauthentications";
const SE: &str = "/apis/networking.istio.io/v1/serviceentries";

fn server() -> FakeApiServer {
    let s = FakeApiServer::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    // Only three Istio kinds are "installed"; the others answer 404.
    for c in [PODS, NAMESPACES, SERVICES, SLICES, VS, PA, SE] {
        s.register(c);
    }
    s
}

fn client(s: &FakeApiServer) -> kube::Client {
    let url = format!("http://{}", s.addr).parse().unwrap();
    kube::Client::try_from(kube::Config::new(url)).unwrap()
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "web:1"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    })
}

fn service(vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": vip, "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

fn virtual_service(v1: i32, v2: i32) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": v2}]}]},
    })
}

fn seed(s: &FakeApiServer) {
    s.apply(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"mesh-agent.io/dataplane-mode": "ambient"}}}),
    );
    s.apply(PODS, pod("web-a", "node-a", "10.1.0.5"));
    s.apply(PODS, pod("web-b", "node-b", "10.1.0.6"));
    s.apply(SERVICES, service("10.96.0.10"));
    s.apply(
        PA,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "shop"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    s.apply(VS, virtual_service(100, 0));
    s.apply(
        SE,
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
               "metadata": {"name": "api", "namespace": "shop"},
               "spec": {"hosts": ["api.example.com"], "resolution": "DNS",
                        "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}]}}),
    );
}

fn ids(d: &SourceDocs) -> Vec<String> {
    let mut v: Vec<String> = d
        .documents
        .iter()
        .map(|d| match d {
            Document::Istio(r) => r.id(),
            Document::Kube(k, _) => k.id(),
            Document::Workloads(..) => "registry".into(),
        })
        .collect();
    v.sort();
    v
}

fn weights(d: &SourceDocs) -> Vec<Option<i32>> {
    d.documents
        .iter()
        .find_map(|d| match d {
            Document::Istio(r) => match &r.spec {
                Spec::VirtualService(vs) => {
                    Some(vs.http[0].route.iter().map(|r| r.weight).collect())
                }
                _ => None,
            },
            _ => None,
        })
        .unwrap_or_default()
}

fn cluster_ip(d: &SourceDocs) -> Option<String> {
    d.documents.iter().find_map(|d| match d {
        Document::Kube(mesh_agent::documents::KubeObject::Service(s), _) => {
            s.spec.as_ref()?.cluster_ip.clone()
        }
        _ => None,
    })
}

/// Polls `f` until it gives `Some`, for at most 15 s (the watcher's
/// backoff after an error starts at 0.8 s).
async fn until<T>(what: &str, f: impl Fn() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(t) = f() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn settings() -> snapshot::Settings {
    snapshot::Settings::offline(
        "node-a",
        "istio-system",
        "cluster.local",
        mesh_agent::registry::ambient::DEFAULT_LABEL,
    )
}

fn local_workloads(d: &SourceDocs) -> Vec<String> {
    let snap = snapshot::build(&[d], &settings(), 1).unwrap();
    snap.local_workloads("node-a")
        .map(|w| w.key().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_watches_relists_after_410_and_reconnects() {
    let s = server();
    seed(&s);
    let metrics = Arc::new(Metrics::new().unwrap());
    let src = KubeSource::start(
        client(&s),
        Settings {
            node_name: Some("node-a".into()),
            remote_pods: true,
        },
        metrics.clone(),
    );

    // Initial list: nothing is published before every kind is listed.
    let docs = until("the initial list", || src.docs()).await;
    assert_eq!(
        ids(&docs),
        [
            "Namespace shop",
            "PeerAuthentication shop/default",
            "Pod shop/web-a",
            "Pod shop/web-b",
            "Service shop/web",
            "ServiceEntry shop/api",
            "VirtualService shop/reviews",
        ]
    );
    let selectors: Vec<String> = s
        .requests()
        .iter()
        .filter(|r| r.path == PODS && !r.is_watch())
        .filter_map(|r| r.query.get("fieldSelector").cloned())
        .collect();
    assert!(
        selectors.contains(&"spec.nodeName=node-a".to_owned()),
        "{selectors:?}"
    );
    assert!(
        selectors.contains(&"spec.nodeName!=node-a".to_owned()),
        "{selectors:?}"
    );
    // This node enrols its pod; the other node's is known, for its identity.
    assert_eq!(local_workloads(&docs), ["shop/web-a"]);
    // Istio kinds whose CRDs are not installed count as empty, with a note.
    let status = src.status();
    assert_eq!(status["Gateway"]["synced"], true, "{status}");
    assert!(
        status["Gateway"]["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("404"),
        "{status}"
    );

    // Watch events: a change, a deletion.
    s.apply(VS, virtual_service(90, 10));
    until("the modified VirtualService", || {
        src.docs().filter(|d| weights(d) == [Some(90), Some(10)])
    })
    .await;
    s.delete(PA, "shop/default");
    until("the deleted PeerAuthentication", || {
        src.docs()
            .filter(|d| !ids(d).contains(&"PeerAuthentication shop/default".to_owned()))
    })
    .await;

    // An invalid object is rejected; its previous version stays.
    s.apply(VS, virtual_service(150, 10));
    until("the rejection", || {
        metrics
            .render()
            .contains("mesh_config_rejected_total{source=\"kubernetes\"} 1")
            .then_some(())
    })
    .await;
    let docs = src.docs().unwrap();
    assert_eq!(
        weights(&docs),
        [Some(90), Some(10)],
        "the last good version"
    );
    let rejected = &src.status()["VirtualService"]["rejected"]["shop/reviews"][0];
    assert!(
        rejected
            .as_str()
            .unwrap_or_default()
            .contains("spec.http[0].route[0].weight: 150 is outside 0-100"),
        "{rejected}"
    );

    // 410 Gone: a change the watch never reported appears after the relist.
    let lists = |path: &str| {
        s.requests()
            .iter()
            .filter(|r| r.path == path && !r.is_watch())
            .count()
    };
    let lists_before = lists(SERVICES);
    s.apply_silently(SERVICES, service("10.96.0.99"));
    s.expire();
    until("the relist after 410", || {
        src.docs()
            .filter(|d| cluster_ip(d).as_deref() == Some("10.96.0.99"))
    })
    .await;
    assert!(lists(SERVICES) > lists_before);
    assert!(
        metrics
            .render()
            .contains("mesh_kube_watch_errors_total{kind=\"Service\"}"),
        "410 counted as a watch error"
    );

    // Every watch relisted after the 410 (each after its own backoff).
    until("every kind to relist", || {
        let st = src.status();
        [
            "Pod (this node)",
            "Pod (other nodes)",
            "Namespace",
            "Service",
            "EndpointSlice",
            "VirtualService",
            "PeerAuthentication",
        ]
        .iter()
        .all(|k| st[k]["lists"].as_u64() >= Some(2))
        .then_some(())
    })
    .await;

    // A dropped watch: the client watches again from the last version it
    // saw, without listing again, and misses nothing.
    let (pod_lists, seen) = (lists(PODS), s.resource_version());
    s.drop_watches();
    s.apply(PODS, pod("web-c", "node-a", "10.1.0.7"));
    let docs = until("the pod added around the reconnect", || {
        src.docs()
            .filter(|d| ids(d).contains(&"Pod shop/web-c".to_owned()))
    })
    .await;
    assert_eq!(local_workloads(&docs), ["shop/web-a", "shop/web-c"]);
    assert_eq!(lists(PODS), pod_lists, "a reconnect is not a relist");
    let resumed = s.requests().iter().any(|r| {
        r.path == PODS
            && r.is_watch()
            && r.query
                .get("resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v >= seen - 1 && v <= seen)
    });
    assert!(
        resumed,
        "no watch resumed from version {seen}: {:?}",
        s.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_another_node_is_ignored_even_when_the_server_sends_it() {
    let s = server();
    // A server that sends every pod whatever the field selector says.
    s.ignore_field_selectors(true);
    seed(&s);
    let src = KubeSource::start(
        client(&s),
        Settings {
            node_name: Some("node-a".into()),
            remote_pods: false,
        },
        Arc::new(Metrics::new().unwrap()),
    );
    let docs = until("the initial list", || src.docs()).await;
    let pods: Vec<String> = ids(&docs)
        .into_iter()
        .filter(|i| i.starts_with("Pod "))
        .collect();
    assert_eq!(
        pods,
        ["Pod shop/web-a"],
        "node-b's pod came on node-a's watch"
    );
    assert_eq!(local_workloads(&docs), ["shop/web-a"]);
    // Moved to another node: gone from this one.
    s.apply(PODS, pod("web-a", "node-b", "10.1.0.5"));
    until("the pod to leave", || {
        src.docs().filter(|d| local_workloads(d).is_empty())
    })
    .await;
}
