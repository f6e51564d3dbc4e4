//! Service discovery: every workload, service and endpoint the mesh knows,
//! merged from Kubernetes objects (Pods, Namespaces, Services,
//! EndpointSlices, Endpoints), Istio ServiceEntries and WorkloadEntries,
//! and the agent's own workload registry. The proxy asks it where a
//! captured connection goes and which identity to expect there.

pub mod ambient;
pub mod build;
pub mod pod;
pub mod protocol;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

pub use build::{Settings, build};
pub use protocol::Protocol;

use crate::{config::Cidr, workload::Workload};

/// Where a workload runs: `region/zone/subzone`, any part may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subzone: String,
}

impl Locality {
    /// Istio's `region/zone/subzone` notation.
    pub fn parse(s: &str) -> Self {
        let mut parts = s.splitn(3, '/').map(str::to_owned);
        Self {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: u16,
    /// The endpoints' port when they do not say (Kubernetes `targetPort`
    /// as a number, ServiceEntry `targetPort`); `None` means the same port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// A named `targetPort`, resolved per endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port_name: Option<String>,
    pub protocol: Protocol,
}

/// One backend of a service.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The endpoint's address; `None` for a DNS name (see `hostname`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// A DNS name to resolve at connect time (ServiceEntry, resolution DNS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Ports by service port name (EndpointSlice ports, WorkloadEntry ports).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub locality: Locality,
    pub weight: u32,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The meshed workload behind this endpoint: reached over HBONE, with
    /// its identity expected.
    #[serde(skip_serializing_if = "Option::is_none", rename = "workload")]
    pub workload: Option<WorkloadRef>,
    /// The service account of a WorkloadEntry (its identity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// A workload as a service endpoint refers to it.
#[derive(Debug, Clone)]
pub struct WorkloadRef(pub Arc<Workload>);

impl Serialize for WorkloadRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.key())
    }
}

impl Endpoint {
    /// A ready endpoint at an address (or a DNS name), with nothing else
    /// known about it yet.
    pub fn at(address: Option<IpAddr>, hostname: Option<String>) -> Self {
        Self {
            address,
            hostname,
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
            locality: Locality::default(),
            weight: 1,
            ready: true,
            node: None,
            workload: None,
            service_account: None,
        }
    }

    /// The endpoint's port for service port `p`.
    pub fn port_for(&self, p: &ServicePort) -> u16 {
        if !p.name.is_empty()
            && let Some(port) = self.ports.get(&p.name)
        {
            return *port;
        }
        if let Some(name) = &p.target_port_name
            && let Some(port) = self.ports.get(name)
        {
            return *port;
        }
        p.target_port.unwrap_or(p.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceKind {
    Kubernetes,
    ServiceEntry,
}

/// How the endpoints of a service are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// The agent picks one of the listed endpoints.
    Static,
    /// The host (or the endpoints' hostnames) is resolved at connect time.
    Dns,
    /// Like `Dns`, one address of the answer.
    DnsRoundRobin,
    /// The connection goes where the application sent it.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshInternal,
    MeshExternal,
}

/// A service: a host name, the addresses clients use, ports, endpoints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Fully qualified (`reviews.bookinfo.svc.cluster.local`, or the
    /// ServiceEntry host).
    pub hostname: String,
    pub kind: ServiceKind,
    /// Virtual IPs or CIDRs clients connect to.
    pub addresses: Vec<Cidr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    pub resolution: Resolution,
    pub location: Location,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The ready endpoints that serve `port` to a client of `family`'s
    /// kind and that `keep` accepts: what load balancing chooses among.
    /// Like Kubernetes, an IPv4 service address leads to IPv4 endpoints
    /// and an IPv6 one to IPv6.
    pub fn candidates(
        &self,
        port: &ServicePort,
        family: IpAddr,
        keep: impl Fn(&Endpoint) -> bool,
    ) -> Vec<&Endpoint> {
        self.endpoints
            .iter()
            .filter(|e| e.ready && e.weight > 0 && keep(e))
            .filter(|e| e.address.is_none_or(|a| a.is_ipv4() == family.is_ipv4()))
            .filter(|e| {
                // Endpoints that list ports must list this one.
                e.ports.is_empty()
                    || port.name.is_empty()
                    || e.ports.contains_key(&port.name)
                    || port
                        .target_port_name
                        .as_ref()
                        .is_some_and(|n| e.ports.contains_key(n))
            })
            .collect()
    }
}

/// Everything the mesh knows about workloads and services.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// Meshed workloads (enrolled on their node, reached over HBONE).
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    /// Pods the enrolment label asks for that Istio ambient's data plane
    /// captures on their node: not enrolled (see `ambient`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_to_istio: Vec<ambient::LeftToIstio>,
    /// `namespace/name` of the pods of the agent's node that the mesh does
    /// not carry (not labelled in, or left to Istio).
    #[serde(skip)]
    pub outside_on_node: std::collections::BTreeSet<String>,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Workloads by (namespace, service account): who an identity can be.
    #[serde(skip)]
    by_identity: HashMap<(String, String), Vec<Arc<Workload>>>,
    #[serde(skip)]
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    /// ServiceEntry address ranges, longest prefix first.
    #[serde(skip)]
    by_cidr: Vec<(Cidr, Arc<Service>)>,
    #[serde(skip)]
    by_host: HashMap<String, Vec<Arc<Service>>>,
}

impl Registry {
    /// The meshed workload at `ip`.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workloads running as service account `sa` of `namespace`.
    pub fn with_identity(&self, namespace: &str, sa: &str) -> &[Arc<Workload>] {
        self.by_identity
            .get(&(namespace.to_owned(), sa.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    /// The service a client reaches at `dst` (a VIP, or a ServiceEntry
    /// address range), with the port it asked for.
    pub fn service_at(&self, dst: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let svc = self.by_vip.get(&dst).or_else(|| {
            self.by_cidr
                .iter()
                .find(|(c, s)| c.contains(dst.ip()) && s.port(dst.port()).is_some())
                .map(|(_, s)| s)
        })?;
        Some((svc, svc.port(dst.port())?))
    }

    /// Services with this fully qualified host name.
    pub fn services_for_host(&self, host: &str) -> &[Arc<Service>] {
        self.by_host.get(host).map_or(&[], Vec::as_slice)
    }

    /// The ready endpoints of the first Service named `host` that has
    /// `port` and any (for services the agent itself calls: an external
    /// authorizer, a trace collector).
    pub fn ready_endpoints(&self, host: &str, port: u16) -> Vec<SocketAddr> {
        self.services_for_host(host)
            .iter()
            .filter_map(|svc| {
                let p = svc.port(port)?;
                let ready: Vec<SocketAddr> = svc
                    .endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .filter_map(|e| Some(SocketAddr::new(e.address?, e.port_for(p))))
                    .collect();
                (!ready.is_empty()).then_some(ready)
            })
            .next()
            .unwrap_or_default()
    }

    /// The workloads scheduled on `node` (what an agent enrols).
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.iter().filter(move |w| w.is_on(node))
    }

    fn index(&mut self) {
        for w in &self.workloads {
            for ip in &w.ips {
                self.by_ip.insert(*ip, w.clone());
            }
            self.by_identity
                .entry((w.namespace.clone(), w.service_account.clone()))
                .or_default()
                .push(w.clone());
        }
        for s in &self.services {
            for a in &s.addresses {
                if a.is_host() {
                    for p in &s.ports {
                        self.by_vip
                            .entry(SocketAddr::new(a.addr, p.port))
                            .or_insert_with(|| s.clone());
                    }
                } else {
                    self.by_cidr.push((*a, s.clone()));
                }
            }
            self.by_host
                .entry(s.hostname.clone())
                .or_default()
                .push(s.clone());
        }
        self.by_cidr.sort_by_key(|c| std::cmp::Reverse(c.0.len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_parses_istio_notation() {
        let l = Locality::parse("us-east1/us-east1-b");
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
            ("us-east1", "us-east1-b", "")
        );
        assert_eq!(Locality::parse(""), Locality::default());
    }
}
