//! The per-request form of routing configuration, built once per snapshot:
//! VirtualService hosts resolved to FQDNs, match regexes compiled, route
//! weights normalised to cumulative thresholds, DestinationRules indexed by
//! host. Routing (the L7 issue) reads only this.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use regex::Regex;
use serde::Serialize;

use crate::istio::{
    Resource, Spec,
    common::StringMatch,
    networking::{Destination, HttpMatchRequest, HttpRoute, VirtualService},
};

/// How one string is matched, ready to run.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends, as Envoy's RE2 `safe_regex` full match.
    Regex(Regex),
}

impl Matcher {
    /// `None` for an empty StringMatch (matches anything); validation
    /// guarantees regexes compile, so a failure here is also "anything".
    pub fn new(m: &StringMatch, ignore_case: bool) -> Option<Self> {
        let fold = |s: &str| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        if let Some(e) = &m.exact {
            return Some(Self::Exact(fold(e)));
        }
        if let Some(p) = &m.prefix {
            return Some(Self::Prefix(fold(p)));
        }
        let re = m.regex.as_ref()?;
        let pattern = if ignore_case {
            format!("(?i)^(?:{re})$")
        } else {
            format!("^(?:{re})$")
        };
        Regex::new(&pattern).ok().map(Self::Regex)
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => s == e,
            Self::Prefix(p) => s.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(s),
        }
    }
}

impl Serialize for Matcher {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Exact(e) => s.collect_str(&format_args!("exact:{e}")),
            Self::Prefix(p) => s.collect_str(&format_args!("prefix:{p}")),
            Self::Regex(r) => s.collect_str(&format_args!("regex:{}", r.as_str())),
        }
    }
}

/// One `match` block: every condition must hold.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<Matcher>,
    pub ignore_uri_case: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Matcher>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<Matcher>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, Option<Matcher>)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub without_headers: Vec<(String, Option<Matcher>)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<(String, Option<Matcher>)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_namespace: String,
}

/// What a route match looks at in a request.
pub struct RequestView<'a> {
    /// The path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The service port the client connected to.
    pub port: u16,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

impl CompiledMatch {
    fn new(m: &HttpMatchRequest) -> Self {
        let map = |ms: &std::collections::BTreeMap<String, StringMatch>| {
            ms.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), Matcher::new(v, false)))
                .collect()
        };
        Self {
            uri: m
                .uri
                .as_ref()
                .and_then(|u| Matcher::new(u, m.ignore_uri_case)),
            ignore_uri_case: m.ignore_uri_case,
            method: m.method.as_ref().and_then(|u| Matcher::new(u, false)),
            authority: m.authority.as_ref().and_then(|u| Matcher::new(u, false)),
            headers: map(&m.headers),
            without_headers: map(&m.without_headers),
            query_params: m
                .query_params
                .iter()
                .map(|(k, v)| (k.clone(), Matcher::new(v, false)))
                .collect(),
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        }
    }

    /// Whether every condition holds for `r` (Istio ANDs the fields of
    /// one match block).
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        let header = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok());
        self.uri_matches(r.path)
            && self.method.as_ref().is_none_or(|m| m.matches(r.method))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(r.authority))
            && self.port.is_none_or(|p| p == r.port)
            && self.headers.iter().all(|(name, m)| match header(name) {
                // A header present with any value, for an empty matcher.
                Some(v) => m.as_ref().is_none_or(|m| m.matches(v)),
                None => false,
            })
            && self
                .without_headers
                .iter()
                .all(|(name, m)| match header(name) {
                    Some(v) => m.as_ref().is_some_and(|m| !m.matches(v)),
                    None => true,
                })
            && self
                .query_params
                .iter()
                .all(|(name, m)| match query_param(r.query, name) {
                    Some(v) => m.as_ref().is_none_or(|m| m.matches(&v)),
                    None => false,
                })
            && self
                .source_labels
                .iter()
                .all(|(k, v)| r.source_labels.get(k) == Some(v))
            && (self.source_namespace.is_empty() || self.source_namespace == r.source_namespace)
    }

    /// Whether a request's path matches the `uri` condition.
    pub fn uri_matches(&self, path: &str) -> bool {
        match &self.uri {
            None => true,
            Some(m) if self.ignore_uri_case => m.matches(&path.to_ascii_lowercase()),
            Some(m) => m.matches(path),
        }
    }
}

/// The value of query parameter `name` (percent-decoding `+` and `%xx`).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a route sends a request: a service host (FQDN), optionally one
/// subset of its endpoints and a port.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledDestination {
    pub host: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subset: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// One `http` route, with its weights as cumulative thresholds out of the
/// total (so a draw in `0..total` picks a destination with one search).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledHttpRoute {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub matches: Vec<CompiledMatch>,
    pub destinations: Vec<CompiledDestination>,
    pub cumulative_weights: Vec<u32>,
    /// Mirror targets with the share of requests each receives (0-100).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<(CompiledDestination, f64)>,
    /// `rewrite.uriRegexRewrite`, compiled.
    #[serde(skip)]
    pub uri_regex_rewrite: Option<(Regex, String)>,
    /// `corsPolicy.allowOrigins` (and the deprecated `allowOrigin`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cors_origins: Vec<Matcher>,
    /// Everything else the route does (redirect, direct response, rewrite,
    /// headers, timeout, retries, fault), read as written.
    #[serde(skip)]
    pub spec: HttpRoute,
}

impl CompiledHttpRoute {
    fn new(r: &HttpRoute, namespace: &str, cluster_domain: &str) -> Self {
        let dest = |d: &Destination| CompiledDestination {
            host: fqdn(&d.host, namespace, cluster_domain),
            subset: d.subset.clone(),
            port: d
                .port
                .as_ref()
                .and_then(|p| u16::try_from(p.number).ok())
                .filter(|p| *p != 0),
        };
        // `mirror` + `mirrorPercentage` (or the deprecated integer), and
        // the newer `mirrors` list; unset percentages mirror everything.
        let mut mirrors: Vec<(CompiledDestination, f64)> = r
            .mirror
            .iter()
            .map(|m| {
                let pct = r
                    .mirror_percentage
                    .as_ref()
                    .map(|p| p.value)
                    .or(r.mirror_percent.map(f64::from))
                    .unwrap_or(100.0);
                (dest(m), pct)
            })
            .collect();
        mirrors.extend(r.mirrors.iter().map(|m| {
            (
                dest(&m.destination),
                m.percentage.as_ref().map_or(100.0, |p| p.value),
            )
        }));
        Self {
            name: r.name.clone(),
            matches: r.matches.iter().map(CompiledMatch::new).collect(),
            destinations: r.route.iter().map(|d| dest(&d.destination)).collect(),
            cumulative_weights: normalise(r.route.iter().map(|d| d.weight)),
            mirrors,
            cors_origins: r
                .cors_policy
                .iter()
                .flat_map(|c| {
                    c.allow_origins
                        .iter()
                        .filter_map(|m| Matcher::new(m, false))
                        .chain(c.allow_origin.iter().map(|o| Matcher::Exact(o.clone())))
                })
                .collect(),
            uri_regex_rewrite: r
                .rewrite
                .as_ref()
                .and_then(|w| w.uri_regex_rewrite.as_ref())
                .and_then(|rr| {
                    // Envoy (RE2) writes groups as `\1`; the regex crate as `${1}`.
                    let groups = Regex::new(r"\\(\d)").ok()?;
                    let with = groups.replace_all(&rr.rewrite, "$${$1}").into_owned();
                    Some((Regex::new(&rr.pattern).ok()?, with))
                }),
            spec: r.clone(),
        }
    }

    /// Whether the route takes `r`: no match blocks, or any one of them.
    pub fn takes(&self, r: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(r))
    }

    /// The destination index for a draw `x` in `0..100`.
    pub fn pick(&self, x: u32) -> Option<usize> {
        let total = *self.cumulative_weights.last()?;
        if total == 0 {
            return None;
        }
        let x = x % total;
        Some(self.cumulative_weights.partition_point(|w| *w <= x))
    }
}

/// A route compiled in namespace `default` (unit tests elsewhere).
#[cfg(test)]
pub fn compile_route_for_tests(spec: &HttpRoute) -> CompiledHttpRoute {
    CompiledHttpRoute::new(spec, "default", "cluster.local")
}

/// Istio's weights: one destination takes everything; several share by
/// weight (validation ensures they total 100; anything else is scaled).
pub fn normalise(weights: impl IntoIterator<Item = Option<i32>>) -> Vec<u32> {
    let w: Vec<u32> = weights
        .into_iter()
        .map(|w| w.unwrap_or(0).max(0) as u32)
        .collect();
    if w.len() == 1 {
        return vec![100];
    }
    let total: u64 = w.iter().map(|x| u64::from(*x)).sum();
    if total == 0 {
        return vec![0; w.len()];
    }
    let mut acc = 0u64;
    w.iter()
        .map(|x| {
            acc += u64::from(*x);
            (acc * 100 / total) as u32
        })
        .collect()
}

/// One `tcp` or `tls` match block (Istio ANDs its fields).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledL4Match {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<crate::config::Cidr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_subnet: Option<crate::config::Cidr>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_namespace: String,
    /// `tls` routes: server names (`*.example.com` wildcards), lowercase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
}

/// What an L4 match looks at in a connection.
pub struct ConnView<'a> {
    pub port: u16,
    pub destination: std::net::IpAddr,
    pub source: std::net::IpAddr,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
    /// The TLS ClientHello's server name, when there was one.
    pub sni: Option<&'a str>,
}

impl CompiledL4Match {
    /// The fields `tcp` and `tls` matches share.
    fn common(
        port: Option<u32>,
        destination_subnets: &[String],
        source_labels: &BTreeMap<String, String>,
        source_namespace: &str,
    ) -> Self {
        Self {
            port: port.and_then(|p| u16::try_from(p).ok()),
            destination_subnets: cidrs(destination_subnets),
            source_labels: source_labels.clone(),
            source_namespace: source_namespace.to_owned(),
            ..Self::default()
        }
    }

    pub fn matches(&self, c: &ConnView<'_>) -> bool {
        self.port.is_none_or(|p| p == c.port)
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|s| s.contains(c.destination)))
            && self.source_subnet.is_none_or(|s| s.contains(c.source))
            && self
                .source_labels
                .iter()
                .all(|(k, v)| c.source_labels.get(k) == Some(v))
            && (self.source_namespace.is_empty() || self.source_namespace == c.source_namespace)
            && (self.sni_hosts.is_empty()
                || c.sni.is_some_and(|sni| {
                    let sni = sni.to_ascii_lowercase();
                    self.sni_hosts.iter().any(|h| match h.strip_prefix('*') {
                        Some(suffix) => sni.ends_with(suffix),
                        None => *h == sni,
                    })
                }))
    }
}

/// A `tcp` or `tls` route: first match wins, then a weighted destination.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledL4Route {
    pub matches: Vec<CompiledL4Match>,
    pub destinations: Vec<CompiledDestination>,
    pub cumulative_weights: Vec<u32>,
}

impl CompiledL4Route {
    pub fn takes(&self, c: &ConnView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(c))
    }

    /// A destination drawn by weight.
    pub fn pick(&self) -> Option<&CompiledDestination> {
        let total = *self.cumulative_weights.last()?;
        if total == 0 {
            return None;
        }
        let x = fastrand::u32(0..total);
        let i = self.cumulative_weights.partition_point(|w| *w <= x);
        self.destinations.get(i)
    }
}

fn l4_route(
    route: &[crate::istio::networking::RouteDestination],
    matches: Vec<CompiledL4Match>,
    namespace: &str,
    cluster_domain: &str,
) -> CompiledL4Route {
    CompiledL4Route {
        matches,
        destinations: route
            .iter()
            .map(|d| CompiledDestination {
                host: fqdn(&d.destination.host, namespace, cluster_domain),
                subset: d.destination.subset.clone(),
                port: d
                    .destination
                    .port
                    .as_ref()
                    .and_then(|p| u16::try_from(p.number).ok())
                    .filter(|p| *p != 0),
            })
            .collect(),
        cumulative_weights: normalise(route.iter().map(|d| d.weight)),
    }
}

fn cidrs(v: &[String]) -> Vec<crate::config::Cidr> {
    v.iter().filter_map(|s| s.parse().ok()).collect()
}

/// A VirtualService, compiled.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledVirtualService {
    pub name: String,
    pub namespace: String,
    /// Hosts as FQDNs (short names resolved in the resource's namespace).
    pub hosts: Vec<String>,
    /// Whether it applies to traffic inside the mesh (no `gateways`, or
    /// `mesh` among them), rather than only at gateways.
    pub for_mesh: bool,
    pub http: Vec<CompiledHttpRoute>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<CompiledL4Route>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<CompiledL4Route>,
    #[serde(skip)]
    pub resource: Arc<Resource>,
}

/// Routing configuration by host.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Routes {
    pub virtual_services: HashMap<String, Vec<Arc<CompiledVirtualService>>>,
    pub destination_rules: HashMap<String, Arc<Resource>>,
    /// DestinationRule subsets by host, then name: the labels an endpoint
    /// must carry.
    pub subsets: HashMap<String, HashMap<String, BTreeMap<String, String>>>,
}

/// The entry of `map` for `host`: its own, else the most specific
/// wildcard (`*.example.com` before `*.com` before `*`), as Istio picks
/// one host's configuration, never a merge of several.
fn most_specific<'a, V>(
    map: &'a HashMap<String, V>,
    host: &str,
    usable: impl Fn(&V) -> bool,
) -> Option<(&'a String, &'a V)> {
    if let Some(e) = map.get_key_value(host).filter(|(_, v)| usable(v)) {
        return Some(e);
    }
    map.iter()
        .filter(|(k, v)| {
            usable(v)
                && k.strip_prefix('*')
                    .is_some_and(|suffix| host.ends_with(suffix) && host.len() > suffix.len())
        })
        .max_by_key(|(k, _)| k.len())
}

impl Routes {
    /// The VirtualServices for `host` inside the mesh: those of the most
    /// specific host that has any (exact, else the longest wildcard).
    pub fn virtual_services_for(&self, host: &str) -> Vec<&Arc<CompiledVirtualService>> {
        most_specific(&self.virtual_services, host, |vs| {
            vs.iter().any(|v| v.for_mesh)
        })
        .map(|(_, v)| v.iter().filter(|vs| vs.for_mesh).collect())
        .unwrap_or_default()
    }

    /// The DestinationRule for `host` (exact, else the longest wildcard).
    pub fn destination_rule_for(
        &self,
        host: &str,
    ) -> Option<&crate::istio::networking::DestinationRule> {
        most_specific(&self.destination_rules, host, |_| true).and_then(|(_, r)| match &r.spec {
            Spec::DestinationRule(dr) => Some(dr),
            _ => None,
        })
    }

    /// The labels of `subset` of `host`'s DestinationRule.
    pub fn subset_labels(&self, host: &str, subset: &str) -> Option<&BTreeMap<String, String>> {
        most_specific(&self.subsets, host, |_| true).and_then(|(_, s)| s.get(subset))
    }
}

/// Istio's short-name rule: a host without a dot is a service in the
/// resource's namespace; anything with a dot (or `*`) is taken as written.
pub fn fqdn(host: &str, namespace: &str, cluster_domain: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{cluster_domain}")
    }
}

impl Routes {
    pub fn new<'a>(
        resources: impl IntoIterator<Item = &'a Arc<Resource>>,
        cluster_domain: &str,
    ) -> Self {
        let mut routes = Routes::default();
        // Oldest first, so the first rule for a host is the one Istio keeps.
        let mut rs: Vec<&Arc<Resource>> = resources.into_iter().collect();
        rs.sort_by(|a, b| {
            (
                &a.metadata.creation_timestamp,
                &a.metadata.namespace,
                &a.metadata.name,
            )
                .cmp(&(
                    &b.metadata.creation_timestamp,
                    &b.metadata.namespace,
                    &b.metadata.name,
                ))
        });
        for r in rs {
            let ns = &r.metadata.namespace;
            match &r.spec {
                Spec::VirtualService(vs) => {
                    let c = Arc::new(compile_vs(r, vs, cluster_domain));
                    for h in &c.hosts {
                        routes
                            .virtual_services
                            .entry(h.clone())
                            .or_default()
                            .push(c.clone());
                    }
                }
                Spec::DestinationRule(dr) => {
                    let host = fqdn(&dr.host, ns, cluster_domain);
                    if routes.destination_rules.contains_key(&host) {
                        continue;
                    }
                    routes.destination_rules.insert(host.clone(), r.clone());
                    routes.subsets.insert(
                        host,
                        dr.subsets
                            .iter()
                            .map(|s| (s.name.clone(), s.labels.clone()))
                            .collect(),
                    );
                }
                _ => {}
            }
        }
        routes
    }
}

fn compile_vs(
    r: &Arc<Resource>,
    vs: &VirtualService,
    cluster_domain: &str,
) -> CompiledVirtualService {
    CompiledVirtualService {
        name: r.metadata.name.clone(),
        namespace: r.metadata.namespace.clone(),
        hosts: vs
            .hosts
            .iter()
            .map(|h| fqdn(h, &r.metadata.namespace, cluster_domain))
            .collect(),
        for_mesh: vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh"),
        http: vs
            .http
            .iter()
            .map(|h| CompiledHttpRoute::new(h, &r.metadata.namespace, cluster_domain))
            .collect(),
        tcp: vs
            .tcp
            .iter()
            .map(|t| {
                let matches = t
                    .matches
                    .iter()
                    .map(|m| CompiledL4Match {
                        source_subnet: m.source_subnet.parse().ok(),
                        ..CompiledL4Match::common(
                            m.port,
                            &m.destination_subnets,
                            &m.source_labels,
                            &m.source_namespace,
                        )
                    })
                    .collect();
                l4_route(&t.route, matches, &r.metadata.namespace, cluster_domain)
            })
            .collect(),
        tls: vs
            .tls
            .iter()
            .map(|t| {
                let matches = t
                    .matches
                    .iter()
                    .map(|m| CompiledL4Match {
                        sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                        ..CompiledL4Match::common(
                            m.port,
                            &m.destination_subnets,
                            &m.source_labels,
                            &m.source_namespace,
                        )
                    })
                    .collect();
                l4_route(&t.route, matches, &r.metadata.namespace, cluster_domain)
            })
            .collect(),
        resource: r.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_become_cumulative_thresholds() {
        assert_eq!(normalise([Some(75), Some(25)]), [75, 100]);
        assert_eq!(normalise([None]), [100], "a single destination takes all");
        assert_eq!(normalise([Some(1), Some(1)]), [50, 100], "scaled to 100");
        assert_eq!(normalise([Some(0), Some(100)]), [0, 100]);
        let r = CompiledHttpRoute {
            name: String::new(),
            matches: vec![],
            destinations: vec![],
            cumulative_weights: normalise([Some(90), Some(10)]),
            mirrors: vec![],
            cors_origins: vec![],
            uri_regex_rewrite: None,
            spec: HttpRoute::default(),
        };
        let picks: Vec<usize> = (0..100).filter_map(|x| r.pick(x)).collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 90);
        assert_eq!(picks.iter().filter(|i| **i == 1).count(), 10);
        let zero = CompiledHttpRoute {
            cumulative_weights: normalise([Some(0), Some(100)]),
            ..r
        };
        assert!((0..100).all(|x| zero.pick(x) == Some(1)));
    }

    #[test]
    fn the_most_specific_host_applies_alone() {
        let yaml: String = ["*", "*.example.com", "api.example.com", "*.other.com"]
            .iter()
            .map(|h| {
                format!(
                    "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                     metadata: {{name: \"{h}\", namespace: default}}\nspec: {{hosts: [\"{h}\"]}}\n"
                )
            })
            .collect();
        let mut parsed = crate::documents::Parsed::default();
        crate::documents::parse_file(
            std::path::Path::new("vs.yaml"),
            yaml.as_bytes(),
            &mut parsed,
        );
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let resources: Vec<Arc<Resource>> = parsed
            .documents
            .into_iter()
            .filter_map(|d| match d {
                crate::documents::Document::Istio(r) => Some(Arc::new(r)),
                _ => None,
            })
            .collect();
        let r = Routes::new(&resources, "cluster.local");
        let names = |host| {
            r.virtual_services_for(host)
                .iter()
                .map(|v| v.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("api.example.com"), ["api.example.com"]);
        assert_eq!(names("web.example.com"), ["*.example.com"]);
        assert_eq!(names("example.com"), ["*"]);
    }

    #[test]
    fn matchers_follow_envoy_semantics() {
        let re = Matcher::new(
            &StringMatch {
                regex: Some("/api/v[12]".into()),
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert!(
            re.matches("/api/v1") && !re.matches("/api/v1/x"),
            "full match"
        );
        let m = CompiledMatch::new(&HttpMatchRequest {
            uri: Some(StringMatch {
                prefix: Some("/API".into()),
                ..Default::default()
            }),
            ignore_uri_case: true,
            ..Default::default()
        });
        assert!(m.uri_matches("/api/x") && m.uri_matches("/Api"));
        assert_eq!(
            fqdn("reviews", "bookinfo", "cluster.local"),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(fqdn("httpbin.org", "x", "cluster.local"), "httpbin.org");
        assert_eq!(fqdn("*", "x", "cluster.local"), "*");
    }
}
