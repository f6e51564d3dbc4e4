//! Outbound: connections the capture programs sent to `127.0.0.1:15001`
//! inside a pod are carried to where the application meant them to go,
//! from inside the same pod so the source address stays the pod's.
//!
//! Where that is comes from the registry: a service address (Kubernetes
//! VIP, ServiceEntry address) is replaced by one of the service's
//! endpoints; a meshed destination is reached over HBONE (mutual TLS,
//! expecting that workload's identity); anything else directly.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{Error, PodContext, ProxyContext, copy, pool::PoolKey, socket};
use crate::{
    identity::CertFor,
    registry::{Endpoint, Protocol, Resolution, Service, ServicePort},
    snapshot::Snapshot,
    snapshot::compile::{CompiledDestination, ConnView},
    spiffe::SpiffeId,
    telemetry::metrics::{ConnLabels, Reporter},
    tls::{self, SpiffeServerVerifier},
    workload::Workload,
};

/// Where a captured connection is carried.
struct Target<'a> {
    /// The address to connect to (an endpoint, once a service is resolved).
    addr: SocketAddr,
    /// The meshed workload there: reached over HBONE.
    workload: Option<Arc<Workload>>,
    /// The service the application addressed, if it used one.
    service: Option<&'a Arc<Service>>,
}

/// Resolves the application's destination `dst` in `snap`: a service's
/// `tcp`/`tls` VirtualService routes first, else the service's endpoints.
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
        });
    };
    if svc.resolution == Resolution::Passthrough {
        return Ok(Target {
            addr: dst,
            workload: snap.registry.workload_at(dst.ip()).cloned(),
            service: Some(svc),
        });
    }
    if let Some(dest) = l4_route(snap, svc, port, dst, stream, peer, pod).await {
        return route_to(snap, &dest, port, dst, peer, pod, ctx).await;
    }
    let e = svc.pick(port, dst.ip()).ok_or_else(|| Error::NoEndpoint {
        service: svc.hostname.clone(),
        port: port.port,
    })?;
    Ok(Target {
        addr: endpoint_addr(e, port).await?,
        workload: e.workload.as_ref().map(|w| w.0.clone()),
        service: Some(svc),
    })
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

/// The endpoint for a route's destination (service, subset, port), by
/// the destination's load balancing policy.
async fn route_to<'s>(
    snap: &'s Snapshot,
    dest: &CompiledDestination,
    port: &ServicePort,
    dst: SocketAddr,
    peer: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<Target<'s>, Error> {
    let no_endpoint = || Error::NoEndpoint {
        service: dest.host.clone(),
        port: dest.port.unwrap_or(port.port),
    };
    let svc = snap
        .registry
        .services_for_host(&dest.host)
        .first()
        .ok_or_else(no_endpoint)?;
    let number = dest.port.unwrap_or(port.port);
    let port = svc
        .port(number)
        .or_else(|| (svc.ports.len() == 1).then(|| &svc.ports[0]))
        .ok_or_else(no_endpoint)?;
    let dr = snap
        .routes
        .destination_rules
        .get(&dest.host)
        .and_then(|r| match &r.spec {
            crate::istio::Spec::DestinationRule(d) => Some(d),
            _ => None,
        });
    let labels = if dest.subset.is_empty() {
        None
    } else {
        Some(
            snap.routes
                .subsets
                .get(&dest.host)
                .and_then(|s| s.get(&dest.subset))
                .ok_or_else(no_endpoint)?,
        )
    };
    let candidates = svc.candidates(port, dst.ip(), |e| {
        labels.is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
    });
    let policy = super::http::cluster::Policy::of(dr, &dest.subset, port.port);
    let cluster = ctx.clusters.get(&dest.host, &dest.subset, port.port);
    let locality = match crate::registry::build::pod_locality(&pod.workload.labels, None) {
        l if l.region.is_empty() => crate::registry::Locality::parse(&ctx.config.locality),
        l => l,
    };
    let input = super::http::cluster::HashInput {
        headers: &http::HeaderMap::new(),
        query: None,
        client: peer.ip(),
        locality: &locality,
        client_labels: &pod.workload.labels,
    };
    let pick = cluster
        .pick(&candidates, &policy, &input, dst.ip(), None)
        .ok_or_else(no_endpoint)?;
    let e = pick.endpoint;
    Ok(Target {
        addr: endpoint_addr(e, port).await?,
        workload: e.workload.as_ref().map(|w| w.0.clone()),
        service: Some(svc),
    })
}

/// The socket address of endpoint `e` for service port `port` (resolving
/// a DNS endpoint's name now).
pub(super) async fn endpoint_addr(e: &Endpoint, port: &ServicePort) -> Result<SocketAddr, Error> {
    let target_port = e.port_for(port);
    match (e.address, &e.hostname) {
        (Some(ip), _) => Ok(SocketAddr::new(ip, target_port)),
        (None, Some(host)) => {
            let mut addrs = tokio::net::lookup_host((host.as_str(), target_port))
                .await
                .map_err(|e| Error::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
            addrs.next().ok_or_else(|| Error::Resolve {
                host: host.clone(),
                reason: "no addresses".into(),
            })
        }
        (None, None) => unreachable!("registry endpoints have an address or a host name"),
    }
}

/// How long a new pod's first connection may wait for its certificate.
const CERT_WAIT: Duration = Duration::from_secs(10);

/// Accepts on one outbound listener until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    stop: CancellationToken,
) {
    super::accept_loop(listener, stop, ctx.clone(), move |stream, peer| {
        let (pod, ctx) = (pod.clone(), ctx.clone());
        async move {
            if let Err(e) = handle(stream, peer, &pod, &ctx).await {
                ctx.metrics.proxy_error(Reporter::Source, e.reason());
                tracing::warn!(pod = %pod.workload.key(), %peer, "outbound: {e}");
            }
        }
    })
    .await;
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: &Arc<PodContext>,
    ctx: &Arc<ProxyContext>,
) -> Result<(), Error> {
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
    let target = match resolve(&snap, dst, &stream, peer, pod, ctx).await {
        Ok(t) => t,
        Err(e) => return refuse(&stream, e),
    };
    let dst = target.addr;
    if target.service.is_some() && ctx.is_own_listener(&snap, dst) {
        return refuse(&stream, Error::Loop { dst });
    }
    match (&ctx.identities, &pod.identity, target.workload) {
        (Some(_), Some(src_id), Some(w)) => {
            let dst_id = w.identity(src_id.trust_domain());
            // Boxed: opening (a TLS handshake, perhaps) is a large future
            // that would otherwise stay part of every connection's task
            // for its whole life (8 KB of an idle connection's ~20).
            let tunnel = match Box::pin(open_tunnel(pod, ctx, dst, &w, &dst_id, src_id)).await {
                Ok(t) => t,
                Err(e) => return refuse(&stream, e),
            };
            let (sp, dp) = (src_id.to_string(), dst_id.to_string());
            let labels = ConnLabels {
                reporter: Reporter::Source,
                source: Some(&pod.workload),
                destination: Some(&w),
                service: target.service.map(|s| &**s),
                destination_addr: dst,
                cluster: &ctx.config.cluster_id,
                security_policy: "mutual_tls",
                source_principal: Some(&sp),
                destination_principal: Some(&dp),
            };
            carry(stream, tunnel, &labels, pod, ctx).await;
        }
        (_, _, meshed) => {
            let pod_name = pod.workload.key().to_string();
            let upstream =
                match socket::connect(&pod.netns, &pod_name, dst, socket::Source::Pod, &ctx.config)
                    .await
                {
                    Ok(u) => u,
                    Err(e) => return refuse(&stream, e),
                };
            let labels = ConnLabels {
                reporter: Reporter::Source,
                source: Some(&pod.workload),
                destination: meshed.as_deref(),
                service: target.service.map(|s| &**s),
                destination_addr: dst,
                cluster: &ctx.config.cluster_id,
                security_policy: "unknown",
                source_principal: None,
                destination_principal: None,
            };
            carry(stream, upstream, &labels, pod, ctx).await;
        }
    }
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
        .maps
        .original_destination(pod.netns_cookie, peer, local)
        .ok_or(Error::NoOriginalDst { peer })?;
    if ctx.is_own_listener(snap, dst) {
        return Err(Error::Loop { dst });
    }
    Ok(dst)
}

/// A CONNECT stream to `dst` over the pooled mTLS connection to the
/// destination pod's node.
pub(super) async fn open_tunnel(
    pod: &PodContext,
    ctx: &ProxyContext,
    dst: SocketAddr,
    w: &Workload,
    dst_id: &SpiffeId,
    src_id: &SpiffeId,
) -> Result<super::pool::Tunnel, Error> {
    let (identities, pool) = match (&ctx.identities, &ctx.pool) {
        (Some(i), Some(p)) => (i.clone(), p.clone()),
        _ => unreachable!("HBONE is only chosen with identities"),
    };
    identities.wait(src_id, CERT_WAIT).await?;
    let via = SocketAddr::new(dst.ip(), ctx.config.hbone_port);
    let verifier = Arc::new(SpiffeServerVerifier::new(
        identities.bundle(),
        dst_id.clone(),
    ));
    let client_cert = Arc::new(CertFor {
        manager: identities,
        identity: src_id.clone(),
    });
    let tls_config = Arc::new(
        tls::client_config(verifier, client_cert, &[tls::ALPN_H2]).map_err(|e| Error::Hbone {
            dst,
            reason: e.to_string(),
        })?,
    );
    let key = PoolKey {
        source: pod.workload.key(),
        destination_node: w
            .node
            .clone()
            .unwrap_or_else(|| ctx.config.node_name.clone()),
        destination_identity: dst_id.clone(),
    };
    let pod_name = pod.workload.key().to_string();
    pool.open(key, dst, || {
        let (tls_config, pod_name) = (tls_config.clone(), pod_name.clone());
        async move {
            let tcp = socket::connect(&pod.netns, &pod_name, via, socket::Source::Pod, &ctx.config)
                .await?;
            let name = rustls::pki_types::ServerName::IpAddress(via.ip().into());
            tokio_rustls::TlsConnector::from(tls_config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    let reason = tls::failure_reason(&e);
                    ctx.metrics.tls_failure(Reporter::Source, reason);
                    Error::Tls {
                        peer: via,
                        reason,
                        detail: tls::failure_detail(&e),
                    }
                })
        }
    })
    .await
}

/// Relays the application's connection and `upstream`, counting into the
/// connection's metrics.
async fn carry<U>(
    stream: TcpStream,
    upstream: U,
    labels: &ConnLabels<'_>,
    pod: &PodContext,
    ctx: &ProxyContext,
) where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let m = ctx.metrics.connection_opened(labels);
    let (pod_name, dst) = (pod.workload.key(), labels.destination_addr);
    tracing::debug!(pod = %pod_name, %dst, mtls = labels.security_policy == "mutual_tls", "outbound: proxying");
    match copy::relay(
        stream,
        upstream,
        m.received.clone(),
        m.sent.clone(),
        ctx.config.buffer_size,
    )
    .await
    {
        Ok((up, down)) => tracing::debug!(pod = %pod_name, %dst, up, down, "outbound: closed"),
        Err(e) => tracing::debug!(pod = %pod_name, %dst, "outbound: closed with {e}"),
    }
}
