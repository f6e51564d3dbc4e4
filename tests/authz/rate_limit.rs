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
