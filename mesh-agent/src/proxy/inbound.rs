//! Inbound plaintext: `sk_lookup` hands connections for any of a pod's ports
//! to the agent's `:15006` listener in that pod; the accepted socket's local
//! address is where the client was going. The agent connects to the
//! application from a source `sk_lookup` passes (`127.0.0.6`, `::6`) so it
//! is not captured again. PeerAuthentication decides whether plaintext may
//! come in at all.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Error, PodContext, ProxyContext, copy, socket};
use crate::telemetry::metrics::{ConnLabels, Reporter};

/// Accepts on one inbound listener until `stop` is cancelled.
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
                ctx.metrics.proxy_error(Reporter::Destination, e.reason());
                tracing::warn!(pod = %pod.workload.key(), %peer, "inbound: {e}");
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
    // One snapshot for the connection's whole life.
    let snap = ctx.store.load();
    let port = stream.local_addr()?.port();
    let mode = snap.peer_authentication(&pod.workload).mode(port);
    if !mode.allows_plaintext() {
        socket::reset(&stream);
        return Err(Error::PlaintextRefused {
            port,
            pod: pod_name,
        });
    }
    let (dst, upstream) = match connect_app(&stream, pod, &pod_name, ctx, &snap).await {
        Ok(x) => x,
        Err(e) => {
            // The client sees a refusal, as it would without the mesh.
            socket::reset(&stream);
            return Err(e);
        }
    };
    stream.set_nodelay(true)?;
    let src_workload = snap.registry.workload_at(peer.ip());
    let m = ctx.metrics.connection_opened(&ConnLabels {
        reporter: Reporter::Destination,
        source: src_workload.map(|w| &**w),
        destination: Some(&pod.workload),
        service: None,
        destination_addr: dst,
        cluster: &ctx.config.cluster_id,
        security_policy: "none",
        source_principal: None,
        destination_principal: None,
    });
    tracing::debug!(pod = %pod_name, %peer, %dst, "inbound: proxying");
    let r = copy::relay(
        stream,
        upstream,
        m.received.clone(),
        m.sent.clone(),
        ctx.config.buffer_size,
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(pod = %pod_name, %dst, "inbound: closed with {e}");
    }
    Ok(())
}

/// Connects to the application at the address the client was going to.
async fn connect_app(
    stream: &TcpStream,
    pod: &PodContext,
    pod_name: &str,
    ctx: &ProxyContext,
    snap: &crate::snapshot::Snapshot,
) -> Result<(SocketAddr, TcpStream), Error> {
    let dst = stream.local_addr()?;
    if ctx.is_own_listener(snap, dst) {
        return Err(Error::Loop { dst });
    }
    let app = socket::connect(
        &pod.netns,
        pod_name,
        dst,
        socket::Source::AgentLoopback,
        &ctx.config,
    )
    .await?;
    Ok((dst, app))
}

/// HBONE is reserved until mTLS lands: accept and close, so a peer gets a
/// prompt reset instead of a hang, and the port stays the agent's.
pub async fn serve_reserved(listener: TcpListener, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => if let Ok((s, peer)) = r {
                tracing::debug!(%peer, "hbone: not implemented yet; closing");
                // A reset, not a FIN that looks like a served connection.
                socket::reset(&s);
                drop(s);
            },
        }
    }
}
