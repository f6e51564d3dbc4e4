//! What DestinationRule traffic policies act on, per destination (host,
//! subset, port — Envoy's cluster): load balancing (simple and consistent
//! hash), circuit breaking (connection pool limits) and outlier detection.
//! The state outlives snapshots; the policy is read from the snapshot each
//! request uses.

mod lb;
mod locality;

pub use lb::{HashInput, Pick};

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    istio::networking::{
        ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, OutlierDetection,
        TrafficPolicy,
    },
    registry::Endpoint,
};

/// The sections of a traffic policy that apply to one destination.
#[derive(Debug, Default, Clone, Copy)]
pub struct Policy<'a> {
    pub load_balancer: Option<&'a LoadBalancerSettings>,
    pub connection_pool: Option<&'a ConnectionPoolSettings>,
    pub outlier_detection: Option<&'a OutlierDetection>,
}

impl<'a> Policy<'a> {
    /// Istio's precedence: the rule's policy, its `portLevelSettings` for
    /// this port, then the subset's policy and its port-level settings;
    /// each section set at a more specific level replaces the whole
    /// section.
    pub fn of(dr: Option<&'a DestinationRule>, subset: &str, port: u16) -> Self {
        let mut p = Self::default();
        let Some(dr) = dr else { return p };
        let subset_policy = dr
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .and_then(|s| s.traffic_policy.as_ref());
        for tp in [dr.traffic_policy.as_ref(), subset_policy]
            .into_iter()
            .flatten()
        {
            p.apply(tp, port);
        }
        p
    }

    fn apply(&mut self, tp: &'a TrafficPolicy, port: u16) {
        if tp.load_balancer.is_some() {
            self.load_balancer = tp.load_balancer.as_ref();
        }
        if tp.connection_pool.is_some() {
            self.connection_pool = tp.connection_pool.as_ref();
        }
        if tp.outlier_detection.is_some() {
            self.outlier_detection = tp.outlier_detection.as_ref();
        }
        for pl in &tp.port_level_settings {
            if pl
                .port
                .as_ref()
                .is_some_and(|s| s.number == u32::from(port))
            {
                if pl.load_balancer.is_some() {
                    self.load_balancer = pl.load_balancer.as_ref();
                }
                if pl.connection_pool.is_some() {
                    self.connection_pool = pl.connection_pool.as_ref();
                }
                if pl.outlier_detection.is_some() {
                    self.outlier_detection = pl.outlier_detection.as_ref();
                }
            }
        }
    }

    fn http_limit(
        &self,
        f: impl Fn(&crate::istio::networking::HttpSettings) -> Option<i32>,
    ) -> Option<usize> {
        self.connection_pool
            .and_then(|c| c.http.as_ref())
            .and_then(f)
            .and_then(|v| usize::try_from(v).ok())
            .filter(|v| *v > 0)
    }

    pub fn max_requests(&self) -> Option<usize> {
        self.http_limit(|h| h.http2_max_requests)
    }

    pub fn max_pending(&self) -> Option<usize> {
        self.http_limit(|h| h.http1_max_pending_requests)
    }

    pub fn max_requests_per_connection(&self) -> Option<usize> {
        self.http_limit(|h| h.max_requests_per_connection)
    }

    pub fn max_retries(&self) -> Option<usize> {
        self.http_limit(|h| h.max_retries)
    }

    pub fn max_connections(&self) -> Option<usize> {
        self.connection_pool
            .and_then(|c| c.tcp.as_ref())
            .and_then(|t| t.max_connections)
            .and_then(|v| usize::try_from(v).ok())
            .filter(|v| *v > 0)
    }

    /// `connectionPool.tcp.idleTimeout`: a TCP connection with no byte
    /// either way for this long is closed.
    pub fn tcp_idle_timeout(&self) -> Option<Duration> {
        self.connection_pool
            .and_then(|c| c.tcp.as_ref())
            .and_then(|t| t.idle_timeout.as_ref())
            .map(|d| d.get())
    }

    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connection_pool
            .and_then(|c| c.tcp.as_ref())
            .and_then(|t| t.connect_timeout.as_ref())
            .map(|d| d.get())
    }
}

/// The state of one destination.
#[derive(Default)]
pub struct Cluster {
    next: AtomicUsize,
    pub active: AtomicUsize,
    pending: AtomicUsize,
    pub retrying: AtomicUsize,
    /// HTTP/1.1 requests in flight are bounded by `maxConnections`.
    slots: Mutex<Option<(usize, Arc<tokio::sync::Semaphore>)>>,
    hosts: Mutex<HashMap<String, Host>>,
    /// The table and the signature of the endpoints it was built for.
    hash: Mutex<Option<(u64, lb::HashTable)>>,
}

#[derive(Debug, Default)]
struct Host {
    active: usize,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Why a request may not go to this destination now.
#[derive(Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `http2MaxRequests` requests are in flight.
    Requests,
    /// No connection free and `http1MaxPendingRequests` already waiting.
    Pending,
    /// `maxConnections` TCP connections are open.
    Connections,
}

/// How one attempt ended, for outlier detection.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Status(u16),
    /// A TCP connection (or tunnel) opened.
    Connected,
    /// No connection, or reset before a response.
    LocalFailure,
}

/// A request counted as in flight to a destination (and to a host).
pub struct Admission {
    cluster: Arc<Cluster>,
    host: Option<String>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.cluster.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(h) = &self.host
            && let Some(host) = self.cluster.hosts.lock().expect("hosts lock").get_mut(h)
        {
            host.active = host.active.saturating_sub(1);
        }
    }
}

/// Takes one off a counter when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An endpoint's name in the cluster state.
pub fn host_key(e: &Endpoint) -> String {
    match (&e.address, &e.hostname) {
        (Some(a), _) => a.to_string(),
        (None, Some(h)) => h.clone(),
        (None, None) => String::new(),
    }
}

impl Cluster {
    /// Admits a TCP connection under `connectionPool.tcp.maxConnections`:
    /// over the limit it is refused at once (Envoy's TCP proxy, flag `UO`).
    pub fn admit_connection(self: &Arc<Self>, policy: &Policy<'_>) -> Result<Admission, Overflow> {
        let slot = match policy.max_connections() {
            Some(max) => Some(
                self.slots(max)
                    .try_acquire_owned()
                    .map_err(|_| Overflow::Connections)?,
            ),
            None => None,
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            cluster: self.clone(),
            host: None,
            _slot: slot,
        })
    }

    /// Admits a request under the connection pool limits, waiting for an
    /// HTTP/1.1 connection slot when `maxConnections` are busy (up to
    /// `http1MaxPendingRequests` requests may wait).
    pub async fn admit(
        self: &Arc<Self>,
        policy: &Policy<'_>,
        h1: bool,
    ) -> Result<Admission, Overflow> {
        if let Some(max) = policy.max_requests()
            && self.active.load(Ordering::Relaxed) >= max
        {
            return Err(Overflow::Requests);
        }
        let slot = match (h1, policy.max_connections()) {
            (true, Some(max)) => {
                let sem = self.slots(max);
                match sem.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        let max_pending = policy.max_pending().unwrap_or(usize::MAX);
                        if self.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
                            self.pending.fetch_sub(1, Ordering::AcqRel);
                            return Err(Overflow::Pending);
                        }
                        // Counted as pending until this returns or the
                        // request is dropped while it waits (a timeout, the
                        // client gone).
                        let _pending = Decrement(&self.pending);
                        sem.acquire_owned().await.ok()
                    }
                }
            }
            _ => None,
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            cluster: self.clone(),
            host: None,
            _slot: slot,
        })
    }

    /// The semaphore for `max` connections (replaced when the limit changes).
    fn slots(&self, max: usize) -> Arc<tokio::sync::Semaphore> {
        let mut s = self.slots.lock().expect("slots lock");
        match &*s {
            Some((m, sem)) if *m == max => sem.clone(),
            _ => {
                let sem = Arc::new(tokio::sync::Semaphore::new(max));
                *s = Some((max, sem.clone()));
                sem
            }
        }
    }

    /// Drops the state of endpoints that left the service (pod churn would
    /// otherwise grow the map forever), once it holds many more than are
    /// there; endpoints with requests in flight stay until they end.
    fn forget_departed(&self, candidates: &[&Endpoint]) {
        let mut hosts = self.hosts.lock().expect("hosts lock");
        if hosts.len() > 2 * candidates.len() + 16 {
            let present: std::collections::HashSet<String> =
                candidates.iter().map(|e| host_key(e)).collect();
            hosts.retain(|k, h| present.contains(k) || h.active > 0);
        }
    }

    /// The candidates outlier detection has not ejected; all of them when
    /// fewer than `minHealthPercent` are healthy (Envoy's panic mode).
    fn healthy<'e>(
        &self,
        candidates: &[&'e Endpoint],
        od: Option<&OutlierDetection>,
    ) -> Vec<&'e Endpoint> {
        if od.is_none() {
            return candidates.to_vec();
        }
        let now = Instant::now();
        let hosts = self.hosts.lock().expect("hosts lock");
        let healthy: Vec<&Endpoint> = candidates
            .iter()
            .copied()
            .filter(|e| {
                hosts
                    .get(&host_key(e))
                    .and_then(|h| h.ejected_until)
                    .is_none_or(|t| t <= now)
            })
            .collect();
        let min = od
            .and_then(|o| o.min_health_percent)
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(0);
        if min > 0 && healthy.len() * 100 < min * candidates.len() {
            candidates.to_vec()
        } else {
            healthy
        }
    }

    /// Records how an attempt to `host` ended; ejects it when it failed
    /// too often in a row (within `maxEjectionPercent`).
    pub fn record(
        &self,
        host: &str,
        outcome: Outcome,
        od: Option<&OutlierDetection>,
        hosts_total: usize,
    ) {
        let Some(od) = od else { return };
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::Connected => (false, false),
            Outcome::LocalFailure => (true, true),
        };
        let mut hosts = self.hosts.lock().expect("hosts lock");
        let now = Instant::now();
        let ejected_now = hosts
            .values()
            .filter(|h| h.ejected_until.is_some_and(|t| t > now))
            .count();
        let h = hosts.entry(host.to_owned()).or_default();
        if !is_5xx {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return;
        }
        h.consecutive_5xx += 1;
        if is_gateway {
            h.consecutive_gateway += 1;
        }
        // Istio: 5 consecutive 5xx by default; gateway errors only when set.
        let max_5xx = od
            .consecutive_5xx_errors
            .or(od.consecutive_errors.and_then(|v| u32::try_from(v).ok()))
            .unwrap_or(5);
        let max_gw = od.consecutive_gateway_errors.unwrap_or(0);
        let tripped = (max_5xx > 0 && h.consecutive_5xx >= max_5xx)
            || (max_gw > 0 && h.consecutive_gateway >= max_gw);
        if !tripped || h.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        let pct = od
            .max_ejection_percent
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(10);
        // Envoy ejects at least one host whatever the percentage.
        let allowed = (hosts_total * pct / 100).max(1);
        if ejected_now >= allowed {
            return;
        }
        let base = od
            .base_ejection_time
            .as_ref()
            .map_or(Duration::from_secs(30), |d| d.get());
        h.ejections += 1;
        // Longer each time, as Envoy (capped at 300 s by default).
        let time = (base * h.ejections).min(Duration::from_secs(300).max(base));
        // Envoy returns hosts at its ejection sweeps, every `interval`
        // (10 s by default): the first sweep after the ejection time.
        let interval = od
            .interval
            .as_ref()
            .map_or(Duration::from_secs(10), |d| d.get());
        h.ejected_until = Some(next_sweep(now + time, interval));
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        tracing::info!(host, ?time, "outlier detection: endpoint ejected");
    }
}

/// Sweeps run on one clock for the whole agent.
static SWEEP_ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// The first sweep at or after `t`.
fn next_sweep(t: Instant, interval: Duration) -> Instant {
    if interval.is_zero() {
        return t;
    }
    let origin = *SWEEP_ORIGIN;
    let since = t.saturating_duration_since(origin).as_nanos();
    let ticks = since.div_ceil(interval.as_nanos());
    origin + Duration::from_nanos(u64::try_from(ticks * interval.as_nanos()).unwrap_or(u64::MAX))
}

/// Every destination's state, by (host, subset, port).
#[derive(Default)]
pub struct Clusters {
    map: Mutex<HashMap<(String, String, u16), Arc<Cluster>>>,
}

impl Clusters {
    pub fn get(&self, host: &str, subset: &str, port: u16) -> Arc<Cluster> {
        self.map
            .lock()
            .expect("clusters lock")
            .entry((host.to_owned(), subset.to_owned(), port))
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| Endpoint::at(Some(std::net::IpAddr::from([10, 0, 0, i])), None))
            .collect()
    }

    #[test]
    fn outlier_detection_ejects_after_consecutive_errors_within_the_percentage() {
        let c = Cluster::default();
        let od = OutlierDetection {
            consecutive_5xx_errors: Some(3),
            max_ejection_percent: Some(50),
            ..Default::default()
        };
        let t = Instant::now() + Duration::from_millis(1500);
        let s = next_sweep(t, Duration::from_secs(1));
        assert!(s >= t && s < t + Duration::from_secs(1), "the next sweep");
        for _ in 0..2 {
            c.record("a", Outcome::Status(503), Some(&od), 4);
        }
        c.record("a", Outcome::Status(200), Some(&od), 4);
        c.record("a", Outcome::Status(500), Some(&od), 4);
        let eps = endpoints(4);
        let refs: Vec<&Endpoint> = eps.iter().collect();
        assert_eq!(
            c.healthy(&refs, Some(&od)).len(),
            4,
            "a success resets the count"
        );
        for h in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            for _ in 0..3 {
                c.record(h, Outcome::LocalFailure, Some(&od), 4);
            }
        }
        assert_eq!(c.healthy(&refs, Some(&od)).len(), 2, "at most 50 % ejected");
        for i in 0..100 {
            c.record(&format!("gone-{i}"), Outcome::Status(200), Some(&od), 4);
        }
        c.forget_departed(&refs);
        assert!(
            c.hosts.lock().unwrap().len() <= 4,
            "departed endpoints forgotten"
        );
    }
}
