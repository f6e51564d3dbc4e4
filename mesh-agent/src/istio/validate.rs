//! Checks Istio resources the way `istioctl validate` does: required
//! fields, value ranges, mutually exclusive fields, regex syntax, weights,
//! durations, selectors and host names. Every problem names its field path;
//! the parser turns paths into lines.
//!
//! Also reports which fields are accepted but not acted on yet, so nothing
//! a user wrote is silently dropped.

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

/// Retry conditions Istio accepts in `retryOn` (besides HTTP status codes).
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

const MIN: StdDuration = StdDuration::from_millis(1);

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
        Spec::VirtualService(s) => virtual_service(&mut c, s),
        Spec::DestinationRule(s) => destination_rule(&mut c, s),
        Spec::Gateway(s) => gateway(&mut c, s),
        Spec::ServiceEntry(s) => service_entry(&mut c, s),
        Spec::WorkloadEntry(s) => workload_entry(&mut c, "spec", s),
        Spec::Sidecar(s) => sidecar(&mut c, s),
        Spec::PeerAuthentication(s) => peer_authentication(&mut c, s),
        Spec::RequestAuthentication(s) => request_authentication(&mut c, s),
        Spec::AuthorizationPolicy(s) => authorization_policy(&mut c, s),
        Spec::Telemetry(s) => telemetry(&mut c, s),
    }
    c.out
}

fn destination(c: &mut Check<'_>, path: &str, d: &Destination) {
    c.required(&format!("{path}.host"), &d.host);
    if !d.host.is_empty() {
        c.host(&format!("{path}.host"), &d.host);
    }
    if !d.subset.is_empty()
        && let Err(e) = check_dns_label(&d.subset)
    {
        c.err(format!("{path}.subset"), e);
    }
    if let Some(p) = &d.port {
        c.port(&format!("{path}.port.number"), p.number);
    }
}

fn weights<I: IntoIterator<Item = Option<i32>>>(c: &mut Check<'_>, path: &str, ws: I) {
    let ws: Vec<Option<i32>> = ws.into_iter().collect();
    for (i, w) in ws.iter().enumerate() {
        if let Some(w) = w
            && !(0..=100).contains(w)
        {
            c.err(
                format!("{path}[{i}].weight"),
                format!("{w} is outside 0-100"),
            );
        }
    }
    if ws.len() > 1 {
        let total: i32 = ws.iter().map(|w| w.unwrap_or(0)).sum();
        if total != 100 {
            c.err(
                path,
                format!("the route weights add up to {total}; they must total 100"),
            );
        }
    }
}

fn headers(c: &mut Check<'_>, path: &str, h: &Option<Headers>) {
    let Some(h) = h else { return };
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for (op, names) in [
            ("set", ops.set.keys().collect::<Vec<_>>()),
            ("add", ops.add.keys().collect()),
            ("remove", ops.remove.iter().collect()),
        ] {
            for n in names {
                c.header_name(&format!("{path}.{side}.{op}"), n);
            }
        }
    }
}

fn virtual_service(c: &mut Check<'_>, s: &VirtualService) {
    if s.hosts.is_empty() {
        c.err("spec.hosts", "at least one host is required");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        c.host(&format!("spec.hosts[{i}]"), h);
        if h == "*" && s.gateways.is_empty() {
            c.err(
                format!("spec.hosts[{i}]"),
                "\"*\" is only allowed for gateways",
            );
        }
    }
    if s.http.is_empty() && s.tls.is_empty() && s.tcp.is_empty() {
        c.err(
            "spec",
            "at least one of http, tls or tcp routes is required",
        );
    }
    for (i, r) in s.http.iter().enumerate() {
        let p = format!("spec.http[{i}]");
        let kinds = [
            !r.route.is_empty(),
            r.redirect.is_some(),
            r.direct_response.is_some(),
            r.delegate.is_some(),
        ];
        match kinds.iter().filter(|b| **b).count() {
            0 => c.err(
                &p,
                "one of route, redirect, directResponse or delegate is required",
            ),
            1 => {}
            _ => c.err(
                &p,
                "route, redirect, directResponse and delegate are mutually exclusive",
            ),
        }
        if r.rewrite.is_some() && r.redirect.is_some() {
            c.err(
                format!("{p}.rewrite"),
                "rewrite and redirect are mutually exclusive",
            );
        }
        if r.mirror.is_some() && !r.mirrors.is_empty() {
            c.err(
                format!("{p}.mirrors"),
                "mirror and mirrors are mutually exclusive",
            );
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            for (field, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    c.string_match(&format!("{mp}.{field}"), sm);
                }
            }
            for (field, map) in [
                ("headers", &m.headers),
                ("queryParams", &m.query_params),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (k, sm) in map {
                    if field != "queryParams" {
                        c.header_name(&format!("{mp}.{field}"), k);
                    }
                    // An empty match on headers means "present".
                    if sm != &StringMatch::default() {
                        c.string_match(&format!("{mp}.{field}.{k}"), sm);
                    }
                }
            }
            if let Some(port) = m.port {
                c.port(&format!("{mp}.port"), port);
            }
        }
        for (j, d) in r.route.iter().enumerate() {
            destination(c, &format!("{p}.route[{j}].destination"), &d.destination);
            headers(c, &format!("{p}.route[{j}].headers"), &d.headers);
        }
        weights(c, &format!("{p}.route"), r.route.iter().map(|d| d.weight));
        if let Some(rd) = &r.redirect {
            if let Some(code) = rd.redirect_code
                && ![301, 302, 303, 307, 308].contains(&code)
            {
                c.err(
                    format!("{p}.redirect.redirectCode"),
                    format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
                );
            }
            if rd.port.is_some() && rd.derive_port.is_some() {
                c.err(
                    format!("{p}.redirect"),
                    "port and derivePort are mutually exclusive",
                );
            }
            if let Some(port) = rd.port {
                c.port(&format!("{p}.redirect.port"), port);
            }
        }
        if let Some(dr) = &r.direct_response {
            if !(200..=599).contains(&dr.status) {
                c.err(
                    format!("{p}.directResponse.status"),
                    format!("{} is not an HTTP status (200-599)", dr.status),
                );
            }
            if let Some(b) = &dr.body
                && b.string.is_some() == b.bytes.is_some()
            {
                c.err(
                    format!("{p}.directResponse.body"),
                    "exactly one of string or bytes is required",
                );
            }
        }
        if let Some(d) = &r.delegate {
            c.required(&format!("{p}.delegate.name"), &d.name);
        }
        if let Some(rw) = &r.rewrite {
            if !rw.uri.is_empty() && rw.uri_regex_rewrite.is_some() {
                c.err(
                    format!("{p}.rewrite"),
                    "uri and uriRegexRewrite are mutually exclusive",
                );
            }
            if let Some(rr) = &rw.uri_regex_rewrite {
                c.regex(&format!("{p}.rewrite.uriRegexRewrite.match"), &rr.pattern);
            }
        }
        c.duration(&format!("{p}.timeout"), &r.timeout, StdDuration::ZERO);
        if let Some(rt) = &r.retries {
            if rt.attempts < 0 {
                c.err(format!("{p}.retries.attempts"), "must not be negative");
            }
            c.duration(
                &format!("{p}.retries.perTryTimeout"),
                &rt.per_try_timeout,
                MIN,
            );
            for cond in rt
                .retry_on
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                if !RETRY_ON.contains(&cond)
                    && !(cond.parse::<u16>().is_ok_and(|n| (100..=599).contains(&n)))
                {
                    c.err(
                        format!("{p}.retries.retryOn"),
                        format!("{cond:?} is not a retry condition"),
                    );
                }
            }
        }
        if let Some(f) = &r.fault {
            if f.delay.is_none() && f.abort.is_none() {
                c.err(format!("{p}.fault"), "one of delay or abort is required");
            }
            if let Some(d) = &f.delay {
                if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                    c.err(format!("{p}.fault.delay"), "fixedDelay is required");
                }
                c.duration(&format!("{p}.fault.delay.fixedDelay"), &d.fixed_delay, MIN);
                if let Some(pc) = &d.percentage {
                    c.percent(&format!("{p}.fault.delay.percentage"), pc);
                }
            }
            if let Some(a) = &f.abort {
                let kinds = [
                    a.http_status.is_some(),
                    !a.grpc_status.is_empty(),
                    !a.http2_error.is_empty(),
                ];
                if kinds.iter().filter(|b| **b).count() != 1 {
                    c.err(
                        format!("{p}.fault.abort"),
                        "exactly one of httpStatus, grpcStatus or http2Error is required",
                    );
                }
                if let Some(s) = a.http_status
                    && !(200..=599).contains(&s)
                {
                    c.err(
                        format!("{p}.fault.abort.httpStatus"),
                        format!("{s} is not an HTTP status (200-599)"),
                    );
                }
                if let Some(pc) = &a.percentage {
                    c.percent(&format!("{p}.fault.abort.percentage"), pc);
                }
            }
        }
        if let Some(m) = &r.mirror {
            destination(c, &format!("{p}.mirror"), m);
        }
        for (j, m) in r.mirrors.iter().enumerate() {
            destination(c, &format!("{p}.mirrors[{j}].destination"), &m.destination);
            if let Some(pc) = &m.percentage {
                c.percent(&format!("{p}.mirrors[{j}].percentage"), pc);
            }
        }
        if let Some(pc) = &r.mirror_percentage {
            c.percent(&format!("{p}.mirrorPercentage"), pc);
        }
        if let Some(cors) = &r.cors_policy {
            for (j, o) in cors.allow_origins.iter().enumerate() {
                c.string_match(&format!("{p}.corsPolicy.allowOrigins[{j}]"), o);
            }
            for (field, names) in [
                ("allowHeaders", &cors.allow_headers),
                ("exposeHeaders", &cors.expose_headers),
            ] {
                for n in names {
                    if n != "*" {
                        c.header_name(&format!("{p}.corsPolicy.{field}"), &n.to_ascii_lowercase());
                    }
                }
            }
            for m in &cors.allow_methods {
                if m != "*"
                    && ![
                        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT",
                        "TRACE",
                    ]
                    .contains(&m.as_str())
                {
                    c.err(
                        format!("{p}.corsPolicy.allowMethods"),
                        format!("{m:?} is not an HTTP method"),
                    );
                }
            }
        }
        headers(c, &format!("{p}.headers"), &r.headers);
    }
    for (i, r) in s.tls.iter().enumerate() {
        let p = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            c.err(format!("{p}.match"), "at least one match is required");
        }
        for (j, m) in r.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                c.err(
                    format!("{p}.match[{j}].sniHosts"),
                    "at least one SNI host is required",
                );
            }
            for (k, h) in m.sni_hosts.iter().enumerate() {
                c.host(&format!("{p}.match[{j}].sniHosts[{k}]"), h);
            }
            for (k, sn) in m.destination_subnets.iter().enumerate() {
                c.cidr(&format!("{p}.match[{j}].destinationSubnets[{k}]"), sn);
            }
        }
        l4_routes(c, &p, &r.route);
    }
    for (i, r) in s.tcp.iter().enumerate() {
        let p = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            for (k, sn) in m.destination_subnets.iter().enumerate() {
                c.cidr(&format!("{p}.match[{j}].destinationSubnets[{k}]"), sn);
            }
            if !m.source_subnet.is_empty() {
                c.cidr(&format!("{p}.match[{j}].sourceSubnet"), &m.source_subnet);
            }
            if let Some(port) = m.port {
                c.port(&format!("{p}.match[{j}].port"), port);
            }
        }
        l4_routes(c, &p, &r.route);
    }
}

fn l4_routes(c: &mut Check<'_>, p: &str, route: &[RouteDestination]) {
    if route.is_empty() {
        c.err(format!("{p}.route"), "at least one destination is required");
    }
    for (j, d) in route.iter().enumerate() {
        destination(c, &format!("{p}.route[{j}].destination"), &d.destination);
    }
    weights(c, &format!("{p}.route"), route.iter().map(|d| d.weight));
}

fn traffic_policy(c: &mut Check<'_>, p: &str, t: &TrafficPolicy, top: bool) {
    load_balancer(c, &format!("{p}.loadBalancer"), &t.load_balancer);
    connection_pool(c, &format!("{p}.connectionPool"), &t.connection_pool);
    outlier(c, &format!("{p}.outlierDetection"), &t.outlier_detection);
    client_tls(c, &format!("{p}.tls"), &t.tls);
    if !top && !t.port_level_settings.is_empty() {
        c.err(
            format!("{p}.portLevelSettings"),
            "port-level settings are only allowed at the top level and in subsets",
        );
    }
    let mut seen = BTreeSet::new();
    for (i, pl) in t.port_level_settings.iter().enumerate() {
        let pp = format!("{p}.portLevelSettings[{i}]");
        match &pl.port {
            None => c.err(format!("{pp}.port"), "required"),
            Some(port) => {
                c.port(&format!("{pp}.port.number"), port.number);
                if !seen.insert(port.number) {
                    c.err(
                        format!("{pp}.port.number"),
                        format!("port {} appears twice", port.number),
                    );
                }
            }
        }
        load_balancer(c, &format!("{pp}.loadBalancer"), &pl.load_balancer);
        connection_pool(c, &format!("{pp}.connectionPool"), &pl.connection_pool);
        outlier(c, &format!("{pp}.outlierDetection"), &pl.outlier_detection);
        client_tls(c, &format!("{pp}.tls"), &pl.tls);
    }
    if let Some(tn) = &t.tunnel {
        c.required(&format!("{p}.tunnel.targetHost"), &tn.target_host);
        c.port(&format!("{p}.tunnel.targetPort"), tn.target_port);
        if !["", "CONNECT", "POST"].contains(&tn.protocol.as_str()) {
            c.err(
                format!("{p}.tunnel.protocol"),
                format!("{:?} is not CONNECT or POST", tn.protocol),
            );
        }
    }
    if let Some(rb) = &t.retry_budget
        && let Some(pc) = &rb.percent
    {
        c.percent(&format!("{p}.retryBudget.percent"), pc);
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn load_balancer(c: &mut Check<'_>, p: &str, lb: &Option<LoadBalancerSettings>) {
    let Some(lb) = lb else { return };
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        c.err(p, "simple and consistentHash are mutually exclusive");
    }
    if let Some(ch) = &lb.consistent_hash {
        let keys = [
            !ch.http_header_name.is_empty(),
            ch.http_cookie.is_some(),
            ch.use_source_ip,
            !ch.http_query_parameter_name.is_empty(),
        ];
        if keys.iter().filter(|b| **b).count() != 1 {
            c.err(format!("{p}.consistentHash"), "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required");
        }
        if let Some(cookie) = &ch.http_cookie {
            c.required(&format!("{p}.consistentHash.httpCookie.name"), &cookie.name);
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            c.err(
                format!("{p}.consistentHash"),
                "ringHash and maglev are mutually exclusive",
            );
        }
        let ring = ch
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .or(ch.minimum_ring_size);
        if ring.is_some_and(|n| n > 8 << 20) {
            c.err(
                format!("{p}.consistentHash.ringHash.minimumRingSize"),
                "at most 8388608",
            );
        }
        if let Some(t) = ch.maglev.as_ref().and_then(|m| m.table_size)
            && !is_prime(t)
        {
            c.err(
                format!("{p}.consistentHash.maglev.tableSize"),
                format!("{t} is not a prime number"),
            );
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            c.err(
                format!("{p}.localityLbSetting"),
                "distribute and failover are mutually exclusive",
            );
        }
        for (i, d) in l.distribute.iter().enumerate() {
            c.required(
                &format!("{p}.localityLbSetting.distribute[{i}].from"),
                &d.from,
            );
            let total: u32 = d.to.values().sum();
            if total != 100 {
                c.err(
                    format!("{p}.localityLbSetting.distribute[{i}].to"),
                    format!("the weights add up to {total}; they must total 100"),
                );
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            if f.from == f.to {
                c.err(
                    format!("{p}.localityLbSetting.failover[{i}]"),
                    "from and to must differ",
                );
            }
            if f.from.contains('/') || f.to.contains('/') {
                c.err(
                    format!("{p}.localityLbSetting.failover[{i}]"),
                    "failover is between regions (no '/')",
                );
            }
        }
    }
    if let Some(w) = &lb.warmup {
        if let Some(m) = w.minimum_percent
            && !(0.0..=100.0).contains(&m)
        {
            c.err(
                format!("{p}.warmup.minimumPercent"),
                "not a percentage (0-100)",
            );
        }
        if let Some(a) = w.aggression
            && a < 1.0
        {
            c.err(format!("{p}.warmup.aggression"), "must be at least 1");
        }
    }
}

fn connection_pool(c: &mut Check<'_>, p: &str, cp: &Option<ConnectionPoolSettings>) {
    let Some(cp) = cp else { return };
    if let Some(t) = &cp.tcp {
        if t.max_connections.is_some_and(|n| n < 0) {
            c.err(format!("{p}.tcp.maxConnections"), "must not be negative");
        }
        c.duration(&format!("{p}.tcp.connectTimeout"), &t.connect_timeout, MIN);
        c.duration(
            &format!("{p}.tcp.maxConnectionDuration"),
            &t.max_connection_duration,
            MIN,
        );
        if let Some(k) = &t.tcp_keepalive {
            c.duration(
                &format!("{p}.tcp.tcpKeepalive.time"),
                &k.time,
                StdDuration::from_secs(1),
            );
            c.duration(
                &format!("{p}.tcp.tcpKeepalive.interval"),
                &k.interval,
                StdDuration::from_secs(1),
            );
        }
    }
    if let Some(h) = &cp.http {
        for (f, v) in [
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ] {
            if v.is_some_and(|n| n < 0) {
                c.err(format!("{p}.http.{f}"), "must not be negative");
            }
        }
        c.duration(&format!("{p}.http.idleTimeout"), &h.idle_timeout, MIN);
    }
}

fn outlier(c: &mut Check<'_>, p: &str, o: &Option<OutlierDetection>) {
    let Some(o) = o else { return };
    for (f, v) in [
        ("maxEjectionPercent", o.max_ejection_percent),
        ("minHealthPercent", o.min_health_percent),
    ] {
        if v.is_some_and(|n| !(0..=100).contains(&n)) {
            c.err(format!("{p}.{f}"), "not a percentage (0-100)");
        }
    }
    c.duration(&format!("{p}.interval"), &o.interval, MIN);
    c.duration(&format!("{p}.baseEjectionTime"), &o.base_ejection_time, MIN);
}

fn client_tls(c: &mut Check<'_>, p: &str, t: &Option<ClientTlsSettings>) {
    let Some(t) = t else { return };
    if t.mode == Some(ClientTlsMode::Mutual)
        && t.credential_name.is_empty()
        && (t.client_certificate.is_empty() || t.private_key.is_empty())
    {
        c.err(
            p,
            "MUTUAL needs clientCertificate and privateKey, or credentialName",
        );
    }
    if t.mode == Some(ClientTlsMode::IstioMutual)
        && (!t.client_certificate.is_empty()
            || !t.private_key.is_empty()
            || !t.ca_certificates.is_empty()
            || !t.credential_name.is_empty())
    {
        c.err(
            p,
            "ISTIO_MUTUAL uses the mesh's certificates: no certificate fields",
        );
    }
}

fn destination_rule(c: &mut Check<'_>, s: &DestinationRule) {
    c.required("spec.host", &s.host);
    if !s.host.is_empty() {
        c.host("spec.host", &s.host);
    }
    if let Some(t) = &s.traffic_policy {
        traffic_policy(c, "spec.trafficPolicy", t, true);
    }
    let mut names = BTreeSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        c.required(&format!("{p}.name"), &sub.name);
        if !sub.name.is_empty() {
            if let Err(e) = check_dns_label(&sub.name) {
                c.err(format!("{p}.name"), e);
            }
            if !names.insert(&sub.name) {
                c.err(
                    format!("{p}.name"),
                    format!("subset {:?} appears twice", sub.name),
                );
            }
        }
        if let Some(t) = &sub.traffic_policy {
            traffic_policy(c, &format!("{p}.trafficPolicy"), t, true);
        }
    }
    c.selector("spec.workloadSelector", &s.workload_selector);
}

fn server_tls(c: &mut Check<'_>, p: &str, t: &Option<ServerTlsSettings>, protocol: &str) {
    let Some(t) = t else {
        if protocol == "HTTPS" {
            c.err(p, "an HTTPS server needs tls settings");
        }
        return;
    };
    if t.https_redirect {
        return;
    }
    match t.mode {
        Some(ServerTlsMode::Simple)
        | Some(ServerTlsMode::Mutual)
        | Some(ServerTlsMode::OptionalMutual)
            if t.credential_name.is_empty()
                && t.credential_names.is_empty()
                && t.tls_certificates.is_empty()
                && (t.server_certificate.is_empty() || t.private_key.is_empty()) =>
        {
            c.err(
                p,
                "SIMPLE and MUTUAL need serverCertificate and privateKey, or credentialName",
            );
        }
        _ => {}
    }
    if let (Some(min), Some(max)) = (t.min_protocol_version, t.max_protocol_version)
        && min != TlsProtocolVersion::TlsAuto
        && max != TlsProtocolVersion::TlsAuto
        && (min as u8) > (max as u8)
    {
        c.err(
            format!("{p}.minProtocolVersion"),
            "higher than maxProtocolVersion",
        );
    }
}

const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "REDIS", "MYSQL", "UDP",
    "HBONE",
];

fn protocol(c: &mut Check<'_>, path: &str, proto: &str) {
    if !proto.is_empty() && !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str()) {
        c.err(
            path,
            format!(
                "{proto:?} is not a protocol Istio knows ({})",
                PROTOCOLS.join(", ")
            ),
        );
    }
}

fn gateway(c: &mut Check<'_>, s: &Gateway) {
    if s.servers.is_empty() {
        c.err("spec.servers", "at least one server is required");
    }
    for (i, srv) in s.servers.iter().enumerate() {
        let p = format!("spec.servers[{i}]");
        c.port(&format!("{p}.port.number"), srv.port.number);
        c.required(&format!("{p}.port.protocol"), &srv.port.protocol);
        protocol(c, &format!("{p}.port.protocol"), &srv.port.protocol);
        if srv.hosts.is_empty() {
            c.err(format!("{p}.hosts"), "at least one host is required");
        }
        for (j, h) in srv.hosts.iter().enumerate() {
            let r = if h.contains('/') {
                check_ns_host(h)
            } else {
                check_host(h)
            };
            if let Err(e) = r {
                c.err(format!("{p}.hosts[{j}]"), e);
            }
        }
        server_tls(
            c,
            &format!("{p}.tls"),
            &srv.tls,
            &srv.port.protocol.to_ascii_uppercase(),
        );
    }
    for (k, v) in &s.selector {
        if check_label_key(k).is_err() || check_label_value(v).is_err() {
            c.err("spec.selector", format!("{k}={v} is not a valid label"));
        }
    }
}

fn service_entry(c: &mut Check<'_>, s: &ServiceEntry) {
    if s.hosts.is_empty() {
        c.err("spec.hosts", "at least one host is required");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        c.host(&format!("spec.hosts[{i}]"), h);
        if h == "*" {
            c.err(
                format!("spec.hosts[{i}]"),
                "\"*\" is not allowed in a ServiceEntry",
            );
        }
    }
    for (i, a) in s.addresses.iter().enumerate() {
        c.cidr(&format!("spec.addresses[{i}]"), a);
    }
    let (mut numbers, mut names) = (BTreeSet::new(), BTreeSet::new());
    for (i, port) in s.ports.iter().enumerate() {
        let p = format!("spec.ports[{i}]");
        c.port(&format!("{p}.number"), port.number);
        protocol(c, &format!("{p}.protocol"), &port.protocol);
        if !numbers.insert(port.number) {
            c.err(
                format!("{p}.number"),
                format!("port {} appears twice", port.number),
            );
        }
        if !port.name.is_empty() && !names.insert(&port.name) {
            c.err(
                format!("{p}.name"),
                format!("port name {:?} appears twice", port.name),
            );
        }
        if let Some(t) = port.target_port {
            c.port(&format!("{p}.targetPort"), t);
        }
    }
    if !s.endpoints.is_empty() && s.workload_selector.is_some() {
        c.err(
            "spec.workloadSelector",
            "workloadSelector and endpoints are mutually exclusive",
        );
    }
    match s.resolution.unwrap_or(Resolution::None) {
        Resolution::Static if s.endpoints.is_empty() && s.workload_selector.is_none() => c.err(
            "spec.endpoints",
            "STATIC resolution needs endpoints or a workloadSelector",
        ),
        Resolution::Dns | Resolution::DnsRoundRobin if s.endpoints.is_empty() => {
            for (i, h) in s.hosts.iter().enumerate() {
                if h.starts_with("*.") {
                    c.err(format!("spec.hosts[{i}]"), "DNS resolution needs concrete hosts (no wildcards) when there are no endpoints");
                }
            }
        }
        _ => {}
    }
    for (i, e) in s.endpoints.iter().enumerate() {
        workload_entry(c, &format!("spec.endpoints[{i}]"), e);
        for port_name in e.ports.keys() {
            if !s.ports.iter().any(|p| &p.name == port_name) {
                c.err(
                    format!("spec.endpoints[{i}].ports.{port_name}"),
                    format!("no service port named {port_name:?}"),
                );
            }
        }
    }
    c.labels_selector("spec.workloadSelector", &s.workload_selector);
}

fn workload_entry(c: &mut Check<'_>, p: &str, e: &WorkloadEntry) {
    if e.address.is_empty() {
        if p == "spec" || e.network.is_empty() {
            c.err(format!("{p}.address"), "required");
        }
    } else if !e.address.starts_with("unix://")
        && e.address.parse::<IpAddr>().is_err()
        && check_host(&e.address).is_err()
    {
        c.err(
            format!("{p}.address"),
            format!(
                "{:?} is not an IP address, host name or unix:// path",
                e.address
            ),
        );
    }
    for (name, port) in &e.ports {
        c.port(&format!("{p}.ports.{name}"), *port);
    }
    for (k, v) in &e.labels {
        if check_label_key(k).is_err() || check_label_value(v).is_err() {
            c.err(
                format!("{p}.labels"),
                format!("{k}={v} is not a valid label"),
            );
        }
    }
    if !e.service_account.is_empty()
        && let Err(e) = check_dns_label(&e.service_account)
    {
        c.err(format!("{p}.serviceAccount"), e);
    }
}

fn sidecar(c: &mut Check<'_>, s: &Sidecar) {
    if s.egress.is_empty()
        && s.ingress.is_empty()
        && s.outbound_traffic_policy.is_none()
        && s.inbound_connection_pool.is_none()
    {
        c.err("spec", "at least one of egress, ingress, outboundTrafficPolicy or inboundConnectionPool is required");
    }
    for (i, l) in s.ingress.iter().enumerate() {
        let p = format!("spec.ingress[{i}]");
        c.port(&format!("{p}.port.number"), l.port.number);
        protocol(c, &format!("{p}.port.protocol"), &l.port.protocol);
        if !l.default_endpoint.is_empty() && !l.default_endpoint.starts_with("unix://") {
            let ok = l
                .default_endpoint
                .rsplit_once(':')
                .is_some_and(|(h, port)| {
                    ["127.0.0.1", "0.0.0.0", "[::1]", "[::]"].contains(&h)
                        && port.parse::<u16>().is_ok()
                });
            if !ok {
                c.err(
                    format!("{p}.defaultEndpoint"),
                    "must be 127.0.0.1:PORT, 0.0.0.0:PORT or unix://PATH",
                );
            }
        }
    }
    for (i, l) in s.egress.iter().enumerate() {
        let p = format!("spec.egress[{i}]");
        if l.hosts.is_empty() {
            c.err(format!("{p}.hosts"), "at least one host is required");
        }
        for (j, h) in l.hosts.iter().enumerate() {
            if let Err(e) = check_ns_host(h) {
                c.err(format!("{p}.hosts[{j}]"), e);
            }
        }
        if let Some(port) = &l.port {
            c.port(&format!("{p}.port.number"), port.number);
        }
    }
    if let Some(o) = &s.outbound_traffic_policy
        && let Some(ep) = &o.egress_proxy
    {
        destination(c, "spec.outboundTrafficPolicy.egressProxy", ep);
    }
    c.labels_selector("spec.workloadSelector", &s.workload_selector);
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

fn peer_authentication(c: &mut Check<'_>, s: &PeerAuthentication) {
    c.selector("spec.selector", &s.selector);
    if !s.port_level_mtls.is_empty() && s.selector.is_none() {
        c.err(
            "spec.portLevelMtls",
            "port-level mTLS needs a workload selector",
        );
    }
    for port in s.port_level_mtls.keys() {
        match port.parse::<u32>() {
            Ok(n) => c.port(&format!("spec.portLevelMtls.{port}"), n),
            Err(_) => c.err(
                format!("spec.portLevelMtls.{port}"),
                format!("{port:?} is not a port number"),
            ),
        }
    }
}

fn request_authentication(c: &mut Check<'_>, s: &RequestAuthentication) {
    targets(c, &s.selector, &s.target_ref, &s.target_refs);
    for (i, r) in s.jwt_rules.iter().enumerate() {
        let p = format!("spec.jwtRules[{i}]");
        c.required(&format!("{p}.issuer"), &r.issuer);
        if !r.jwks_uri.is_empty() && !r.jwks.is_empty() {
            c.err(&p, "jwksUri and jwks are mutually exclusive");
        }
        if !(r.jwks_uri.is_empty()
            || r.jwks_uri.starts_with("https://")
            || r.jwks_uri.starts_with("http://"))
        {
            c.err(
                format!("{p}.jwksUri"),
                format!("{:?} is not an http(s) URL", r.jwks_uri),
            );
        }
        if !r.jwks.is_empty()
            && serde_json::from_str::<serde_json::Value>(&r.jwks)
                .map_or(true, |v| !v["keys"].is_array())
        {
            c.err(
                format!("{p}.jwks"),
                "not a JSON Web Key Set (an object with \"keys\")",
            );
        }
        for (j, h) in r.from_headers.iter().enumerate() {
            c.required(&format!("{p}.fromHeaders[{j}].name"), &h.name);
        }
        for (j, h) in r.output_claim_to_headers.iter().enumerate() {
            c.header_name(&format!("{p}.outputClaimToHeaders[{j}].header"), &h.header);
            c.required(&format!("{p}.outputClaimToHeaders[{j}].claim"), &h.claim);
        }
        c.duration(&format!("{p}.timeout"), &r.timeout, MIN);
    }
}

/// Condition keys AuthorizationPolicy accepts.
fn known_condition(key: &str) -> bool {
    const PLAIN: &[&str] = &[
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    ];
    PLAIN.contains(&key)
        || key
            .strip_prefix("request.headers[")
            .is_some_and(|r| r.ends_with(']') && r.len() > 1)
        || key
            .strip_prefix("request.auth.claims[")
            .is_some_and(|r| r.ends_with(']') && r.len() > 1)
        || key.starts_with("experimental.envoy.filters.")
}

fn authorization_policy(c: &mut Check<'_>, s: &AuthorizationPolicy) {
    targets(c, &s.selector, &s.target_ref, &s.target_refs);
    let custom = s.action == Some(AuthorizationAction::Custom);
    match (&s.provider, custom) {
        (None, true) => c.err("spec.provider", "CUSTOM action needs a provider"),
        (Some(_), false) => c.err(
            "spec.provider",
            "a provider is only allowed with the CUSTOM action",
        ),
        (Some(p), true) => c.required("spec.provider.name", &p.name),
        (None, false) => {}
    }
    for (i, rule) in s.rules.iter().flatten().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let fp = format!("{p}.from[{j}].source");
            let Some(src) = &from.source else {
                c.err(&fp, "required");
                continue;
            };
            let fields = [
                ("principals", &src.principals),
                ("notPrincipals", &src.not_principals),
                ("requestPrincipals", &src.request_principals),
                ("notRequestPrincipals", &src.not_request_principals),
                ("namespaces", &src.namespaces),
                ("notNamespaces", &src.not_namespaces),
                ("serviceAccounts", &src.service_accounts),
                ("notServiceAccounts", &src.not_service_accounts),
                ("ipBlocks", &src.ip_blocks),
                ("notIpBlocks", &src.not_ip_blocks),
                ("remoteIpBlocks", &src.remote_ip_blocks),
                ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ];
            if fields.iter().all(|(_, v)| v.is_empty()) {
                c.err(
                    &fp,
                    "an empty source matches nothing; list at least one field",
                );
            }
            for (f, vals) in fields {
                for (k, v) in vals.iter().enumerate() {
                    if v.is_empty() {
                        c.err(format!("{fp}.{f}[{k}]"), "empty value");
                    } else if f.ends_with("pBlocks") || f.ends_with("IpBlocks") {
                        c.cidr(&format!("{fp}.{f}[{k}]"), v);
                    }
                }
            }
            if !src.principals.is_empty() && !src.service_accounts.is_empty() {
                c.err(&fp, "principals and serviceAccounts are mutually exclusive");
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let tp = format!("{p}.to[{j}].operation");
            let Some(op) = &to.operation else {
                c.err(&tp, "required");
                continue;
            };
            if [
                &op.hosts,
                &op.not_hosts,
                &op.ports,
                &op.not_ports,
                &op.methods,
                &op.not_methods,
                &op.paths,
                &op.not_paths,
            ]
            .iter()
            .all(|v| v.is_empty())
            {
                c.err(
                    &tp,
                    "an empty operation matches nothing; list at least one field",
                );
            }
            for (f, ports) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                for (k, port) in ports.iter().enumerate() {
                    if port
                        .parse::<u32>()
                        .map_or(true, |n| !(1..=65535).contains(&n))
                    {
                        c.err(
                            format!("{tp}.{f}[{k}]"),
                            format!("{port:?} is not a port number"),
                        );
                    }
                }
            }
            for (f, paths) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                for (k, path) in paths.iter().enumerate() {
                    if path.is_empty()
                        || (path.matches('*').count() > 1
                            && !path.contains("{*}")
                            && !path.contains("{**}"))
                    {
                        c.err(
                            format!("{tp}.{f}[{k}]"),
                            format!(
                                "{path:?}: use one leading or trailing *, or {{*}}/{{**}} templates"
                            ),
                        );
                    }
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let cp = format!("{p}.when[{j}]");
            if !known_condition(&cond.key) {
                c.err(
                    format!("{cp}.key"),
                    format!(
                        "{:?} is not a condition key AuthorizationPolicy knows",
                        cond.key
                    ),
                );
            }
            if cond.values.is_empty() && cond.not_values.is_empty() {
                c.err(&cp, "values or notValues is required");
            }
        }
    }
}

fn telemetry(c: &mut Check<'_>, s: &Telemetry) {
    targets(c, &s.selector, &s.target_ref, &s.target_refs);
    for (i, t) in s.tracing.iter().enumerate() {
        let p = format!("spec.tracing[{i}]");
        if let Some(v) = t.random_sampling_percentage
            && !(0.0..=100.0).contains(&v)
        {
            c.err(
                format!("{p}.randomSamplingPercentage"),
                "not a percentage (0-100)",
            );
        }
        for (j, pr) in t.providers.iter().enumerate() {
            c.required(&format!("{p}.providers[{j}].name"), &pr.name);
        }
        for (name, tag) in &t.custom_tags {
            let n = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if n != 1 {
                c.err(
                    format!("{p}.customTags.{name}"),
                    "exactly one of literal, environment or header is required",
                );
            }
        }
    }
    for (i, m) in s.metrics.iter().enumerate() {
        let p = format!("spec.metrics[{i}]");
        for (j, pr) in m.providers.iter().enumerate() {
            c.required(&format!("{p}.providers[{j}].name"), &pr.name);
        }
        for (j, o) in m.overrides.iter().enumerate() {
            if let Some(sel) = &o.matches
                && sel.metric.is_some()
                && !sel.custom_metric.is_empty()
            {
                c.err(
                    format!("{p}.overrides[{j}].match"),
                    "metric and customMetric are mutually exclusive",
                );
            }
            for (tag, ov) in &o.tag_overrides {
                if ov.operation != Some(TagOperation::Remove) && ov.value.is_empty() {
                    c.err(
                        format!("{p}.overrides[{j}].tagOverrides.{tag}.value"),
                        "required unless the operation is REMOVE",
                    );
                }
                if ov.operation == Some(TagOperation::Remove) && !ov.value.is_empty() {
                    c.err(
                        format!("{p}.overrides[{j}].tagOverrides.{tag}.value"),
                        "REMOVE takes no value",
                    );
                }
            }
        }
        c.duration(
            &format!("{p}.reportingInterval"),
            &m.reporting_interval,
            MIN,
        );
    }
    for (i, a) in s.access_logging.iter().enumerate() {
        let p = format!("spec.accessLogging[{i}]");
        for (j, pr) in a.providers.iter().enumerate() {
            c.required(&format!("{p}.providers[{j}].name"), &pr.name);
        }
        if let Some(f) = &a.filter {
            c.required(&format!("{p}.filter.expression"), &f.expression);
        }
    }
}

const VIRTUAL_SERVICE: &[&str] = &[
    "hosts",
    "gateways",
    "http.name",
    "http.match.name",
    "http.match.uri",
    "http.match.method",
    "http.match.authority",
    "http.match.headers",
    "http.match.withoutHeaders",
    "http.match.queryParams",
    "http.match.ignoreUriCase",
    "http.match.port",
    "http.match.sourceLabels",
    "http.match.sourceNamespace",
    "http.route",
    "http.redirect",
    "http.directResponse",
    "http.rewrite",
    "http.headers",
    "http.timeout",
    "http.retries.attempts",
    "http.retries.perTryTimeout",
    "http.retries.retryOn",
    "http.retries.backoff",
    "http.fault",
    "http.mirror",
    "http.mirrors",
    "http.mirrorPercentage",
    "http.mirrorPercent",
    "http.corsPolicy.allowOrigins",
    "http.corsPolicy.allowOrigin",
    "http.corsPolicy.allowMethods",
    "http.corsPolicy.allowHeaders",
    "http.corsPolicy.exposeHeaders",
    "http.corsPolicy.maxAge",
    "http.corsPolicy.allowCredentials",
    "tcp.match.port",
    "tcp.match.destinationSubnets",
    "tcp.match.sourceSubnet",
    "tcp.match.sourceLabels",
    "tcp.match.sourceNamespace",
    "tcp.route",
    "tls.match.sniHosts",
    "tls.match.port",
    "tls.match.destinationSubnets",
    "tls.match.sourceLabels",
    "tls.match.sourceNamespace",
    "tls.route",
];

/// The traffic policy fields the L7 path acts on, under each place a
/// policy may sit (rule, port, subset, subset port).
const TRAFFIC_POLICY: [&str; 17] = [
    "loadBalancer.simple",
    "loadBalancer.consistentHash",
    "loadBalancer.localityLbSetting",
    "connectionPool.tcp.maxConnections",
    "connectionPool.tcp.connectTimeout",
    "connectionPool.http.http1MaxPendingRequests",
    "connectionPool.http.http2MaxRequests",
    "connectionPool.http.maxRequestsPerConnection",
    "connectionPool.http.maxRetries",
    "connectionPool.http.useClientProtocol",
    "outlierDetection.consecutive5xxErrors",
    "outlierDetection.consecutiveGatewayErrors",
    "outlierDetection.consecutiveErrors",
    "outlierDetection.baseEjectionTime",
    "outlierDetection.maxEjectionPercent",
    "outlierDetection.minHealthPercent",
    "outlierDetection.interval",
];

static DESTINATION_RULE: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut v = vec!["host", "subsets.name", "subsets.labels"];
    for place in [
        "trafficPolicy",
        "trafficPolicy.portLevelSettings",
        "subsets.trafficPolicy",
        "subsets.trafficPolicy.portLevelSettings",
    ] {
        for f in TRAFFIC_POLICY {
            v.push(Box::leak(format!("{place}.{f}").into_boxed_str()));
        }
    }
    v.push("trafficPolicy.portLevelSettings.port");
    v.push("subsets.trafficPolicy.portLevelSettings.port");
    v
});

/// Fields of each kind the mesh acts on today; everything else is
/// accepted and reported as not yet enforced.
fn enforced(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::PeerAuthentication => &["selector", "mtls", "portLevelMtls"],
        // The service registry: where captured connections go.
        Kind::ServiceEntry => &[
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints.address",
            "endpoints.ports",
            "endpoints.labels",
            "endpoints.locality",
            "endpoints.weight",
            "endpoints.serviceAccount",
            "workloadSelector",
        ],
        // L7 routing in the source pod's agent.
        Kind::VirtualService => VIRTUAL_SERVICE,
        Kind::DestinationRule => &DESTINATION_RULE,
        Kind::WorkloadEntry => &[
            "address",
            "ports",
            "labels",
            "locality",
            "weight",
            "serviceAccount",
        ],
        _ => &[],
    }
}

/// A note listing the fields of `r` that are accepted but not acted on yet.
pub fn not_enforced(r: &Resource) -> Option<Problem> {
    let mut fields = BTreeSet::new();
    collect_fields(&r.spec.to_json(), String::new(), 0, &mut fields);
    let done = enforced(r.kind());
    let pending: Vec<String> = fields
        .into_iter()
        .filter(|f| {
            !done
                .iter()
                .any(|d| f == d || f.starts_with(&format!("{d}.")))
        })
        .collect();
    if pending.is_empty() {
        return None;
    }
    Some(Problem {
        severity: Severity::Note,
        file: r.origin.file.clone(),
        line: r.origin.line,
        resource: r.id(),
        field: "spec".into(),
        message: format!("accepted, not yet enforced: {}", pending.join(", ")),
    })
}

/// Fields whose value is a map keyed by user data (label names, header
/// names, ports): their keys are not field names.
const MAP_FIELDS: &[&str] = &[
    "labels",
    "matchLabels",
    "selector",
    "ports",
    "portLevelMtls",
    "headers",
    "queryParams",
    "withoutHeaders",
    "sourceLabels",
    "set",
    "add",
    "customTags",
    "tagOverrides",
    "appendHeaders",
    "appendRequestHeaders",
    "appendResponseHeaders",
];

/// Field paths (without indices) down to two levels under the spec.
fn collect_fields(v: &serde_json::Value, path: String, depth: usize, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                // Deep enough to tell `connectionPool.http.maxRetries`
                // (enforced) from `connectionPool.http.idleTimeout`.
                if depth >= 4
                    || MAP_FIELDS.contains(&k.as_str())
                    || !matches!(
                        child,
                        serde_json::Value::Object(_) | serde_json::Value::Array(_)
                    )
                {
                    out.insert(p);
                } else {
                    collect_fields(child, p, depth + 1, out);
                }
            }
        }
        serde_json::Value::Array(items) => items
            .iter()
            .for_each(|i| collect_fields(i, path.clone(), depth, out)),
        _ if !path.is_empty() => {
            out.insert(path);
        }
        _ => {}
    }
}
