//! The request series (`istio_requests_total` and its three histograms):
//! recorded per request, or through a connection's [`RequestRecorder`]
//! when the connection's labels are fixed.

use prometheus::IntCounter;

use super::{ConnLabels, Metrics, RequestOutcome};
use crate::telemetry::series::InUse;

/// The label values a connection gives its requests' series.
struct RequestLabels {
    /// The connection's values up to its last three (`request_protocol`
    /// and `response_flags`, which each request has its own of, and
    /// `connection_security_policy`).
    tcp: Vec<String>,
    security: String,
}

impl RequestLabels {
    fn new(labels: &ConnLabels<'_>) -> Self {
        let [tcp @ .., _, _, security] = labels.values();
        Self {
            tcp: tcp.into(),
            security,
        }
    }
}

/// One label set's request series, resolved.
struct RequestHandles {
    /// Keeps the set from being swept while the connection holds it.
    _in_use: InUse,
    requests: IntCounter,
    duration: prometheus::Histogram,
    request_bytes: prometheus::Histogram,
    response_bytes: prometheus::Histogram,
}

impl RequestHandles {
    fn record(&self, o: &RequestOutcome<'_>) {
        self.requests.inc();
        self.duration.observe(o.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(o.request_bytes as f64);
        self.response_bytes.observe(o.response_bytes as f64);
    }
}

/// The request series of one connection whose labels do not change (the
/// destination's side), resolved once per outcome (code, flags…): a
/// keep-alive connection's requests do not build and hash twenty label
/// values each.
pub struct RequestRecorder {
    labels: RequestLabels,
    #[allow(clippy::type_complexity)]
    cache: std::sync::Mutex<Vec<((u16, String, String, String), RequestHandles)>>,
}

impl RequestRecorder {
    /// Outcomes kept per connection; others are resolved each time.
    const MAX_OUTCOMES: usize = 8;

    pub fn new(labels: &ConnLabels<'_>) -> Self {
        Self {
            labels: RequestLabels::new(labels),
            cache: Default::default(),
        }
    }
}

impl Metrics {
    /// Records a finished HTTP request.
    pub fn request_done(&self, labels: &ConnLabels<'_>, o: &RequestOutcome<'_>) {
        if let Some(h) = self.request_handles(&RequestLabels::new(labels), o) {
            h.record(o);
        }
    }

    /// The four request series for one label set, admitted against the
    /// cap (`None`: over it, counted as an overflow, not recorded).
    fn request_handles(&self, l: &RequestLabels, o: &RequestOutcome<'_>) -> Option<RequestHandles> {
        let code = o.code.to_string();
        let tail = [
            o.protocol,
            o.flags,
            l.security.as_str(),
            &code,
            o.grpc_status,
        ];
        let values: Vec<String> = l
            .tcp
            .iter()
            .cloned()
            .chain(tail.map(String::from))
            .collect();
        let in_use = self.http_series.enter(&values)?;
        let v: Vec<&str> = values.iter().map(String::as_str).collect();
        Some(RequestHandles {
            _in_use: in_use,
            requests: self.requests.with_label_values(&v),
            duration: self.request_duration.with_label_values(&v),
            request_bytes: self.request_bytes.with_label_values(&v),
            response_bytes: self.response_bytes.with_label_values(&v),
        })
    }

    /// Records a finished request of a connection whose labels are fixed,
    /// through its [`RequestRecorder`].
    pub fn request_done_on(&self, r: &RequestRecorder, o: &RequestOutcome<'_>) {
        let mut cache = r.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Compared in place: the key is built only for a new outcome.
        let known = cache.iter().find(|((code, protocol, flags, grpc), _)| {
            *code == o.code && protocol == o.protocol && flags == o.flags && grpc == o.grpc_status
        });
        if let Some((_, h)) = known {
            h.record(o);
            return;
        }
        let Some(h) = self.request_handles(&r.labels, o) else {
            return;
        };
        h.record(o);
        if cache.len() < RequestRecorder::MAX_OUTCOMES {
            let key = (
                o.code,
                o.protocol.to_owned(),
                o.flags.to_owned(),
                o.grpc_status.to_owned(),
            );
            cache.push((key, h));
        }
    }
}
