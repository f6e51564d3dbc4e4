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

pub use crate::istio::envoy_filter::{Limit, Unit, parse_patch};
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
    use std::time::Duration;

    use super::*;

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
        changed.max_tokens += 1;
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
