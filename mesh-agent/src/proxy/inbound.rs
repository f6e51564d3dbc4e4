//! Inbound: connections arriving for a pod of this node, decided on and
//! delivered by the destination's own agent. They come two ways —
//! plaintext, which `sk_lookup` hands to the agent's `:15006` listener in
//! the pod (the accepted socket's local address is where the client was
//! going), and HBONE streams on `:15008` ([`super::hbone`]) — and both pass
//! through here:
//!
//! 1. an [`Arrival`] says who is coming (the peer's verified identity, for
//!    HBONE) and where to;
//! 2. [`Arrival::admit`] is the destination's decision about the
//!    connection (PeerAuthentication today; AuthorizationPolicy's
//!    connection-level rules belong here too);
//! 3. [`connect_app`] connects to the application from a source
//!    `sk_lookup` passes (`127.0.0.6`, `::6`), so it is not captured again;
//! 4. [`serve`] carries the bytes. Request-level decisions (L7 rules)
//!    would serve HTTP here instead of relaying.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{Error, PodContext, ProxyContext, copy, socket};
use crate::{
    snapshot::Snapshot,
    spiffe::SpiffeId,
    telemetry::metrics::{ConnLabels, Reporter},
    workload::Workload,
};

/// A connection arriving for a pod of this node.
pub struct Arrival {
    /// The destination pod.
    pub pod: Arc<PodContext>,
    /// Where the client was going (an address of the pod).
    pub dst: SocketAddr,
    /// Where it comes from, as the network says.
    pub peer: SocketAddr,
    /// Who it is, as its certificate proved (HBONE); `None` for plaintext.
    pub identity: Option<Arc<SpiffeId>>,
    /// The configuration the connection is decided and carried with.
    pub snap: Arc<Snapshot>,
}

impl Arrival {
    /// The destination's decision about this connection: `Ok` lets it in.
    /// Plaintext is refused where PeerAuthentication is STRICT for the
    /// port; mutual TLS (HBONE) always satisfies it.
    pub fn admit(&self) -> Result<(), Error> {
        if self.identity.is_none() {
            let mode = self
                .snap
                .peer_authentication(&self.pod.workload)
                .mode(self.dst.port());
            if !mode.allows_plaintext() {
                return Err(Error::PlaintextRefused {
                    port: self.dst.port(),
                    pod: self.pod.workload.key().to_string(),
                });
            }
        }
        Ok(())
    }

    /// The workload the connection comes from. Over HBONE, from the
    /// identity its certificate proved, never from the address alone: the
    /// workload at the peer's address if it has that identity, else the
    /// one workload running as that identity (several pods of one
    /// Deployment count as one); when several workloads share it, none.
    /// Plaintext has only the address, as Istio reports it.
    pub fn source_workload(&self) -> Option<&Arc<Workload>> {
        let registry = &self.snap.registry;
        let Some(id) = &self.identity else {
            return registry.workload_at(self.peer.ip());
        };
        if let Some(w) = registry.workload_at(self.peer.ip())
            && w.identity(id.trust_domain()) == **id
        {
            return Some(w);
        }
        let (ns, sa) = id.workload_parts()?;
        let candidates = registry.with_identity(ns, sa);
        let first = candidates.first()?;
        candidates
            .iter()
            .all(|w| w.workload_name() == first.workload_name())
            .then_some(first)
    }
}

/// Accepts on one plaintext inbound listener until `stop` is cancelled.
pub async fn serve_plaintext(
    listener: TcpListener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    stop: CancellationToken,
) {
    super::accept_loop(listener, stop, ctx.clone(), move |stream, peer| {
        let (pod, ctx) = (pod.clone(), ctx.clone());
        async move {
            if let Err(e) = plaintext(stream, peer, pod.clone(), &ctx).await {
                ctx.metrics.proxy_error(Reporter::Destination, e.reason());
                tracing::warn!(pod = %pod.workload.key(), %peer, "inbound: {e}");
            }
        }
    })
    .await;
}

async fn plaintext(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: &ProxyContext,
) -> Result<(), Error> {
    let arrival = Arrival {
        dst: stream.local_addr()?,
        pod,
        peer,
        identity: None,
        // One snapshot for the connection's whole life.
        snap: ctx.store.load(),
    };
    let app = match arrival.admit() {
        Ok(()) => connect_app(&arrival, ctx).await,
        Err(e) => Err(e),
    };
    let app = match app {
        Ok(a) => a,
        Err(e) => {
            // The client sees a refusal, as it would without the mesh.
            socket::reset(&stream);
            return Err(e);
        }
    };
    stream.set_nodelay(true)?;
    serve(&arrival, stream, app, ctx).await;
    Ok(())
}

/// Connects to the application at the address the client was going to.
pub async fn connect_app(arrival: &Arrival, ctx: &ProxyContext) -> Result<TcpStream, Error> {
    let dst = arrival.dst;
    if ctx.is_own_listener(&arrival.snap, dst) {
        return Err(Error::Loop { dst });
    }
    let name = arrival.pod.workload.key().to_string();
    socket::connect(
        &arrival.pod.netns,
        &name,
        dst,
        socket::Source::AgentLoopback,
        &ctx.config,
    )
    .await
}

/// Carries an admitted connection to the application, counting it with
/// the destination's labels.
pub async fn serve<C>(arrival: &Arrival, client: C, app: TcpStream, ctx: &ProxyContext)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let principals = arrival
        .identity
        .as_ref()
        .zip(arrival.pod.identity.as_ref())
        .map(|(src, dst)| (src.to_string(), dst.to_string()));
    let m = ctx.metrics.connection_opened(&ConnLabels {
        reporter: Reporter::Destination,
        source: arrival.source_workload().map(|w| &**w),
        destination: Some(&arrival.pod.workload),
        service: None,
        destination_addr: arrival.dst,
        cluster: &ctx.config.cluster_id,
        security_policy: if principals.is_some() {
            "mutual_tls"
        } else {
            "none"
        },
        source_principal: principals.as_ref().map(|p| p.0.as_str()),
        destination_principal: principals.as_ref().map(|p| p.1.as_str()),
    });
    let (pod, peer, dst) = (arrival.pod.workload.key(), arrival.peer, arrival.dst);
    tracing::debug!(%pod, %peer, %dst, "inbound: proxying");
    let r = copy::relay(
        client,
        app,
        m.received.clone(),
        m.sent.clone(),
        ctx.config.buffer_size,
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(%pod, %dst, "inbound: closed with {e}");
    }
}

/// The HBONE port without mutual TLS: accept and reset, so a peer gets a
/// prompt refusal instead of a hang, and the port stays the agent's.
pub async fn serve_reserved(listener: TcpListener, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => if let Ok((s, peer)) = r {
                tracing::debug!(%peer, "hbone: mutual TLS is off; refusing");
                // A reset, not a FIN that looks like a served connection.
                socket::reset(&s);
                drop(s);
            },
        }
    }
}
