//! Local rate limiting from Istio's documented EnvoyFilter, enforced by
//! the destination's agent with a token bucket per workload.

use serde_json::json;

use super::*;

/// The EnvoyFilter of Istio's "Enabling Rate Limits using Envoy" task,
/// with this bucket, for `app: web`.
fn http_limit(max: u64, per_fill: u64, interval: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
        "metadata": {"name": "web-ratelimit", "namespace": "default"},
        "spec": {
            "workloadSelector": {"labels": {"app": "web"}},
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
                "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": {
                        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                        "value": {
                            "stat_prefix": "http_local_rate_limiter",
                            "token_bucket": {"max_tokens": max, "tokens_per_fill": per_fill, "fill_interval": interval},
                            "filter_enabled": {"runtime_key": "local_rate_limit_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                            "filter_enforced": {"runtime_key": "local_rate_limit_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                            "response_headers_to_add": [{"append": false, "header": {"key": "x-local-rate-limit", "value": "true"}}],
                        },
                    },
                }},
            }],
        },
    })
}

#[test]
fn a_burst_gets_the_bucket_and_the_rest_429() {
    let m = mesh("authz-ratelimit", &[]);
    m.apply(&[http_limit(5, 5, "60s")]);
    let url = format!("http://{VIP}:80/burst");
    let v = m.client.run_app(&["http-count", &url, "20"]).json();
    assert_eq!(
        v["answers"],
        json!({"hello from web": 5, "HTTP 429": 15}),
        "{v}"
    );
    let last = &v["last"];
    assert_eq!(last["headers"]["x-local-rate-limit"], "true", "{last}");
    assert_eq!(last["headers"]["x-mesh-response-flags"], "RL", "{last}");
    assert_eq!(last["body"], "local_rate_limited\n");
    let refused = m.agent_b.metrics().value(
        "mesh_rate_limited_total",
        &[
            ("unit", "requests"),
            ("filter", "default/web-ratelimit"),
            ("result", "refused"),
        ],
    );
    assert_eq!(refused, 15.0);
    // Another resource changing keeps the bucket (still empty).
    m.apply(&[
        http_limit(5, 5, "60s"),
        policy("all", json!({"rules": [{}]})),
    ]);
    assert_eq!(m.status("/after-change", &[]), 429, "the bucket was kept");

    // The configured rate over ten seconds: 10 per second (a bucket of 10
    // refilled by 10 every second), offered 20 per second.
    m.apply(&[http_limit(10, 10, "1s")]);
    let v = m
        .client
        .run_app(&["fixed-rate", &format!("http://{VIP}:80/rate"), "20", "10"])
        .json();
    let (ok, refused) = (
        v["requests"].as_u64().unwrap(),
        v["errors"].as_u64().unwrap(),
    );
    assert_eq!(ok + refused, 200, "{v}");
    // 100 from the refills plus the first, full bucket: 100..=110, ±10 %.
    assert!(
        (90..=121).contains(&ok),
        "accepted {ok} of 200 in 10 s at 10/s: {v}"
    );

    // Istio's per-route example: the filter enabled without a bucket, and
    // a bucket of 3 merged into the routes of vhost `inbound|http|8080`;
    // another port of the workload is not limited.
    let mut per_route = http_limit(3, 3, "60s");
    let enable = per_route["spec"]["configPatches"][0].clone();
    let mut enable = enable;
    enable["patch"]["value"]["typed_config"]["value"] =
        json!({"stat_prefix": "http_local_rate_limiter"});
    let mut route = json!({
        "applyTo": "HTTP_ROUTE",
        "match": {"context": "SIDECAR_INBOUND",
                  "routeConfiguration": {"vhost": {"name": "inbound|http|8080", "route": {"action": "ANY"}}}},
        "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {}}},
    });
    route["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"] =
        per_route["spec"]["configPatches"][0]["patch"]["value"]["typed_config"].clone();
    per_route["spec"]["configPatches"] = json!([enable, route]);
    m.apply(&[per_route]);
    let v = m.client.run_app(&["http-count", &url, "10"]).json();
    assert_eq!(
        v["answers"],
        json!({"hello from web": 3, "HTTP 429": 7}),
        "{v}"
    );
    let other = format!("http://{}/other-port", m.web.v4(7000));
    let v = m.client.run_app(&["http-count", &other, "10"]).json();
    assert_eq!(
        v["answers"],
        json!({"hello from web": 10}),
        "port 7000: {v}"
    );

    // Connections: `envoy.filters.network.local_ratelimit`, two per minute.
    let mut tcp = http_limit(2, 2, "60s");
    let patch = &mut tcp["spec"]["configPatches"][0];
    patch["applyTo"] = "NETWORK_FILTER".into();
    patch["patch"]["value"] = json!({
        "name": "envoy.filters.network.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "tcp_local_rate_limiter",
            "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"},
        },
    });
    m.apply(&[tcp]);
    let echo = m.web.v4(9000);
    assert!(m.echo(&m.client, &echo) && m.echo(&m.outsider, &echo));
    assert!(
        !m.echo(&m.client, &echo),
        "the third connection in a minute"
    );
    let refused = m.agent_b.metrics().value(
        "mesh_rate_limited_total",
        &[("unit", "connections"), ("result", "refused")],
    );
    assert_eq!(refused, 1.0);
}

/// Envoy's descriptors, in Istio's per-route form: the route's
/// `rate_limits` (here from another EnvoyFilter) turn each request into
/// descriptors (`:path` as `PATH`, a
/// matching `x-user` header as `header_match=bob`), and the descriptors
/// listed in the route's limit get buckets of their own; other requests
/// take from the route's default bucket.
#[test]
fn descriptors_give_paths_and_users_their_own_buckets() {
    let m = mesh("authz-ratelimit-descriptors", &[]);
    let mut f = http_limit(1, 1, "60s");
    let mut enable = f["spec"]["configPatches"][0].clone();
    enable["patch"]["value"]["typed_config"]["value"] =
        json!({"stat_prefix": "http_local_rate_limiter"});
    let vhost = json!({"context": "SIDECAR_INBOUND",
        "routeConfiguration": {"vhost": {"name": "inbound|http|8080", "route": {"action": "ANY"}}}});
    let limit = json!({
        "applyTo": "HTTP_ROUTE", "match": vhost,
        "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "value": {
                "stat_prefix": "http_local_rate_limiter",
                "token_bucket": {"max_tokens": 6, "tokens_per_fill": 6, "fill_interval": "60s"},
                "filter_enabled": {"runtime_key": "local_rate_limit_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"runtime_key": "local_rate_limit_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "always_consume_default_token_bucket": false,
                "descriptors": [
                    {"entries": [{"key": "PATH", "value": "/slow"}],
                     "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"}},
                    {"entries": [{"key": "header_match", "value": "bob"}],
                     "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "60s"}},
                ],
                "response_headers_to_add": [{"append": false, "header": {"key": "x-local-rate-limit", "value": "true"}}],
            },
        }}}},
    });
    // The route's rate_limits in a patch of their own, as often written.
    let rules = json!({
        "applyTo": "HTTP_ROUTE", "match": vhost,
        "patch": {"operation": "MERGE", "value": {"route": {"rate_limits": [
            {"actions": [{"request_headers": {"header_name": ":path", "descriptor_key": "PATH"}}]},
            {"actions": [{"header_value_match": {"descriptor_value": "bob",
                "headers": [{"name": "x-user", "string_match": {"exact": "bob"}}]}}]},
        ]}}},
    });
    f["spec"]["configPatches"] = json!([enable, limit]);
    // Envoy merges every HTTP_ROUTE patch into the route, whichever
    // EnvoyFilter it comes from.
    let mut r = http_limit(1, 1, "60s");
    r["metadata"]["name"] = "web-ratelimit-rules".into();
    r["spec"]["configPatches"] = json!([rules]);
    m.apply(&[f, r]);
    let count = |path: &str, headers: &[&str]| {
        let url = format!("http://{VIP}:80{path}");
        let mut args = vec!["http-count", &url, "4"];
        args.extend_from_slice(headers);
        m.client.run_app(&args).json()["answers"].clone()
    };
    assert_eq!(
        count("/slow", &[]),
        json!({"hello from web": 2, "HTTP 429": 2}),
        "/slow has a bucket of 2"
    );
    assert_eq!(
        count("/./slow", &[]),
        json!({"HTTP 429": 4}),
        "the path is normalized before it makes a descriptor"
    );
    assert_eq!(
        count("/alice", &["x-user: alice"]),
        json!({"hello from web": 4}),
        "no descriptor matches: the default bucket (6)"
    );
    assert_eq!(
        count("/bob", &["x-user: bob"]),
        json!({"hello from web": 1, "HTTP 429": 3}),
        "x-user: bob has a bucket of 1"
    );
    assert_eq!(
        count("/other", &[]),
        json!({"hello from web": 2, "HTTP 429": 2}),
        "the default bucket had 2 left: the descriptors' requests did not take from it"
    );
}
