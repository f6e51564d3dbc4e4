//! The connections the agent carries now, for `mesh-agent connections`
//! (`/connections` on the admin port), as `istioctl ztunnel-config
//! connections` lists ztunnel's: who, to where, with which identities, how
//! many bytes, since when. A connection is in the table from the moment
//! the agent carries it until its guard drops; sharded locks keep the
//! cost to one short lock at each end.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

use super::copy::Tally;

const SHARDS: usize = 16;

/// One live connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// `outbound` (from a pod of this node) or `inbound` (to one).
    pub direction: &'static str,
    /// `tcp`, or `http` when the agent reads its requests.
    pub protocol: &'static str,
    /// The pod of this node it belongs to (`namespace/name`).
    pub pod: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    pub started: SystemTime,
    /// Bytes both ways, when the agent relays them (not for HTTP).
    pub tally: Option<Tally>,
}

/// What `/connections` shows of one.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnView<'a> {
    pub id: u64,
    pub direction: &'a str,
    pub protocol: &'a str,
    pub pod: &'a str,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub source_identity: Option<&'a str>,
    pub destination_identity: Option<&'a str>,
    pub bytes_from_source: Option<u64>,
    pub bytes_to_source: Option<u64>,
    pub age_seconds: f64,
}

#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<ConnInfo>>>; SHARDS],
}

/// Keeps a connection in the table while it lives.
pub struct Registered {
    table: Arc<ConnTable>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.shard(self.id).remove(&self.id);
    }
}

impl ConnTable {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnInfo>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, info: ConnInfo) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(id).insert(id, Arc::new(info));
        Registered {
            table: self.clone(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live connection, oldest first, as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let mut all: Vec<(u64, Arc<ConnInfo>)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|(id, _)| *id);
        let now = SystemTime::now();
        let views: Vec<ConnView<'_>> = all
            .iter()
            .map(|(id, c)| ConnView {
                id: *id,
                direction: c.direction,
                protocol: c.protocol,
                pod: &c.pod,
                source: c.source,
                destination: c.destination,
                source_identity: c.source_identity.as_deref(),
                destination_identity: c.destination_identity.as_deref(),
                bytes_from_source: c.tally.as_ref().map(Tally::from_client),
                bytes_to_source: c.tally.as_ref().map(Tally::from_upstream),
                age_seconds: now
                    .duration_since(c.started)
                    .unwrap_or_default()
                    .as_secs_f64(),
            })
            .collect();
        serde_json::to_value(views).unwrap_or_default()
    }
}
