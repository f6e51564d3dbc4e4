use super::*;
use crate::workload::Workload;

fn wl(name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload::for_tests(name, "default", labels)
}

#[test]
fn connection_lifecycle_updates_istio_metrics() {
    let m = Metrics::new().unwrap();
    let src = wl("client", &[("app", "sleep"), ("version", "v1")]);
    let c = m.connection_opened(&ConnLabels {
        reporter: Reporter::Source,
        source: Some(&src),
        destination: None,
        service: None,
        destination_addr: "192.0.2.9:80".parse().unwrap(),
        cluster: "Kubernetes",
        security_policy: "unknown",
        source_principal: None,
        destination_principal: None,
    });
    c.received.inc_by(5);
    c.sent.inc_by(7);
    let text = m.render();
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap();
    for want in [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_app=\"sleep\"",
        "source_version=\"v1\"",
        "source_cluster=\"Kubernetes\"",
        "destination_workload=\"unknown\"",
        "destination_service=\"unknown\"",
        "destination_service_name=\"PassthroughCluster\"",
        "request_protocol=\"tcp\"",
        "connection_security_policy=\"unknown\"",
    ] {
        assert!(opened.contains(want), "{want} missing in {opened}");
    }
    assert!(opened.ends_with(" 1"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with(" 5"))
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.ends_with(" 7"))
    );
    assert!(text.contains("mesh_tcp_connections_active{direction=\"outbound\"} 1"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 0")),
        "not closed yet"
    );
    drop(c);
    let text = m.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 1"))
    );
    assert!(text.contains("mesh_tcp_connections_active{direction=\"outbound\"} 0"));
}

fn labels<'a>(src: &'a Workload, dst: Option<&'a Workload>) -> ConnLabels<'a> {
    ConnLabels {
        reporter: Reporter::Source,
        source: Some(src),
        destination: dst,
        service: None,
        destination_addr: "192.0.2.9:80".parse().unwrap(),
        cluster: "Kubernetes",
        security_policy: "unknown",
        source_principal: None,
        destination_principal: None,
    }
}

fn series(m: &Metrics, name: &str) -> usize {
    m.render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .count()
}

#[test]
fn series_over_the_cap_are_counted_as_overflow_and_not_exported() {
    let m = Metrics::with_series_cap(2).unwrap();
    let ws: Vec<Workload> = (0..3).map(|i| wl(&format!("w{i}"), &[])).collect();
    let conns: Vec<ConnMetrics> = ws
        .iter()
        .map(|w| m.connection_opened(&labels(w, None)))
        .collect();
    for c in &conns {
        c.sent.inc_by(10);
    }
    assert_eq!(series(&m, "istio_tcp_connections_opened_total"), 2);
    assert!(
        m.render()
            .contains("mesh_metric_series_overflow_total{family=\"tcp\"} 1"),
        "{}",
        m.render()
    );
    // A known set is still counted when the family is full.
    drop(m.connection_opened(&labels(&ws[0], None)));
    assert!(m.render().contains("source_workload=\"w0\""));
    assert!(
        m.render()
            .contains("mesh_metric_series_overflow_total{family=\"tcp\"} 1")
    );
}

#[test]
fn series_of_departed_workloads_go_once_their_connections_close() {
    let m = Metrics::new().unwrap();
    let here = wl("here", &[]);
    let gone = wl("gone", &[]);
    let open = m.connection_opened(&labels(&gone, Some(&here)));
    drop(m.connection_opened(&labels(&here, Some(&here))));
    let registry = crate::testing::snapshot(&format!(
        "workloads:\n{}",
        crate::testing::workload_yaml("here", "10.0.0.2", "default", "")
    ))
    .registry;
    // `gone` left the registry, but a connection of it is still open.
    assert_eq!(m.sweep_series(&registry), 0);
    assert_eq!(series(&m, "istio_tcp_connections_opened_total"), 2);
    drop(open);
    assert_eq!(m.sweep_series(&registry), 1);
    let text = m.render();
    assert_eq!(
        series(&m, "istio_tcp_connections_opened_total"),
        1,
        "{text}"
    );
    assert_eq!(series(&m, "istio_tcp_sent_bytes_total"), 1, "{text}");
    assert!(!text.contains("source_workload=\"gone\""), "{text}");
    assert!(text.contains("source_workload=\"here\""), "{text}");
}

#[test]
fn a_source_known_only_by_identity_keeps_its_namespace() {
    let m = Metrics::new().unwrap();
    let dst = wl("server", &[]);
    let c = m.connection_opened(&ConnLabels {
        reporter: Reporter::Destination,
        source: None,
        destination: Some(&dst),
        service: None,
        destination_addr: "10.0.0.2:80".parse().unwrap(),
        cluster: "Kubernetes",
        security_policy: "mutual_tls",
        source_principal: Some("spiffe://cluster.local/ns/shop/sa/cart"),
        destination_principal: Some("spiffe://cluster.local/ns/default/sa/default"),
    });
    let text = m.render();
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap();
    for want in [
        "source_workload=\"unknown\"",
        "source_workload_namespace=\"shop\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/cart\"",
        "destination_workload=\"server\"",
    ] {
        assert!(opened.contains(want), "{want} missing in {opened}");
    }
    drop(c);
}

/// A connection's recorder gives the series `request_done` gives, once
/// per outcome, and holds them while it lives.
#[test]
fn a_connections_recorder_records_what_request_done_records() {
    let m = Metrics::new().unwrap();
    let (src, dst) = (wl("client", &[]), wl("web", &[]));
    let outcome = |code: u16, flags| RequestOutcome {
        protocol: "http",
        code,
        grpc_status: "-",
        flags,
        duration: std::time::Duration::from_millis(3),
        request_bytes: 10,
        response_bytes: 20,
    };
    let rec = RequestRecorder::new(&labels(&src, Some(&dst)));
    for _ in 0..3 {
        m.request_done_on(&rec, &outcome(200, "-"));
    }
    m.request_done_on(&rec, &outcome(403, "RBAC"));
    let direct = Metrics::new().unwrap();
    for _ in 0..3 {
        direct.request_done(&labels(&src, Some(&dst)), &outcome(200, "-"));
    }
    direct.request_done(&labels(&src, Some(&dst)), &outcome(403, "RBAC"));
    let requests = |m: &Metrics| {
        let mut v: Vec<String> = m
            .render()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    let got = requests(&m);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got, requests(&direct));
    assert!(
        got.iter()
            .any(|l| l.contains("response_code=\"200\"") && l.ends_with(" 3"))
    );
    // Held by the connection: a sweep keeps them even once the workloads
    // are gone.
    let empty = crate::testing::snapshot("workloads: []\n").registry;
    assert_eq!(m.sweep_series(&empty), 0);
    drop(rec);
    assert!(m.sweep_series(&empty) > 0);
    assert!(requests(&m).is_empty());
}
