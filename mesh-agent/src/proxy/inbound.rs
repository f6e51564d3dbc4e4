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
//!    connection: PeerAuthentication, then AuthorizationPolicy when no
//!    policy of the workload needs the HTTP request ([`authorize`]);
//! 3. [`connect_app`] connects to the application from a source
//!    `sk_lookup` passes (`127.0.0.6`, `::6`), so it is not captured again;
//! 4. [`serve`] carries the bytes — or, when the workload's policies need
//!    the request (L7 rules, RequestAuthentication) and the connection
//!    speaks HTTP (declared by its Service port, else detected), serves
//!    HTTP and decides per request ([`http`]).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

pub mod authorize;
pub mod http;

use super::{
    Error, PodContext, ProxyContext, app_stream::AppStream, conn_log::ConnLog, copy,
    prefixed::Prefixed, sniff, socket,
};
use crate::{
    policy::rate_limit::{Admit, Unit},
    snapshot::{InboundPolicy, Snapshot},
    spiffe::SpiffeId,
    telemetry::{
        accesslog,
        metrics::{ConnLabels, Reporter},
    },
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
    /// The destination workload's policies, from `snap`.
    pub policy: InboundPolicy,
}

impl Arrival {
    /// The access-log record of this connection (the server side), if a
    /// provider wants it.
    fn conn_log<'a>(&self, ctx: &'a ProxyContext, tally: &copy::Tally) -> Option<ConnLog<'a>> {
        let to = ctx
            .access_log
            .wants(&self.policy.access_logging, accesslog::Mode::Server)?;
        let mut r = self.log_record(std::time::SystemTime::now());
        r.upstream_host = Some(self.dst);
        Some(ConnLog::new(&ctx.access_log, to, r, tally.clone()))
    }

    /// Lists the connection in `/connections` while the guard lives.
    pub fn list(
        &self,
        ctx: &ProxyContext,
        protocol: &'static str,
        tally: Option<copy::Tally>,
    ) -> super::conn_table::Registered {
        ctx.conns.register(super::conn_table::ConnInfo {
            direction: "inbound",
            protocol,
            pod: self.pod.workload.key().to_string(),
            source: self.peer,
            destination: self.dst,
            source_identity: self.identity.as_ref().map(|i| i.to_string()),
            destination_identity: self.pod.identity.as_ref().map(|i| i.to_string()),
            started: std::time::SystemTime::now(),
            tally,
        })
    }

    /// A server-side record of a request or connection that arrived here.
    pub fn log_record(&self, start: std::time::SystemTime) -> accesslog::Record {
        let mut r = accesslog::Record::new(accesslog::Mode::Server, start, self.peer, self.dst);
        r.upstream_cluster = format!("inbound|{}||", self.dst.port());
        r.mtls = self.identity.is_some();
        r.downstream_peer_san = self
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default();
        r.downstream_local_san = self
            .pod
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default();
        r
    }

    pub fn new(
        pod: Arc<PodContext>,
        dst: SocketAddr,
        peer: SocketAddr,
        identity: Option<Arc<SpiffeId>>,
        snap: Arc<Snapshot>,
    ) -> Self {
        let policy = snap.inbound_policy(&pod.workload);
        Self {
            pod,
            dst,
            peer,
            identity,
            snap,
            policy,
        }
    }

    /// The destination's decision about this connection: `Ok` lets it in.
    /// Plaintext is refused where PeerAuthentication is STRICT for the
    /// port; mutual TLS (HBONE) always satisfies it. AuthorizationPolicy
    /// decides here unless the workload's policies need the request.
    pub fn admit(&self, ctx: &ProxyContext) -> Result<(), Error> {
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
        for l in self.policy.limits(Unit::Connections) {
            match l.admit(&[]) {
                Admit::Yes => {}
                Admit::OverNotEnforced => {
                    ctx.metrics
                        .rate_limited("connections", &l.filter, "over_not_enforced")
                }
                Admit::Refused => {
                    ctx.metrics
                        .rate_limited("connections", &l.filter, "refused");
                    return Err(Error::RateLimited {
                        dst: self.dst,
                        pod: self.pod.workload.key().to_string(),
                        filter: l.filter.clone(),
                    });
                }
            }
        }
        if !self.policy.per_request() {
            self.authorize_connection(ctx)?;
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
    super::accept_loop(
        listener,
        stop,
        pod.clone(),
        ctx.clone(),
        move |stream, peer| {
            let (pod, ctx) = (pod.clone(), ctx.clone());
            async move {
                match plaintext(stream, peer, pod.clone(), &ctx).await {
                    Ok(()) => {}
                    // Denials are counted and audited where they are decided.
                    Err(e @ (Error::Denied { .. } | Error::RateLimited { .. })) => {
                        ctx.metrics.proxy_error(Reporter::Destination, e.reason());
                        tracing::debug!(pod = %pod.workload.key(), %peer, "inbound: {e}");
                    }
                    Err(e) => {
                        ctx.metrics.proxy_error(Reporter::Destination, e.reason());
                        tracing::warn!(pod = %pod.workload.key(), %peer, "inbound: {e}");
                    }
                }
            }
        },
    )
    .await;
}

async fn plaintext(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: &Arc<ProxyContext>,
) -> Result<(), Error> {
    // One snapshot for the connection's whole life.
    let arrival = Arrival::new(pod, stream.local_addr()?, peer, None, ctx.store.load());
    let app = match arrival.admit(ctx) {
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
    serve(arrival, stream, app, ctx).await;
    Ok(())
}

/// Connects to the application at the address the client was going to.
pub async fn connect_app(arrival: &Arrival, ctx: &ProxyContext) -> Result<AppStream, Error> {
    let dst = arrival.dst;
    if ctx.is_own_listener(&arrival.snap, dst) {
        return Err(Error::Loop { dst });
    }
    let name = arrival.pod.workload.key().to_string();
    let app = socket::connect(
        &arrival.pod.netns,
        &name,
        dst,
        socket::Source::AgentLoopback,
        &ctx.config,
    )
    .await?;
    let cookie = arrival.pod.netns_cookie;
    Ok(AppStream::new(app, cookie, ctx.fast_credit.as_ref()))
}

/// Carries an admitted connection to the application: as HTTP decided
/// per request when the workload's policies need the request and the
/// connection speaks HTTP; else byte for byte, counted with the
/// destination's labels (after the connection-level decision, if it was
/// left for now).
pub async fn serve<C>(arrival: Arrival, client: C, app: AppStream, ctx: &Arc<ProxyContext>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !arrival.policy.per_request() {
        return relay(&arrival, client, app, ctx, false).await;
    }
    let mut client = client;
    let (prefix, is_http) = match arrival.policy.port_protocols.get(&arrival.dst.port()) {
        Some(p) => (Vec::new(), p.is_http()),
        None => match sniff::read_http_start(&mut client).await {
            Ok(r) => r,
            Err(e) => {
                return tracing::debug!(pod = %arrival.pod.workload.key(), "inbound: {e}");
            }
        },
    };
    let client = Prefixed::new(prefix, client);
    if is_http {
        return http::serve(Arc::new(arrival), client, app, ctx.clone()).await;
    }
    // Not HTTP: the connection-level decision, with Istio's semantics for
    // HTTP-only fields.
    if let Err(e) = arrival.authorize_connection(ctx) {
        ctx.metrics.proxy_error(Reporter::Destination, e.reason());
        return tracing::info!(pod = %arrival.pod.workload.key(), peer = %arrival.peer, "inbound: {e}");
    }
    relay(&arrival, client, app, ctx, true).await;
}

impl Arrival {
    /// Calls `f` with the connection's metric labels.
    pub fn with_labels<R>(&self, ctx: &ProxyContext, f: impl FnOnce(&ConnLabels<'_>) -> R) -> R {
        let principals = self
            .identity
            .as_ref()
            .zip(self.pod.identity.as_ref())
            .map(|(src, dst)| (src.to_string(), dst.to_string()));
        f(&ConnLabels {
            reporter: Reporter::Destination,
            source: self.source_workload().map(|w| &**w),
            destination: Some(&self.pod.workload),
            service: None,
            destination_addr: self.dst,
            cluster: &ctx.config.cluster_id,
            security_policy: if principals.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            source_principal: principals.as_ref().map(|p| p.0.as_str()),
            destination_principal: principals.as_ref().map(|p| p.1.as_str()),
        })
    }
}

/// Relays byte for byte until either side closes, or a configuration
/// change means the connection may no longer stay (`known_tcp`: the
/// connection was seen not to be HTTP).
async fn relay<C>(arrival: &Arrival, client: C, app: AppStream, ctx: &ProxyContext, known_tcp: bool)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    // Subscribed before anything can change unseen.
    let mut changes = ctx.store.subscribe();
    if ctx.store.load().version != arrival.snap.version {
        changes.mark_changed();
    }
    let m = arrival.with_labels(ctx, |l| ctx.metrics.connection_opened(l));
    let (pod, peer, dst) = (arrival.pod.workload.key(), arrival.peer, arrival.dst);
    tracing::debug!(%pod, %peer, %dst, "inbound: proxying");
    let tally = copy::Tally::default();
    let mut log = arrival.conn_log(ctx, &tally);
    let _listed = arrival.list(ctx, "tcp", Some(tally.clone()));
    let copy = copy::relay(
        client,
        app,
        m.received.clone(),
        m.sent.clone(),
        ctx.config.buffer_size,
        super::TCP_IDLE_TIMEOUT,
        Some(tally),
    );
    tokio::pin!(copy);
    let why = tokio::select! {
        r = &mut copy => {
            if let Err(e) = r {
                tracing::debug!(%pod, %dst, "inbound: closed with {e}");
            }
            return;
        },
        why = revoked(arrival, ctx, known_tcp, &mut changes) => why,
    };
    if let Revoked::Reparse = why {
        // Allowed, but now to be decided per request: closed once quiet
        // (at most a second later), so a request in flight is not cut.
        let quiet = async {
            let total = || m.received.get() + m.sent.get();
            let mut last = total();
            loop {
                tokio::time::sleep(QUIET).await;
                let now = total();
                if now == last {
                    return;
                }
                last = now;
            }
        };
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(%pod, %dst, "inbound: closed with {e}");
                }
                return;
            },
            _ = tokio::time::timeout(REPARSE_WITHIN, quiet) => {}
        }
    }
    tracing::info!(%pod, %peer, %dst, "inbound: closing a connection: {why}");
    if let Some(l) = &mut log {
        l.ended_with(&why);
    }
}

/// How long a relayed connection must carry nothing to count as quiet.
const QUIET: std::time::Duration = std::time::Duration::from_millis(20);

/// A relayed connection that must be decided per request from now on is
/// closed within this, quiet or not.
const REPARSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a relayed connection must go.
enum Revoked {
    Denied(String),
    /// Its policies now need the request.
    Reparse,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Denied(by) => write!(f, "denied by AuthorizationPolicy ({by})"),
            Self::Reparse => f.write_str("its workload's policies now decide each request"),
        }
    }
}

/// Resolves when a new configuration no longer lets a relayed connection
/// stay: its policies now deny it (as ztunnel re-checks open
/// connections), or they now need the request, which a relayed connection
/// of unknown protocol cannot show (the client reconnects and is decided
/// per request).
async fn revoked(
    arrival: &Arrival,
    ctx: &ProxyContext,
    known_tcp: bool,
    changes: &mut tokio::sync::watch::Receiver<u64>,
) -> Revoked {
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = Arrival::new(
            arrival.pod.clone(),
            arrival.dst,
            arrival.peer,
            arrival.identity.clone(),
            ctx.store.load(),
        );
        if !known_tcp && now.policy.per_request() {
            return Revoked::Reparse;
        }
        if now.policy.authorization.is_empty() {
            continue;
        }
        let peer = now.peer();
        let v = now
            .policy
            .authorization
            .decide(&now.attributes(&peer, None));
        if !v.allowed {
            now.record(ctx, &peer, &v, None);
            return Revoked::Denied(authorize::describe(&v));
        }
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
