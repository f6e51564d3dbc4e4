//! Outbound: connections the capture programs sent to `127.0.0.1:15001`
//! inside a pod are carried to where the application meant them to go, from
//! inside the same pod so the source address stays the pod's.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Error, PodContext, ProxyContext, copy, socket};
use crate::telemetry::metrics::{ConnLabels, Reporter};

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
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<(), Error> {
    let pod_name = pod.workload.key().to_string();
    let (dst, upstream) = match connect_upstream(&stream, peer, pod, &pod_name, ctx).await {
        Ok(x) => x,
        Err(e) => {
            // The application sees a refusal, as it would without the mesh.
            socket::reset(&stream);
            return Err(e);
        }
    };
    stream.set_nodelay(true)?;
    let dst_workload = ctx.workloads.by_ip(dst.ip());
    let m = ctx.metrics.connection_opened(&ConnLabels {
        reporter: Reporter::Source,
        source: Some(&pod.workload),
        destination: dst_workload.as_deref(),
        destination_addr: dst,
        cluster: &ctx.config.cluster_id,
        security_policy: "unknown",
    });
    tracing::debug!(pod = %pod_name, %peer, %dst, "outbound: proxying");
    let r = copy::relay(
        stream,
        upstream,
        m.received.clone(),
        m.sent.clone(),
        ctx.config.buffer_size,
    )
    .await;
    match r {
        Ok((up, down)) => tracing::debug!(pod = %pod_name, %dst, up, down, "outbound: closed"),
        Err(e) => tracing::debug!(pod = %pod_name, %dst, "outbound: closed with {e}"),
    }
    Ok(())
}

/// Finds where the application was going and connects there from the pod.
async fn connect_upstream(
    stream: &TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    pod_name: &str,
    ctx: &ProxyContext,
) -> Result<(SocketAddr, TcpStream), Error> {
    let local = stream.local_addr()?;
    let dst = ctx
        .maps
        .original_destination(pod.netns_cookie, peer, local)
        .ok_or(Error::NoOriginalDst { peer })?;
    if ctx.is_own_listener(dst) {
        return Err(Error::Loop { dst });
    }
    let upstream =
        socket::connect(&pod.netns, pod_name, dst, socket::Source::Pod, &ctx.config).await?;
    Ok((dst, upstream))
}
