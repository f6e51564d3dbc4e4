//! The destination's AuthorizationPolicy decision about a connection or a
//! request: what policy sees of it ([`Attributes`]), and what follows a
//! verdict — counted (`mesh_authz_decisions_total`), written to the audit
//! log (AUDIT matches and every denial), dry-run differences logged.

use crate::{
    policy::authz::{Action, Attributes, HttpAttributes, Verdict},
    telemetry::audit,
};

use super::{Arrival, Error, ProxyContext};

/// Who the peer is, as policy names it.
pub struct Peer {
    /// The SPIFFE ID without `spiffe://`.
    pub principal: Option<String>,
    pub namespace: Option<String>,
}

/// The request a verdict was about, for the audit log.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
}

impl Arrival {
    pub fn peer(&self) -> Peer {
        match &self.identity {
            Some(id) => Peer {
                principal: Some(id.to_string().trim_start_matches("spiffe://").to_owned()),
                namespace: id.workload_parts().map(|(ns, _)| ns.to_owned()),
            },
            None => Peer {
                principal: None,
                namespace: None,
            },
        }
    }

    pub fn attributes<'a>(
        &self,
        peer: &'a Peer,
        http: Option<&'a HttpAttributes<'a>>,
    ) -> Attributes<'a> {
        Attributes {
            principal: peer.principal.as_deref(),
            namespace: peer.namespace.as_deref(),
            source_ip: self.peer.ip(),
            remote_ip: self.peer.ip(),
            destination: self.dst,
            http,
        }
    }

    /// The connection-level decision: `Err` when a policy denies it.
    pub fn authorize_connection(&self, ctx: &ProxyContext) -> Result<(), Error> {
        let authz = &self.policy.authorization;
        if authz.is_empty() {
            return Ok(());
        }
        let peer = self.peer();
        let v = authz.decide(&self.attributes(&peer, None));
        if self.record(ctx, &peer, &v, None) {
            return Ok(());
        }
        // Counted as a connection opened and closed at once, as Istio's
        // TCP metrics show a denied connection.
        self.with_labels(ctx, |l| drop(ctx.metrics.connection_opened(l)));
        Err(Error::Denied {
            dst: self.dst,
            pod: self.pod.workload.key().to_string(),
            by: describe(&v),
        })
    }

    /// Counts, audits and logs a verdict; whether it allows.
    pub fn record(
        &self,
        ctx: &ProxyContext,
        peer: &Peer,
        v: &Verdict<'_>,
        req: Option<&RequestInfo<'_>>,
    ) -> bool {
        let policy = v.policy.map_or("none", |p| p.id.as_str());
        let action = v.action.map_or("NONE", Action::name);
        let decision = if v.allowed { "allow" } else { "deny" };
        ctx.metrics.authz_decision(action, decision, policy);
        let audit = |decision, reason: &str, policy: &str| {
            self.audit(ctx, peer, decision, reason, policy, req)
        };
        if let Some(p) = v.audit {
            ctx.metrics.authz_decision("AUDIT", "audit", &p.id);
            audit(decision, "AUDIT", &p.id);
        }
        if !v.allowed {
            audit("deny", action, policy);
            tracing::debug!(pod = %self.pod.workload.key(), peer = %self.peer, path = req.map_or("-", |r| r.path), "authorization: denied ({})", describe(v));
        }
        if let Some((would_allow, action, by)) = v.dry_run {
            let by = by.map_or("none", |p| p.id.as_str());
            let action = action.map_or("NONE", Action::name);
            let decision = if would_allow {
                "dry_run_allow"
            } else {
                "dry_run_deny"
            };
            ctx.metrics.authz_decision(action, decision, by);
            tracing::info!(pod = %self.pod.workload.key(), peer = %self.peer, path = req.map_or("-", |r| r.path), "authorization dry-run: would {} ({action} {by})", if would_allow { "allow" } else { "deny" });
        }
        v.allowed
    }
}

impl Arrival {
    /// Counts and audits what a CUSTOM policy's authorizer decided.
    pub fn record_custom(
        &self,
        ctx: &ProxyContext,
        peer: &Peer,
        policy: &str,
        allowed: bool,
        req: Option<&RequestInfo<'_>>,
    ) {
        let decision = if allowed { "allow" } else { "deny" };
        ctx.metrics.authz_decision("CUSTOM", decision, policy);
        if !allowed {
            self.audit(ctx, peer, decision, "CUSTOM", policy, req);
        }
    }

    /// Writes one audit record about this connection (and request).
    fn audit(
        &self,
        ctx: &ProxyContext,
        peer: &Peer,
        decision: &'static str,
        reason: &str,
        policy: &str,
        req: Option<&RequestInfo<'_>>,
    ) {
        ctx.audit.write(&audit::Record {
            time: audit::now(),
            decision,
            reason,
            policy,
            source_principal: peer.principal.as_deref(),
            source_ip: self.peer.ip().to_string(),
            destination_workload: &self.pod.workload.key().to_string(),
            destination: self.dst.to_string(),
            method: req.map(|r| r.method),
            host: req.map(|r| r.host),
            path: req.map(|r| r.path),
        });
    }
}

/// How a verdict came about, for logs and errors.
pub fn describe(v: &Verdict<'_>) -> String {
    match (v.action, v.policy) {
        (Some(a), Some(p)) => format!("{} {}", a.name(), p.id),
        (Some(Action::Allow), None) => "no ALLOW policy matched".into(),
        _ => "no policy".into(),
    }
}
