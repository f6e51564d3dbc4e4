//! What the data path acts on, field by field: everything else a resource
//! sets is accepted and reported as "accepted, not yet enforced", so the
//! validator never claims more than the agent does.

use super::*;

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

/// The traffic policy fields the data path acts on, under each place a
/// policy may sit (rule, port, subset, subset port). Load balancing,
/// `connectionPool.tcp` and outlier detection act on TCP services too
/// (outlier detection counting refused connections); the `http` settings
/// on HTTP ports. Each is exercised through real traffic in `tests/l7/`
/// (`connectionPool.tcp.idleTimeout` in `tests/faults.rs`).
const TRAFFIC_POLICY: [&str; 18] = [
    "loadBalancer.simple",
    "loadBalancer.consistentHash",
    "loadBalancer.localityLbSetting",
    "connectionPool.tcp.maxConnections",
    "connectionPool.tcp.connectTimeout",
    "connectionPool.tcp.idleTimeout",
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
        // Decided by the destination's agent (`policy::authz`,
        // `policy::jwt`, `policy::ext_authz`), tested in `tests/authz/`.
        Kind::AuthorizationPolicy => &["selector", "rules", "action", "provider"],
        Kind::RequestAuthentication => &["selector", "jwtRules"],
        Kind::Telemetry => &[
            "selector",
            "accessLogging",
            "tracing.match",
            "tracing.providers",
            "tracing.randomSamplingPercentage",
            "tracing.disableSpanReporting",
            "tracing.customTags",
        ],
        // Local rate limits; other patches are warned about by validation.
        Kind::EnvoyFilter => &["workloadSelector", "configPatches", "priority"],
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
        // Routing in the source pod's agent: `http` routes for HTTP ports,
        // `tcp` and `tls` routes for the others.
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

/// What a resource of a kind the agent does not act on at all would have
/// done, said plainly: the risk of believing it is in force.
fn consequence(r: &Resource) -> Option<String> {
    let targeted = match &r.spec {
        Spec::AuthorizationPolicy(p) => p.target_ref.is_some() || !p.target_refs.is_empty(),
        Spec::RequestAuthentication(p) => p.target_ref.is_some() || !p.target_refs.is_empty(),
        Spec::EnvoyFilter(p) => !p.target_refs.is_empty(),
        Spec::Telemetry(p) => p.target_ref.is_some() || !p.target_refs.is_empty(),
        _ => false,
    };
    if targeted {
        return Some(format!(
            "this {} binds to a gateway or service (targetRef), which this data plane does not \
             have: it is not applied",
            r.kind().name()
        ));
    }
    let what = match &r.spec {
        Spec::Gateway(_) => "nothing listens for its servers",
        Spec::Sidecar(_) => "egress and ingress are not restricted by it",
        _ => return None,
    };
    Some(format!("this {} is not enforced: {what}", r.kind().name()))
}

/// What the agent does not act on in `r`: a warning naming the
/// consequence for a kind it does not enforce at all (policies above all:
/// a deny-all policy that quietly allows everything is worse than an
/// error), else a note listing the fields accepted but not acted on yet.
pub fn not_enforced(r: &Resource) -> Option<Problem> {
    if let Some(message) = consequence(r) {
        return Some(Problem {
            severity: Severity::Warning,
            file: r.origin.file.clone(),
            line: r.origin.line,
            resource: r.id(),
            field: "spec".into(),
            message,
        });
    }
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
