//! Outbound: connections the capture programs sent to `127.0.0.1:15001`
//! inside a pod are carried to where the application meant them to go,
//! from inside the same pod so the source address stays the pod's.
//!
//! Where that is comes from the registry: a service address (Kubernetes
//! VIP, ServiceEntry address) is replaced by one of the service's
//! endpoints; a meshed destination is reached over HBONE (mutual TLS,
//! expecting that workload's identity); anything else directly.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{
    Error, PodContext, ProxyContext,
    app_stream::AppStream,
    cluster::{self, Admission, Cluster, HashInput},
    conn_log::ConnLog,
    conn_table::ConnInfo,
    copy,
    destination::Destination,
    socket,
    upstream::{self, Via},
};
use crate::{
    istio::networking::OutlierDetection,
    registry::{Protocol, Resolution, Service, ServicePort},
    snapshot::Snapshot,
    snapshot::compile::{CompiledDestination, ConnView},
    telemetry::{
        accesslog::{Mode, Record, Resolved},
        metrics::{ConnLabels, Reporter},
    },
    workload::Workload,
};

/// Where a captured connection is carried.
struct Target<'s> {
    /// The address to connect to (an endpoint, once a service is resolved).
    addr: SocketAddr,
    /// The meshed workload there: reached over HBONE.
    workload: Option<Arc<Workload>>,
    /// The service the application addressed, if it used one.
    service: Option<Arc<Service>>,
    /// The endpoint chosen by a destination's policy, and what to tell it
    /// about the connection (a service's endpoint; none for an address
    /// outside the registry or a passthrough service).
    balanced: Option<Balanced<'s>>,
}

/// A connection to an endpoint chosen under a DestinationRule: it holds a
/// place in the destination's connection limit while it lives, and its
/// connect outcome feeds outlier detection.
struct Balanced<'s> {
    cluster: Arc<Cluster>,
    host: String,
    hosts: usize,
    outlier_detection: Option<&'s OutlierDetection>,
    connect_timeout: Option<std::time::Duration>,
    idle_timeout: Option<std::time::Duration>,
    _admission: Admission,
}

impl Balanced<'_> {
    fn record(&self, outcome: cluster::Outcome) {
        self.cluster
            .record(&self.host, outcome, self.outlier_detection, self.hosts);
    }
}

/// Resolves the application's destination `dst` in `snap`: a service's
/// `tcp`/`tls` VirtualService routes first, else the service itself, then
/// an endpoint by the destination's DestinationRule (load balancing,
/// connection limit, outlier detection).
async fn resolve<'s>(
    snap: &'s Snapshot,
    dst: SocketAddr,
    stream: &TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<Target<'s>, Error> {
    let Some((svc, port)) = snap.registry.service_at(dst) else {
        return Ok(Target {
            addr: dst,
            workload: snap.registry.workload_at(dst.ip()).cloned(),
            service: None,
            balanced: None,
        });
    };
    if svc.resolution == Resolution::Passthrough {
        return Ok(Target {
            addr: dst,
            workload: snap.registry.workload_at(dst.ip()).cloned(),
            service: Some(svc.clone()),
            balanced: None,
        });
    }
    let dest = match l4_route(snap, svc, port, dst, stream, peer, pod).await {
        Some(d) => d,
        None => CompiledDestination {
            host: svc.hostname.clone(),
            subset: String::new(),
            port: None,
        },
    };
    balance(snap, &dest, svc, port, dst, peer, pod, ctx).await
}

/// The destination the service's VirtualService `tls` routes (by the
/// ClientHello's server name) or `tcp` routes give this connection.
async fn l4_route(
    snap: &Snapshot,
    svc: &Service,
    port: &ServicePort,
    dst: SocketAddr,
    stream: &TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
) -> Option<CompiledDestination> {
    let vss: Vec<_> = snap
        .routes
        .virtual_services_for(&svc.hostname)
        .into_iter()
        .filter(|v| !v.tcp.is_empty() || !v.tls.is_empty())
        .collect();
    if vss.is_empty() {
        return None;
    }
    let sni = if vss.iter().any(|v| !v.tls.is_empty()) {
        super::sniff::sni(stream).await
    } else {
        None
    };
    let view = ConnView {
        port: port.port,
        destination: dst.ip(),
        source: peer.ip(),
        source_labels: &pod.workload.labels,
        source_namespace: &pod.workload.namespace,
        sni: sni.as_deref(),
    };
    let tls = vss
        .iter()
        .flat_map(|v| v.tls.iter())
        .filter(|_| sni.is_some());
    let tcp = vss.iter().flat_map(|v| v.tcp.iter());
    tls.chain(tcp)
        .find(|r| r.takes(&view))
        .and_then(|r| r.pick())
        .cloned()
}

/// The endpoint of `dest` for this connection, under the destination's
/// DestinationRule: admitted under `maxConnections`, chosen by its load
/// balancer (consistent hashing can only use the client's address here),
/// healthy by outlier detection, local first by locality.
#[allow(clippy::too_many_arguments)] // one captured connection's context
async fn balance<'s>(
    snap: &'s Snapshot,
    dest: &CompiledDestination,
    svc: &Arc<Service>,
    port: &ServicePort,
    dst: SocketAddr,
    peer: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<Target<'s>, Error> {
    let no_endpoint = |host: &str, port: u16| Error::NoEndpoint {
        service: host.to_owned(),
        port,
    };
    let d = Destination::resolve(snap, &ctx.clusters, dest, port.port, Some(svc))
        .map_err(|_| no_endpoint(&dest.host, dest.port.unwrap_or(port.port)))?;
    let mut admission = d
        .cluster
        .admit_connection(&d.policy)
        .map_err(|_| Error::Overflow {
            service: d.describe(),
        })?;
    let candidates = d.candidates(dst.ip());
    let locality = super::client_locality(pod, ctx);
    let input = HashInput {
        headers: &http::HeaderMap::new(),
        query: None,
        client: super::client_address(pod, peer),
        locality: &locality,
        client_labels: &pod.workload.labels,
    };
    let pick = d
        .cluster
        .pick(
            &candidates,
            &d.policy,
            &input,
            dst.ip(),
            Some(&mut admission),
        )
        .ok_or_else(|| no_endpoint(&d.service.hostname, d.port.port))?;
    let e = pick.endpoint;
    let balanced = Balanced {
        cluster: d.cluster.clone(),
        host: pick.key,
        hosts: candidates.len(),
        outlier_detection: d.policy.outlier_detection,
        connect_timeout: d.policy.connect_timeout(),
        idle_timeout: d.policy.tcp_idle_timeout(),
        _admission: admission,
    };
    let addr = match upstream::endpoint_addr(e, &d.port).await {
        Ok(a) => a,
        Err(err) => {
            balanced.record(cluster::Outcome::LocalFailure);
            return Err(err);
        }
    };
    Ok(Target {
        addr,
        workload: e.workload.as_ref().map(|w| w.0.clone()),
        // The service the route chose (a `tcp` route may lead elsewhere).
        service: Some(d.service.clone()),
        balanced: Some(balanced),
    })
}

/// Accepts on one outbound listener until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    stop: CancellationToken,
) {
    super::accept_loop(
        listener,
        stop,
        pod.clone(),
        ctx.clone(),
        move |stream, peer| {
            let (pod, ctx) = (pod.clone(), ctx.clone());
            async move {
                if let Err(e) = handle(stream, peer, &pod, &ctx).await {
                    ctx.metrics.proxy_error(Reporter::Source, e.reason());
                    tracing::warn!(pod = %pod.workload.key(), %peer, "outbound: {e}");
                }
            }
        },
    )
    .await;
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: &Arc<PodContext>,
    ctx: &Arc<ProxyContext>,
) -> Result<(), Error> {
    let stream = AppStream::new(stream, pod.netns_cookie, ctx.fast_credit.as_ref());
    let start = std::time::SystemTime::now();
    // One snapshot for the connection's whole life.
    let snap = ctx.store.load();
    let dst = match original_destination(&stream, peer, pod, ctx, &snap) {
        Ok(d) => d,
        Err(e) => return refuse(&stream, e),
    };
    stream.set_nodelay(true)?;
    if let Some((svc, port)) = snap.registry.service_at(dst)
        && svc.resolution != Resolution::Passthrough
        && (port.protocol.is_http()
            || (port.protocol == Protocol::Unknown && super::sniff::detect_http(&stream).await))
    {
        let (svc, port) = (svc.clone(), port.clone());
        // Boxed so that plain TCP connections do not carry its size.
        Box::pin(super::http::serve(
            stream,
            peer,
            dst,
            pod.clone(),
            ctx.clone(),
            snap,
            svc,
            port,
        ))
        .await;
        return Ok(());
    }
    let dialled = dst;
    let target = match resolve(&snap, dst, &stream, peer, pod, ctx).await {
        Ok(t) => t,
        Err(e) => return refuse(&stream, e),
    };
    let dst = target.addr;
    if target.service.is_some() && ctx.is_own_listener(&snap, dst) {
        return refuse(&stream, Error::Loop { dst });
    }
    let via = Via::to(ctx, pod, target.workload.as_deref());
    let timeout = target.balanced.as_ref().and_then(|b| b.connect_timeout);
    let open = upstream::open(pod, ctx, dst, target.workload.as_deref(), &via);
    let opened = match timeout {
        Some(t) => tokio::time::timeout(t, open)
            .await
            .unwrap_or(Err(Error::ConnectTimeout { dst, timeout: t })),
        None => open.await,
    };
    if let Some(b) = &target.balanced {
        b.record(match opened {
            Ok(_) => cluster::Outcome::Connected,
            Err(_) => cluster::Outcome::LocalFailure,
        });
    }
    let upstream = match opened {
        Ok(u) => u,
        Err(e) => return refuse(&stream, e),
    };
    let principals = via.principals();
    let labels = ConnLabels {
        reporter: Reporter::Source,
        source: Some(&pod.workload),
        destination: target.workload.as_deref(),
        service: target.service.as_deref(),
        destination_addr: dst,
        cluster: &ctx.config.cluster_id,
        security_policy: via.security_policy(),
        source_principal: principals.as_ref().map(|p| p.0.as_str()),
        destination_principal: principals.as_ref().map(|p| p.1.as_str()),
    };
    let idle = target
        .balanced
        .as_ref()
        .and_then(|b| b.idle_timeout)
        .unwrap_or(super::TCP_IDLE_TIMEOUT);
    let log = ctx
        .access_log
        .wants(&snap.access_logging(&pod.workload), Mode::Client)
        .map(|to| {
            let remote = SocketAddr::new(super::client_address(pod, peer), peer.port());
            let mut r = Record::new(Mode::Client, start, remote, dialled);
            r.upstream_host = Some(dst);
            r.upstream_cluster = match &target.service {
                Some(s) => format!("outbound|{}||{}", dialled.port(), s.hostname),
                None => "PassthroughCluster".into(),
            };
            r.mtls = via.is_mtls();
            r.upstream_peer_san = principals.as_ref().map(|p| p.1.clone()).unwrap_or_default();
            (to, r)
        });
    // The target (its place under `maxConnections`) lives as long as the
    // connection.
    let tally = copy::Tally::default();
    let _listed = ctx.conns.register(ConnInfo {
        direction: "outbound",
        protocol: "tcp",
        pod: pod.workload.key().to_string(),
        source: SocketAddr::new(super::client_address(pod, peer), peer.port()),
        destination: dst,
        source_identity: principals.as_ref().map(|p| p.0.clone()),
        destination_identity: principals.as_ref().map(|p| p.1.clone()),
        started: start,
        tally: Some(tally.clone()),
    });
    carry(stream, upstream, &labels, idle, pod, ctx, log, tally).await;
    drop(target);
    Ok(())
}

/// Resets the application's connection, as a refused connect would without
/// the mesh, and reports why.
fn refuse(stream: &TcpStream, e: Error) -> Result<(), Error> {
    socket::reset(stream);
    Err(e)
}

/// Where the application was going, from the capture maps.
fn original_destination(
    stream: &TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
    snap: &Snapshot,
) -> Result<SocketAddr, Error> {
    let local = stream.local_addr()?;
    let dst = ctx
        .capture
        .original_destination(pod.netns_cookie, peer, local)
        .ok_or(Error::NoOriginalDst { peer })?;
    if ctx.is_own_listener(snap, dst) {
        return Err(Error::Loop { dst });
    }
    Ok(dst)
}

/// Relays the application's connection and `upstream`, counting into the
/// connection's metrics.
#[allow(clippy::too_many_arguments)] // one connection's context
async fn carry<U>(
    stream: AppStream,
    upstream: U,
    labels: &ConnLabels<'_>,
    idle: std::time::Duration,
    pod: &PodContext,
    ctx: &ProxyContext,
    log: Option<(Arc<Resolved>, Record)>,
    tally: copy::Tally,
) where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut log = log.map(|(to, r)| ConnLog::new(&ctx.access_log, to, r, tally.clone()));
    let m = ctx.metrics.connection_opened(labels);
    let (pod_name, dst) = (pod.workload.key(), labels.destination_addr);
    tracing::debug!(pod = %pod_name, %dst, mtls = labels.security_policy == "mutual_tls", "outbound: proxying");
    let relayed = copy::relay(
        stream,
        upstream,
        m.received.clone(),
        m.sent.clone(),
        ctx.config.buffer_size,
        idle,
        Some(tally),
    )
    .await;
    match &relayed {
        Ok((up, down)) => tracing::debug!(pod = %pod_name, %dst, up, down, "outbound: closed"),
        Err(e) => {
            tracing::debug!(pod = %pod_name, %dst, "outbound: closed with {e}");
            if let Some(l) = &mut log {
                l.ended_with(e);
            }
        }
    }
}

#[cfg(test)]
mod tests;
