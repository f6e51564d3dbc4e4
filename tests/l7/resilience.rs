//! Faults, timeouts and retries: what a route does when the upstream is
//! slow or fails, and what it makes fail on purpose.

use std::time::Duration;

use mesh_tests::sys::wait_until;
use serde_json::json;

use super::*;

#[test]
fn fault_abort_answers_its_share_of_requests_and_flags_them_fi() {
    let w = web_routes(
        "l7-abort",
        json!([{"name": "abort",
                "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}},
                "route": to("v1")}]),
        &[],
    );
    let n = 2000;
    let r = w.many("/abort", n, &[]);
    let aborted = answers(&r, "HTTP 503");
    within_4_sigma(aborted, n as u64, 0.5, "aborted");
    assert_eq!(r["flags"]["FI"].as_u64(), Some(aborted), "{r}");
    assert_eq!(answers(&r, "hello from v1"), n as u64 - aborted, "{r}");
    let fi = || {
        w.agent_a.metrics().try_value(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "FI")],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || fi() == Ok(aborted as f64)),
        "FI in metrics: {:?}",
        fi()
    );
}

#[test]
fn fault_delay_delays_every_request_or_its_share_and_flags_them_di() {
    let w = web_routes(
        "l7-delay",
        json!([
            {"name": "delay", "match": prefix("/delay"),
             "fault": {"delay": {"fixedDelay": "300ms", "percentage": {"value": 100}}}, "route": to("v1")},
            {"name": "delay-some", "match": prefix("/sometimes-late"),
             "fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 30}}}, "route": to("v1")},
        ]),
        &[],
    );
    // The answer comes, late, flagged DI.
    let r = w.one("/delay", &[]);
    assert_eq!(status(&r), 200, "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap() >= 300, "{r}");
    assert_eq!(last_header(&r, "x-mesh-response-flags"), "DI", "{r}");
    // 30 % of 1,000 requests delayed, every one answered.
    let n = 1000;
    let r = w.many("/sometimes-late", n, &[]);
    let delayed = r["flags"]["DI"].as_u64().unwrap_or(0);
    within_4_sigma(delayed, n as u64, 0.3, "delayed");
    assert_eq!(answers(&r, "hello from v1"), n as u64, "{r}");
}

#[test]
fn a_route_timeout_answers_504_ut() {
    let w = web_routes(
        "l7-timeout",
        json!([{"name": "timeout", "timeout": "500ms", "route": to("v1")}]),
        &[],
    );
    let r = w.one("/slow", &["x-delay-ms: 3000"]);
    assert_eq!(
        (status(&r), last_header(&r, "x-mesh-response-flags")),
        (504, "UT"),
        "{r}"
    );
    let elapsed = r["elapsed_ms"].as_u64().unwrap();
    assert!(
        (500..3000).contains(&elapsed),
        "answered after {elapsed} ms"
    );
}

#[test]
fn per_try_timeouts_retry_until_the_attempts_run_out_urx() {
    let w = web_routes(
        "l7-per-try",
        json!([{"name": "per-try",
                "retries": {"attempts": 2, "perTryTimeout": "1s", "retryOn": "5xx"},
                "route": to("v1")}]),
        &[],
    );
    // A try's budget long enough for the request to reach the upstream
    // on an emulated CPU too (200 ms was not, in the VM tier), and still
    // short of the upstream's delay; the upstream logs each request when
    // its delay is over.
    let r = w.one("/stuck", &["x-delay-ms: 3000"]);
    assert_eq!(
        (status(&r), last_header(&r, "x-mesh-response-flags")),
        (504, "URX"),
        "{r}"
    );
    // The first try and two retries reached the upstream.
    assert!(
        wait_until(Duration::from_secs(5), || requests(&w.app1).len() == 3),
        "{:?}",
        requests(&w.app1)
    );
}

#[test]
fn configured_retries_recover_from_a_flaky_upstream_for_any_method() {
    let w = web_routes(
        "l7-retry",
        json!([{"name": "retry", "retries": {"attempts": 3, "retryOn": "5xx"}, "route": to("v1")}]),
        &[],
    );
    // The server fails every other request it sees.
    let r = w.many("/flaky", 200, &["x-fail-every: 2"]);
    assert_eq!(answers(&r, "hello from v1"), 200, "{r}");
    // Configured retries apply to a POST as well.
    let r = w.many(
        "/flaky",
        50,
        &["x-fail-every: 2", "--method=POST", "--body=x"],
    );
    assert_eq!(answers(&r, "hello from v1"), 50, "{r}");
}

#[test]
fn the_default_retry_policy_retries_a_get_but_never_a_post_the_app_saw() {
    let w = web_routes(
        "l7-default-retry",
        json!([{"name": "default-retries", "route": to("v1")}]),
        &[],
    );
    let r = w.many("/unconfigured", 100, &["x-fail-every: 2"]);
    assert_eq!(answers(&r, "hello from v1"), 100, "{r}");
    let r = w.many(
        "/unconfigured",
        100,
        &["x-fail-every: 2", "--method=POST", "--body=order"],
    );
    assert_eq!(
        answers(&r, "HTTP 503"),
        50,
        "every other POST fails, none retried: {r}"
    );
}
