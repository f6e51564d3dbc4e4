//! Building the registry from configuration documents.
//!
//! * Workloads: the agent's registry entries, and Kubernetes Pods in
//!   ambient mode by the enrolment label (see `ambient`; never
//!   host-network pods, nor pods Istio's own data plane claims). A
//!   registry entry wins over a Pod with the same name.
//! * Kubernetes Services: one per Service, host
//!   `<name>.<namespace>.svc.<cluster domain>`, endpoints from its
//!   EndpointSlices, else its Endpoints object, else its selector over the
//!   known pods.
//! * ServiceEntries: one service per host, as Istio does; endpoints from
//!   `endpoints`, else `workloadSelector` over WorkloadEntries and pods, else
//!   (resolution DNS) the host itself.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Namespace, Pod, Service as KubeService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    Endpoint, Locality, Location, Protocol, Registry, Resolution, Service, ServiceKind,
    ServicePort, WorkloadRef, ambient,
};
use crate::{
    config::Cidr,
    documents::{Document, KubeObject},
    istio::{
        Resource, Spec,
        networking::{self, ServiceEntry, WorkloadEntry},
    },
    workload::Workload,
};

/// EndpointSlices name their service with this label.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// What the registry needs besides the documents.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `cluster.local` unless the cluster says otherwise.
    pub cluster_domain: String,
    /// The key of the label that enrols a pod or namespace
    /// (`--dataplane-mode-label`).
    pub dataplane_mode_label: String,
    /// The agent's node: the pods there the mesh does not carry are
    /// recorded (`Registry::outside_on_node`). None in the CA.
    pub node_name: Option<String>,
}

/// The objects of each kind, borrowed from the documents.
#[derive(Default)]
struct Objects<'a> {
    registry: Vec<&'a Workload>,
    pods: Vec<&'a Pod>,
    namespaces: HashMap<&'a str, &'a Namespace>,
    services: Vec<&'a KubeService>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    endpoints: HashMap<(&'a str, &'a str), &'a Endpoints>,
    service_entries: Vec<(&'a Resource, &'a ServiceEntry)>,
    workload_entries: Vec<(&'a Resource, &'a WorkloadEntry)>,
}

fn ns_name(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or_default(),
    )
}

/// Builds the registry from every document of every source.
pub fn build<'a>(docs: impl IntoIterator<Item = &'a Document>, settings: &Settings) -> Registry {
    let mut o = Objects::default();
    for d in docs {
        match d {
            Document::Workloads(ws, _) => o.registry.extend(ws),
            Document::Kube(k, _) => match k {
                KubeObject::Pod(p) => o.pods.push(p),
                KubeObject::Namespace(n) => {
                    o.namespaces
                        .insert(n.metadata.name.as_deref().unwrap_or_default(), n);
                }
                KubeObject::Service(s) => o.services.push(s),
                KubeObject::EndpointSlice(s) => {
                    let ns = s.metadata.namespace.as_deref().unwrap_or("default");
                    if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME))
                    {
                        o.slices.entry((ns, svc.as_str())).or_default().push(s);
                    }
                }
                KubeObject::Endpoints(e) => {
                    o.endpoints.insert(ns_name(&e.metadata), e);
                }
            },
            Document::Istio(r) => match &r.spec {
                Spec::ServiceEntry(se) => o.service_entries.push((r, se)),
                Spec::WorkloadEntry(we) => o.workload_entries.push((r, we)),
                _ => {}
            },
        }
    }

    let (workloads, others, left_to_istio) = workloads(&o, settings);
    // Pods of this node the mesh does not carry: the CNI plugin is told so
    // at once, not after waiting for them to appear.
    let outside_on_node = others
        .iter()
        .filter(|w| settings.node_name.is_some() && w.node == settings.node_name)
        .map(|w| w.key().to_string())
        .collect();
    let by_ip: HashMap<IpAddr, Arc<Workload>> = workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone())))
        .collect();
    let all_pods: Vec<&Arc<Workload>> = workloads.iter().chain(&others).collect();

    let mut services = Vec::new();
    for s in &o.services {
        if let Some(svc) = kube_service(s, &o, &all_pods, &by_ip, settings) {
            services.push(Arc::new(svc));
        }
    }
    for (r, se) in &o.service_entries {
        for host in &se.hosts {
            services.push(Arc::new(service_entry(r, se, host, &o, &all_pods, &by_ip)));
        }
    }
    let mut reg = Registry {
        workloads,
        services,
        left_to_istio,
        outside_on_node,
        ..Registry::default()
    };
    reg.index();
    reg
}

/// Meshed workloads, the other pods (still service endpoints), and the
/// pods Istio ambient claims.
fn workloads(
    o: &Objects<'_>,
    settings: &Settings,
) -> (
    Vec<Arc<Workload>>,
    Vec<Arc<Workload>>,
    Vec<ambient::LeftToIstio>,
) {
    let istio_nodes = ambient::istio_nodes(o.pods.iter().copied());
    let mut left = Vec::new();
    let mut meshed: BTreeMap<_, Arc<Workload>> = o
        .registry
        .iter()
        .map(|w| (w.key(), Arc::new((*w).clone())))
        .collect();
    let mut others = Vec::new();
    for p in &o.pods {
        let Some(w) = super::pod::workload(p) else {
            continue;
        };
        if meshed.contains_key(&w.key()) {
            continue; // the explicit registry entry wins
        }
        let ns_labels = o
            .namespaces
            .get(w.namespace.as_str())
            .and_then(|n| n.metadata.labels.as_ref());
        let ours = ambient::in_mode(&settings.dataplane_mode_label, &w.labels, ns_labels);
        match ambient::claimed_by_istio(&w, ns_labels, &istio_nodes) {
            Some(claim) if ours => {
                left.push(claim);
                others.push(Arc::new(w));
            }
            _ if ours => {
                meshed.insert(w.key(), Arc::new(w));
            }
            _ => others.push(Arc::new(w)),
        }
    }
    (meshed.into_values().collect(), others, left)
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A pod's locality: Istio's `istio-locality` label (`region.zone.subzone`),
/// else the zone its EndpointSlice gives.
pub fn pod_locality(labels: &BTreeMap<String, String>, zone: Option<&str>) -> Locality {
    if let Some(l) = labels.get("istio-locality") {
        return Locality::parse(&l.replace('.', "/"));
    }
    Locality {
        zone: zone.unwrap_or_default().into(),
        ..Locality::default()
    }
}

fn pod_endpoint(w: &Arc<Workload>, ip: IpAddr, by_ip: &HashMap<IpAddr, Arc<Workload>>) -> Endpoint {
    Endpoint {
        address: Some(ip),
        hostname: None,
        ports: BTreeMap::new(),
        labels: w.labels.clone(),
        locality: pod_locality(&w.labels, None),
        weight: 1,
        ready: true,
        node: w.node.clone(),
        workload: by_ip.get(&ip).cloned().map(WorkloadRef),
        service_account: None,
    }
}

fn kube_service(
    s: &KubeService,
    o: &Objects<'_>,
    pods: &[&Arc<Workload>],
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
    settings: &Settings,
) -> Option<Service> {
    let spec = s.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let (namespace, name) = ns_name(&s.metadata);
    let addresses: Vec<Cidr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|addr| Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        })
        .fold(Vec::new(), |mut v, c| {
            if !v.contains(&c) {
                v.push(c);
            }
            v
        });
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let name = p.name.clone().unwrap_or_default();
            let (target_port, target_port_name) = match &p.target_port {
                Some(IntOrString::Int(n)) => (u16::try_from(*n).ok(), None),
                Some(IntOrString::String(n)) => (None, Some(n.clone())),
                None => (None, None),
            };
            Some(ServicePort {
                protocol: Protocol::of_kubernetes_port(&name, p.app_protocol.as_deref()),
                name,
                port: u16::try_from(p.port).ok()?,
                target_port,
                target_port_name,
            })
        })
        .collect();
    let pod_by_ref = |r: Option<&k8s_openapi::api::core::v1::ObjectReference>| {
        let r = r?;
        let (ns, n) = (
            r.namespace.as_deref().unwrap_or(namespace),
            r.name.as_deref()?,
        );
        pods.iter().find(|w| w.namespace == ns && w.name == n)
    };
    let mut endpoints = Vec::new();
    if let Some(slices) = o.slices.get(&(namespace, name)) {
        for slice in slices {
            let ports: BTreeMap<String, u16> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect();
            for e in slice.endpoints.iter().flatten() {
                let pod = pod_by_ref(e.target_ref.as_ref());
                let labels = pod.map(|w| w.labels.clone()).unwrap_or_default();
                for a in &e.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else {
                        continue;
                    };
                    endpoints.push(Endpoint {
                        address: Some(ip),
                        hostname: None,
                        ports: ports.clone(),
                        locality: pod_locality(&labels, e.zone.as_deref()),
                        labels: labels.clone(),
                        weight: 1,
                        // Kubernetes: a missing condition means ready.
                        ready: e.conditions.as_ref().and_then(|c| c.ready) != Some(false),
                        node: e.node_name.clone(),
                        workload: by_ip.get(&ip).cloned().map(WorkloadRef),
                        service_account: None,
                    });
                }
            }
        }
    } else if let Some(eps) = o.endpoints.get(&(namespace, name)) {
        for subset in eps.subsets.iter().flatten() {
            let ports: BTreeMap<String, u16> = subset
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port).ok()?,
                    ))
                })
                .collect();
            let ready = subset.addresses.iter().flatten().map(|a| (a, true));
            let unready = subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| (a, false));
            for (a, ready) in ready.chain(unready) {
                let Ok(ip) = a.ip.parse::<IpAddr>() else {
                    continue;
                };
                let labels = pod_by_ref(a.target_ref.as_ref())
                    .map(|w| w.labels.clone())
                    .unwrap_or_default();
                endpoints.push(Endpoint {
                    address: Some(ip),
                    hostname: None,
                    ports: ports.clone(),
                    locality: pod_locality(&labels, None),
                    labels,
                    weight: 1,
                    ready,
                    node: a.node_name.clone(),
                    workload: by_ip.get(&ip).cloned().map(WorkloadRef),
                    service_account: None,
                });
            }
        }
    } else if let Some(sel) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for w in pods
            .iter()
            .filter(|w| w.namespace == namespace && selects(sel, &w.labels))
        {
            endpoints.extend(w.ips.iter().map(|ip| pod_endpoint(w, *ip, by_ip)));
        }
        endpoints.extend(workload_entries(o, namespace, sel, by_ip));
    }
    Some(Service {
        name: name.into(),
        namespace: namespace.into(),
        hostname: format!("{name}.{namespace}.svc.{}", settings.cluster_domain),
        kind: ServiceKind::Kubernetes,
        addresses,
        ports,
        endpoints,
        resolution: Resolution::Static,
        location: Location::MeshInternal,
        subject_alt_names: Vec::new(),
    })
}

/// A WorkloadEntry (inline in a ServiceEntry, or standalone) as an endpoint.
fn entry_endpoint(
    e: &WorkloadEntry,
    labels: &BTreeMap<String, String>,
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
) -> Option<Endpoint> {
    if e.address.starts_with("unix://") {
        return None; // a Unix socket is not something a pod connects to
    }
    let ip = e.address.parse::<IpAddr>().ok();
    Some(Endpoint {
        address: ip,
        hostname: ip.is_none().then(|| e.address.clone()),
        ports: e
            .ports
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), u16::try_from(*v).ok()?)))
            .collect(),
        labels: labels.clone(),
        locality: Locality::parse(&e.locality),
        weight: e.weight.unwrap_or(1).max(1),
        ready: true,
        node: None,
        workload: ip.and_then(|ip| by_ip.get(&ip).cloned()).map(WorkloadRef),
        service_account: (!e.service_account.is_empty()).then(|| e.service_account.clone()),
    })
}

fn workload_entries<'a>(
    o: &'a Objects<'_>,
    namespace: &'a str,
    selector: &'a BTreeMap<String, String>,
    by_ip: &'a HashMap<IpAddr, Arc<Workload>>,
) -> impl Iterator<Item = Endpoint> + 'a {
    o.workload_entries
        .iter()
        .filter(move |(r, we)| {
            r.metadata.namespace == namespace && selects(selector, &merged_labels(r, we))
        })
        .filter_map(move |(r, we)| entry_endpoint(we, &merged_labels(r, we), by_ip))
}

/// A WorkloadEntry's labels: its spec's, over its metadata's.
fn merged_labels(r: &Resource, we: &WorkloadEntry) -> BTreeMap<String, String> {
    let mut l = r.metadata.labels.clone();
    l.extend(we.labels.clone());
    l
}

fn service_entry(
    r: &Resource,
    se: &ServiceEntry,
    host: &str,
    o: &Objects<'_>,
    pods: &[&Arc<Workload>],
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
) -> Service {
    let namespace = r.metadata.namespace.as_str();
    let resolution = match se.resolution {
        Some(networking::Resolution::Static) => Resolution::Static,
        Some(networking::Resolution::Dns) => Resolution::Dns,
        Some(networking::Resolution::DnsRoundRobin) => Resolution::DnsRoundRobin,
        Some(networking::Resolution::None) | None => Resolution::Passthrough,
    };
    let ports = se
        .ports
        .iter()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone(),
                port: u16::try_from(p.number).ok()?,
                target_port: p.target_port.and_then(|t| u16::try_from(t).ok()),
                target_port_name: None,
                protocol: Protocol::from_name(&p.protocol).unwrap_or(Protocol::Unknown),
            })
        })
        .collect();
    let mut endpoints: Vec<Endpoint> = se
        .endpoints
        .iter()
        .filter_map(|e| entry_endpoint(e, &e.labels, by_ip))
        .collect();
    if let Some(sel) = &se.workload_selector {
        endpoints.extend(workload_entries(o, namespace, &sel.labels, by_ip));
        for w in pods
            .iter()
            .filter(|w| w.namespace == namespace && selects(&sel.labels, &w.labels))
        {
            endpoints.extend(w.ips.iter().map(|ip| pod_endpoint(w, *ip, by_ip)));
        }
    }
    if endpoints.is_empty() && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
        endpoints.push(Endpoint::at(None, Some(host.into())));
    }
    Service {
        name: r.metadata.name.clone(),
        namespace: namespace.into(),
        hostname: host.into(),
        kind: ServiceKind::ServiceEntry,
        addresses: se.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
        ports,
        endpoints,
        resolution,
        location: match se.location {
            Some(networking::Location::MeshInternal) => Location::MeshInternal,
            _ => Location::MeshExternal,
        },
        subject_alt_names: se.subject_alt_names.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::documents as parse;

    fn registry(yaml: &str) -> Registry {
        let mut out = parse::Parsed::default();
        parse::parse_file(Path::new("t.yaml"), yaml.as_bytes(), &mut out);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        build(
            &out.documents,
            &Settings {
                cluster_domain: "cluster.local".into(),
                dataplane_mode_label: ambient::DEFAULT_LABEL.into(),
                node_name: None,
            },
        )
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh-agent.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop, uid: u-1, labels: {app: cart, version: v1}}
spec: {nodeName: node-a, serviceAccountName: cart, containers: []}
status: {phase: Running, podIPs: [{ip: 10.1.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-2, namespace: shop, labels: {app: cart, version: v2, mesh-agent.io/dataplane-mode: none}}
spec: {nodeName: node-b, containers: []}
status: {phase: Running, podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: host-agent, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-a, hostNetwork: true, containers: []}
status: {phase: Running, podIP: 192.168.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: cart}
  ports:
    - {name: http-api, port: 80, targetPort: 8080}
    - {name: grpc, port: 9000, targetPort: grpc-port, appProtocol: http2}
    - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: cart-x1, namespace: shop, labels: {kubernetes.io/service-name: cart}}
addressType: IPv4
ports: [{name: http-api, port: 8080}, {name: grpc, port: 9090}]
endpoints:
  - addresses: [10.1.0.5]
    zone: zone-a
    nodeName: node-a
    targetRef: {kind: Pod, name: cart-1, namespace: shop}
  - addresses: [10.1.0.6]
    conditions: {ready: false}
    nodeName: node-b
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  selector: {app: cart}
  ports: [{name: tcp, port: 5000, targetPort: 5001}]
"#;

    #[test]
    fn kubernetes_services_endpoints_and_ambient_pods() {
        let r = registry(CLUSTER);
        let keys: Vec<String> = r.workloads.iter().map(|w| w.key().to_string()).collect();
        assert_eq!(
            keys,
            ["shop/cart-1"],
            "opted-out and host-network pods are not meshed"
        );
        let cart = r.workload_at("10.1.0.5".parse().unwrap()).unwrap();
        assert_eq!(
            (
                cart.service_account.as_str(),
                cart.node.as_deref(),
                cart.uid.as_deref()
            ),
            ("cart", Some("node-a"), Some("u-1"))
        );
        assert!(r.workload_at("10.1.0.6".parse().unwrap()).is_none());

        let (svc, port) = r.service_at("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(svc.hostname, "cart.shop.svc.cluster.local");
        assert_eq!(port.protocol, Protocol::Http);
        assert_eq!(svc.ports.len(), 2, "UDP ports are not proxied");
        let grpc = svc.port(9000).unwrap();
        assert_eq!(
            grpc.protocol,
            Protocol::Http2,
            "appProtocol wins over the name"
        );
        assert_eq!(svc.endpoints.len(), 2);
        let e = &svc.endpoints[0];
        assert_eq!(e.port_for(port), 8080);
        assert_eq!(e.port_for(grpc), 9090);
        assert_eq!(e.locality.zone, "zone-a");
        assert_eq!(e.labels["version"], "v1", "labels from the pod");
        assert!(e.workload.is_some(), "a meshed endpoint");
        assert!(!svc.endpoints[1].ready && svc.endpoints[1].workload.is_none());
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let ready: Vec<_> = svc
            .candidates(port, v4, |_| true)
            .iter()
            .map(|e| e.address)
            .collect();
        assert_eq!(
            ready,
            [Some("10.1.0.5".parse().unwrap())],
            "only ready endpoints"
        );
        let v6: IpAddr = "fd00::10".parse().unwrap();
        assert!(
            svc.candidates(port, v6, |_| true).is_empty(),
            "no IPv6 endpoint"
        );

        // No EndpointSlice: the selector over known pods (meshed or not).
        let (legacy, lp) = r.service_at("10.96.0.11:5000".parse().unwrap()).unwrap();
        let mut ips: Vec<_> = legacy
            .endpoints
            .iter()
            .map(|e| e.address.unwrap().to_string())
            .collect();
        ips.sort();
        assert_eq!(ips, ["10.1.0.5", "10.1.0.6"]);
        assert_eq!(legacy.endpoints[0].port_for(lp), 5001);
        assert!(r.service_at("10.96.0.11:5001".parse().unwrap()).is_none());
        assert_eq!(
            r.services_for_host("legacy.shop.svc.cluster.local").len(),
            1
        );
    }

    #[test]
    fn service_entries_one_service_per_host() {
        let r = registry(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.internal, db-alias.internal]
  addresses: [192.168.240.0/24]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP, targetPort: 6432}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
    - {address: 192.168.240.10, labels: {role: primary}, locality: r1/z1, weight: 3, serviceAccount: db}
    - {address: 192.168.240.11, ports: {tcp-pg: 7432}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: data}
spec:
  hosts: [legacy.data]
  addresses: [10.200.0.1]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: data}
spec: {address: 10.20.0.5, labels: {app: legacy}, serviceAccount: vm}
"#,
        );
        assert_eq!(r.services.len(), 4);
        let (db, port) = r
            .service_at("192.168.240.77:5432".parse().unwrap())
            .unwrap();
        assert_eq!(db.hostname, "db.internal");
        assert_eq!(db.location, Location::MeshInternal);
        assert_eq!(db.endpoints[0].port_for(port), 6432, "targetPort");
        assert_eq!(
            db.endpoints[1].port_for(port),
            7432,
            "the endpoint's own port"
        );
        assert_eq!(db.endpoints[0].weight, 3);
        assert_eq!(db.endpoints[0].locality.zone, "z1");
        assert_eq!(db.endpoints[0].service_account.as_deref(), Some("db"));
        assert!(
            r.service_at("192.168.241.1:5432".parse().unwrap())
                .is_none()
        );
        let api = &r.services_for_host("api.example.com")[0];
        assert_eq!(api.resolution, Resolution::Dns);
        assert_eq!(api.location, Location::MeshExternal, "Istio's default");
        assert_eq!(
            api.endpoints[0].hostname.as_deref(),
            Some("api.example.com")
        );
        let (vms, _) = r.service_at("10.200.0.1:80".parse().unwrap()).unwrap();
        assert_eq!(vms.endpoints.len(), 1);
        assert_eq!(vms.endpoints[0].address, Some("10.20.0.5".parse().unwrap()));
    }
}
