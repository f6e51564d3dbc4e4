//! Golden signals as an operator reads them: a real Prometheus scrapes
//! both agents while the client sends a known load, and PromQL gives back
//! its request count and rate, its 5xx ratio and its latency quantiles,
//! from the source's and from the destination's side.

use mesh_tests::prometheus::{Prometheus, promtool_check};

use super::*;

/// Every request to `web` is delayed 50 ms, except `/fail`, aborted
/// with 503 at the source.
fn routes() -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"hosts": ["web"], "http": [
            {"match": [{"uri": {"prefix": "/fail"}}],
             "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "web"}}]},
            {"fault": {"delay": {"fixedDelay": "50ms", "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "web"}}]},
        ]},
    })
}

const OK: usize = 100;
const FAILED: usize = 25;

#[test]
fn prometheus_reads_request_rate_errors_and_latency_from_both_agents() {
    let m = Mesh::start("tel-golden", &|_| String::new(), true);
    m.telemetry(&[routes()]);
    let prom = Prometheus::start(
        &m.c.env,
        &m.c.fabric,
        &["10.255.0.1:15020".into(), "10.255.0.2:15020".into()],
    );
    assert!(
        wait_until(Duration::from_secs(20), || prom
            .scalar("sum(up{job=\"mesh-agent\"})")
            == Some(2.0)),
        "Prometheus does not scrape both agents: {:?}",
        prom.query("up")
    );

    let started = std::time::SystemTime::now();
    let url = format!("http://{VIP}:80/ok");
    let ok =
        m.c.client
            .run_app(&["http-count", &url, &OK.to_string()])
            .json();
    let ended = std::time::SystemTime::now();
    assert_eq!(
        ok["answers"]["hello from web"].as_u64(),
        Some(OK as u64),
        "{ok}"
    );
    let url = format!("http://{VIP}:80/fail");
    let failed =
        m.c.client
            .run_app(&["http-count", &url, &FAILED.to_string()])
            .json();
    assert_eq!(failed["last"]["status"], 503, "{failed}");

    // Wait until a scrape after the load: the source counted every request.
    let source = "istio_requests_total{reporter=\"source\",destination_service_name=\"web\"}";
    assert!(
        wait_until(Duration::from_secs(20), || prom
            .scalar(&format!("sum({source})"))
            == Some((OK + FAILED) as f64)),
        "Prometheus never saw {} requests: {:?}",
        OK + FAILED,
        prom.query(&format!("sum({source})"))
    );
    // The 5xx ratio.
    let ratio = prom
        .scalar(&format!(
            "sum(istio_requests_total{{reporter=\"source\",destination_service_name=\"web\",response_code=~\"5..\"}}) / sum({source})"
        ))
        .unwrap();
    assert!(
        (ratio - FAILED as f64 / (OK + FAILED) as f64).abs() < 1e-9,
        "5xx ratio {ratio}"
    );
    // The destination saw the requests that reached it, and who sent them
    // (its own scrape may lag the source's by one).
    assert!(
        wait_until(Duration::from_secs(20), || prom
            .scalar("sum(istio_requests_total{reporter=\"destination\"})")
            == Some(OK as f64)),
        "the destination never counted {OK}: {:?}",
        prom.query("sum(istio_requests_total{reporter=\"destination\"})")
    );
    let dest = prom.query(
        "sum by (source_workload, source_principal, destination_workload, connection_security_policy, response_code) \
         (istio_requests_total{reporter=\"destination\"})",
    );
    assert_eq!(dest.len(), 1, "{dest:?}");
    let (labels, n) = &dest[0];
    assert_eq!(*n, OK as f64, "{labels}");
    assert_eq!(labels["source_workload"], "client");
    assert_eq!(labels["destination_workload"], "web");
    assert_eq!(
        labels["source_principal"],
        "spiffe://cluster.local/ns/default/sa/client-sa"
    );
    assert_eq!(labels["connection_security_policy"], "mutual_tls");
    assert_eq!(labels["response_code"], "200");

    // The rate over the 200s' phase, at its end: what the client sent.
    let secs = ended.duration_since(started).unwrap().as_secs_f64();
    let at = ended
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let window = secs.floor().max(2.0) as u64;
    let rate = prom.query_at(
        &format!(
            "sum(rate(istio_requests_total{{reporter=\"source\",response_code=\"200\"}}[{window}s]))"
        ),
        Some(at),
    );
    let expected = OK as f64 / secs;
    let got = rate.first().map(|(_, v)| *v).unwrap_or(0.0);
    assert!(
        (0.6..=1.4).contains(&(got / expected)),
        "request rate {got:.1}/s over {window}s, the client sent {expected:.1}/s for {secs:.1} s"
    );

    // Latency: the 200s all took the 50 ms delay (Istio's buckets: 50,
    // 100), the aborted ones none of it. Over the whole counts, not a
    // rate: the 503s' series began with the burst, so a rate of them
    // would have no increase to work with.
    // (The tails may reach the next bucket on a loaded machine.)
    for (q, code, lo, hi) in [
        (0.5, "200", 50.0, 100.0),
        (0.95, "200", 50.0, 250.0),
        (0.99, "200", 50.0, 250.0),
        (0.5, "503", 0.0, 5.0),
    ] {
        let v = prom
            .scalar(&format!(
                "histogram_quantile({q}, sum by (le) (istio_request_duration_milliseconds_bucket{{reporter=\"source\",response_code=\"{code}\"}}))"
            ))
            .unwrap_or(f64::NAN);
        assert!(
            (lo..=hi).contains(&v),
            "p{} of the {code}s is {v} ms, expected {lo}-{hi}",
            q * 100.0
        );
    }

    // The exposition passes promtool, but for the one lint Istio's own
    // name trips (milliseconds, not seconds: kept for Istio's dashboards).
    for agent in [&m.agent_a, &m.agent_b] {
        let problems: Vec<String> = promtool_check(&agent.metrics().0)
            .into_iter()
            .filter(|p| {
                p != "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\""
            })
            .collect();
        assert!(problems.is_empty(), "promtool check metrics: {problems:#?}");
    }
}
