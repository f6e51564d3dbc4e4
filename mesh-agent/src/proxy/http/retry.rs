//! Retries as Istio configures Envoy: the route's `retries` (attempts,
//! perTryTimeout, retryOn), or Istio's default policy without one — two
//! retries on connect-failure, refused-stream, unavailable, cancelled and
//! 503. A retry budget (Envoy's: 20 % of the requests in flight, at least
//! three) keeps retries from multiplying load when an upstream struggles.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::proxy::cluster::Cluster;

use http::{HeaderMap, Method, StatusCode};

use crate::snapshot::compile::CompiledHttpRoute;

/// Why an attempt produced no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint (the request never left).
    Connect,
    /// The upstream refused the HTTP/2 stream (never processed).
    RefusedStream,
    /// The connection or stream ended before response headers.
    Reset,
    /// `perTryTimeout` passed before response headers.
    PerTryTimeout,
}

/// The `retryOn` conditions that apply.
#[derive(Debug, Default, Clone)]
struct Conditions {
    five_xx: bool,
    gateway_error: bool,
    reset: bool,
    connect_failure: bool,
    refused_stream: bool,
    retriable_4xx: bool,
    status_codes: Vec<u16>,
    /// gRPC status codes (from `grpc-status` in the response headers).
    grpc: Vec<u32>,
}

impl Conditions {
    /// Parses Istio's `retryOn` (Envoy's names, plus bare status codes).
    fn parse(s: &str) -> Self {
        let mut c = Self::default();
        for cond in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond {
                "5xx" => c.five_xx = true,
                "gateway-error" => c.gateway_error = true,
                "reset" | "reset-before-request" => c.reset = true,
                "connect-failure" => c.connect_failure = true,
                "refused-stream" => c.refused_stream = true,
                "retriable-4xx" => c.retriable_4xx = true,
                // Istio adds 503 to the list whenever codes are retriable.
                "retriable-status-codes" => c.status_codes.push(503),
                "cancelled" => c.grpc.push(1),
                "deadline-exceeded" => c.grpc.push(4),
                "resource-exhausted" => c.grpc.push(8),
                "internal" => c.grpc.push(13),
                "unavailable" => c.grpc.push(14),
                n => {
                    if let Ok(code) = n.parse::<u16>() {
                        c.status_codes.push(code);
                    }
                }
            }
        }
        c
    }
}

/// Istio's default `retryOn`.
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

#[derive(Debug, Clone)]
pub struct Policy {
    /// Retries after the first attempt.
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// Base of the exponential backoff between attempts.
    pub backoff: Duration,
    on: Conditions,
    /// Configured on the route (rather than Istio's default): then
    /// non-idempotent requests are retried as configured too.
    explicit: bool,
}

impl Policy {
    pub fn of(route: Option<&CompiledHttpRoute>) -> Self {
        match route.and_then(|r| r.spec.retries.as_ref()) {
            Some(r) => Self {
                retries: u32::try_from(r.attempts).unwrap_or(0),
                per_try_timeout: r.per_try_timeout.as_ref().map(|d| d.get()),
                backoff: r
                    .backoff
                    .as_ref()
                    .map_or(Duration::from_millis(25), |d| d.get()),
                on: Conditions::parse(if r.retry_on.is_empty() {
                    DEFAULT_RETRY_ON
                } else {
                    &r.retry_on
                }),
                explicit: true,
            },
            None => Self {
                retries: 2,
                per_try_timeout: None,
                backoff: Duration::from_millis(25),
                on: Conditions::parse(DEFAULT_RETRY_ON),
                explicit: false,
            },
        }
    }

    /// Whether a response with `status` (and these headers) is retried.
    pub fn retries_response(
        &self,
        method: &Method,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> bool {
        let c = &self.on;
        let code = status.as_u16();
        let by_status = (c.five_xx && status.is_server_error())
            || (c.gateway_error && matches!(code, 502..=504))
            || (c.retriable_4xx && code == 409)
            || c.status_codes.contains(&code);
        let by_grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|g| c.grpc.contains(&g));
        // The application saw the request: without an explicit policy,
        // only idempotent methods may be sent again.
        (by_status || by_grpc) && (self.explicit || idempotent(method))
    }

    /// Whether an attempt that failed this way is retried.
    pub fn retries_failure(&self, method: &Method, f: Failure) -> bool {
        let c = &self.on;
        match f {
            // Never reached the application: safe for any method.
            Failure::Connect => c.connect_failure || c.five_xx || c.gateway_error,
            Failure::RefusedStream => c.refused_stream || c.five_xx || c.reset,
            Failure::Reset | Failure::PerTryTimeout => {
                (c.reset || c.five_xx || c.gateway_error) && (self.explicit || idempotent(method))
            }
        }
    }

    /// The pause before retry `n` (1-based): Envoy's jittered exponential
    /// backoff, capped at ten times the base.
    pub fn backoff(&self, n: u32) -> Duration {
        let cap = self.backoff * 10;
        let ceiling = (self.backoff * 2u32.saturating_pow(n.saturating_sub(1))).min(cap);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// RFC 9110 §9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Requests and retries in flight in this agent.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static RETRYING: AtomicUsize = AtomicUsize::new(0);

/// Counts a request as in flight while it lives.
pub struct InFlight;

impl InFlight {
    pub fn start() -> Self {
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry the budget allowed; gives its place back when dropped.
pub struct RetryPermit {
    /// The destination whose `maxRetries` it also counts against.
    cluster: Option<Arc<Cluster>>,
}

impl RetryPermit {
    /// `None` when retries in flight already use the agent's budget.
    pub fn take() -> Option<Self> {
        let budget = (ACTIVE.load(Ordering::Relaxed) / 5).max(3);
        // Lazily: a permit made and dropped would give back a place never taken.
        reserve(&RETRYING, budget).then(|| Self { cluster: None })
    }

    /// Also within the destination's `maxRetries` (concurrent retries to
    /// it), when the DestinationRule sets one.
    pub fn take_for(cluster: &Arc<Cluster>, max_retries: Option<usize>) -> Option<Self> {
        let mut permit = Self::take()?;
        if let Some(max) = max_retries {
            if !reserve(&cluster.retrying, max) {
                return None;
            }
            permit.cluster = Some(cluster.clone());
        }
        Some(permit)
    }
}

/// Adds one to `counter` unless it reached `limit`.
fn reserve(counter: &AtomicUsize, limit: usize) -> bool {
    let mut now = counter.load(Ordering::Relaxed);
    loop {
        if now >= limit {
            return false;
        }
        match counter.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(v) => now = v,
        }
    }
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        RETRYING.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = &self.cluster {
            c.retrying.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retry_on: &str, explicit: bool) -> Policy {
        Policy {
            retries: 2,
            per_try_timeout: None,
            backoff: Duration::from_millis(25),
            on: Conditions::parse(retry_on),
            explicit,
        }
    }

    #[test]
    fn default_policy_never_resends_a_post_the_application_saw() {
        let d = Policy::of(None);
        let h = HeaderMap::new();
        assert!(d.retries_response(&Method::GET, StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(!d.retries_response(&Method::POST, StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(!d.retries_response(&Method::GET, StatusCode::INTERNAL_SERVER_ERROR, &h));
        assert!(d.retries_failure(&Method::POST, Failure::Connect));
        assert!(!d.retries_failure(&Method::POST, Failure::Reset));
    }

    #[test]
    fn explicit_conditions_are_followed() {
        let p = policy("5xx", true);
        let h = HeaderMap::new();
        assert!(p.retries_response(&Method::POST, StatusCode::INTERNAL_SERVER_ERROR, &h));
        assert!(!p.retries_response(&Method::GET, StatusCode::NOT_FOUND, &h));
        let g = policy("gateway-error,409", true);
        assert!(g.retries_response(&Method::GET, StatusCode::BAD_GATEWAY, &h));
        assert!(g.retries_response(&Method::GET, StatusCode::CONFLICT, &h));
        assert!(!g.retries_response(&Method::GET, StatusCode::INTERNAL_SERVER_ERROR, &h));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        assert!(policy("unavailable", true).retries_response(&Method::POST, StatusCode::OK, &grpc));
    }

    #[test]
    fn the_budget_bounds_retries_in_flight() {
        let permits: Vec<_> = std::iter::from_fn(RetryPermit::take).take(10).collect();
        assert_eq!(
            permits.len(),
            3,
            "at least three, 20 % of nothing in flight"
        );
        drop(permits);
        assert!(RetryPermit::take().is_some());
    }
}
