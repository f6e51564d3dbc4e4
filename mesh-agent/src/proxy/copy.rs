//! Moving bytes both ways with bounded buffers, honouring half-close, and
//! counting them into the connection's metrics as they pass.
//!
//! Buffers are lent, not owned: an idle direction holds only a small inline
//! buffer to wait on; a full-size buffer is allocated when data flows and
//! released as soon as its read finds nothing more (`Pending` with nothing
//! left to write). Ten thousand idle connections then cost a few KB each
//! instead of two full buffers each.

use std::{
    future::{Future as _, poll_fn},
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One connection's byte totals, readable after its relay ended or was
/// dropped (for its access-log record): `[from client, from upstream]`.
#[derive(Debug, Default, Clone)]
pub struct Tally(Arc<[AtomicU64; 2]>);

impl Tally {
    pub fn from_client(&self) -> u64 {
        self.0[0].load(Ordering::Relaxed)
    }

    pub fn from_upstream(&self) -> u64 {
        self.0[1].load(Ordering::Relaxed)
    }
}

/// A stream whose reads add to a counter (and to a tally, slot `slot`).
struct Counted<S> {
    inner: S,
    read: IntCounter,
    tally: Option<(Tally, usize)>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            self.read.inc_by(n);
            if let Some((t, slot)) = &self.tally {
                t.0[*slot].fetch_add(n, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies `client` ↔ `upstream` until both directions have ended. When one
/// side finishes sending, the other side's write half is shut down and the
/// reverse direction keeps flowing (TCP half-close). Each direction uses at
/// most one buffer of `buf_size` bytes, and only while data flows. No byte
/// either way for `idle` ends it with `TimedOut` (Envoy's TCP proxy
/// `idle_timeout`, Istio's `connectionPool.tcp.idleTimeout`). Returns
/// (client→upstream, upstream→client) bytes; `tally`, when given, has
/// them too, however the relay ends.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    from_client: IntCounter,
    from_upstream: IntCounter,
    buf_size: usize,
    idle: Duration,
    tally: Option<Tally>,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Counted {
        inner: client,
        read: from_client,
        tally: tally.clone().map(|t| (t, 0)),
    };
    let mut u = Counted {
        inner: upstream,
        read: from_upstream,
        tally: tally.map(|t| (t, 1)),
    };
    let (mut up, mut down) = (Half::new(buf_size), Half::new(buf_size));
    let (mut up_done, mut down_done) = (None, None);
    // The timer is moved only when it fires (not on every read): it then
    // looks at when bytes last moved.
    let mut last_moved = Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    poll_fn(|cx| {
        let before = up.total + down.total;
        if up_done.is_none()
            && let Poll::Ready(n) = up.poll_copy(cx, &mut c, &mut u)?
        {
            up_done = Some(n);
        }
        if down_done.is_none()
            && let Poll::Ready(n) = down.poll_copy(cx, &mut u, &mut c)?
        {
            down_done = Some(n);
        }
        if let (Some(a), Some(b)) = (up_done, down_done) {
            return Poll::Ready(Ok((a, b)));
        }
        if up.total + down.total != before {
            last_moved = Instant::now();
        }
        while timer.as_mut().poll(cx).is_ready() {
            let until = last_moved + idle;
            if until <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte either way for {idle:?} (idle timeout)"),
                )));
            }
            timer.as_mut().reset(until.into());
        }
        Poll::Pending
    })
    .await
}

/// What an idle direction waits with: big enough for a small request or
/// reply in one read, small enough to keep in every connection.
const IDLE_BUF: usize = 512;

/// One direction of a relay.
struct Half {
    size: usize,
    /// The full-size buffer, only while data flows.
    big: Option<Box<[u8]>>,
    small: [u8; IDLE_BUF],
    /// Whether the bytes waiting to be written are in `small`.
    in_small: bool,
    /// Bytes `pos..end` of the current buffer are waiting to be written.
    pos: usize,
    end: usize,
    /// The last small read filled `small`: use the big buffer next.
    grow: bool,
    read_done: bool,
    need_flush: bool,
    total: u64,
}

impl Half {
    fn new(size: usize) -> Self {
        Self {
            size,
            big: None,
            small: [0; IDLE_BUF],
            in_small: true,
            pos: 0,
            end: 0,
            grow: false,
            read_done: false,
            need_flush: false,
            total: 0,
        }
    }

    /// Reads from `r` and writes to `w` until `r` ends; then shuts `w`'s
    /// write half. Returns the bytes copied.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.pos == self.end && !self.read_done {
                let use_big = self.big.is_some() || self.grow;
                let buf: &mut [u8] = if use_big {
                    let size = self.size;
                    self.big
                        .get_or_insert_with(|| vec![0; size].into_boxed_slice())
                } else {
                    &mut self.small
                };
                let cap = buf.len();
                let mut rb = ReadBuf::new(buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing to read: push out what was written, then
                        // give the big buffer back while this side is idle.
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        self.big = None;
                        self.grow = false;
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            (self.pos, self.end, self.in_small) = (0, n, !use_big);
                            self.grow = n == cap;
                            self.total += n as u64;
                        }
                    }
                }
            }
            while self.pos < self.end {
                let data = match (&self.big, self.in_small) {
                    (Some(b), false) => &b[self.pos..self.end],
                    _ => &self.small[self.pos..self.end],
                };
                let n = ready!(Pin::new(&mut *w).poll_write(cx, data))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.total));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// client ⇄ [relay] ⇄ server over real loopback sockets.
    async fn pair() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
        IntCounter,
        IntCounter,
    ) {
        pair_idle(Duration::from_secs(3600)).await
    }

    async fn pair_idle(
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
        IntCounter,
        IntCounter,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = back.accept().await.unwrap();
        let (up, down) = (
            IntCounter::new("up", "up").unwrap(),
            IntCounter::new("down", "down").unwrap(),
        );
        let relay = tokio::spawn(relay(
            accepted,
            upstream,
            up.clone(),
            down.clone(),
            1024,
            idle,
            None,
        ));
        (client, server, relay, up, down)
    }

    #[tokio::test]
    async fn a_quiet_connection_is_closed_at_the_idle_timeout_and_a_chatty_one_is_not() {
        let idle = Duration::from_millis(300);
        let started = Instant::now();
        let (mut client, mut server, relay, _, _) = pair_idle(idle).await;
        // A byte every 100 ms for a second: never idle for 300 ms.
        for _ in 0..10 {
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "closed while bytes moved");
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1150) && took < Duration::from_millis(2500),
            "closed after {took:?}"
        );
    }

    #[tokio::test]
    async fn half_close_lets_the_response_through() {
        let (mut client, mut server, relay, up, down) = pair().await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "server sees the request and then EOF");
        server.write_all(b"world").await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            back, b"world",
            "the reply still flows after the client's FIN"
        );
        assert_eq!(relay.await.unwrap().unwrap(), (5, 5));
        assert_eq!((up.get(), down.get()), (5, 5));
    }

    #[tokio::test]
    async fn an_idle_direction_gives_its_buffer_back() {
        let (mut app, mut from_app) = tokio::io::duplex(64 << 10);
        let (mut to_peer, mut peer) = tokio::io::duplex(64 << 10);
        let mut half = Half::new(16 << 10);
        // More than the idle buffer: the first read fills it, the rest goes
        // through a full-size buffer, then the read finds nothing more.
        app.write_all(&[7u8; 3000]).await.unwrap();
        let r =
            std::future::poll_fn(|cx| Poll::Ready(half.poll_copy(cx, &mut from_app, &mut to_peer)))
                .await;
        assert!(r.is_pending());
        assert_eq!(half.total, 3000);
        assert!(half.big.is_none(), "an idle direction kept its big buffer");
        let mut got = vec![0u8; 3000];
        peer.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn large_transfer_through_small_buffers_is_intact() {
        let (mut client, mut server, relay, up, _) = pair().await;
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "payload corrupted through the relay");
        drop(server);
        drop(writer.await.unwrap());
        relay.await.unwrap().unwrap();
        assert_eq!(up.get(), data.len() as u64);
    }
}
