//! `networking.istio.io/v1alpha3` EnvoyFilter: patches to Envoy's
//! configuration, kept as written. This data plane has no Envoy to patch;
//! it reads the one shape Istio documents for local rate limiting
//! ([`parse_patch`], enforced by `policy::rate_limit`) and reports every
//! other patch as ignored.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    common::PolicyTargetReference,
    networking::{WorkloadLabels, spec},
};

spec! {
    pub struct EnvoyFilter {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub workload_selector: Option<WorkloadLabels>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub target_refs: Vec<PolicyTargetReference>,
        /// Envoy configuration fragments: free-form.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub config_patches: Vec<serde_json::Value>,
        #[serde(skip_serializing_if = "is_zero")]
        pub priority: i32,
    }
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

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
    /// The port of an `HTTP_ROUTE` limit (its vhost `inbound|http|PORT`);
    /// `None`: every request of the workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

impl Limit {
    /// The same limit, as configured (a bucket carries over).
    pub fn same_as(&self, o: &Limit) -> bool {
        self.unit == o.unit
            && self.max_tokens == o.max_tokens
            && self.tokens_per_fill == o.tokens_per_fill
            && self.fill_interval == o.fill_interval
            && self.enabled == o.enabled
            && self.enforced == o.enforced
            && self.response_headers == o.response_headers
            && self.port == o.port
    }

    /// Whether the limit counts a request (connection) to `port`.
    pub fn covers(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// A patch of an EnvoyFilter: `Ok(Some)` a local rate limit this data
/// plane enforces, `Ok(None)` anything else (ignored), `Err` a rate limit
/// it cannot read (the field and why).
pub fn parse_patch(p: &Value) -> Result<Option<Limit>, (String, String)> {
    if p["applyTo"].as_str() == Some("HTTP_ROUTE") {
        return parse_route_patch(p);
    }
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
    inbound_context(p)?;
    let config = typed_value(&value["typed_config"]);
    // The filter without a bucket only enables the per-route limits of
    // `HTTP_ROUTE` patches (Istio's per-route example).
    if unit == Unit::Requests && config["token_bucket"].is_null() {
        return Ok(None);
    }
    limit_of(config, unit, None)
}

/// Only the inbound side (the destination's agent) applies here.
fn inbound_context(p: &Value) -> Result<(), (String, String)> {
    match p["match"]["context"].as_str() {
        None | Some("SIDECAR_INBOUND") | Some("ANY") => Ok(()),
        Some(other) => Err((
            "match.context".into(),
            format!("{other}: only SIDECAR_INBOUND (or ANY) applies to this data plane"),
        )),
    }
}

/// Whether a patch is the bucket-less `HTTP_FILTER` that enables per-route
/// limits: read, not ignored.
pub fn enables_route_limits(p: &Value) -> bool {
    p["applyTo"].as_str() == Some("HTTP_FILTER")
        && p["patch"]["value"]["name"].as_str() == Some(HTTP_FILTER)
        && typed_value(&p["patch"]["value"]["typed_config"])["token_bucket"].is_null()
}

/// Whether an `HTTP_ROUTE` limit has `descriptors` (not enforced: its
/// route's bucket applies to every request).
pub fn has_descriptors(p: &Value) -> bool {
    !typed_value(&p["patch"]["value"]["typed_per_filter_config"][HTTP_FILTER])["descriptors"]
        .is_null()
}

/// `typed_config` as a TypedStruct (`value` holds the config) or the
/// config itself.
fn typed_value(typed: &Value) -> &Value {
    if typed["value"].is_object() {
        &typed["value"]
    } else {
        typed
    }
}

/// Istio's per-route local rate limit: an `HTTP_ROUTE` patch merging
/// `typed_per_filter_config` into the routes of vhost `inbound|http|PORT`.
fn parse_route_patch(p: &Value) -> Result<Option<Limit>, (String, String)> {
    let per_filter = &p["patch"]["value"]["typed_per_filter_config"][HTTP_FILTER];
    if per_filter.is_null() {
        return Ok(None);
    }
    let err = |f: &str, why: &str| Err((f.to_owned(), why.to_owned()));
    inbound_context(p)?;
    let vhost = p["match"]["routeConfiguration"]["vhost"]["name"]
        .as_str()
        .unwrap_or_default();
    let Some(port) = vhost
        .strip_prefix("inbound|http|")
        .and_then(|p| p.parse::<u16>().ok())
    else {
        return err(
            "match.routeConfiguration.vhost.name",
            &format!("{vhost:?}: inbound|http|PORT is required (the inbound port it limits)"),
        );
    };
    limit_of(typed_value(per_filter), Unit::Requests, Some(port))
}

/// A LocalRateLimit configuration's bucket and shares.
fn limit_of(
    config: &Value,
    unit: Unit,
    port: Option<u16>,
) -> Result<Option<Limit>, (String, String)> {
    let err = |f: &str, why: &str| Err((f.to_owned(), why.to_owned()));
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
        .and_then(|s| s.parse::<super::common::Duration>().ok())
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
        port,
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The patch from Istio's "Enabling Rate Limits using Envoy" task.
    pub(crate) fn istio_task_patch() -> Value {
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
    fn reads_istios_per_route_example() {
        let enable = serde_json::json!({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "value": {"stat_prefix": "http_local_rate_limiter"}}}},
        });
        assert!(parse_patch(&enable).unwrap().is_none() && enables_route_limits(&enable));
        let mut route = serde_json::json!({
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "SIDECAR_INBOUND", "routeConfiguration": {"vhost": {"name": "inbound|http|9080", "route": {"action": "ANY"}}}},
            "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "value": {"stat_prefix": "http_local_rate_limiter",
                          "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "60s"}}}}}},
        });
        let l = parse_patch(&route).unwrap().unwrap();
        assert_eq!((l.port, l.max_tokens), (Some(9080), 4));
        assert!(l.covers(9080) && !l.covers(8080));
        assert!(!has_descriptors(&route));
        route["match"]["routeConfiguration"]["vhost"]["name"] = "outbound|80||web".into();
        assert_eq!(
            parse_patch(&route).unwrap_err().0,
            "match.routeConfiguration.vhost.name"
        );
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
}
