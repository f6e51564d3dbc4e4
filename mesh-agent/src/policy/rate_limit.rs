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
//! * `descriptors`, each with a bucket of its own, matched against the
//!   descriptors a request makes with its route's `rate_limits` (or the
//!   filter's own) — see `istio::envoy_filter::descriptors`; a matched
//!   request also takes from the default bucket unless
//!   `always_consume_default_token_bucket` is false;
//! * a bucket starts full, and is kept across configuration changes that
//!   leave its limit as it was ([`Limiters`]).
//!
//! Any other patch is ignored: this data plane has no Envoy to patch.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, Weak},
    time::Instant,
};

use serde::Serialize;

use crate::istio::envoy_filter::PatchUse;
pub use crate::istio::envoy_filter::{
    BucketSpec, Entries, Limit, RateLimitRule, RequestFacts, Unit, read_patches, route_rules,
};
use crate::{
    istio::{Resource, Spec},
    workload::Workload,
};

/// The rate limits of an EnvoyFilter resource, with its scope.
#[derive(Debug, Clone)]
pub struct FilterLimits {
    pub id: String,
    namespace: String,
    selector: BTreeMap<String, String>,
    pub limits: Vec<Limit>,
    /// The `rate_limits` its route-only patches add: Envoy merges them
    /// into the routes whichever EnvoyFilter sets the limit.
    pub route_rules: Vec<RateLimitRule>,
}

impl FilterLimits {
    pub fn from_resource(r: &Resource) -> Option<Self> {
        let Spec::EnvoyFilter(s) = &r.spec else {
            return None;
        };
        if !s.target_refs.is_empty() {
            return None;
        }
        // A limit that cannot be read is left out (validation rejects it);
        // the others of the resource still apply.
        let read = read_patches(&s.config_patches);
        let route_rules = route_rules(&read);
        let limits: Vec<Limit> = read
            .into_iter()
            .filter_map(|u| match u {
                Ok(PatchUse::Limit(l)) => Some(*l),
                _ => None,
            })
            .collect();
        (!limits.is_empty() || !route_rules.is_empty()).then(|| Self {
            route_rules,
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

/// One workload's buckets for one limit: the default one and one per
/// descriptor.
#[derive(Debug, Serialize)]
pub struct Limiter {
    /// The EnvoyFilter, `namespace/name`.
    pub filter: String,
    #[serde(flatten)]
    pub limit: Limit,
    /// Token states: the default bucket's first, then the descriptors'.
    #[serde(skip)]
    tokens: Mutex<Vec<Tokens>>,
    /// The descriptors, strictest (fewest tokens per second) first: a
    /// refused request takes as few tokens as it can, as in Envoy.
    #[serde(skip)]
    order: Vec<usize>,
}

#[derive(Debug)]
struct Tokens {
    left: u64,
    last_fill: Instant,
}

impl Tokens {
    fn full(b: &BucketSpec, now: Instant) -> Self {
        Self {
            left: b.max_tokens,
            last_fill: now,
        }
    }

    /// Refills by whole intervals since the last fill, then takes one.
    fn take(&mut self, b: &BucketSpec, now: Instant) -> bool {
        let fills = (now.saturating_duration_since(self.last_fill).as_nanos()
            / b.fill_interval.as_nanos()) as u64;
        if fills > 0 {
            self.left = self
                .left
                .saturating_add(fills.saturating_mul(b.tokens_per_fill))
                .min(b.max_tokens);
            self.last_fill += b.fill_interval * u32::try_from(fills).unwrap_or(u32::MAX);
        }
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// The buckets in use, kept across snapshots: a configuration change that
/// leaves a limit as it was (any other resource changing, a pod coming)
/// keeps its bucket; only a changed limit starts full.
#[derive(Debug, Default)]
pub struct Limiters {
    live: Mutex<HashMap<(String, String, usize), Weak<Limiter>>>,
}

impl Limiters {
    /// The bucket of `workload` for limit `index` of `filter`.
    pub fn get(&self, workload: &str, filter: &str, index: usize, limit: &Limit) -> Arc<Limiter> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let key = (workload.to_owned(), filter.to_owned(), index);
        if let Some(l) = live.get(&key).and_then(Weak::upgrade)
            && l.limit.same_as(limit)
        {
            return l;
        }
        live.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(Limiter::new(filter, limit.clone()));
        live.insert(key, Arc::downgrade(&l));
        l
    }
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
        let now = Instant::now();
        let tokens = std::iter::once(&limit.bucket)
            .chain(limit.descriptors.iter().map(|d| &d.bucket))
            .map(|b| Tokens::full(b, now))
            .collect();
        let mut order: Vec<usize> = (0..limit.descriptors.len()).collect();
        order.sort_by(|a, b| {
            let rate = |i: &usize| limit.descriptors[*i].bucket.rate();
            rate(a).total_cmp(&rate(b))
        });
        Self {
            filter: filter.into(),
            tokens: Mutex::new(tokens),
            order,
            limit,
        }
    }

    /// Takes a token, if the request is one the filter sees: from the
    /// bucket of each descriptor of the request that has one, and from the
    /// default bucket when none has (or always, with
    /// `always_consume_default_token_bucket`).
    pub fn admit(&self, descriptors: &[Entries]) -> Admit {
        if self.limit.enabled < 1.0 && fastrand::f64() >= self.limit.enabled {
            return Admit::Yes;
        }
        if self.take(descriptors, Instant::now()) {
            return Admit::Yes;
        }
        if self.limit.enforced >= 1.0 || fastrand::f64() < self.limit.enforced {
            Admit::Refused
        } else {
            Admit::OverNotEnforced
        }
    }

    fn take(&self, descriptors: &[Entries], now: Instant) -> bool {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let mut matched = false;
        for &i in &self.order {
            let d = &self.limit.descriptors[i];
            if descriptors.contains(&d.entries) {
                matched = true;
                if !tokens[i + 1].take(&d.bucket, now) {
                    return false;
                }
            }
        }
        if matched && !self.limit.always_consume_default {
            return true;
        }
        tokens[0].take(&self.limit.bucket, now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::istio::envoy_filter::parse_patch;

    #[test]
    fn a_bucket_outlives_snapshots_while_its_limit_stays() {
        let l = parse_patch(&crate::istio::envoy_filter::tests::istio_task_patch())
            .unwrap()
            .unwrap();
        let store = Limiters::default();
        let a = store.get("default/web", "ns/f", 0, &l);
        assert!(Arc::ptr_eq(&a, &store.get("default/web", "ns/f", 0, &l)));
        assert!(!Arc::ptr_eq(&a, &store.get("default/api", "ns/f", 0, &l)));
        let mut changed = l.clone();
        changed.bucket.max_tokens += 1;
        assert!(!Arc::ptr_eq(
            &a,
            &store.get("default/web", "ns/f", 0, &changed)
        ));
    }

    #[test]
    fn the_bucket_refills_by_whole_intervals_up_to_its_size() {
        let mut l = parse_patch(&crate::istio::envoy_filter::tests::istio_task_patch())
            .unwrap()
            .unwrap();
        l.bucket.max_tokens = 3;
        l.bucket.tokens_per_fill = 2;
        l.bucket.fill_interval = Duration::from_secs(1);
        let lim = Limiter::new("ns/f", l);
        let t0 = lim.tokens.lock().unwrap()[0].last_fill;
        let take = |t| lim.take(&[], t);
        assert!(take(t0) && take(t0) && take(t0));
        assert!(!take(t0 + Duration::from_millis(999)));
        assert!(take(t0 + Duration::from_millis(1000)));
        assert!(take(t0 + Duration::from_millis(1500)));
        assert!(!take(t0 + Duration::from_millis(1999)));
        // Ten intervals later: full (3), not 20.
        let later = t0 + Duration::from_secs(11);
        assert!(take(later) && take(later) && take(later));
        assert!(!take(later));
    }

    /// Envoy's descriptor example: a default bucket of 3, `/a` with 1
    /// token, `/b` with 2.
    fn with_descriptors(always_consume_default: Option<bool>) -> Limiter {
        let mut p = crate::istio::envoy_filter::tests::istio_task_patch();
        let c = &mut p["patch"]["value"]["typed_config"]["value"];
        c["token_bucket"] = serde_json::json!({"max_tokens": 3, "fill_interval": "60s"});
        c["descriptors"] = serde_json::json!([
            {"entries": [{"key": "PATH", "value": "/b"}], "token_bucket": {"max_tokens": 2, "fill_interval": "60s"}},
            {"entries": [{"key": "PATH", "value": "/a"}], "token_bucket": {"max_tokens": 1, "fill_interval": "120s"}},
        ]);
        c["rate_limits"] = serde_json::json!([{"actions": [{"request_headers": {"header_name": ":path", "descriptor_key": "PATH"}}]}]);
        if let Some(a) = always_consume_default {
            c["always_consume_default_token_bucket"] = a.into();
        }
        Limiter::new("ns/f", parse_patch(&p).unwrap().unwrap())
    }

    fn path(p: &str) -> Vec<Entries> {
        vec![vec![("PATH".to_owned(), p.to_owned())]]
    }

    #[test]
    fn a_descriptor_has_its_own_bucket() {
        let lim = with_descriptors(Some(false));
        let t0 = lim.tokens.lock().unwrap()[0].last_fill;
        let take = |p: &str| lim.take(&path(p), t0);
        assert!(take("/a") && !take("/a"), "/a: 1 token");
        assert!(take("/b") && take("/b") && !take("/b"), "/b: 2 tokens");
        assert!(
            take("/c") && take("/c") && take("/c") && !take("/c"),
            "the default: 3"
        );
        // Built from a request by the rule's actions.
        let h = http::HeaderMap::new();
        let req = RequestFacts {
            method: "GET",
            path: "/a",
            authority: "web",
            headers: &h,
            remote: "10.0.0.1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(lim.limit.request_descriptors(&req), path("/a"));
    }

    #[test]
    fn by_default_a_matched_request_also_takes_from_the_default_bucket() {
        let lim = with_descriptors(None);
        assert!(lim.limit.always_consume_default);
        let t0 = lim.tokens.lock().unwrap()[0].last_fill;
        let take = |p: &str| lim.take(&path(p), t0);
        assert!(take("/b") && take("/b"));
        assert!(take("/c"), "the default bucket has one left");
        assert!(!take("/c") && !take("/a"), "the default bucket is empty");
    }

    /// A route's limit replaces the filter's for requests to its port, as
    /// `typed_per_filter_config` does in Envoy; other ports keep the
    /// filter's.
    #[test]
    fn a_per_route_limit_replaces_the_filters_on_its_port() {
        let filter = parse_patch(&crate::istio::envoy_filter::tests::istio_task_patch())
            .unwrap()
            .unwrap();
        let mut route = filter.clone();
        route.port = Some(8080);
        let policy = crate::snapshot::InboundPolicy {
            authorization: Arc::default(),
            request_authentication: Arc::default(),
            port_protocols: Arc::default(),
            rate_limits: Arc::new(vec![
                Arc::new(Limiter::new("ns/filter", filter)),
                Arc::new(Limiter::new("ns/route", route)),
            ]),
            access_logging: Arc::default(),
            tracing: Arc::default(),
        };
        let names = |port| {
            policy
                .request_limits(port)
                .map(|l| l.filter.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(8080), ["ns/route"]);
        assert_eq!(names(7000), ["ns/filter"]);
    }
}
