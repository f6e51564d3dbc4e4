//! Choosing an endpoint of a destination (DestinationRule `loadBalancer`):
//! round robin (weighted by endpoint `weight`), random, least request,
//! passthrough, and consistent hashing (Envoy's ring hash and Maglev) on a
//! header, cookie, query parameter or the client's address — after
//! outlier detection and locality preference narrowed the candidates. The
//! L4 and the L7 paths both choose here.

use std::{net::IpAddr, sync::atomic::Ordering};

use super::{Admission, Cluster, Policy, host_key};
use crate::{
    istio::networking::{ConsistentHashLb, SimpleLb},
    registry::Endpoint,
};

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

/// A hash ring (Envoy's ring hash) or lookup table (Maglev) over the
/// endpoints, rebuilt when they change.
pub(super) enum HashTable {
    Ring(Vec<(u64, usize)>),
    Maglev(Vec<usize>),
}

/// The endpoints' weights, for a weighted choice.
enum Weights {
    /// All equal: position `x` is endpoint `x mod n`.
    Even(usize),
    /// Cumulative weights: position `x mod total` falls in one endpoint's
    /// share.
    Cumulative(Vec<u64>),
}

impl Weights {
    fn of(eligible: &[&Endpoint]) -> Self {
        let first = eligible.first().map_or(1, |e| e.weight);
        if eligible.iter().all(|e| e.weight == first) {
            return Weights::Even(eligible.len().max(1));
        }
        let mut total = 0u64;
        Weights::Cumulative(
            eligible
                .iter()
                .map(|e| {
                    total += u64::from(e.weight.max(1));
                    total
                })
                .collect(),
        )
    }

    /// The endpoint at position `x` (any number: it wraps).
    fn at(&self, x: usize) -> usize {
        match self {
            Weights::Even(n) => x % n,
            Weights::Cumulative(c) => {
                let total = c.last().copied().unwrap_or(1);
                let x = x as u64 % total;
                c.partition_point(|&upto| upto <= x)
            }
        }
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

impl Cluster {
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

    /// Round robin, random and least request honour the endpoints'
    /// weights (ServiceEntry and WorkloadEntry `weight`): an endpoint of
    /// weight 3 is chosen three times as often as one of weight 1.
    fn simple(&self, eligible: &[&Endpoint], lb: Option<SimpleLb>, dialled: IpAddr) -> usize {
        let weights = Weights::of(eligible);
        let round_robin = || weights.at(self.next.fetch_add(1, Ordering::Relaxed));
        match lb {
            Some(SimpleLb::Random) => weights.at(fastrand::usize(..)),
            Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) if eligible.len() > 1 => {
                // Envoy's default: the less loaded of two random choices.
                let hosts = self.hosts.lock().expect("hosts lock");
                let load = |i: usize| hosts.get(&host_key(eligible[i])).map_or(0, |h| h.active);
                let (a, b) = (
                    weights.at(fastrand::usize(..)),
                    weights.at(fastrand::usize(..)),
                );
                if load(b) < load(a) { b } else { a }
            }
            // The address the client dialled, when it is an endpoint.
            Some(SimpleLb::Passthrough) => eligible
                .iter()
                .position(|e| e.address == Some(dialled))
                .unwrap_or_else(round_robin),
            _ => round_robin(),
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

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
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
    fn round_robin_and_random_follow_endpoint_weights() {
        let mut eps = endpoints(3);
        eps[0].weight = 3;
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let c = Cluster::default();
        let mut rr = [0usize; 3];
        for _ in 0..500 {
            rr[c.simple(&refs, None, IpAddr::from([0, 0, 0, 0]))] += 1;
        }
        assert_eq!(rr, [300, 100, 100], "weights 3:1:1, round robin");
        let mut random = [0usize; 3];
        for _ in 0..10_000 {
            random[c.simple(&refs, Some(SimpleLb::Random), IpAddr::from([0, 0, 0, 0]))] += 1;
        }
        // 6,000 expected for weight 3: σ ≈ 49, so ±4σ.
        assert!((5800..=6200).contains(&random[0]), "{random:?}");
        eps[0].weight = 1;
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let mut even = [0usize; 3];
        for _ in 0..300 {
            even[c.simple(&refs, None, IpAddr::from([0, 0, 0, 0]))] += 1;
        }
        assert_eq!(even, [100, 100, 100]);
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
}
