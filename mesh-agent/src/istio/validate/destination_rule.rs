//! DestinationRule: subsets and traffic policies (load balancing,
//! connection pools, outlier detection, client TLS) at every level.

use super::*;

pub(super) fn traffic_policy(c: &mut Check<'_>, p: &str, t: &TrafficPolicy, top: bool) {
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

pub(super) fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

pub(super) fn load_balancer(c: &mut Check<'_>, p: &str, lb: &Option<LoadBalancerSettings>) {
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

pub(super) fn connection_pool(c: &mut Check<'_>, p: &str, cp: &Option<ConnectionPoolSettings>) {
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

pub(super) fn outlier(c: &mut Check<'_>, p: &str, o: &Option<OutlierDetection>) {
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

pub(super) fn client_tls(c: &mut Check<'_>, p: &str, t: &Option<ClientTlsSettings>) {
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

pub(super) fn check(c: &mut Check<'_>, s: &DestinationRule) {
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
