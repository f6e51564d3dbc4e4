//! `security.istio.io`: PeerAuthentication, RequestAuthentication,
//! AuthorizationPolicy.

use super::*;

pub(super) fn peer_authentication(c: &mut Check<'_>, s: &PeerAuthentication) {
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

pub(super) fn request_authentication(c: &mut Check<'_>, s: &RequestAuthentication) {
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
pub(super) fn known_condition(key: &str) -> bool {
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

pub(super) fn authorization_policy(c: &mut Check<'_>, s: &AuthorizationPolicy) {
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
            if cond.key == "connection.sni" {
                c.warn(
                    format!("{cp}.key"),
                    "connection.sni: no TLS a client named a server for ends at the destination's \
                     agent, so there is no SNI to compare: the rule fails closed (an ALLOW rule \
                     never matches, a DENY rule always does)",
                );
            }
            if cond.key.starts_with("experimental.envoy.filters.") {
                c.warn(
                    format!("{cp}.key"),
                    format!(
                        "{:?} reads Envoy filter metadata this data plane does not have: the rule \
                         fails closed (an ALLOW rule never matches, a DENY rule always does)",
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
