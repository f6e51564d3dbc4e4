//! The rest of `networking.istio.io`: Gateway, ServiceEntry, WorkloadEntry,
//! Sidecar.

use super::*;

pub(super) fn server_tls(
    c: &mut Check<'_>,
    p: &str,
    t: &Option<ServerTlsSettings>,
    protocol: &str,
) {
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

pub(super) const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "REDIS", "MYSQL", "UDP",
    "HBONE",
];

pub(super) fn protocol(c: &mut Check<'_>, path: &str, proto: &str) {
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

pub(super) fn gateway(c: &mut Check<'_>, s: &Gateway) {
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

pub(super) fn service_entry(c: &mut Check<'_>, s: &ServiceEntry) {
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

pub(super) fn workload_entry(c: &mut Check<'_>, p: &str, e: &WorkloadEntry) {
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

pub(super) fn sidecar(c: &mut Check<'_>, s: &Sidecar) {
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
