//! The HBONE client: HTTP/2 `CONNECT` over mutual TLS to a destination
//! pod's `:15008`, with connections pooled so many streams share one.
//!
//! A pooled connection is keyed by the source pod, the destination node and
//! the destination identity. The source pod, because connections leave from
//! its own network namespace (the destination sees its address, as with
//! ztunnel); the identity, because the TLS handshake proved exactly one
//! server identity, so only destinations with that identity may share it.
//! With one pod per identity per node this is one connection per
//! (source identity, destination node) — or more: a connection carries at
//! most `h2::STREAMS_PER_CONNECTION` streams, and the pool dials another
//! when all of a key's connections are full, rather than letting new
//! streams queue behind a peer's stream limit.
//!
//! A connection does not outlive the certificate or the trust bundle it was
//! dialled with: once the source's certificate is renewed or the roots
//! change, new streams go to a connection dialled with the new ones (the
//! handshake is where a certificate is presented and checked), and the old
//! connection closes when its last stream ends. Nor does it outlive
//! `max_age`, for the same reason at a longer scale.
//!
//! Every wait is bounded. A dial (TCP, TLS, HTTP/2 handshake) has
//! `dial_timeout`, and no lock is held across it: streams that fit on an
//! open connection never wait for a dial, and one dial per key runs at a
//! time (the openers that need a new connection wait for it, rather than
//! each dialling its own). HTTP/2 pings every `keepalive_interval` notice a
//! peer that stopped answering (a dead node, a cut link) within
//! `keepalive_timeout`, not at TCP's retransmission timeout.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Method, Request, StatusCode, Version, client::conn::http2::SendRequest, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Error;
use crate::{spiffe::SpiffeId, telemetry::metrics::Metrics, workload::WorkloadKey};

/// HTTP/2 settings of HBONE, both sides. Windows bound what a peer may
/// send before we read it: per stream and per connection.
pub mod h2 {
    pub const STREAM_WINDOW: u32 = 1 << 20;
    pub const CONNECTION_WINDOW: u32 = 4 << 20;
    /// What our HBONE server accepts on one connection.
    pub const MAX_CONCURRENT_STREAMS: u32 = 256;
    /// What our HBONE client puts on one connection before dialling another:
    /// at most what ztunnel accepts by default, so a mixed mesh never
    /// waits on a peer's limit.
    pub const STREAMS_PER_CONNECTION: usize = 100;
    pub const MAX_SEND_BUFFER: usize = 1 << 20;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: WorkloadKey,
    pub destination_node: String,
    pub destination_identity: SpiffeId,
}

/// How the pool treats its connections.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A connection without streams for this long closes.
    pub idle: Duration,
    /// A connection this old takes no new stream (and closes once idle).
    pub max_age: Duration,
    /// The most a dial (TCP, TLS and HTTP/2 handshakes) may take.
    pub dial_timeout: Duration,
    /// HTTP/2 PING this often, idle or not.
    pub keepalive_interval: Duration,
    /// A PING unanswered for this long closes the connection.
    pub keepalive_timeout: Duration,
}

struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
    /// The generation of the source's certificate and trust bundle it was
    /// dialled with.
    generation: u64,
    dialled: Instant,
}

/// A key's connections; a new one is dialled when all are full.
#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Conn>>,
    /// Held by the one opener dialling for this key (never `conns`).
    dialling: tokio::sync::Mutex<()>,
}

pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Connections whose HTTP/2 driver runs: the gauge follows it the
    /// moment one closes (a peer gone), not at the next sweep.
    live: Arc<AtomicUsize>,
}

/// One CONNECT stream: the tunnel's bytes. Dropping it ends the stream.
pub struct Tunnel {
    io: TokioIo<Upgraded>,
    _stream: StreamGuard,
}

/// Counts a stream on its pooled connection while it lives, so the reaper
/// only closes connections nobody uses.
struct StreamGuard {
    streams: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl StreamGuard {
    fn new(streams: Arc<AtomicUsize>, last_used: Arc<Mutex<Instant>>) -> Self {
        streams.fetch_add(1, Ordering::AcqRel);
        *last_used.lock().expect("pool lock") = Instant::now();
        Self { streams, last_used }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *self.last_used.lock().expect("pool lock") = Instant::now();
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Pool {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Arc<Self> {
        let pool = Arc::new(Self {
            slots: Mutex::new(HashMap::new()),
            settings,
            metrics,
            live: Arc::default(),
        });
        let weak = Arc::downgrade(&pool);
        let every = (pool.settings.idle / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(p) = weak.upgrade() else { return };
                p.reap(p.settings.idle);
            }
        });
        pool
    }

    /// Drops connections that are closed, or without streams and idle for
    /// longer than `idle`, superseded or too old.
    fn reap(&self, idle: Duration) {
        let max_age = self.settings.max_age;
        let mut slots = self.slots.lock().expect("pool lock");
        let mut open = 0;
        slots.retain(|key, slot| {
            let mut conns = slot.conns.lock().expect("pool lock");
            let before = conns.len();
            let newest = conns.iter().map(|c| c.generation).max().unwrap_or(0);
            conns.retain(|c| {
                let busy = c.streams.load(Ordering::Acquire) > 0;
                !c.sender.is_closed()
                    && (busy
                        || (c.generation == newest
                            && c.dialled.elapsed() < max_age
                            && c.last_used.lock().expect("pool lock").elapsed() < idle))
            });
            if conns.len() < before {
                tracing::debug!(
                    ?key,
                    closed = before - conns.len(),
                    "hbone: closing idle connections"
                );
            }
            open += conns.len();
            // A key being dialled keeps its slot: the dial's connection goes there.
            !conns.is_empty() || slot.dialling.try_lock().is_err()
        });
        tracing::trace!(open, "hbone: pool swept");
    }

    /// Connections open now, over every key.
    #[cfg(test)]
    fn open_connections(&self) -> usize {
        let slots = self.slots.lock().expect("pool lock");
        slots
            .values()
            .map(|s| s.conns.lock().expect("pool lock").len())
            .sum()
    }

    /// A place for one more stream on an open connection of `slot` dialled
    /// with `generation` (or a newer one) and not too old.
    fn take(
        &self,
        slot: &Slot,
        generation: u64,
    ) -> Option<(SendRequest<Empty<Bytes>>, StreamGuard)> {
        let mut conns = slot.conns.lock().expect("pool lock");
        conns.retain(|c| !c.sender.is_closed());
        let c = conns.iter().find(|c| {
            c.generation >= generation
                && c.dialled.elapsed() < self.settings.max_age
                && c.streams.load(Ordering::Acquire) < h2::STREAMS_PER_CONNECTION
        })?;
        // Counted before the lock is released, so concurrent openers see
        // this stream and do not overfill the connection.
        Some((
            c.sender.clone(),
            StreamGuard::new(c.streams.clone(), c.last_used.clone()),
        ))
    }

    /// A place for one more stream, dialling a connection if no open one
    /// has room. One opener per key dials; the others wait for it.
    async fn take_or_dial<F, Fut, S>(
        &self,
        slot: &Slot,
        authority: SocketAddr,
        generation: u64,
        dial: &F,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamGuard), Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<S, Error>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(t) = self.take(slot, generation) {
            return Ok(t);
        }
        let _dialling = slot.dialling.lock().await;
        // Another opener's dial may have made room meanwhile.
        if let Some(t) = self.take(slot, generation) {
            return Ok(t);
        }
        let timeout = self.settings.dial_timeout;
        let conn = tokio::time::timeout(timeout, async {
            handshake(
                dial().await?,
                generation,
                &self.settings,
                &self.live,
                &self.metrics,
            )
            .await
        })
        .await
        .map_err(|_| Error::ConnectTimeout {
            dst: authority,
            timeout,
        })??;
        let taken = (
            conn.sender.clone(),
            StreamGuard::new(conn.streams.clone(), conn.last_used.clone()),
        );
        slot.conns.lock().expect("pool lock").push(conn);
        Ok(taken)
    }

    /// Opens a CONNECT stream to `authority` over the pooled connection for
    /// `key`, dialling a new connection with `dial` when there is none with
    /// room that was dialled with `generation` (the source's certificate
    /// and trust bundle; or a newer one).
    pub async fn open<F, Fut, S>(
        &self,
        key: PoolKey,
        authority: SocketAddr,
        generation: u64,
        dial: F,
    ) -> Result<Tunnel, Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<S, Error>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = self
            .slots
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .clone();
        // A connection that died between uses is replaced once.
        for attempt in 0..2 {
            let (sender, guard) = self
                .take_or_dial(&slot, authority, generation, &dial)
                .await?;
            // The peer answers a CONNECT once it has reached the
            // application (its own connect timeout, by default the same as
            // ours, bounds that); twice the dial timeout leaves it room to
            // say why it could not, and still bounds a peer that never does.
            let answer = self.settings.dial_timeout * 2;
            let connected = tokio::time::timeout(answer, connect(sender, authority))
                .await
                .map_err(|_| Error::ConnectTimeout {
                    dst: authority,
                    timeout: answer,
                })?;
            match connected {
                Ok(io) => {
                    return Ok(Tunnel {
                        io: TokioIo::new(io),
                        _stream: guard,
                    });
                }
                Err(ConnectError::Closed(e)) if attempt == 0 => {
                    tracing::debug!(?key, "hbone: pooled connection closed ({e}); redialling");
                    let dead = guard.streams.clone();
                    drop(guard);
                    slot.conns
                        .lock()
                        .expect("pool lock")
                        .retain(|c| !Arc::ptr_eq(&c.streams, &dead));
                }
                Err(ConnectError::Closed(e)) => {
                    return Err(Error::Hbone {
                        dst: authority,
                        reason: e,
                    });
                }
                Err(ConnectError::Refused(status)) => {
                    return Err(Error::HboneRefused {
                        dst: authority,
                        status,
                    });
                }
            }
        }
        unreachable!("the loop returns")
    }
}

enum ConnectError {
    Closed(String),
    Refused(StatusCode),
}

async fn handshake<S>(
    io: S,
    generation: u64,
    settings: &Settings,
    live: &Arc<AtomicUsize>,
    metrics: &Arc<Metrics>,
) -> Result<Conn, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(h2::STREAM_WINDOW)
        .initial_connection_window_size(h2::CONNECTION_WINDOW)
        .max_send_buf_size(h2::MAX_SEND_BUFFER)
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| Error::HboneHandshake(e.to_string()))?;
    metrics.set_hbone_connections(live.fetch_add(1, Ordering::AcqRel) + 1);
    let (live, metrics) = (live.clone(), metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("hbone: connection ended: {e}");
        }
        metrics.set_hbone_connections(live.fetch_sub(1, Ordering::AcqRel) - 1);
    });
    Ok(Conn {
        sender,
        streams: Arc::new(AtomicUsize::new(0)),
        last_used: Arc::new(Mutex::new(Instant::now())),
        generation,
        dialled: Instant::now(),
    })
}

async fn connect(
    mut sender: SendRequest<Empty<Bytes>>,
    authority: SocketAddr,
) -> Result<Upgraded, ConnectError> {
    sender
        .ready()
        .await
        .map_err(|e| ConnectError::Closed(e.to_string()))?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .version(Version::HTTP_2)
        .body(Empty::new())
        .expect("valid CONNECT request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ConnectError::Closed(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(ConnectError::Refused(resp.status()));
    }
    hyper::upgrade::on(resp)
        .await
        .map_err(|e| ConnectError::Closed(e.to_string()))
}

#[cfg(test)]
mod tests;
