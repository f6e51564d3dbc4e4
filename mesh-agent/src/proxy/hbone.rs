//! The HBONE server: the agent's `:15008` listener inside each pod's
//! network namespace. Mutual TLS 1.3 with the pod's own certificate, then
//! HTTP/2 `CONNECT <ip:port>` streams, each carried to the application
//! from the agent's in-pod source address.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Error, PodContext, ProxyContext, inbound, pool::h2};
use crate::{
    identity::CertFor,
    spiffe::SpiffeId,
    telemetry::metrics::Reporter,
    tls::{self, SpiffeClientVerifier},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HBONE for `pod` until `stop`.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    stop: CancellationToken,
) {
    let (Some(identities), Some(identity)) = (ctx.identities.clone(), pod.identity.clone()) else {
        // No mTLS configured: the port stays reserved.
        return super::inbound::serve_reserved(listener, stop).await;
    };
    let verifier = Arc::new(SpiffeClientVerifier::new(
        identities.bundle(),
        identities.trust_domain(),
        true,
    ));
    let cert = Arc::new(CertFor {
        manager: identities,
        identity: identity.clone(),
    });
    let config = match tls::server_config(verifier, cert, &[tls::ALPN_H2]) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(pod = %pod.workload.key(), "hbone: cannot build the TLS configuration: {e}");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("hbone: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // One HBONE connection carries many streams: it counts once here;
        // its streams are bounded by HTTP/2's MAX_CONCURRENT_STREAMS.
        let Some(permit) = ctx.limits.admit(&pod.connections) else {
            tracing::debug!(pod = %pod.workload.key(), %peer, "hbone: connection limit reached: refused");
            super::socket::reset(&tcp);
            continue;
        };
        let (acceptor, pod, ctx2, identity) =
            (acceptor.clone(), pod.clone(), ctx.clone(), identity.clone());
        let cut = ctx.cut.clone();
        ctx.connections.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = connection(acceptor, tcp, peer, pod, ctx2, identity) => {}
            }
        });
    }
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    identity: SpiffeId,
) {
    let _ = tcp.set_nodelay(true);
    // A pod just enrolled may still be waiting for its certificate: hold the
    // client's hello (it waits in the socket) rather than fail the handshake.
    if let Some(identities) = &ctx.identities
        && let Err(e) = identities.wait(&identity, HANDSHAKE_TIMEOUT).await
    {
        ctx.metrics
            .tls_failure(Reporter::Destination, "no_certificate");
        tracing::warn!(pod = %pod.workload.key(), %peer, "hbone: {e}");
        return;
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = tls::failure_reason(&e);
            ctx.metrics.tls_failure(Reporter::Destination, reason);
            tracing::warn!(pod = %pod.workload.key(), %peer, %reason, "hbone: refused a client: {}", tls::failure_detail(&e));
            return;
        }
        Err(_) => {
            ctx.metrics.tls_failure(Reporter::Destination, "timeout");
            return;
        }
    };
    let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let Some(peer_id) = peer_cert.and_then(tls::cert_identity) else {
        return;
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        // Which certificate the client presented: renewals are visible here.
        let serial = peer_cert
            .and_then(|c| tls::cert_info(c).ok())
            .map(|i| i.serial)
            .unwrap_or_default();
        tracing::debug!(pod = %pod.workload.key(), %peer, client = %peer_id, %serial, "hbone: client connected");
    }
    let peer_id = Arc::new(peer_id);
    let draining = ctx.draining.clone();
    let keepalive = (
        ctx.config.hbone_keepalive_interval,
        ctx.config.hbone_keepalive_timeout,
    );
    let svc = service_fn(move |req| {
        let (pod, ctx, identity, peer_id) =
            (pod.clone(), ctx.clone(), identity.clone(), peer_id.clone());
        async move { Ok::<_, Infallible>(stream(req, peer, &pod, &ctx, &identity, &peer_id).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(h2::STREAM_WINDOW)
        .initial_connection_window_size(h2::CONNECTION_WINDOW)
        .max_concurrent_streams(h2::MAX_CONCURRENT_STREAMS)
        .max_send_buf_size(h2::MAX_SEND_BUFFER)
        // A client that stopped answering (its node died) is noticed and
        // its streams end, rather than waiting on TCP.
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(keepalive.0)
        .keep_alive_timeout(keepalive.1)
        .serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = conn.as_mut() => r,
        () = draining.cancelled() => {
            // GOAWAY: the peer opens new streams on a new connection (to
            // the next agent); the streams open here finish.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%peer, "hbone: connection ended: {e}");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// Where a CONNECT request asks to go: an `ip:port` authority, nothing
/// else (no name to resolve, no path); the status to answer otherwise.
pub fn connect_target(method: &Method, uri: &http::Uri) -> Result<SocketAddr, StatusCode> {
    if method != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    uri.authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(StatusCode::BAD_REQUEST)
}

/// One CONNECT stream: checks where it goes, lets the destination decide
/// ([`inbound::Arrival::admit`]), connects to the application, answers 200
/// and relays.
async fn stream(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    pod: &PodContext,
    ctx: &Arc<ProxyContext>,
    identity: &SpiffeId,
    peer_id: &Arc<SpiffeId>,
) -> Response<Empty<Bytes>> {
    let dst = match connect_target(req.method(), req.uri()) {
        Ok(d) => d,
        Err(code) => return status(code),
    };
    // The stream must go to a pod on this node with the identity this
    // connection's handshake proved; anything else is misdirected.
    let target = match ctx.local.get(dst.ip()) {
        Some(t) if t.identity.as_ref() == Some(identity) => t,
        _ => {
            tracing::warn!(pod = %pod.workload.key(), %peer, %dst, "hbone: CONNECT to a destination this identity does not serve");
            ctx.metrics
                .proxy_error(Reporter::Destination, "hbone_misdirected");
            return status(StatusCode::MISDIRECTED_REQUEST);
        }
    };
    let arrival = inbound::Arrival::new(target, dst, peer, Some(peer_id.clone()), ctx.store.load());
    let app = match arrival.admit(ctx) {
        Ok(()) => inbound::connect_app(&arrival, ctx).await,
        Err(e) => Err(e),
    };
    let app = match app {
        Ok(a) => a,
        Err(e) => {
            ctx.metrics.proxy_error(Reporter::Destination, e.reason());
            if matches!(e, Error::Denied { .. } | Error::RateLimited { .. }) {
                // Counted and audited where it was decided.
                tracing::debug!(pod = %arrival.pod.workload.key(), %peer, "hbone: {e}");
            } else {
                tracing::warn!(pod = %arrival.pod.workload.key(), %peer, "hbone: {e}");
            }
            return status(match e {
                Error::Loop { .. } => StatusCode::BAD_REQUEST,
                Error::Denied { .. } => StatusCode::FORBIDDEN,
                Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            });
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let ctx = ctx.clone();
    ctx.connections.clone().spawn(async move {
        let tunnel = match upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => return tracing::debug!(%peer, "hbone: upgrade failed: {e}"),
        };
        let cut = ctx.cut.clone();
        tokio::select! {
            _ = cut.cancelled() => {}
            _ = inbound::serve(arrival, tunnel, app, &ctx) => {}
        }
    });
    status(StatusCode::OK)
}

#[cfg(test)]
mod tests;
