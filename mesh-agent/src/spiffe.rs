//! SPIFFE IDs, `spiffe://<trust-domain>/<path>`: workload identities
//! (`/ns/<namespace>/sa/<service-account>`) and the mesh's own components.
//! A leaf: TLS, the workload registry, the identity manager and the CA all
//! name identities with it, and it depends on none of them.

use std::{fmt, str::FromStr};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)")]
    NotSpiffe(String),
    #[error(
        "{0:?} is not a workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    NotWorkload(String),
}

/// A SPIFFE ID: trust domain plus path. Workload identities have the path
/// `/ns/<namespace>/sa/<service-account>`; the mesh's own components use
/// `/mesh/<role>/…` (the CA, nodes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

impl SpiffeId {
    /// The identity of a workload.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            path: format!("/ns/{namespace}/sa/{service_account}"),
        }
    }

    /// The identity a node agent proves to the CA with its node credential.
    pub fn node(trust_domain: &str, node: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            path: format!("/mesh/node/{node}"),
        }
    }

    /// The identity of the certificate authority's endpoint.
    pub fn ca(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            path: "/mesh/ca".into(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `(namespace, service account)` for a workload identity.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let rest = self.path.strip_prefix("/ns/")?;
        let (ns, sa) = rest.split_once("/sa/")?;
        (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((ns, sa))
    }

    /// The node name of a node identity.
    pub fn node_name(&self) -> Option<&str> {
        self.path
            .strip_prefix("/mesh/node/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
    }

    /// Parses a workload identity, rejecting other SPIFFE IDs.
    pub fn parse_workload(s: &str) -> Result<Self, Error> {
        let id: Self = s.parse()?;
        if id.workload_parts().is_none() {
            return Err(Error::NotWorkload(s.into()));
        }
        Ok(id)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::NotSpiffe(s.into());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = !path.is_empty()
            && !path.ends_with('/')
            && !path.contains("//")
            && path.split('/').all(|seg| seg != "." && seg != "..")
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b));
        if !td_ok || !path_ok {
            return Err(bad());
        }
        Ok(Self {
            trust_domain: td.into(),
            path: format!("/{path}"),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_identity_round_trips() {
        let id = SpiffeId::workload("cluster.local", "default", "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        let back: SpiffeId = id.to_string().parse().unwrap();
        assert_eq!(back, id);
        assert_eq!(back.workload_parts(), Some(("default", "sleep")));
        assert_eq!(back.trust_domain(), "cluster.local");
    }

    #[test]
    fn node_and_ca_identities_are_not_workloads() {
        let n = SpiffeId::node("td", "node-1");
        assert_eq!(n.node_name(), Some("node-1"));
        assert!(n.workload_parts().is_none());
        assert!(SpiffeId::parse_workload(&n.to_string()).is_err());
        assert!(SpiffeId::ca("td").node_name().is_none());
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "http://td/ns/a/sa/b",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
        assert!(SpiffeId::parse_workload("spiffe://td/ns/a/sa/b/c").is_err());
    }
}
