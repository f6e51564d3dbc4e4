//! Carrying captured connections: outbound (app → agent in the source pod →
//! destination) and inbound plaintext (client → agent in the destination pod
//! → app).

pub mod copy;
pub mod inbound;
pub mod outbound;
pub mod socket;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config, ebpf::Maps, netns::Netns, telemetry::metrics::Metrics, workload::Workload,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no original destination recorded for the connection from {peer} (it did not pass \
         through the capture programs)"
    )]
    NoOriginalDst { peer: SocketAddr },
    #[error("refusing to connect to {dst}: it is one of the agent's own listeners")]
    Loop { dst: SocketAddr },
    #[error("connecting to {dst} timed out after {timeout:?}")]
    ConnectTimeout {
        dst: SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{what} {addr} in {pod}'s network namespace: {source}")]
    Socket {
        what: &'static str,
        addr: SocketAddr,
        pod: String,
        #[source]
        source: io::Error,
    },
    #[error("port {port} is already in use on {addr} in {pod}'s network namespace")]
    PortInUse {
        port: u16,
        addr: IpAddr,
        pod: String,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// Short reason for the `mesh_proxy_errors_total` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoOriginalDst { .. } => "no_original_destination",
            Error::Loop { .. } => "loop",
            Error::ConnectTimeout { .. } => "connect_timeout",
            Error::Connect { .. } => "connect_failed",
            Error::Socket { .. } | Error::PortInUse { .. } | Error::Netns(_) => "socket",
            Error::Io(_) => "io",
        }
    }
}

/// State every connection handler shares.
pub struct ProxyContext {
    pub config: Arc<Config>,
    pub maps: Arc<Maps>,
    pub metrics: Arc<Metrics>,
    pub workloads: WorkloadIndex,
    /// Tracks connection tasks, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the drain period is over: open connections are cut.
    pub cut: CancellationToken,
}

impl ProxyContext {
    /// Whether `dst` is one of the agent's own in-pod listeners, which a
    /// captured connection must never be sent to (it would loop).
    fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let c = &self.config;
        [c.outbound_port, c.inbound_port, c.hbone_port].contains(&dst.port())
            && (dst.ip().is_loopback() || self.workloads.by_ip(dst.ip()).is_some())
    }
}

/// One enrolled pod, as its connection handlers see it.
pub struct PodContext {
    pub workload: Arc<Workload>,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
}

/// Workloads on this node by address, for metric labels and loop checks.
#[derive(Default)]
pub struct WorkloadIndex(RwLock<HashMap<IpAddr, Arc<Workload>>>);

impl WorkloadIndex {
    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.0.read().expect("index lock").get(&ip).cloned()
    }

    pub fn insert(&self, w: &Arc<Workload>) {
        let mut m = self.0.write().expect("index lock");
        for ip in &w.ips {
            m.insert(*ip, w.clone());
        }
    }

    pub fn remove(&self, w: &Workload) {
        let mut m = self.0.write().expect("index lock");
        for ip in &w.ips {
            m.remove(ip);
        }
    }
}

/// Accepts until `stop`, running `handle` for each connection as a task the
/// drain can wait for and cut when the drain period ends.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let fut = handle(stream, peer);
        let cut = ctx.cut.clone();
        ctx.connections.spawn(async move {
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = fut => {}
            }
        });
    }
}
