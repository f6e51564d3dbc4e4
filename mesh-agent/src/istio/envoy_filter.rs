//! `networking.istio.io/v1alpha3` EnvoyFilter: patches to Envoy's
//! configuration, kept as written. This data plane has no Envoy to patch;
//! it reads the one shape Istio documents for local rate limiting
//! ([`read_patches`], enforced by `policy::rate_limit`) and reports every
//! other patch as ignored.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    common::PolicyTargetReference,
    networking::{WorkloadLabels, spec},
};

mod descriptors;
pub use descriptors::{
    BucketSpec, DescriptorLimit, Entries, FieldError, RateLimitRule, RequestFacts,
};
use descriptors::{parse_descriptors, parse_rate_limits};

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
    /// The default bucket: requests no descriptor matches (and, with
    /// `always_consume_default_token_bucket`, every request).
    #[serde(flatten)]
    pub bucket: BucketSpec,
    /// Fractions of 1.
    pub enabled: f64,
    pub enforced: f64,
    /// The status of a refused request (`status`, default 429).
    pub status: u16,
    #[serde(skip)]
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Added to a request over the limit that is let through
    /// (`request_headers_to_add_when_not_enforced`).
    #[serde(skip)]
    pub request_headers_not_enforced: Vec<(HeaderName, HeaderValue)>,
    /// Fields set that this data plane does not enforce.
    #[serde(skip)]
    pub not_enforced: Vec<&'static str>,
    /// `rate_limits` entries left out (an action this data plane does not
    /// have), with why.
    #[serde(skip)]
    pub skipped_rules: Vec<FieldError>,
    /// The port of an `HTTP_ROUTE` limit (its vhost `inbound|http|PORT`);
    /// `None`: every request of the workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Descriptors with a bucket of their own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<DescriptorLimit>,
    /// What makes a request's descriptors: the route's `rate_limits` (or
    /// the filter's own).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitRule>,
    pub always_consume_default: bool,
    /// The filter's `stage`: only `rate_limits` of that stage apply.
    #[serde(skip)]
    stage: u64,
    /// Everything it was read from: equal sources, the same limit.
    #[serde(skip)]
    source: Value,
}

fn as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

impl Limit {
    /// The same limit, as configured (a bucket carries over).
    pub fn same_as(&self, o: &Limit) -> bool {
        self.unit == o.unit
            && self.port == o.port
            && self.bucket == o.bucket
            && self.source == o.source
    }

    /// Whether the limit counts a request (connection) to `port`.
    pub fn covers(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// The descriptors of a request, for the descriptors with a bucket;
    /// none when no descriptor has one (nothing to match).
    pub fn request_descriptors(&self, req: &RequestFacts<'_>) -> Vec<Entries> {
        if self.descriptors.is_empty() {
            return Vec::new();
        }
        self.rate_limits
            .iter()
            .filter(|r| r.stage == self.stage && r.port.is_none_or(|p| p == req.port))
            .filter_map(|r| r.descriptor(req))
            .collect()
    }

    /// Takes the `rate_limits` that route-only patches add to the routes
    /// this limit counts (Envoy merges every patch into the route, from
    /// any EnvoyFilter), unless the filter has `rate_limits` of its own,
    /// which replace the route's.
    pub fn add_route_rules(&mut self, rules: &[RateLimitRule]) {
        if self.unit != Unit::Requests || !self.source["config"]["rate_limits"].is_null() {
            return;
        }
        for r in rules {
            if r.port.is_some_and(|p| self.covers(p)) {
                self.rate_limits.push(r.clone());
                let added = &mut self.source["added"];
                if !added.is_array() {
                    *added = Value::Array(Vec::new());
                }
                if let Value::Array(a) = added {
                    a.push(serde_json::json!({"port": r.port, "rule": r}));
                }
            }
        }
    }
}

/// What one patch of an EnvoyFilter is to this data plane.
#[derive(Debug)]
pub enum PatchUse {
    /// A local rate limit, enforced.
    Limit(Box<Limit>),
    /// The bucket-less `HTTP_FILTER` that enables per-route limits.
    EnablesRouteLimits,
    /// An `HTTP_ROUTE` patch adding `rate_limits` alone: they make the
    /// descriptors of the limits on that port; `skipped`, entries left
    /// out (and why).
    RouteRules {
        rules: Vec<RateLimitRule>,
        skipped: Vec<FieldError>,
    },
    /// Anything else: this data plane has no Envoy to patch.
    Ignored,
}

/// Every patch of an EnvoyFilter, in order: `Err` is a rate limit this
/// data plane cannot read (the field and why). The `rate_limits` of
/// route-only patches are added to the request limits on their port.
pub fn read_patches(patches: &[Value]) -> Vec<Result<PatchUse, FieldError>> {
    let mut out: Vec<_> = patches.iter().map(read_patch).collect();
    let rules = route_rules(&out);
    for u in &mut out {
        if let Ok(PatchUse::Limit(l)) = u {
            l.add_route_rules(&rules);
        }
    }
    out
}

/// The rules of the route-only patches among `read`.
pub fn route_rules(read: &[Result<PatchUse, FieldError>]) -> Vec<RateLimitRule> {
    read.iter()
        .filter_map(|u| match u {
            Ok(PatchUse::RouteRules { rules, .. }) => Some(rules.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A patch alone: `Ok(Some)` a limit it sets.
#[cfg(test)]
pub fn parse_patch(p: &Value) -> Result<Option<Limit>, FieldError> {
    read_patch(p).map(|u| match u {
        PatchUse::Limit(l) => Some(*l),
        _ => None,
    })
}

fn read_patch(p: &Value) -> Result<PatchUse, FieldError> {
    if p["applyTo"].as_str() == Some("HTTP_ROUTE") {
        return read_route_patch(p);
    }
    let unit = match p["applyTo"].as_str() {
        Some("HTTP_FILTER") => Unit::Requests,
        Some("NETWORK_FILTER") => Unit::Connections,
        _ => return Ok(PatchUse::Ignored),
    };
    let value = &p["patch"]["value"];
    let wanted = match unit {
        Unit::Requests => HTTP_FILTER,
        Unit::Connections => NETWORK_FILTER,
    };
    if value["name"].as_str() != Some(wanted) {
        return Ok(PatchUse::Ignored);
    }
    inbound_context(p)?;
    let config = typed_value(&value["typed_config"]);
    // The filter without a bucket only enables the per-route limits of
    // `HTTP_ROUTE` patches (Istio's per-route example).
    if unit == Unit::Requests && config["token_bucket"].is_null() {
        return Ok(PatchUse::EnablesRouteLimits);
    }
    limit_of(config, unit, None, &Value::Null).map(|l| PatchUse::Limit(Box::new(l)))
}

/// Only the inbound side (the destination's agent) applies here.
fn inbound_context(p: &Value) -> Result<(), FieldError> {
    match p["match"]["context"].as_str() {
        None | Some("SIDECAR_INBOUND") | Some("ANY") => Ok(()),
        Some(other) => Err((
            "match.context".into(),
            format!("{other}: only SIDECAR_INBOUND (or ANY) applies to this data plane"),
        )),
    }
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

/// The inbound port of an `HTTP_ROUTE` patch: its vhost `inbound|http|PORT`.
fn route_port(p: &Value) -> Result<u16, FieldError> {
    let vhost = p["match"]["routeConfiguration"]["vhost"]["name"]
        .as_str()
        .unwrap_or_default();
    vhost
        .strip_prefix("inbound|http|")
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| {
            (
                "match.routeConfiguration.vhost.name".to_owned(),
                format!("{vhost:?}: inbound|http|PORT is required (the inbound port it limits)"),
            )
        })
}

/// Istio's per-route local rate limit: an `HTTP_ROUTE` patch merging
/// `typed_per_filter_config` (and the route's `rate_limits`, which make
/// the descriptors) into the routes of vhost `inbound|http|PORT`.
fn read_route_patch(p: &Value) -> Result<PatchUse, FieldError> {
    let value = &p["patch"]["value"];
    let per_filter = &value["typed_per_filter_config"][HTTP_FILTER];
    let rules = &value["route"]["rate_limits"];
    if per_filter.is_null() && rules.is_null() {
        return Ok(PatchUse::Ignored);
    }
    if per_filter.is_null() {
        // Route `rate_limits` alone may be for a global rate limit service
        // or another proxy: only those of an inbound vhost are read.
        let (Ok(()), Ok(port)) = (inbound_context(p), route_port(p)) else {
            return Ok(PatchUse::Ignored);
        };
        let (rules, skipped) =
            parse_rate_limits(rules, "patch.value.route.rate_limits", Some(port))?;
        return Ok(PatchUse::RouteRules { rules, skipped });
    }
    inbound_context(p)?;
    let port = route_port(p)?;
    limit_of(typed_value(per_filter), Unit::Requests, Some(port), rules)
        .map(|l| PatchUse::Limit(Box::new(l)))
}

/// A token bucket: `max_tokens`, `tokens_per_fill` (default 1),
/// `fill_interval` (at least 50 ms, Envoy's minimum).
fn bucket_of(bucket: &Value, at: &str) -> Result<BucketSpec, FieldError> {
    let err = |f: &str, why: &str| Err((format!("{at}.{f}"), why.to_owned()));
    if !bucket.is_object() {
        return Err((at.to_owned(), "required".to_owned()));
    }
    let Some(max_tokens) = number(&bucket["max_tokens"]).filter(|n| *n > 0) else {
        return err("max_tokens", "a positive integer is required");
    };
    let tokens_per_fill = match &bucket["tokens_per_fill"] {
        Value::Null => 1,
        v => match number(v).filter(|n| *n > 0) {
            Some(n) => n,
            None => return err("tokens_per_fill", "a positive integer"),
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
                "fill_interval",
                "a duration of at least 50ms (Envoy's minimum) is required",
            );
        }
    };
    Ok(BucketSpec {
        max_tokens,
        tokens_per_fill,
        fill_interval,
    })
}

/// A LocalRateLimit configuration: its buckets and shares; `route_rules`
/// are the `rate_limits` of the route it is merged into.
fn limit_of(
    config: &Value,
    unit: Unit,
    port: Option<u16>,
    route_rules: &Value,
) -> Result<Limit, FieldError> {
    let bucket = bucket_of(&config["token_bucket"], "token_bucket")?;
    // Absent, a share is 0 % in Envoy ("for safety"): a filter without
    // `filter_enabled` limits nothing, one without `filter_enforced` only
    // counts.
    let fraction = |v: &Value| -> Result<f64, FieldError> {
        if v.is_null() {
            return Ok(0.0);
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
    // The network filter has no enabled/enforced shares nor descriptors.
    let (enabled, enforced) = match unit {
        Unit::Requests => (
            fraction(&config["filter_enabled"])?,
            fraction(&config["filter_enforced"])?,
        ),
        Unit::Connections => (1.0, 1.0),
    };
    let status = match &config["status"]["code"] {
        Value::Null => 429,
        v => match status_code(v) {
            Some(c) => c,
            None => {
                return Err((
                    "status.code".into(),
                    format!("{v}: an HTTP status from 400 to 599 (a number or Envoy's name)"),
                ));
            }
        },
    };
    // What this data plane does not do, for `validate` to say.
    let mut not_enforced = Vec::new();
    for (field, set) in [
        (
            "local_rate_limit_per_downstream_connection",
            config["local_rate_limit_per_downstream_connection"] == true,
        ),
        (
            "local_cluster_rate_limit",
            !config["local_cluster_rate_limit"].is_null(),
        ),
        (
            "enable_x_ratelimit_headers",
            config["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03",
        ),
        (
            "rate_limited_as_resource_exhausted",
            config["rate_limited_as_resource_exhausted"] == true,
        ),
        ("vh_rate_limits", !config["vh_rate_limits"].is_null()),
    ] {
        if set {
            not_enforced.push(field);
        }
    }
    let (descriptors, (rate_limits, skipped_rules), stage) = match unit {
        Unit::Requests => {
            let stage = number(&config["stage"]).unwrap_or(0);
            let descriptors =
                parse_descriptors(&config["descriptors"], bucket.fill_interval, bucket_of)?;
            // The filter's own `rate_limits` (newer Envoy) replace the
            // route's.
            let rules = if config["rate_limits"].is_null() {
                parse_rate_limits(route_rules, "patch.value.route.rate_limits", port)?
            } else {
                parse_rate_limits(&config["rate_limits"], "rate_limits", port)?
            };
            (descriptors, rules, stage)
        }
        Unit::Connections => (Vec::new(), Default::default(), 0),
    };
    Ok(Limit {
        unit,
        bucket,
        enabled,
        enforced,
        status,
        response_headers: headers_of(&config["response_headers_to_add"]),
        request_headers_not_enforced: headers_of(
            &config["request_headers_to_add_when_not_enforced"],
        ),
        not_enforced,
        skipped_rules,
        port,
        descriptors,
        rate_limits,
        always_consume_default: config["always_consume_default_token_bucket"]
            .as_bool()
            .unwrap_or(true),
        stage,
        source: serde_json::json!({"config": config, "route": route_rules}),
    })
}

/// A protobuf integer as JSON has it: a number, or (64-bit) a string.
fn number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// A `HeaderValueOption` list's headers.
fn headers_of(v: &Value) -> Vec<(HeaderName, HeaderValue)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let k = HeaderName::from_bytes(h["header"]["key"].as_str()?.as_bytes()).ok()?;
            let v = HeaderValue::from_str(h["header"]["value"].as_str()?).ok()?;
            Some((k, v))
        })
        .collect()
}

/// An `HttpStatus` code: a number, or the name of Envoy's `StatusCode`
/// enum for the common ones.
fn status_code(v: &Value) -> Option<u16> {
    let n = v.as_u64().or_else(|| {
        Some(match v.as_str()? {
            "BadRequest" => 400,
            "Unauthorized" => 401,
            "Forbidden" => 403,
            "NotFound" => 404,
            "TooManyRequests" => 429,
            "InternalServerError" => 500,
            "BadGateway" => 502,
            "ServiceUnavailable" => 503,
            "GatewayTimeout" => 504,
            s => s.parse().ok()?,
        })
    })?;
    u16::try_from(n).ok().filter(|c| (400..600).contains(c))
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
        assert!(matches!(
            read_patch(&enable),
            Ok(PatchUse::EnablesRouteLimits)
        ));
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
        assert_eq!((l.port, l.bucket.max_tokens), (Some(9080), 4));
        assert!(l.covers(9080) && !l.covers(8080));
        assert!(l.descriptors.is_empty() && l.rate_limits.is_empty());
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
            (l.unit, l.bucket.max_tokens, l.bucket.tokens_per_fill),
            (Unit::Requests, 4, 4)
        );
        assert_eq!(l.bucket.fill_interval, Duration::from_secs(60));
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

    /// Envoy's descriptor example, the Istio way: the filter on, a route
    /// patch with the per-route bucket and its descriptors, and another
    /// adding the route's `rate_limits` (merged into the same routes).
    #[test]
    fn route_rate_limits_make_the_descriptors_of_the_limits_on_their_port() {
        let route = |value: Value| {
            serde_json::json!({
                "applyTo": "HTTP_ROUTE",
                "match": {"context": "SIDECAR_INBOUND", "routeConfiguration": {"vhost": {"name": "inbound|http|8080", "route": {"action": "ANY"}}}},
                "patch": {"operation": "MERGE", "value": value},
            })
        };
        let limit = route(
            serde_json::json!({"typed_per_filter_config": {HTTP_FILTER: {"value": {
                "token_bucket": {"max_tokens": 10, "fill_interval": "60s"},
                "descriptors": [{"entries": [{"key": "PATH", "value": "/slow"}],
                                 "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}}],
            }}}}),
        );
        let rules = route(serde_json::json!({"route": {"rate_limits": [
            {"actions": [{"request_headers": {"header_name": ":path", "descriptor_key": "PATH"}}]}]}}));
        let read = read_patches(&[limit.clone(), rules.clone()]);
        assert!(matches!(read[1], Ok(PatchUse::RouteRules { .. })));
        let Ok(PatchUse::Limit(l)) = &read[0] else {
            panic!("{read:?}")
        };
        assert_eq!(l.descriptors.len(), 1);
        assert_eq!(l.rate_limits.len(), 1, "the other patch's rate_limits");
        let alone = parse_patch(&limit).unwrap().unwrap();
        assert!(alone.rate_limits.is_empty());
        assert!(!alone.same_as(l), "the rules are part of the limit");
        // Two rules patches on one port: a change to either is a change.
        let limit_of = |patches: &[Value]| match read_patches(patches).remove(0) {
            Ok(PatchUse::Limit(l)) => *l,
            other => panic!("{other:?}"),
        };
        let mut changed = rules.clone();
        changed["patch"]["value"]["route"]["rate_limits"][0]["actions"][0]["request_headers"]["descriptor_key"] =
            "OTHER".into();
        let two = limit_of(&[limit.clone(), rules.clone(), rules.clone()]);
        assert_eq!(two.rate_limits.len(), 2);
        assert!(!two.same_as(&limit_of(&[limit.clone(), changed, rules.clone()])));
        let mut bad = rules.clone();
        bad["patch"]["value"]["route"]["rate_limits"][0]["actions"][0] =
            serde_json::json!({"query_parameters": {}});
        let Ok(PatchUse::RouteRules {
            rules: kept,
            skipped,
        }) = read_patches(&[limit, bad]).remove(1)
        else {
            panic!("route rules")
        };
        assert!(kept.is_empty());
        assert_eq!(
            skipped[0].0,
            "patch.value.route.rate_limits[0].actions[0].query_parameters"
        );
        // Rules for another proxy's routes are not this data plane's.
        let mut outbound = rules;
        outbound["match"]["context"] = "SIDECAR_OUTBOUND".into();
        assert!(matches!(read_patch(&outbound), Ok(PatchUse::Ignored)));
    }

    /// Envoy's defaults and the other fields of LocalRateLimit.
    #[test]
    fn absent_shares_are_zero_and_the_extras_are_read() {
        let mut p = istio_task_patch();
        let c = &mut p["patch"]["value"]["typed_config"]["value"];
        let o = c.as_object_mut().unwrap();
        o.remove("filter_enabled");
        o.remove("filter_enforced");
        c["status"] = serde_json::json!({"code": "ServiceUnavailable"});
        c["request_headers_to_add_when_not_enforced"] = serde_json::json!([{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "header": {"key": "x-over-limit", "value": "1"}}]);
        c["local_rate_limit_per_downstream_connection"] = true.into();
        let l = parse_patch(&p).unwrap().unwrap();
        assert_eq!((l.enabled, l.enforced, l.status), (0.0, 0.0, 503));
        assert_eq!(l.request_headers_not_enforced[0].0, "x-over-limit");
        assert_eq!(
            l.not_enforced,
            ["local_rate_limit_per_downstream_connection"]
        );
        assert_eq!(
            parse_patch(&istio_task_patch()).unwrap().unwrap().status,
            429
        );
        p["patch"]["value"]["typed_config"]["value"]["status"] = serde_json::json!({"code": 200});
        assert_eq!(parse_patch(&p).unwrap_err().0, "status.code");
    }
}
