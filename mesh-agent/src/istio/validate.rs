//! Checks Istio resources the way `istioctl validate` does: required
//! fields, value ranges, mutually exclusive fields, regex syntax, weights,
//! durations, selectors and host names. Every problem names its field path;
//! the parser turns paths into lines.
//!
//! Also reports which fields are accepted but not acted on yet, so nothing
//! a user wrote is silently dropped.

mod destination_rule;
mod enforced;
mod networking;
mod security;
mod telemetry;
mod virtual_service;

use std::{collections::BTreeSet, net::IpAddr, time::Duration as StdDuration};

use super::{
    Kind, Problem, Resource, Severity, Spec,
    common::{Duration, Percent, StringMatch, WorkloadSelector},
    networking::*,
    security::*,
    telemetry::*,
};

/// Collects the problems of one resource.
struct Check<'a> {
    r: &'a Resource,
    out: Vec<Problem>,
}

impl Check<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        self.out.push(Problem {
            severity: Severity::Error,
            file: self.r.origin.file.clone(),
            line: self.r.origin.line_of(&path),
            resource: self.r.id(),
            field: path,
            message: message.into(),
        });
    }

    /// A finding that does not refuse the resource but may surprise.
    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.err(path, message);
        if let Some(p) = self.out.last_mut() {
            p.severity = Severity::Warning;
        }
    }

    /// A finding that does not refuse the resource.
    fn note(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.err(path, message);
        if let Some(p) = self.out.last_mut() {
            p.severity = Severity::Note;
        }
    }

    fn required(&mut self, path: &str, value: &str) {
        if value.is_empty() {
            self.err(path, "required");
        }
    }

    fn host(&mut self, path: &str, h: &str) {
        if let Err(e) = check_host(h) {
            self.err(path, e);
        }
    }

    fn port(&mut self, path: &str, p: u32) {
        if !(1..=65535).contains(&p) {
            self.err(path, format!("{p} is not a port number (1-65535)"));
        }
    }

    fn percent(&mut self, path: &str, p: &Percent) {
        if !(0.0..=100.0).contains(&p.value) {
            self.err(
                format!("{path}.value"),
                format!("{} is not a percentage (0-100)", p.value),
            );
        }
    }

    fn duration(&mut self, path: &str, d: &Option<Duration>, min: StdDuration) {
        if let Some(d) = d
            && d.get() < min
        {
            self.err(path, format!("{d} is shorter than the minimum {min:?}"));
        }
    }

    fn string_match(&mut self, path: &str, m: &StringMatch) {
        let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            self.err(path, "exactly one of exact, prefix or regex is required");
        }
        if let Some(re) = &m.regex {
            self.regex(&format!("{path}.regex"), re);
        }
    }

    fn regex(&mut self, path: &str, re: &str) {
        if let Err(e) = regex::Regex::new(re) {
            self.err(
                path,
                format!("invalid regex: {}", first_line(&e.to_string())),
            );
        }
    }

    fn selector(&mut self, path: &str, s: &Option<WorkloadSelector>) {
        if let Some(s) = s {
            self.labels(path, "matchLabels", &s.match_labels);
        }
    }

    /// The `labels` form of selector (ServiceEntry, Sidecar).
    fn labels_selector(&mut self, path: &str, s: &Option<WorkloadLabels>) {
        if let Some(s) = s {
            self.labels(path, "labels", &s.labels);
        }
    }

    fn labels(
        &mut self,
        path: &str,
        field: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) {
        if labels.is_empty() {
            self.note(
                path,
                "a workload selector without labels selects every workload in the namespace",
            );
        }
        for (k, v) in labels {
            if let Err(e) = check_label_key(k) {
                self.err(format!("{path}.{field}.{k}"), format!("key {k:?}: {e}"));
            }
            if let Err(e) = check_label_value(v) {
                self.err(format!("{path}.{field}.{k}"), e);
            }
        }
    }

    fn header_name(&mut self, path: &str, name: &str) {
        if name.is_empty()
            || name.bytes().any(|b| {
                b.is_ascii_uppercase()
                    || !(b.is_ascii_graphic())
                    || b == b':' && !name.starts_with(':')
            })
        {
            self.err(
                path,
                format!("{name:?} is not a valid header name (lowercase token)"),
            );
        }
    }

    fn cidr(&mut self, path: &str, s: &str) {
        if let Err(e) = check_cidr(s) {
            self.err(path, e);
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_else(|| s.lines().next().unwrap_or(s))
        .trim()
}

/// DNS-1123 label: lowercase alphanumerics and '-', at most 63.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a DNS-1123 label"))
    }
}

/// A host: an FQDN or short name, optionally with a `*.` wildcard prefix, or `*`.
pub fn check_host(h: &str) -> Result<(), String> {
    if h == "*" {
        return Ok(());
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if name.is_empty()
        || name.len() > 255
        || name.contains('*')
        || name.split('.').any(|l| check_dns_label(l).is_err())
    {
        return Err(format!(
            "{h:?} is not a valid host (DNS name, optionally with a *. prefix)"
        ));
    }
    Ok(())
}

/// `namespace/host` (Gateway and Sidecar hosts): namespace may be `*`, `.` or `~`.
fn check_ns_host(h: &str) -> Result<(), String> {
    let Some((ns, host)) = h.split_once('/') else {
        return Err(format!("{h:?} must be of the form namespace/host"));
    };
    if !["*", ".", "~"].contains(&ns) {
        check_dns_label(ns).map_err(|e| format!("{h:?}: namespace {e}"))?;
    }
    check_host(host)
}

fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !name_ok || (!prefix.is_empty() && prefix.split('.').any(|l| check_dns_label(l).is_err())) {
        return Err("not a valid label key".into());
    }
    Ok(())
}

fn check_label_value(v: &str) -> Result<(), String> {
    let ok = v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!("{v:?} is not a valid label value"))
    }
}

fn check_cidr(s: &str) -> Result<(), String> {
    let (addr, len) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    if let Some(l) = len {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match l.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(format!("{s:?}: bad prefix length")),
        }
    }
    Ok(())
}

const MIN: StdDuration = StdDuration::from_millis(1);

pub use enforced::not_enforced;
use virtual_service::destination;

/// Problems of one resource (errors refuse it).
pub fn check(r: &Resource) -> Vec<Problem> {
    let mut c = Check { r, out: Vec::new() };
    let name = &r.metadata.name;
    if name.is_empty() {
        c.err("metadata.name", "required");
    } else if name.len() > 253 || name.split('.').any(|l| check_dns_label(l).is_err()) {
        c.err(
            "metadata.name",
            format!("{name:?} is not a valid name (DNS-1123 subdomain)"),
        );
    }
    if let Err(e) = check_dns_label(&r.metadata.namespace) {
        c.err("metadata.namespace", e);
    }
    match &r.spec {
        Spec::VirtualService(s) => virtual_service::check(&mut c, s),
        Spec::DestinationRule(s) => destination_rule::check(&mut c, s),
        Spec::Gateway(s) => networking::gateway(&mut c, s),
        Spec::ServiceEntry(s) => networking::service_entry(&mut c, s),
        Spec::WorkloadEntry(s) => networking::workload_entry(&mut c, "spec", s),
        Spec::Sidecar(s) => networking::sidecar(&mut c, s),
        Spec::PeerAuthentication(s) => security::peer_authentication(&mut c, s),
        Spec::RequestAuthentication(s) => security::request_authentication(&mut c, s),
        Spec::AuthorizationPolicy(s) => security::authorization_policy(&mut c, s),
        Spec::Telemetry(s) => telemetry::check(&mut c, s),
        Spec::EnvoyFilter(s) => envoy_filter(&mut c, s),
    }
    c.out
}

/// The local rate limits an EnvoyFilter sets must be readable; every
/// other patch is reported once, as ignored.
fn envoy_filter(c: &mut Check<'_>, s: &super::envoy_filter::EnvoyFilter) {
    use super::envoy_filter::{PatchUse, read_patches};
    let mut ignored = Vec::new();
    for (i, u) in read_patches(&s.config_patches).into_iter().enumerate() {
        match u {
            Ok(PatchUse::Ignored) => ignored.push(i.to_string()),
            Ok(PatchUse::Limit(l)) => {
                let at = format!("spec.configPatches[{i}]");
                if l.unit == super::envoy_filter::Unit::Requests {
                    if l.enabled == 0.0 {
                        c.warn(&at, "limits nothing: filter_enabled is absent or 0 % (Envoy's default is 0 %)");
                    } else if l.enforced == 0.0 {
                        c.warn(&at, "refuses nothing: filter_enforced is absent or 0 % (Envoy's default is 0 %); requests over the limit are only counted");
                    }
                }
                for f in &l.not_enforced {
                    c.warn(format!("{at}.{f}"), "accepted, not enforced");
                }
                for (f, why) in &l.skipped_rules {
                    c.warn(format!("{at}.{f}"), why);
                }
            }
            Ok(PatchUse::RouteRules { skipped, .. }) => {
                for (f, why) in skipped {
                    c.warn(format!("spec.configPatches[{i}].{f}"), why);
                }
            }
            Ok(_) => {}
            Err((field, why)) => c.err(format!("spec.configPatches[{i}].{field}"), why),
        }
    }
    if !ignored.is_empty() {
        let warn = format!(
            "configPatches[{}] ignored: this data plane has no Envoy to patch (it reads the local rate limit filters alone)",
            ignored.join(", ")
        );
        c.warn("spec.configPatches", warn);
    }
}

fn targets(
    c: &mut Check<'_>,
    selector: &Option<WorkloadSelector>,
    one: &Option<super::common::PolicyTargetReference>,
    many: &[super::common::PolicyTargetReference],
) {
    let n = [selector.is_some(), one.is_some(), !many.is_empty()]
        .iter()
        .filter(|b| **b)
        .count();
    if n > 1 {
        c.err(
            "spec",
            "selector, targetRef and targetRefs are mutually exclusive",
        );
    }
    c.selector("spec.selector", selector);
    for (path, t) in one.iter().map(|t| ("spec.targetRef".to_owned(), t)).chain(
        many.iter()
            .enumerate()
            .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)),
    ) {
        c.required(&format!("{path}.kind"), &t.kind);
        c.required(&format!("{path}.name"), &t.name);
        if !["", "Gateway", "Service", "ServiceEntry", "GatewayClass"].contains(&t.kind.as_str()) {
            c.err(
                format!("{path}.kind"),
                format!("{:?} cannot be a policy target", t.kind),
            );
        }
    }
}
