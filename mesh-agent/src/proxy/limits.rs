//! Bounds on what clients can make the agent hold, each counted when hit
//! (`mesh_limit_reached_total{limit}`): open connections per agent and per
//! pod (`--max-connections`, `--max-connections-per-pod`), and mirrored
//! requests in flight. A connection over a limit is reset at once (the
//! client sees a refusal, not a hang); a mirror over its limit is skipped
//! (the request itself is served).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics::{
    CONNECTIONS_PER_AGENT, CONNECTIONS_PER_POD, MIRRORS_IN_FLIGHT, Metrics,
};

/// Mirrored requests one agent has in flight at most: a mirror that does
/// not answer must not pile up requests (Envoy's shadowing has no such
/// bound; the agent is shared by every pod of the node).
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// The agent's limits.
pub struct Limits {
    connections: Arc<Semaphore>,
    per_pod: usize,
    mirrors: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// A pod's share: its open connections, counted against its limit.
pub struct PodLimit(Arc<Semaphore>);

/// An admitted connection's place under both limits, returned when it
/// closes (dropped).
pub struct ConnectionPermit {
    _agent: OwnedSemaphorePermit,
    _pod: OwnedSemaphorePermit,
}

impl Limits {
    pub fn new(connections: usize, per_pod: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(connections)),
            per_pod,
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            metrics,
        }
    }

    /// A new pod's connection limit.
    pub fn pod(&self) -> PodLimit {
        PodLimit(Arc::new(Semaphore::new(self.per_pod)))
    }

    /// A place for one more connection of `pod`, or `None` (counted) when
    /// the pod or the agent has all it may hold.
    pub fn admit(&self, pod: &PodLimit) -> Option<ConnectionPermit> {
        let Ok(p) = pod.0.clone().try_acquire_owned() else {
            self.metrics.limit_reached(CONNECTIONS_PER_POD);
            return None;
        };
        let Ok(a) = self.connections.clone().try_acquire_owned() else {
            self.metrics.limit_reached(CONNECTIONS_PER_AGENT);
            return None;
        };
        Some(ConnectionPermit { _agent: a, _pod: p })
    }

    /// A place for one more mirrored request, or `None` (counted).
    pub fn mirror(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.mirrors.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.limit_reached(MIRRORS_IN_FLIGHT);
        }
        permit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reached(m: &Metrics, limit: &str) -> f64 {
        crate::testing::metric(&m.render(), "mesh_limit_reached_total", &[("limit", limit)])
            .expect("the series is exported from the start")
    }

    #[test]
    fn a_pod_and_the_agent_hold_only_their_share_and_say_when_full() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let limits = Limits::new(3, 2, metrics.clone());
        let (a, b) = (limits.pod(), limits.pod());
        let a1 = limits.admit(&a).unwrap();
        let _a2 = limits.admit(&a).unwrap();
        assert!(limits.admit(&a).is_none(), "pod a holds 2");
        assert_eq!(reached(&metrics, CONNECTIONS_PER_POD), 1.0);
        let _b1 = limits.admit(&b).unwrap();
        assert!(limits.admit(&b).is_none(), "the agent holds 3");
        assert_eq!(reached(&metrics, CONNECTIONS_PER_AGENT), 1.0);
        // A closed connection gives its place back to both.
        drop(a1);
        let _b2 = limits.admit(&b).unwrap();
    }

    #[test]
    fn mirrors_over_the_limit_are_skipped_and_counted() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let limits = Limits::new(1, 1, metrics.clone());
        let held: Vec<_> = (0..MAX_MIRRORS_IN_FLIGHT)
            .map(|_| limits.mirror().unwrap())
            .collect();
        assert!(limits.mirror().is_none());
        assert_eq!(reached(&metrics, MIRRORS_IN_FLIGHT), 1.0);
        drop(held);
        assert!(limits.mirror().is_some());
    }
}
