//! Prometheus metrics with Istio's names and labels, so existing dashboards
//! work unchanged, plus the agent's own (`mesh_*`).

use std::{net::SocketAddr, sync::Arc};

use prometheus::{
    Encoder as _, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, TextEncoder,
};

use super::{
    Error,
    series::{InUse, Table},
};
use crate::{ebpf::Maps, workload::Workload};

/// Label sets each Istio family may hold by default (`--metrics-max-series`).
pub const DEFAULT_MAX_SERIES: usize = 20_000;

/// The `limit` label values of `mesh_limit_reached_total` (the limits are
/// `proxy::limits`'s).
pub const LIMITS: [&str; 3] = [
    CONNECTIONS_PER_AGENT,
    CONNECTIONS_PER_POD,
    MIRRORS_IN_FLIGHT,
];
pub const CONNECTIONS_PER_AGENT: &str = "connections_per_agent";
pub const CONNECTIONS_PER_POD: &str = "connections_per_pod";
pub const MIRRORS_IN_FLIGHT: &str = "mirrors_in_flight";

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
        // A source known only by its proved identity still has a namespace.
        let source_namespace = match (s, self.source_principal) {
            (Some(w), _) => w.namespace.clone(),
            (None, Some(p)) => p
                .parse::<crate::spiffe::SpiffeId>()
                .ok()
                .and_then(|id| id.workload_parts().map(|(ns, _)| ns.to_owned()))
                .unwrap_or_else(|| "unknown".into()),
            (None, None) => "unknown".into(),
        };
        // The service the client addressed; without one, the workload's
        // canonical service (as Istio's stats fall back to it); a
        // destination the mesh does not know is Envoy's PassthroughCluster.
        let (service, service_namespace, service_name) = match (self.service, d) {
            (Some(svc), _) => (
                svc.hostname.clone(),
                svc.namespace.clone(),
                svc.name.clone(),
            ),
            (None, Some(w)) => (
                w.canonical_service().to_string(),
                w.namespace.clone(),
                w.canonical_service().to_string(),
            ),
            (None, None) => (
                "unknown".into(),
                "unknown".into(),
                "PassthroughCluster".into(),
            ),
        };
        [
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }
            .into(),
            w(s, Workload::workload_name),
            w(s, Workload::canonical_service),
            w(s, Workload::canonical_revision),
            source_namespace,
            self.source_principal.unwrap_or("unknown").into(),
            w(s, Workload::app),
            w(s, Workload::version),
            cluster(s),
            service,
            service_namespace,
            service_name,
            w(d, Workload::workload_name),
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

/// Positions of the labels a series sweep reads.
mod at {
    pub const SOURCE_WORKLOAD: usize = 1;
    pub const SOURCE_NAMESPACE: usize = 4;
    pub const DESTINATION_SERVICE: usize = 9;
    pub const DESTINATION_WORKLOAD: usize = 12;
    pub const DESTINATION_CANONICAL_SERVICE: usize = 13;
    pub const DESTINATION_NAMESPACE: usize = 15;
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: prometheus::Registry,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    active: IntGaugeVec,
    proxy_errors: IntCounterVec,
    workloads: IntGauge,
    enrol_failures: IntCounter,
    tls_failures: IntCounterVec,
    limits_reached: IntCounterVec,
    cert_requests: IntCounterVec,
    config_rejected: IntCounterVec,
    config_applied: IntCounterVec,
    config_version: IntGauge,
    config_applied_at: Gauge,
    kube_watch_errors: IntCounterVec,
    hbone_connections: IntGauge,
    insecure: IntGauge,
    authz_decisions: IntCounterVec,
    jwt_rejections: IntCounterVec,
    jwks_fetches: IntCounterVec,
    audit_dropped: IntCounter,
    access_log: IntCounterVec,
    trace_spans: IntCounterVec,
    rate_limited: IntCounterVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    /// The label sets of the TCP and the request families, capped.
    tcp_series: Arc<Table>,
    http_series: Arc<Table>,
}

fn histogram_vec(
    registry: &prometheus::Registry,
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
    /// Keeps the connection's label set from being swept while it lives.
    _series: Option<InUse>,
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.closed.inc();
        self.active.dec();
    }
}

fn counter_vec(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, Error> {
    let v = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

/// A counter that is not exported: what a connection over the series cap
/// counts into.
fn detached() -> IntCounter {
    IntCounter::new("mesh_detached", "not exported").expect("a valid name")
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        Self::with_series_cap(DEFAULT_MAX_SERIES)
    }

    /// Metrics whose Istio families each hold at most `max_series` label
    /// sets.
    pub fn with_series_cap(max_series: usize) -> Result<Self, Error> {
        let registry = prometheus::Registry::new();
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
        let overflow = counter_vec(
            &registry,
            "mesh_metric_series_overflow_total",
            "Connections and requests not counted in Istio's metrics because their family already holds --metrics-max-series label sets.",
            &["family"],
        )?;
        let tcp_opened = counter_vec(
            &registry,
            "istio_tcp_connections_opened_total",
            "TCP connections opened.",
            &ISTIO_TCP_LABELS,
        )?;
        let tcp_closed = counter_vec(
            &registry,
            "istio_tcp_connections_closed_total",
            "TCP connections closed.",
            &ISTIO_TCP_LABELS,
        )?;
        let tcp_sent = counter_vec(
            &registry,
            "istio_tcp_sent_bytes_total",
            "Bytes sent to the client (response direction).",
            &ISTIO_TCP_LABELS,
        )?;
        let tcp_received = counter_vec(
            &registry,
            "istio_tcp_received_bytes_total",
            "Bytes received from the client (request direction).",
            &ISTIO_TCP_LABELS,
        )?;
        let requests = counter_vec(
            &registry,
            "istio_requests_total",
            "HTTP and gRPC requests, by Istio's standard labels.",
            &ISTIO_HTTP_LABELS,
        )?;
        let request_duration = histogram_vec(
            &registry,
            "istio_request_duration_milliseconds",
            "Time from the request's first byte to the response's last.",
            &DURATION_BUCKETS,
        )?;
        let request_bytes = histogram_vec(
            &registry,
            "istio_request_bytes",
            "Request sizes (body bytes).",
            &SIZE_BUCKETS,
        )?;
        let response_bytes = histogram_vec(
            &registry,
            "istio_response_bytes",
            "Response sizes (body bytes).",
            &SIZE_BUCKETS,
        )?;
        let counter_remover = |v: &IntCounterVec| -> super::series::Remover {
            let v = v.clone();
            Box::new(move |l: &[&str]| {
                let _ = v.remove_label_values(l);
            })
        };
        let histogram_remover = |v: &HistogramVec| -> super::series::Remover {
            let v = v.clone();
            Box::new(move |l: &[&str]| {
                let _ = v.remove_label_values(l);
            })
        };
        let tcp_series = Table::new(
            max_series,
            overflow.with_label_values(&["tcp"]),
            vec![
                counter_remover(&tcp_opened),
                counter_remover(&tcp_closed),
                counter_remover(&tcp_sent),
                counter_remover(&tcp_received),
            ],
        );
        let http_series = Table::new(
            max_series,
            overflow.with_label_values(&["http"]),
            vec![
                counter_remover(&requests),
                histogram_remover(&request_duration),
                histogram_remover(&request_bytes),
                histogram_remover(&response_bytes),
            ],
        );
        let m = Self {
            tcp_series,
            http_series,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            access_log: counter_vec(
                &registry,
                "mesh_access_log_records_total",
                "Access-log records by result: written (per provider), filtered out by a Telemetry filter, dropped (the queue was full), failed (the sink refused the write).",
                &["result"],
            )?,
            trace_spans: counter_vec(
                &registry,
                "mesh_trace_spans_total",
                "Spans of sampled traces by result: exported, dropped (the queue was full), failed (the provider refused or was unreachable).",
                &["result"],
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
            limits_reached: counter_vec(
                &registry,
                "mesh_limit_reached_total",
                "Work refused because a limit was reached, by limit (connections_per_agent, connections_per_pod, mirrors_in_flight).",
                &["limit"],
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
            insecure: {
                let g = IntGauge::new(
                    "mesh_insecure_no_mtls",
                    "1 when the agent runs without mutual TLS (--insecure-no-mtls).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            authz_decisions: counter_vec(
                &registry,
                "mesh_authz_decisions_total",
                "AuthorizationPolicy decisions by the destination's agent: the deciding action (ALLOW, DENY, CUSTOM, AUDIT; NONE when no policy applies), the decision (allow, deny, audit, dry_run_allow, dry_run_deny) and the policy (namespace/name; none when no ALLOW policy matched).",
                &["action", "decision", "policy"],
            )?,
            jwt_rejections: counter_vec(
                &registry,
                "mesh_jwt_rejections_total",
                "Requests refused with 401 because their JWT failed, by reason.",
                &["reason"],
            )?,
            jwks_fetches: counter_vec(
                &registry,
                "mesh_jwks_fetches_total",
                "Fetches of RequestAuthentication key sets (jwksUri), by result (ok, error).",
                &["result"],
            )?,
            rate_limited: counter_vec(
                &registry,
                "mesh_rate_limited_total",
                "Requests and connections over a local rate limit (EnvoyFilter), by unit, filter and result (refused; over_not_enforced when filter_enforced let it through).",
                &["unit", "filter", "result"],
            )?,
            audit_dropped: {
                let c = IntCounter::new(
                    "mesh_audit_dropped_total",
                    "Audit records dropped because the audit queue was full.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            active,
            workloads,
            registry,
        };
        for r in ["ok", "error"] {
            m.jwks_fetches.with_label_values(&[r]);
        }
        // Every handshake failure reason is exported from the start (at 0),
        // so "no failure" is a reading, not a missing series.
        for l in LIMITS {
            m.limits_reached.with_label_values(&[l]);
        }
        for r in ["issued", "failed"] {
            m.cert_requests.with_label_values(&[r]);
        }
        for d in [Reporter::Source, Reporter::Destination] {
            for r in crate::tls::verify::FAILURE_REASONS {
                m.tls_failures.with_label_values(&[direction(d), r]);
            }
        }
        Ok(m)
    }

    /// Exports the kernel programs' counters and map sizes on every scrape.
    pub fn register_ebpf(&self, maps: Arc<Maps>) -> Result<(), Error> {
        self.registry
            .register(Box::new(super::ebpf::EbpfCollector::new(maps)?))?;
        Ok(())
    }

    /// Records a new connection and returns its live counters.
    pub fn connection_opened(&self, labels: &ConnLabels<'_>) -> ConnMetrics {
        let values = labels.values();
        let active = self.active.with_label_values(&[direction(labels.reporter)]);
        active.inc();
        let Some(series) = self.tcp_series.enter(&values) else {
            // Over the cap: the connection is carried, its bytes counted
            // nowhere (the overflow counter says how often).
            return ConnMetrics {
                sent: detached(),
                received: detached(),
                closed: detached(),
                active,
                _series: None,
            };
        };
        let v: Vec<&str> = values.iter().map(String::as_str).collect();
        self.tcp_opened.with_label_values(&v).inc();
        ConnMetrics {
            sent: self.tcp_sent.with_label_values(&v),
            received: self.tcp_received.with_label_values(&v),
            closed: self.tcp_closed.with_label_values(&v),
            active,
            _series: Some(series),
        }
    }

    /// Removes the Istio series that name a workload or a service no
    /// longer in `registry` and that no open connection uses; returns how
    /// many went. Runs on a timer, not per change: its cost follows the
    /// number of series and workloads, and nothing needs it sooner.
    pub fn sweep_series(&self, registry: &crate::registry::Registry) -> usize {
        let workloads: std::collections::HashSet<(&str, &str)> = registry
            .workloads
            .iter()
            .map(|w| (w.namespace.as_str(), w.workload_name()))
            .collect();
        let services: std::collections::HashSet<&str> = registry
            .services
            .iter()
            .map(|s| s.hostname.as_str())
            .collect();
        let live = |v: &[String]| {
            let known = |name: &String, ns: &String| {
                name == "unknown" || workloads.contains(&(ns.as_str(), name.as_str()))
            };
            let service = &v[at::DESTINATION_SERVICE];
            known(&v[at::SOURCE_WORKLOAD], &v[at::SOURCE_NAMESPACE])
                && known(&v[at::DESTINATION_WORKLOAD], &v[at::DESTINATION_NAMESPACE])
                && (service == "unknown"
                    || services.contains(service.as_str())
                    // A workload addressed directly: named after it.
                    || *service == v[at::DESTINATION_CANONICAL_SERVICE])
        };
        self.tcp_series.sweep(live) + self.http_series.sweep(live)
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

    /// Counts work refused at `limit` (one of [`LIMITS`]).
    pub fn limit_reached(&self, limit: &str) {
        self.limits_reached.with_label_values(&[limit]).inc();
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

    /// Counts one authorization decision.
    pub fn authz_decision(&self, action: &str, decision: &str, policy: &str) {
        self.authz_decisions
            .with_label_values(&[action, decision, policy])
            .inc();
    }

    pub fn jwt_rejected(&self, reason: &str) {
        self.jwt_rejections.with_label_values(&[reason]).inc();
    }

    pub fn rate_limited(&self, unit: &str, filter: &str, result: &str) {
        self.rate_limited
            .with_label_values(&[unit, filter, result])
            .inc();
    }

    /// The counter of audit records dropped, for the audit writer.
    pub fn audit_dropped(&self) -> IntCounter {
        self.audit_dropped.clone()
    }

    pub fn access_log_counts(&self) -> IntCounterVec {
        self.access_log.clone()
    }

    pub fn trace_span_counts(&self) -> IntCounterVec {
        self.trace_spans.clone()
    }

    pub fn jwks_fetch(&self, result: &str) {
        self.jwks_fetches.with_label_values(&[result]).inc();
    }

    /// `mesh_insecure_no_mtls`: 1 when the agent runs without mutual TLS.
    pub fn set_insecure(&self, insecure: bool) {
        self.insecure.set(i64::from(insecure));
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

mod requests;
pub use requests::RequestRecorder;

#[cfg(test)]
mod tests;
