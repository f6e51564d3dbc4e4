//! What DestinationRule traffic policies act on, per destination (host,
//! subset, port — Envoy's cluster): load balancing (simple and consistent
//! hash), circuit breaking (connection pool limits) and outlier detection.
//! The state outlives snapshots; the policy is read from the snapshot each
//! request uses.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    istio::networking::{
        ConnectionPoolSettings, ConsistentHashLb, DestinationRule, LoadBalancerSettings,
        OutlierDetection, SimpleLb, TrafficPolicy,
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

    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connection_pool
            .and_then(|c| c.tcp.as_ref())
            .and_then(|t| t.connect_timeout.as_ref())
            .map(|d| d.get())
    }
}

/// What a request offers load balancing: hash inputs and where the
/// client is.
pub struct HashInput<'a> {
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
    pub client: IpAddr,
    pub locality: &'a crate::registry::Locality,
    pub client_labels: &'a std::collections::BTreeMap<String, String>,
}

/// The endpoint chosen for a request, and the cookie to set when a
/// sticky-session cookie had to be made.
pub struct Pick<'e> {
    pub endpoint: &'e Endpoint,
    pub key: String,
    pub set_cookie: Option<String>,
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
    hash: Mutex<Option<(u64, HashTable)>>,
}

#[derive(Debug, Default)]
struct Host {
    active: usize,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// A hash ring (Envoy's ring hash) or lookup table (Maglev) over the
/// endpoints, rebuilt when they change.
enum HashTable {
    Ring(Vec<(u64, usize)>),
    Maglev(Vec<usize>),
}

/// Why a request may not go to this destination now.
#[derive(Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `http2MaxRequests` requests are in flight.
    Requests,
    /// No connection free and `http1MaxPendingRequests` already waiting.
    Pending,
}

/// How one attempt ended, for outlier detection.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Status(u16),
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

/// FNV-1a: stable, fast, good enough to spread endpoints on a ring.
fn hash64(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV spreads short, similar keys poorly in the high bits: finish
    // with a 64-bit mix (splitmix64's).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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

    /// Chooses among `candidates` (ready endpoints of the destination).
    pub fn pick<'e>(
        &self,
        candidates: &[&'e Endpoint],
        policy: &Policy<'_>,
        input: &HashInput<'_>,
        dialled: IpAddr,
        admission: Option<&mut Admission>,
    ) -> Option<Pick<'e>> {
        self.forget_departed(candidates);
        let lb = policy.load_balancer;
        let eligible = super::locality::prefer(
            self.healthy(candidates, policy.outlier_detection),
            input.locality,
            lb.and_then(|l| l.locality_lb_setting.as_ref()),
            policy.outlier_detection.is_some(),
            input.client_labels,
        );
        if eligible.is_empty() {
            return None;
        }
        let (index, set_cookie) = match lb.and_then(|l| l.consistent_hash.as_ref()) {
            Some(ch) => {
                let (key, set_cookie) = hash_key(ch, input);
                match key {
                    Some(k) => (self.hashed(&eligible, ch, &k), set_cookie),
                    // Nothing to hash on: Envoy picks at random.
                    None => (fastrand::usize(..eligible.len()), None),
                }
            }
            None => (
                self.simple(&eligible, lb.and_then(|l| l.simple), dialled),
                None,
            ),
        };
        let endpoint = eligible[index];
        let key = host_key(endpoint);
        // Counted while the admitted request lives (least request).
        if let Some(a) = admission {
            self.hosts
                .lock()
                .expect("hosts lock")
                .entry(key.clone())
                .or_default()
                .active += 1;
            a.host = Some(key.clone());
        }
        Some(Pick {
            endpoint,
            key,
            set_cookie,
        })
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

    fn simple(&self, eligible: &[&Endpoint], lb: Option<SimpleLb>, dialled: IpAddr) -> usize {
        let n = eligible.len();
        match lb {
            Some(SimpleLb::Random) => fastrand::usize(..n),
            Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) if n > 1 => {
                // Envoy's default: the less loaded of two random choices.
                let hosts = self.hosts.lock().expect("hosts lock");
                let load = |i: usize| hosts.get(&host_key(eligible[i])).map_or(0, |h| h.active);
                let (a, b) = (fastrand::usize(..n), fastrand::usize(..n));
                if load(b) < load(a) { b } else { a }
            }
            // The address the client dialled, when it is an endpoint.
            Some(SimpleLb::Passthrough) => eligible
                .iter()
                .position(|e| e.address == Some(dialled))
                .unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed) % n),
            _ => self.next.fetch_add(1, Ordering::Relaxed) % n,
        }
    }

    /// The endpoint for hash key `key`: ring hash (Envoy's default for
    /// Istio's consistentHash) or Maglev.
    fn hashed(&self, eligible: &[&Endpoint], ch: &ConsistentHashLb, key: &str) -> usize {
        // The table is rebuilt only when the endpoints change; telling that
        // must not cost an allocation per request.
        let signature = eligible.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, e| {
            let part = match (&e.address, &e.hostname) {
                (Some(IpAddr::V4(a)), _) => u64::from(u32::from(*a)),
                (Some(IpAddr::V6(a)), _) => {
                    let v = u128::from(*a);
                    (v as u64) ^ ((v >> 64) as u64)
                }
                (None, Some(name)) => hash64(name.as_bytes()),
                (None, None) => 0,
            };
            (h ^ part).wrapping_mul(0x0100_0000_01b3).rotate_left(5)
        });
        let mut cached = self.hash.lock().expect("hash lock");
        let maglev = ch.maglev.is_some();
        let stale = match &*cached {
            Some((s, t)) => *s != signature || maglev != matches!(t, HashTable::Maglev(_)),
            None => true,
        };
        if stale {
            let names: Vec<String> = eligible.iter().map(|e| host_key(e)).collect();
            let table = if let Some(m) = &ch.maglev {
                HashTable::Maglev(maglev_table(&names, m.table_size.unwrap_or(65537)))
            } else {
                let min = ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .unwrap_or(1024);
                HashTable::Ring(ring(&names, min))
            };
            *cached = Some((signature, table));
        }
        let h = hash64(key.as_bytes());
        match &cached.as_ref().expect("just built").1 {
            HashTable::Ring(r) => {
                let i = r.partition_point(|(p, _)| *p < h);
                r[i % r.len()].1
            }
            HashTable::Maglev(t) => t[(h % t.len() as u64) as usize],
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

/// The key to hash on, and a `Set-Cookie` when a sticky cookie with a
/// TTL had to be created (Envoy's cookie hashing).
fn hash_key(ch: &ConsistentHashLb, input: &HashInput<'_>) -> (Option<String>, Option<String>) {
    if !ch.http_header_name.is_empty() {
        let v = input
            .headers
            .get(ch.http_header_name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        return (v, None);
    }
    if let Some(c) = &ch.http_cookie {
        let existing = input
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == c.name)
            .map(|(_, v)| v.to_owned());
        if existing.is_some() {
            return (existing, None);
        }
        let Some(ttl) = c.ttl.as_ref().map(|d| d.get()) else {
            return (None, None);
        };
        let value = format!("{:016x}", fastrand::u64(..));
        let mut cookie = format!("{}={value}", c.name);
        if !c.path.is_empty() {
            cookie.push_str(&format!("; Path={}", c.path));
        }
        if !ttl.is_zero() {
            cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
        }
        cookie.push_str("; HttpOnly");
        return (Some(value), Some(cookie));
    }
    if ch.use_source_ip {
        return (Some(input.client.to_string()), None);
    }
    if !ch.http_query_parameter_name.is_empty() {
        let v = input.query.and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == ch.http_query_parameter_name)
                .map(|(_, v)| v.to_owned())
        });
        return (v, None);
    }
    (None, None)
}

/// Envoy's ring hash: each host at `ceil(min / n)` points on a 64-bit ring.
fn ring(names: &[String], min: u64) -> Vec<(u64, usize)> {
    let n = names.len().max(1) as u64;
    let per_host = min.div_ceil(n).clamp(1, 8 * 1024 * 1024 / n);
    let mut points: Vec<(u64, usize)> = names
        .iter()
        .enumerate()
        .flat_map(|(i, name)| {
            (0..per_host).map(move |r| (hash64(format!("{name}_{r}").as_bytes()), i))
        })
        .collect();
    points.sort_unstable();
    points
}

/// Maglev's lookup table: every host fills slots in its own permutation
/// order, in turn, until the table is full.
fn maglev_table(names: &[String], size: u64) -> Vec<usize> {
    // Maglev needs a prime size for every permutation to reach every slot.
    let mut m = size.max(names.len() as u64 * 2 + 1) as usize;
    while !is_prime(m) {
        m += 1;
    }
    let perms: Vec<(usize, usize)> = names
        .iter()
        .map(|n| {
            let offset = (hash64(n.as_bytes()) % m as u64) as usize;
            let skip = (hash64(format!("{n}#skip").as_bytes()) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; names.len()];
    let mut table = vec![usize::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            // A non-prime size can cycle: give up on this host's turn
            // after a full lap.
            let mut tries = 0;
            while table[c] != usize::MAX && tries < m {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
                tries += 1;
            }
            if table[c] == usize::MAX {
                table[c] = i;
                next[i] += 1;
                filled += 1;
            }
            if filled == m {
                break 'fill;
            }
        }
    }
    table
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

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
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
            .map(|i| Endpoint::at(Some(IpAddr::from([10, 0, 0, i])), None))
            .collect()
    }

    #[test]
    fn ring_and_maglev_are_stable_and_spread() {
        let eps = endpoints(4);
        let refs: Vec<&Endpoint> = eps.iter().collect();
        for ch in [
            ConsistentHashLb::default(),
            ConsistentHashLb {
                maglev: Some(Default::default()),
                ..Default::default()
            },
        ] {
            let c = Cluster::default();
            let mut seen = [0usize; 4];
            for k in 0..4000 {
                let key = format!("user-{k}");
                let a = c.hashed(&refs, &ch, &key);
                assert_eq!(a, c.hashed(&refs, &ch, &key), "same key, same host");
                seen[a] += 1;
            }
            assert!(seen.iter().all(|n| *n > 500), "spread: {seen:?}");
        }
        let t = maglev_table(&["a".into(), "b".into()], 65537);
        assert!(t.iter().all(|i| *i < 2));
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
