//! VirtualService: hosts, gateways, `http` routes (matches, destinations
//! and weights, redirects, rewrites, retries, faults, mirrors, CORS) and
//! `tcp`/`tls` routes.

use super::*;

/// Retry conditions Istio accepts in `retryOn` (besides HTTP status codes).
pub(super) const RETRY_ON: &[&str] = &[
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

pub(super) fn destination(c: &mut Check<'_>, path: &str, d: &Destination) {
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

pub(super) fn weights<I: IntoIterator<Item = Option<i32>>>(c: &mut Check<'_>, path: &str, ws: I) {
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

pub(super) fn headers(c: &mut Check<'_>, path: &str, h: &Option<Headers>) {
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

pub(super) fn check(c: &mut Check<'_>, s: &VirtualService) {
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

pub(super) fn l4_routes(c: &mut Check<'_>, p: &str, route: &[RouteDestination]) {
    if route.is_empty() {
        c.err(format!("{p}.route"), "at least one destination is required");
    }
    for (j, d) in route.iter().enumerate() {
        destination(c, &format!("{p}.route[{j}].destination"), &d.destination);
    }
    weights(c, &format!("{p}.route"), route.iter().map(|d| d.weight));
}
