//! Prometheus metrics with Istio's names and labels, so existing dashboards
//! work unchanged, plus the agent's own (`mesh_*`).

use std::{net::SocketAddr, sync::Arc};

use prometheus::{
    Encoder as _, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto,
};

use super::Error;
use crate::{ebpf::Maps, workload::Workload};

/// Istio's standard labels for TCP metrics, in the order `ConnLabels::values` fills them.
const ISTIO_TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Istio's request labels: the TCP ones plus the response's codes.
const ISTIO_HTTP_LABELS: [&str; 25] = {
    let mut l = [""; 25];
    let mut i = 0;
    while i < ISTIO_TCP_LABELS.len() {
        l[i] = ISTIO_TCP_LABELS[i];
        i += 1;
    }
    l[23] = "response_code";
    l[24] = "grpc_response_status";
    l
};

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for request and response sizes (bytes).
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// How one HTTP request ended, for its metrics.
pub struct RequestOutcome<'a> {
    /// `http` or `grpc`.
    pub protocol: &'a str,
    pub code: u16,
    /// gRPC status, `-` for plain HTTP.
    pub grpc_status: &'a str,
    /// Envoy response flags, `-` when none.
    pub flags: &'a str,
    pub duration: std::time::Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Which side of the connection reports it, as Istio names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The source pod's agent (outbound).
    Source,
    /// The destination pod's agent (inbound).
    Destination,
}

/// What the metric labels describe about one connection.
pub struct ConnLabels<'a> {
    pub reporter: Reporter,
    pub source: Option<&'a Workload>,
    pub destination: Option<&'a Workload>,
    /// The service the client addressed, when it used one.
    pub service: Option<&'a crate::registry::Service>,
    /// Where the connection was going (used when the destination is not a known workload).
    pub destination_addr: SocketAddr,
    pub cluster: &'a str,
    /// `mutual_tls`, `none` (plaintext, inbound) or `unknown`.
    pub security_policy: &'static str,
    /// SPIFFE IDs, when mutual TLS proved (or is expected to prove) them.
    pub source_principal: Option<&'a str>,
    pub destination_principal: Option<&'a str>,
}

impl ConnLabels<'_> {
    fn values(&self) -> [String; 23] {
        let w = |o: Option<&Workload>, f: fn(&Workload) -> &str| o.map_or("unknown", f).to_string();
        let cluster = |o: Option<&Workload>| {
            if o.is_some() {
                self.cluster.to_string()
            } else {
                "unknown".into()
            }
        };
        let (s, d) = (self.source, self.destination);
        [
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }
            .into(),
            w(s, |w| &w.name),
            w(s, Workload::canonical_service),
            w(s, Workload::canonical_revision),
            w(s, |w| &w.namespace),
            self.source_principal.unwrap_or("unknown").into(),
            w(s, Workload::app),
            w(s, Workload::version),
            cluster(s),
            // The service the client addressed; without one, Istio names
            // the workload's canonical service, or the address dialled.
            match (self.service, d) {
                (Some(svc), _) => svc.hostname.clone(),
                (None, Some(w)) => w.canonical_service().to_string(),
                (None, None) => self.destination_addr.ip().to_string(),
            },
            match (self.service, d) {
                (Some(svc), _) => svc.namespace.clone(),
                (None, d) => w(d, |w| &w.namespace),
            },
            match (self.service, d) {
                (Some(svc), _) => svc.name.clone(),
                (None, Some(w)) => w.canonical_service().to_string(),
                (None, None) => self.destination_addr.ip().to_string(),
            },
            w(d, |w| &w.name),
            w(d, Workload::canonical_service),
            w(d, Workload::canonical_revision),
            w(d, |w| &w.namespace),
            self.destination_principal.unwrap_or("unknown").into(),
            w(d, Workload::app),
            w(d, Workload::version),
            cluster(d),
            "tcp".into(),
            "-".into(),
            self.security_policy.into(),
        ]
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    active: IntGaugeVec,
    proxy_errors: IntCounterVec,
    workloads: IntGauge,
    enrol_failures: IntCounter,
    tls_failures: IntCounterVec,
    cert_requests: IntCounterVec,
    config_rejected: IntCounterVec,
    config_applied: IntCounterVec,
    config_version: IntGauge,
    config_applied_at: Gauge,
    kube_watch_errors: IntCounterVec,
    hbone_connections: IntGauge,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> Result<HistogramVec, Error> {
    let v = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &ISTIO_HTTP_LABELS,
    )?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

/// The live counters of one connection; dropping it records the close.
pub struct ConnMetrics {
    /// Bytes from the destination back to the client (Istio: "sent during response").
    pub sent: IntCounter,
    /// Bytes from the client to the destination (Istio: "received during request").
    pub received: IntCounter,
    closed: IntCounter,
    active: IntGauge,
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.closed.inc();
        self.active.dec();
    }
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, Error> {
    let v = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let active = IntGaugeVec::new(
            Opts::new(
                "mesh_tcp_connections_active",
                "Connections the agent is proxying now.",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(active.clone()))?;
        let workloads = IntGauge::new("mesh_workloads_enrolled", "Pods enrolled on this node.")?;
        registry.register(Box::new(workloads.clone()))?;
        let m = Self {
            tcp_opened: counter_vec(
                &registry,
                "istio_tcp_connections_opened_total",
                "TCP connections opened.",
                &ISTIO_TCP_LABELS,
            )?,
            tcp_closed: counter_vec(
                &registry,
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
                &ISTIO_TCP_LABELS,
            )?,
            tcp_sent: counter_vec(
                &registry,
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client (response direction).",
                &ISTIO_TCP_LABELS,
            )?,
            tcp_received: counter_vec(
                &registry,
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (request direction).",
                &ISTIO_TCP_LABELS,
            )?,
            proxy_errors: counter_vec(
                &registry,
                "mesh_proxy_errors_total",
                "Connections the agent could not carry, by reason.",
                &["direction", "reason"],
            )?,
            enrol_failures: {
                let c = IntCounter::new(
                    "mesh_workload_enrol_failures_total",
                    "Pods the agent failed to enrol (retried on the next change or tick).",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            tls_failures: counter_vec(
                &registry,
                "mesh_tls_handshake_failures_total",
                "mTLS handshakes refused, by side and reason (unknown_ca, expired, wrong_identity, wrong_trust_domain, no_client_certificate, ...).",
                &["direction", "reason"],
            )?,
            cert_requests: counter_vec(
                &registry,
                "mesh_certificate_requests_total",
                "Workload certificate requests to the CA, by result.",
                &["result"],
            )?,
            config_rejected: counter_vec(
                &registry,
                "mesh_config_rejected_total",
                "Configuration updates rejected (the previous configuration kept serving), by source.",
                &["source"],
            )?,
            config_applied: counter_vec(
                &registry,
                "mesh_config_applied_total",
                "Configuration updates applied, by source.",
                &["source"],
            )?,
            config_version: {
                let g = IntGauge::new(
                    "mesh_config_version",
                    "Version of the configuration snapshot in force (1 for the first).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            config_applied_at: {
                let g = Gauge::new(
                    "mesh_config_last_apply_timestamp_seconds",
                    "When the snapshot in force was applied (Unix time).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            kube_watch_errors: counter_vec(
                &registry,
                "mesh_kube_watch_errors_total",
                "Kubernetes list/watch errors (each retried with backoff), by watched kind.",
                &["kind"],
            )?,
            hbone_connections: {
                let g = IntGauge::new(
                    "mesh_hbone_pooled_connections",
                    "HBONE connections in the client pool.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            requests: counter_vec(
                &registry,
                "istio_requests_total",
                "HTTP and gRPC requests, by Istio's standard labels.",
                &ISTIO_HTTP_LABELS,
            )?,
            request_duration: histogram_vec(
                &registry,
                "istio_request_duration_milliseconds",
                "Time from the request's first byte to the response's last.",
                &DURATION_BUCKETS,
            )?,
            request_bytes: histogram_vec(
                &registry,
                "istio_request_bytes",
                "Request sizes (body bytes).",
                &SIZE_BUCKETS,
            )?,
            response_bytes: histogram_vec(
                &registry,
                "istio_response_bytes",
                "Response sizes (body bytes).",
                &SIZE_BUCKETS,
            )?,
            active,
            workloads,
            registry,
        };
        // Every handshake failure reason is exported from the start (at 0),
        // so "no failure" is a reading, not a missing series.
        for d in [Reporter::Source, Reporter::Destination] {
            for r in crate::tls::verify::FAILURE_REASONS {
                m.tls_failures.with_label_values(&[direction(d), r]);
            }
        }
        Ok(m)
    }

    /// Records a finished HTTP request.
    pub fn request_done(&self, labels: &ConnLabels<'_>, o: &RequestOutcome<'_>) {
        let [tcp @ .., _, _, security] = labels.values();
        let code = o.code.to_string();
        let v: Vec<&str> = tcp
            .iter()
            .map(String::as_str)
            .chain([o.protocol, o.flags, security.as_str(), &code, o.grpc_status])
            .collect();
        self.requests.with_label_values(&v).inc();
        self.request_duration
            .with_label_values(&v)
            .observe(o.duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .with_label_values(&v)
            .observe(o.request_bytes as f64);
        self.response_bytes
            .with_label_values(&v)
            .observe(o.response_bytes as f64);
    }

    /// Exports the kernel programs' counters and map sizes on every scrape.
    pub fn register_ebpf(&self, maps: Arc<Maps>) -> Result<(), Error> {
        self.registry
            .register(Box::new(EbpfCollector::new(maps)?))?;
        Ok(())
    }

    /// Records a new connection and returns its live counters.
    pub fn connection_opened(&self, labels: &ConnLabels<'_>) -> ConnMetrics {
        let values = labels.values();
        let v: Vec<&str> = values.iter().map(String::as_str).collect();
        self.tcp_opened.with_label_values(&v).inc();
        let active = self.active.with_label_values(&[direction(labels.reporter)]);
        active.inc();
        ConnMetrics {
            sent: self.tcp_sent.with_label_values(&v),
            received: self.tcp_received.with_label_values(&v),
            closed: self.tcp_closed.with_label_values(&v),
            active,
        }
    }

    /// Counts a connection the agent failed to carry.
    pub fn proxy_error(&self, reporter: Reporter, reason: &str) {
        self.proxy_errors
            .with_label_values(&[direction(reporter), reason])
            .inc();
    }

    /// Counts a refused mTLS handshake.
    pub fn tls_failure(&self, reporter: Reporter, reason: &str) {
        self.tls_failures
            .with_label_values(&[direction(reporter), reason])
            .inc();
    }

    pub fn certificate_request(&self, result: &str) {
        self.cert_requests.with_label_values(&[result]).inc();
    }

    /// Exports the configuration counters of `source` from the start (at
    /// 0), so a dashboard or a check sees the series before the first
    /// update rather than no series at all.
    pub fn config_source(&self, source: &str) {
        self.config_rejected.with_label_values(&[source]);
        self.config_applied.with_label_values(&[source]);
    }

    pub fn config_rejected(&self, source: &str) {
        self.config_rejected.with_label_values(&[source]).inc();
    }

    pub fn set_hbone_connections(&self, n: usize) {
        self.hbone_connections.set(n as i64);
    }

    pub fn set_workloads(&self, n: usize) {
        self.workloads.set(n as i64);
    }

    pub fn enrol_failed(&self) {
        self.enrol_failures.inc();
    }

    /// Records a new snapshot from `source`.
    pub fn config_applied(&self, source: &str, version: u64, at: std::time::SystemTime) {
        self.config_applied.with_label_values(&[source]).inc();
        self.config_version.set(version as i64);
        self.config_applied_at.set(
            at.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
    }

    pub fn kube_watch_error(&self, kind: &str) {
        self.kube_watch_errors.with_label_values(&[kind]).inc();
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

fn direction(r: Reporter) -> &'static str {
    match r {
        Reporter::Source => "outbound",
        Reporter::Destination => "inbound",
    }
}

/// Reads the per-CPU program counters and map sizes at scrape time.
struct EbpfCollector {
    maps: Arc<Maps>,
    descs: Vec<Desc>,
}

const EVENTS: &str = "mesh_ebpf_program_events_total";
const ENTRIES: &str = "mesh_ebpf_map_entries";

impl EbpfCollector {
    fn new(maps: Arc<Maps>) -> Result<Self, Error> {
        let descs = vec![
            Desc::new(
                EVENTS.into(),
                "What each kernel program did (summed over CPUs).".into(),
                vec!["program".into(), "outcome".into()],
                Default::default(),
            )?,
            Desc::new(
                ENTRIES.into(),
                "Entries in the connection-tracking maps.".into(),
                vec!["map".into()],
                Default::default(),
            )?,
        ];
        Ok(Self { maps, descs })
    }
}

fn sample(labels: &[(&str, &str)], value: f64, counter: bool) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = proto::LabelPair::default();
                l.set_name((*k).into());
                l.set_value((*v).into());
                l
            })
            .collect(),
    );
    if counter {
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

fn family(
    name: &str,
    help: &str,
    kind: proto::MetricType,
    metrics: Vec<proto::Metric>,
) -> proto::MetricFamily {
    let mut f = proto::MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

impl Collector for EbpfCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut events = Vec::new();
        for (program, s) in self.maps.program_stats() {
            for (outcome, v) in [
                ("redirected", s.redirected),
                ("passed", s.passed),
                ("errors", s.errors),
            ] {
                events.push(sample(
                    &[("program", program), ("outcome", outcome)],
                    v as f64,
                    true,
                ));
            }
        }
        let e = self.maps.entries();
        let entries = vec![
            sample(&[("map", "mesh_orig_dst")], e.orig_dst as f64, false),
            sample(&[("map", "mesh_conn_dst")], e.conn_dst as f64, false),
            sample(&[("map", "mesh_fast_socks")], e.fast_socks as f64, false),
        ];
        vec![
            family(
                EVENTS,
                &self.descs[0].help,
                proto::MetricType::COUNTER,
                events,
            ),
            family(
                ENTRIES,
                &self.descs[1].help,
                proto::MetricType::GAUGE,
                entries,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
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
            "destination_service=\"192.0.2.9\"",
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
}
