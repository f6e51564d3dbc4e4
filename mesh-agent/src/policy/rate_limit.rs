//! Local rate limiting, in the one shape Istio documents: an EnvoyFilter
//! that inserts `envoy.filters.http.local_ratelimit` (requests) or
//! `envoy.filters.network.local_ratelimit` (connections) into the inbound
//! listener of the workloads it selects. The destination's agent keeps a
//! token bucket per workload and filter, as each Envoy sidecar would:
//!
//! * `token_bucket`: `max_tokens`, `tokens_per_fill` (default 1),
//!   `fill_interval`; a request (connection) takes a token or is refused —
//!   `429` with flag `RL` and `response_headers_to_add` for HTTP, a reset
//!   for TCP;
//! * `filter_enabled` / `filter_enforced`: the share of requests the
//!   bucket sees, and the share of those over the limit that are refused
//!   (the others are only counted);
//! * a bucket starts full and is rebuilt when its EnvoyFilter changes.
//!
//! Any other patch is ignored: this data plane has no Envoy to patch.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::Value;

use crate::{
    istio::{Resource, Spec},
    workload::Workload,
};

const HTTP_FILTER: &str = "envoy.filters.http.local_ratelimit";
const NETWORK_FILTER: &str = "envoy.filters.network.local_ratelimit";

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Requests,
    Connections,
}

/// One rate limit, as configured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    pub unit: Unit,
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    #[serde(serialize_with = "as_text")]
    pub fill_interval: Duration,
    /// Fractions of 1.
    pub enabled: f64,
    pub enforced: f64,
    #[serde(skip)]
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
}

fn as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// A patch of an EnvoyFilter: `Ok(Some)` a local rate limit this data
/// plane enforces, `Ok(None)` anything else (ignored), `Err` a rate limit
/// it cannot read (the field and why).
pub fn parse_patch(p: &Value) -> Result<Option<Limit>, (String, String)> {
    let unit = match p["applyTo"].as_str() {
        Some("HTTP_FILTER") => Unit::Requests,
        Some("NETWORK_FILTER") => Unit::Connections,
        _ => return Ok(None),
    };
    let value = &p["patch"]["value"];
    let wanted = match unit {
        Unit::Requests => HTTP_FILTER,
        Unit::Connections => NETWORK_FILTER,
    };
    if value["name"].as_str() != Some(wanted) {
        return Ok(None);
    }
    let err = |f: &str, why: &str| Err((f.to_owned(), why.to_owned()));
    match p["match"]["context"].as_str() {
        None | Some("SIDECAR_INBOUND") | Some("ANY") => {}
        Some(other) => {
            return err(
                "match.context",
                &format!("{other}: only SIDECAR_INBOUND (or ANY) applies to this data plane"),
            );
        }
    }
    // `typed_config` is a TypedStruct (`value` holds the config) or the
    // config itself.
    let typed = &value["typed_config"];
    let config = if typed["value"].is_object() {
        &typed["value"]
    } else {
        typed
    };
    let bucket = &config["token_bucket"];
    if !bucket.is_object() {
        return err("patch.value.typed_config.value.token_bucket", "required");
    }
    let number = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok());
    let Some(max_tokens) = number(&bucket["max_tokens"]).filter(|n| *n > 0) else {
        return err("token_bucket.max_tokens", "a positive integer is required");
    };
    let tokens_per_fill = match &bucket["tokens_per_fill"] {
        Value::Null => 1,
        v => match number(v).filter(|n| *n > 0) {
            Some(n) => n,
            None => return err("token_bucket.tokens_per_fill", "a positive integer"),
        },
    };
    let fill_interval = match bucket["fill_interval"]
        .as_str()
        .and_then(|s| s.parse::<crate::istio::common::Duration>().ok())
        .map(|d| d.get())
    {
        Some(d) if d >= Duration::from_millis(50) => d,
        _ => {
            return err(
                "token_bucket.fill_interval",
                "a duration of at least 50ms (Envoy's minimum) is required",
            );
        }
    };
    let fraction = |v: &Value| -> Result<f64, (String, String)> {
        if v.is_null() {
            return Ok(1.0);
        }
        let d = &v["default_value"];
        let num = number(&d["numerator"]).unwrap_or(0) as f64;
        let den = match d["denominator"].as_str().unwrap_or("HUNDRED") {
            "HUNDRED" => 100.0,
            "TEN_THOUSAND" => 10_000.0,
            "MILLION" => 1_000_000.0,
            other => {
                return Err((
                    "default_value.denominator".into(),
                    format!("{other}: HUNDRED, TEN_THOUSAND or MILLION"),
                ));
            }
        };
        Ok((num / den).clamp(0.0, 1.0))
    };
    // The network filter has no enabled/enforced shares: always on.
    let (enabled, enforced) = match unit {
        Unit::Requests => (
            fraction(&config["filter_enabled"])?,
            fraction(&config["filter_enforced"])?,
        ),
        Unit::Connections => (1.0, 1.0),
    };
    let response_headers = config["response_headers_to_add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let k = HeaderName::from_bytes(h["header"]["key"].as_str()?.as_bytes()).ok()?;
            let v = HeaderValue::from_str(h["header"]["value"].as_str()?).ok()?;
            Some((k, v))
        })
        .collect();
    Ok(Some(Limit {
        unit,
        max_tokens,
        tokens_per_fill,
        fill_interval,
        enabled,
        enforced,
        response_headers,
    }))
}

/// The rate limits of an EnvoyFilter resource, with its scope.
#[derive(Debug, Clone)]
pub struct FilterLimits {
    pub id: String,
    namespace: String,
    selector: BTreeMap<String, String>,
    pub limits: Vec<Limit>,
}

impl FilterLimits {
    pub fn from_resource(r: &Resource) -> Option<Self> {
        let Spec::EnvoyFilter(s) = &r.spec else {
            return None;
        };
        if !s.target_refs.is_empty() {
            return None;
        }
        let limits: Vec<Limit> = s
            .config_patches
            .iter()
            .filter_map(|p| parse_patch(p).ok().flatten())
            .collect();
        (!limits.is_empty()).then(|| Self {
            id: format!("{}/{}", r.metadata.namespace, r.metadata.name),
            namespace: r.metadata.namespace.clone(),
            selector: s
                .workload_selector
                .as_ref()
                .map(|w| w.labels.clone())
                .unwrap_or_default(),
            limits,
        })
    }

    /// Istio's EnvoyFilter scope: its namespace, or every namespace from
    /// the root namespace; `workloadSelector` labels must all match.
    pub fn applies_to(&self, w: &Workload, root_namespace: &str) -> bool {
        (self.namespace == w.namespace || self.namespace == root_namespace)
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

/// One workload's bucket for one limit.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limiter {
    /// The EnvoyFilter, `namespace/name`.
    pub filter: String,
    #[serde(flatten)]
    pub limit: Limit,
    #[serde(skip)]
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: u64,
    last_fill: Instant,
}

/// What a limiter says about one request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Over the limit and refused.
    Refused,
    /// Over the limit, but `filter_enforced` let it through.
    OverNotEnforced,
}

impl Limiter {
    pub fn new(filter: &str, limit: Limit) -> Self {
        Self {
            filter: filter.into(),
            bucket: Mutex::new(Bucket {
                tokens: limit.max_tokens,
                last_fill: Instant::now(),
            }),
            limit,
        }
    }

    /// Takes a token, if the request is one the filter sees.
    pub fn admit(&self) -> Admit {
        if self.limit.enabled < 1.0 && fastrand::f64() >= self.limit.enabled {
            return Admit::Yes;
        }
        if self.take(Instant::now()) {
            return Admit::Yes;
        }
        if self.limit.enforced >= 1.0 || fastrand::f64() < self.limit.enforced {
            Admit::Refused
        } else {
            Admit::OverNotEnforced
        }
    }

    fn take(&self, now: Instant) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let interval = self.limit.fill_interval;
        let fills =
            (now.saturating_duration_since(b.last_fill).as_nanos() / interval.as_nanos()) as u64;
        if fills > 0 {
            b.tokens = b
                .tokens
                .saturating_add(fills.saturating_mul(self.limit.tokens_per_fill))
                .min(self.limit.max_tokens);
            b.last_fill += interval * u32::try_from(fills).unwrap_or(u32::MAX);
        }
        if b.tokens == 0 {
            return false;
        }
        b.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patch from Istio's "Enabling Rate Limits using Envoy" task.
    fn istio_task_patch() -> Value {
        serde_json::json!({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "value": {
                        "stat_prefix": "http_local_rate_limiter",
                        "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "60s"},
                        "filter_enabled": {"runtime_key": "local_rate_limit_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "filter_enforced": {"runtime_key": "local_rate_limit_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "response_headers_to_add": [{"append_action": "APPEND_IF_EXISTS_OR_ADD", "header": {"key": "x-local-rate-limit", "value": "true"}}],
                    },
                },
            }},
        })
    }

    #[test]
    fn reads_istios_documented_shape() {
        let l = parse_patch(&istio_task_patch()).unwrap().unwrap();
        assert_eq!(
            (l.unit, l.max_tokens, l.tokens_per_fill),
            (Unit::Requests, 4, 4)
        );
        assert_eq!(l.fill_interval, Duration::from_secs(60));
        assert_eq!((l.enabled, l.enforced), (1.0, 1.0));
        assert_eq!(l.response_headers[0].0, "x-local-rate-limit");
        let mut other = istio_task_patch();
        other["patch"]["value"]["name"] = "envoy.filters.http.lua".into();
        assert!(
            parse_patch(&other).unwrap().is_none(),
            "other filters are ignored"
        );
        let mut bad = istio_task_patch();
        bad["patch"]["value"]["typed_config"]["value"]["token_bucket"]["fill_interval"] =
            "1ms".into();
        assert_eq!(
            parse_patch(&bad).unwrap_err().0,
            "token_bucket.fill_interval"
        );
        let mut outbound = istio_task_patch();
        outbound["match"]["context"] = "SIDECAR_OUTBOUND".into();
        assert_eq!(parse_patch(&outbound).unwrap_err().0, "match.context");
    }

    #[test]
    fn the_bucket_refills_by_whole_intervals_up_to_its_size() {
        let mut l = parse_patch(&istio_task_patch()).unwrap().unwrap();
        l.max_tokens = 3;
        l.tokens_per_fill = 2;
        l.fill_interval = Duration::from_secs(1);
        let lim = Limiter::new("ns/f", l);
        let t0 = lim.bucket.lock().unwrap().last_fill;
        assert!(lim.take(t0) && lim.take(t0) && lim.take(t0));
        assert!(!lim.take(t0 + Duration::from_millis(999)));
        assert!(lim.take(t0 + Duration::from_millis(1000)));
        assert!(lim.take(t0 + Duration::from_millis(1500)));
        assert!(!lim.take(t0 + Duration::from_millis(1999)));
        // Ten intervals later: full (3), not 20.
        let later = t0 + Duration::from_secs(11);
        assert!(lim.take(later) && lim.take(later) && lim.take(later));
        assert!(!lim.take(later));
    }
}
