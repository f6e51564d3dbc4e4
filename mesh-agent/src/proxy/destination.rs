//! What a route's destination (host, subset, port) stands for: the service
//! and port, the endpoints of the subset, the DestinationRule's traffic
//! policy for them, and the state load balancing and outlier detection
//! keep for them. The L4 and the L7 paths resolve destinations here.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::cluster::{Cluster, Clusters, Policy};
use crate::{
    registry::{Endpoint, Service, ServicePort},
    snapshot::{Snapshot, compile::CompiledDestination},
};

/// Why a destination names nothing that can take traffic (Envoy's `NC`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no service for host {host}")]
    NoService { host: String },
    #[error("{host} has no port {port}")]
    NoPort { host: String, port: u16 },
    #[error("subset {subset} of {host} is not defined by a DestinationRule")]
    NoSubset { host: String, subset: String },
}

/// A resolved destination, valid for the snapshot it was resolved in.
pub struct Destination<'s> {
    pub service: Arc<Service>,
    pub port: ServicePort,
    pub subset: String,
    /// The labels an endpoint of the subset carries (none: every endpoint).
    labels: Option<&'s BTreeMap<String, String>>,
    /// The DestinationRule's traffic policy for this subset and port.
    pub policy: Policy<'s>,
    pub cluster: Arc<Cluster>,
}

impl<'s> Destination<'s> {
    /// Resolves `dest` in `snap`. `port` is the port the client used (a
    /// destination without a port keeps it); `current` is the service the
    /// client addressed, used as is when the destination names it.
    pub fn resolve(
        snap: &'s Snapshot,
        clusters: &Clusters,
        dest: &CompiledDestination,
        port: u16,
        current: Option<&Arc<Service>>,
    ) -> Result<Self, Error> {
        let service = match current.filter(|s| s.hostname == dest.host) {
            Some(s) => s.clone(),
            None => snap
                .registry
                .services_for_host(&dest.host)
                .first()
                .cloned()
                .ok_or_else(|| Error::NoService {
                    host: dest.host.clone(),
                })?,
        };
        let number = dest.port.unwrap_or(port);
        let port = service
            .port(number)
            .or_else(|| (service.ports.len() == 1).then(|| &service.ports[0]))
            .cloned()
            .ok_or_else(|| Error::NoPort {
                host: service.hostname.clone(),
                port: number,
            })?;
        let labels = if dest.subset.is_empty() {
            None
        } else {
            Some(
                snap.routes
                    .subset_labels(&dest.host, &dest.subset)
                    .ok_or_else(|| Error::NoSubset {
                        host: dest.host.clone(),
                        subset: dest.subset.clone(),
                    })?,
            )
        };
        let rule = snap.routes.destination_rule_for(&dest.host);
        Ok(Self {
            policy: Policy::of(rule, &dest.subset, port.port),
            cluster: clusters.get(&dest.host, &dest.subset, port.port),
            service,
            port,
            subset: dest.subset.clone(),
            labels,
        })
    }

    /// The ready endpoints of the subset that a client at `client` (its
    /// address family) can reach: what load balancing chooses among.
    pub fn candidates(&self, client: IpAddr) -> Vec<&Endpoint> {
        self.service.candidates(&self.port, client, |e| {
            self.labels
                .is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
        })
    }

    /// The destination as logs and local replies name it.
    pub fn describe(&self) -> String {
        if self.subset.is_empty() {
            self.service.hostname.clone()
        } else {
            format!("{} (subset {})", self.service.hostname, self.subset)
        }
    }
}
