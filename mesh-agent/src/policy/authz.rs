//! AuthorizationPolicy (`security.istio.io/v1`, `v1beta1`), decided by the
//! destination's agent with Istio's semantics:
//!
//! * Scope: a policy in the root namespace applies mesh-wide (with a
//!   selector: to matching workloads of every namespace), else to its own
//!   namespace (with a selector: to the workloads it matches there).
//!   `targetRef(s)` bind to gateways and services, not to pods: not applied.
//! * Order: CUSTOM, then DENY, then ALLOW. A DENY that matches denies; if
//!   any ALLOW policy applies, a request that matches none is denied; an
//!   ALLOW policy without rules matches nothing, `rules: [{}]` everything.
//!   AUDIT only marks the request for the audit log.
//! * A rule matches when one of its `from`, one of its `to` and all of its
//!   `when` match; within a source or an operation every field set must
//!   match (any of its values, none of its `not` values).
//! * On a connection that is not HTTP, fields only HTTP carries (methods,
//!   paths, hosts, request principals, headers, JWT claims) cannot be
//!   checked: an ALLOW rule using them never matches, a DENY (or AUDIT)
//!   rule ignores them — it denies on its other fields — as Istio does.
//! * Anything a rule says that the agent cannot apply (an unknown `when`
//!   key) fails closed: the ALLOW rule never matches, the DENY rule always
//!   does; `/config_dump` and the log say which.
//! * `istio.io/dry-run: "true"`: evaluated, logged and counted as what
//!   would have happened, never enforced.
//! * CUSTOM asks an HTTP authorizer (`policy::ext_authz`) per request; on
//!   a connection that is not HTTP it cannot, and a CUSTOM policy that
//!   matches the connection denies it.

pub mod matchers;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    config::Cidr,
    istio::{Resource, Spec, security},
    workload::Workload,
};
use matchers::{PathMatch, Str, host_matches, in_blocks};

pub use super::jwt::Authenticated;

/// The annotation that makes a policy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Custom,
    Deny,
    Allow,
    Audit,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Custom => "CUSTOM",
            Self::Deny => "DENY",
            Self::Allow => "ALLOW",
            Self::Audit => "AUDIT",
        }
    }
}

/// What one request (or connection) is, as policy sees it.
pub struct Attributes<'a> {
    /// The peer's proved identity without `spiffe://`
    /// (`cluster.local/ns/default/sa/sleep`); `None` for plaintext.
    pub principal: Option<&'a str>,
    /// The namespace of that identity.
    pub namespace: Option<&'a str>,
    /// The connection's peer address (`source.ip`, `ipBlocks`).
    pub source_ip: IpAddr,
    /// The client's address as the request says it (`remote.ip`,
    /// `remoteIpBlocks`): the peer address, since the agent trusts no
    /// proxy in front of it.
    pub remote_ip: IpAddr,
    pub destination: SocketAddr,
    /// The request, on an HTTP connection.
    pub http: Option<&'a HttpAttributes<'a>>,
}

pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// `:authority` or `Host`.
    pub authority: &'a str,
    /// Normalized, without the query ([`matchers::normalize_path`]).
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The request's verified JWT, if it carried one.
    pub auth: Option<&'a Authenticated>,
}

/// One policy, compiled.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `namespace/name`, as metrics and logs name it.
    pub id: String,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    #[serde(skip)]
    namespace: String,
    #[serde(skip)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(skip)]
    rules: Vec<Rule>,
    /// The rules by the principal or namespace they need: a request is
    /// checked against those of its peer and the others, not every rule
    /// (1,000 rules cost two lookups).
    #[serde(skip)]
    index: RuleIndex,
    /// Some rule needs the HTTP request to be decided.
    pub uses_http: bool,
    /// What cannot be applied, and how it fails closed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Policy {
    /// The policy of a (validated) resource; `None` for other kinds and for
    /// `targetRef` policies (they bind to gateways and services).
    pub fn from_resource(r: &Resource) -> Option<Self> {
        let Spec::AuthorizationPolicy(s) = &r.spec else {
            return None;
        };
        if s.target_ref.is_some() || !s.target_refs.is_empty() {
            return None;
        }
        let action = match s.action {
            None | Some(security::AuthorizationAction::Allow) => Action::Allow,
            Some(security::AuthorizationAction::Deny) => Action::Deny,
            Some(security::AuthorizationAction::Audit) => Action::Audit,
            Some(security::AuthorizationAction::Custom) => Action::Custom,
        };
        let mut problems = Vec::new();
        let rules: Vec<Rule> = s
            .rules
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                let rule = Rule::compile(r);
                if let Some(e) = &rule.broken {
                    problems.push(format!(
                        "rules[{i}]: {e}; {}",
                        if action == Action::Allow {
                            "the rule never matches"
                        } else {
                            "the rule matches every request"
                        }
                    ));
                }
                rule
            })
            .collect();
        let index = RuleIndex::new(&rules);
        Some(Self {
            id: format!("{}/{}", r.metadata.namespace, r.metadata.name),
            action,
            provider: s.provider.as_ref().map(|p| p.name.clone()),
            // Go's `strconv.ParseBool` spellings of true, as Istio reads it.
            dry_run: r
                .metadata
                .annotations
                .get(DRY_RUN_ANNOTATION)
                .is_some_and(|v| ["1", "t", "T", "TRUE", "true", "True"].contains(&v.as_str())),
            namespace: r.metadata.namespace.clone(),
            selector: s.selector.as_ref().map(|s| s.match_labels.clone()),
            // CUSTOM asks an HTTP authorizer: it needs the request.
            uses_http: action == Action::Custom || rules.iter().any(|r| r.uses_http),
            index,
            rules,
            problems,
        })
    }

    /// Whether the policy applies to workload `w`.
    pub fn applies_to(&self, w: &Workload, root_namespace: &str) -> bool {
        let in_scope = self.namespace == w.namespace || self.namespace == root_namespace;
        in_scope
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }

    /// Whether the request matches the policy (any rule).
    pub fn matches(&self, a: &Attributes<'_>) -> bool {
        // HTTP-only fields on a non-HTTP connection: ALLOW never matches on
        // them, DENY and AUDIT ignore them (see the module comment).
        let tcp = self.action != Action::Allow;
        self.index
            .any(a, |i| self.rules[*i].matches(a, tcp, self.action))
    }
}

/// Rules whose every source names exact principals (or else exact
/// namespaces) can only match a peer with one of them: indexed by it. The
/// rest (and rules that cannot be applied) are checked always.
#[derive(Debug, Default)]
struct RuleIndex {
    by_principal: HashMap<String, Vec<usize>>,
    by_namespace: HashMap<String, Vec<usize>>,
    rest: Vec<usize>,
}

impl RuleIndex {
    fn new(rules: &[Rule]) -> Self {
        let mut ix = Self::default();
        for (i, r) in rules.iter().enumerate() {
            let applicable = r.broken.is_none() && !r.from.is_empty();
            if let Some(ps) = applicable
                .then(|| exact_values(r, |s| &s.principals))
                .flatten()
            {
                add(&mut ix.by_principal, ps, i);
            } else if let Some(ns) = applicable
                .then(|| exact_values(r, |s| &s.namespaces))
                .flatten()
            {
                add(&mut ix.by_namespace, ns, i);
            } else {
                ix.rest.push(i);
            }
        }
        ix
    }

    /// Whether any rule a peer of `a`'s identity could match does.
    fn any(&self, a: &Attributes<'_>, rule: impl Fn(&usize) -> bool) -> bool {
        let of = |m: &HashMap<String, Vec<usize>>, k: Option<&str>| {
            k.and_then(|k| m.get(k))
                .is_some_and(|v| v.iter().any(&rule))
        };
        of(&self.by_principal, a.principal)
            || of(&self.by_namespace, a.namespace)
            || self.rest.iter().any(&rule)
    }
}

/// The exact values `field` of every source of `r` lists, if every source
/// lists some and all are exact.
fn exact_values(r: &Rule, field: impl Fn(&SourceMatch) -> &Field<Str>) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    for s in &r.from {
        let f = field(s);
        if f.values.is_empty() {
            return None;
        }
        for m in &f.values {
            match m {
                Str::Exact(v) => out.push(v.as_str()),
                _ => return None,
            }
        }
    }
    Some(out)
}

fn add(index: &mut HashMap<String, Vec<usize>>, keys: Vec<&str>, rule: usize) {
    for k in keys {
        let rules = index.entry(k.to_owned()).or_default();
        if rules.last() != Some(&rule) {
            rules.push(rule);
        }
    }
}

/// The policies of one workload, in evaluation order.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadAuthz {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Arc<Policy>>,
    /// Some policy needs the HTTP request (or a RequestAuthentication
    /// applies): HTTP connections are decided per request.
    pub per_request: bool,
}

/// The outcome of evaluating a workload's policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'p> {
    pub allowed: bool,
    /// The action that decided, and the policy (`None`: no policy, or no
    /// ALLOW policy matched).
    pub action: Option<Action>,
    pub policy: Option<&'p Policy>,
    /// The matching AUDIT policy, if any.
    pub audit: Option<&'p Policy>,
    /// What the dry-run policies would have changed: the verdict with
    /// them enforced, when it differs.
    pub dry_run: Option<(bool, Option<Action>, Option<&'p Policy>)>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for Policy {}

impl WorkloadAuthz {
    /// The policies among `all` that apply to `w`, in evaluation order.
    pub fn for_workload(all: &[Arc<Policy>], w: &Workload, root_namespace: &str) -> Self {
        let mut policies: Vec<Arc<Policy>> = all
            .iter()
            .filter(|p| p.applies_to(w, root_namespace))
            .cloned()
            .collect();
        policies.sort_by_key(|p| p.action);
        Self {
            per_request: policies.iter().any(|p| p.uses_http),
            policies,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The CUSTOM policy whose provider must be asked first, if one
    /// matches (enforced ones only).
    pub fn custom(&self, a: &Attributes<'_>) -> Option<&Policy> {
        self.policies
            .iter()
            .filter(|p| p.action == Action::Custom && !p.dry_run)
            .find(|p| p.matches(a))
            .map(|p| &**p)
    }

    /// DENY, then ALLOW (CUSTOM is asked by the caller, see [`Self::custom`]).
    pub fn decide(&self, a: &Attributes<'_>) -> Verdict<'_> {
        let (allowed, action, policy) = self.evaluate(a, false);
        let audit = self
            .policies
            .iter()
            .filter(|p| p.action == Action::Audit && !p.dry_run)
            .find(|p| p.matches(a))
            .map(|p| &**p);
        let dry_run = if self.policies.iter().any(|p| p.dry_run) {
            let shadow = self.evaluate(a, true);
            (shadow.0 != allowed).then_some(shadow)
        } else {
            None
        };
        Verdict {
            allowed,
            action,
            policy,
            audit,
            dry_run,
        }
    }

    fn evaluate(
        &self,
        a: &Attributes<'_>,
        with_dry_run: bool,
    ) -> (bool, Option<Action>, Option<&Policy>) {
        let live = |p: &&Arc<Policy>| with_dry_run || !p.dry_run;
        let of = |action: Action| {
            self.policies
                .iter()
                .filter(live)
                .filter(move |p| p.action == action)
        };
        // An HTTP authorizer cannot be asked about a connection that is not
        // HTTP: a CUSTOM policy matching one denies it (fails closed).
        if a.http.is_none()
            && let Some(p) = of(Action::Custom).find(|p| p.matches(a))
        {
            return (false, Some(Action::Custom), Some(p));
        }
        if let Some(p) = of(Action::Deny).find(|p| p.matches(a)) {
            return (false, Some(Action::Deny), Some(p));
        }
        let mut allows = of(Action::Allow).peekable();
        if allows.peek().is_none() {
            return (true, None, None);
        }
        match allows.find(|p| p.matches(a)) {
            Some(p) => (true, Some(Action::Allow), Some(p)),
            None => (false, Some(Action::Allow), None),
        }
    }
}

/// A value list and its negation, as every source and operation field is.
#[derive(Debug)]
struct Field<T> {
    values: Vec<T>,
    not: Vec<T>,
}

impl<T> Field<T> {
    fn is_set(&self) -> bool {
        !self.values.is_empty() || !self.not.is_empty()
    }

    fn matches(&self, f: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&f)) && !self.not.iter().any(&f)
    }
}

fn strings(values: &[String], not: &[String]) -> Field<Str> {
    Field {
        values: values.iter().map(|s| Str::new(s)).collect(),
        not: not.iter().map(|s| Str::new(s)).collect(),
    }
}

fn try_list<T>(
    values: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
    broken: &mut Option<String>,
) -> Vec<T> {
    values
        .iter()
        .filter_map(|v| match parse(v) {
            Ok(t) => Some(t),
            Err(e) => {
                broken.get_or_insert(e);
                None
            }
        })
        .collect()
}

#[derive(Debug)]
struct SourceMatch {
    principals: Field<Str>,
    request_principals: Field<Str>,
    namespaces: Field<Str>,
    service_accounts: Field<String>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
}

#[derive(Debug)]
struct OperationMatch {
    hosts: Field<Str>,
    ports: Field<u16>,
    methods: Field<Str>,
    paths: Field<PathMatch>,
}

#[derive(Debug)]
enum Key {
    Header(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    /// `namespace/service-account` of the peer's identity.
    SourceServiceAccount,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    AuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
}

impl Key {
    fn parse(k: &str) -> Result<Self, String> {
        let bracketed = |prefix: &str| -> Option<Vec<String>> {
            let rest = k.strip_prefix(prefix)?;
            let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
            let parts: Vec<String> = inner.split("][").map(str::to_owned).collect();
            (!parts.iter().any(String::is_empty)).then_some(parts)
        };
        Ok(match k {
            "source.ip" => Self::SourceIp,
            "remote.ip" => Self::RemoteIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "source.serviceAccount" => Self::SourceServiceAccount,
            "request.auth.principal" => Self::AuthPrincipal,
            "request.auth.audiences" => Self::AuthAudiences,
            "request.auth.presenter" => Self::AuthPresenter,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            // The destination's agent terminates no TLS a client named:
            // there is no SNI to compare, and a rule on it fails closed.
            "connection.sni" => {
                return Err(
                    "when: connection.sni is not available to this data plane (no TLS a client \
                     named a server for ends here)"
                        .into(),
                );
            }
            _ => {
                if let Some(mut h) = bracketed("request.headers")
                    && h.len() == 1
                {
                    Self::Header(h.remove(0).to_ascii_lowercase())
                } else if let Some(path) = bracketed("request.auth.claims") {
                    Self::AuthClaims(path)
                } else {
                    return Err(format!("when: key {k:?} is not supported"));
                }
            }
        })
    }

    fn uses_http(&self) -> bool {
        matches!(
            self,
            Self::Header(_)
                | Self::AuthPrincipal
                | Self::AuthAudiences
                | Self::AuthPresenter
                | Self::AuthClaims(_)
        )
    }
}

#[derive(Debug)]
enum Values {
    Strings(Field<Str>),
    Ips(Field<Cidr>),
    Ports(Field<u16>),
}

#[derive(Debug)]
struct Condition {
    key: Key,
    values: Values,
}

#[derive(Debug)]
struct Rule {
    from: Vec<SourceMatch>,
    to: Vec<OperationMatch>,
    when: Vec<Condition>,
    uses_http: bool,
    /// Why the rule cannot be applied as written.
    broken: Option<String>,
}

fn port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("{s:?} is not a port number"))
}

impl Rule {
    fn compile(r: &security::Rule) -> Self {
        let mut broken = None;
        let from: Vec<SourceMatch> = r
            .from
            .iter()
            .filter_map(|f| f.source.as_ref())
            .map(|s| SourceMatch {
                principals: strings(&s.principals, &s.not_principals),
                request_principals: strings(&s.request_principals, &s.not_request_principals),
                namespaces: strings(&s.namespaces, &s.not_namespaces),
                service_accounts: Field {
                    values: s.service_accounts.clone(),
                    not: s.not_service_accounts.clone(),
                },
                ip_blocks: Field {
                    values: try_list(&s.ip_blocks, matchers::cidr, &mut broken),
                    not: try_list(&s.not_ip_blocks, matchers::cidr, &mut broken),
                },
                remote_ip_blocks: Field {
                    values: try_list(&s.remote_ip_blocks, matchers::cidr, &mut broken),
                    not: try_list(&s.not_remote_ip_blocks, matchers::cidr, &mut broken),
                },
            })
            .collect();
        let to: Vec<OperationMatch> =
            r.to.iter()
                .filter_map(|t| t.operation.as_ref())
                .map(|o| OperationMatch {
                    hosts: strings(&o.hosts, &o.not_hosts),
                    ports: Field {
                        values: try_list(&o.ports, port, &mut broken),
                        not: try_list(&o.not_ports, port, &mut broken),
                    },
                    methods: strings(&o.methods, &o.not_methods),
                    paths: Field {
                        values: try_list(&o.paths, PathMatch::new, &mut broken),
                        not: try_list(&o.not_paths, PathMatch::new, &mut broken),
                    },
                })
                .collect();
        let when: Vec<Condition> = r
            .when
            .iter()
            .filter_map(|c| {
                let key = match Key::parse(&c.key) {
                    Ok(k) => k,
                    Err(e) => {
                        broken.get_or_insert(e);
                        return None;
                    }
                };
                let values = match key {
                    Key::SourceIp | Key::RemoteIp | Key::DestinationIp => Values::Ips(Field {
                        values: try_list(&c.values, matchers::cidr, &mut broken),
                        not: try_list(&c.not_values, matchers::cidr, &mut broken),
                    }),
                    Key::DestinationPort => Values::Ports(Field {
                        values: try_list(&c.values, port, &mut broken),
                        not: try_list(&c.not_values, port, &mut broken),
                    }),
                    _ => Values::Strings(strings(&c.values, &c.not_values)),
                };
                Some(Condition { key, values })
            })
            .collect();
        let uses_http = from.iter().any(|s| s.request_principals.is_set())
            || to
                .iter()
                .any(|o| o.hosts.is_set() || o.methods.is_set() || o.paths.is_set())
            || when.iter().any(|c| c.key.uses_http());
        Self {
            from,
            to,
            when,
            uses_http,
            broken,
        }
    }

    /// `tcp`: what an HTTP-only field gives on a non-HTTP connection.
    fn matches(&self, a: &Attributes<'_>, tcp: bool, action: Action) -> bool {
        if self.broken.is_some() {
            return action != Action::Allow;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a, tcp)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, tcp)))
            && self.when.iter().all(|c| c.matches(a, tcp))
    }
}

/// `namespace/service-account` of the peer's identity.
fn service_account(a: &Attributes<'_>) -> Option<String> {
    a.principal
        .and_then(|p| p.split_once("/ns/"))
        .map(|(_, rest)| rest.replacen("/sa/", "/", 1))
}

/// An HTTP-only field: checked against the request, or `tcp` without one.
fn on_http(a: &Attributes<'_>, tcp: bool, f: impl Fn(&HttpAttributes<'_>) -> bool) -> bool {
    match a.http {
        Some(h) => f(h),
        None => tcp,
    }
}

impl SourceMatch {
    fn matches(&self, a: &Attributes<'_>, tcp: bool) -> bool {
        let principal = a.principal.unwrap_or_default();
        let namespace = a.namespace.unwrap_or_default();
        self.principals.matches(|m| m.matches(principal))
            && self.namespaces.matches(|m| m.matches(namespace))
            && (!self.service_accounts.is_set() || {
                let sa = service_account(a).unwrap_or_default();
                self.service_accounts.matches(|s| *s == sa)
            })
            && (self.ip_blocks.values.is_empty() || in_blocks(&self.ip_blocks.values, a.source_ip))
            && !in_blocks(&self.ip_blocks.not, a.source_ip)
            && (self.remote_ip_blocks.values.is_empty()
                || in_blocks(&self.remote_ip_blocks.values, a.remote_ip))
            && !in_blocks(&self.remote_ip_blocks.not, a.remote_ip)
            && (!self.request_principals.is_set()
                || on_http(a, tcp, |h| {
                    let rp = h.auth.map_or("", |t| t.principal.as_str());
                    self.request_principals.matches(|m| m.matches(rp))
                }))
    }
}

impl OperationMatch {
    fn matches(&self, a: &Attributes<'_>, tcp: bool) -> bool {
        let port = a.destination.port();
        self.ports.matches(|p| *p == port)
            && (!self.hosts.is_set()
                || on_http(a, tcp, |h| {
                    self.hosts.matches(|m| host_matches(m, h.authority))
                }))
            && (!self.methods.is_set()
                || on_http(a, tcp, |h| self.methods.matches(|m| m.matches(h.method))))
            && (!self.paths.is_set()
                || on_http(a, tcp, |h| self.paths.matches(|m| m.matches(h.path))))
    }
}

impl Condition {
    fn matches(&self, a: &Attributes<'_>, tcp: bool) -> bool {
        let strs = |v: &[&str]| match &self.values {
            Values::Strings(f) => {
                // Any of the values present matches; none may match a `not`.
                (f.values.is_empty() || v.iter().any(|s| f.values.iter().any(|m| m.matches(s))))
                    && !v.iter().any(|s| f.not.iter().any(|m| m.matches(s)))
                    // A key with `values` requires the attribute.
                    && (f.values.is_empty() || !v.is_empty())
            }
            _ => false,
        };
        let ip = |ip: IpAddr| match &self.values {
            Values::Ips(f) => {
                (f.values.is_empty() || in_blocks(&f.values, ip)) && !in_blocks(&f.not, ip)
            }
            _ => false,
        };
        match &self.key {
            Key::SourceIp => ip(a.source_ip),
            Key::RemoteIp => ip(a.remote_ip),
            Key::DestinationIp => ip(a.destination.ip()),
            Key::DestinationPort => match &self.values {
                Values::Ports(f) => f.matches(|p| *p == a.destination.port()),
                _ => false,
            },
            Key::SourceNamespace => strs(&a.namespace.into_iter().collect::<Vec<_>>()),
            Key::SourcePrincipal => strs(&a.principal.into_iter().collect::<Vec<_>>()),
            Key::SourceServiceAccount => {
                let sa = service_account(a);
                strs(&sa.as_deref().into_iter().collect::<Vec<_>>())
            }
            Key::Header(name) => on_http(a, tcp, |h| match name.as_str() {
                // Pseudo-headers, and Host as HTTP/2 carries it.
                ":authority" | "host" => strs(&[h.authority]),
                ":path" => strs(&[h.path]),
                ":method" => strs(&[h.method]),
                _ => {
                    // Repeated headers are one value joined by commas, as
                    // Envoy sees them: no value can be matched on its own.
                    let v: Vec<&str> = h
                        .headers
                        .get_all(name.as_str())
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    if v.is_empty() {
                        strs(&[])
                    } else {
                        strs(&[v.join(",").as_str()])
                    }
                }
            }),
            Key::AuthPrincipal => on_http(a, tcp, |h| {
                strs(
                    &h.auth
                        .map(|t| t.principal.as_str())
                        .into_iter()
                        .collect::<Vec<_>>(),
                )
            }),
            Key::AuthPresenter => on_http(a, tcp, |h| {
                strs(
                    &h.auth
                        .and_then(|t| t.presenter.as_deref())
                        .into_iter()
                        .collect::<Vec<_>>(),
                )
            }),
            Key::AuthAudiences => on_http(a, tcp, |h| {
                strs(
                    &h.auth
                        .map(|t| t.audiences.iter().map(String::as_str).collect::<Vec<_>>())
                        .unwrap_or_default(),
                )
            }),
            Key::AuthClaims(path) => on_http(a, tcp, |h| {
                let values = h.auth.map(|t| t.claim(path)).unwrap_or_default();
                strs(&values.iter().map(String::as_str).collect::<Vec<_>>())
            }),
        }
    }
}

#[cfg(test)]
mod tests;
