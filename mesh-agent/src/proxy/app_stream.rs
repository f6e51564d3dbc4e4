//! The agent's end of a connection with an application in the same pod.
//!
//! With the fast path on, what the application sends is put straight into
//! this socket's queue by `sk_msg`, which the kernel does not bound; the
//! application may run only `FAST_WINDOW` bytes ahead of what the agent has
//! read (see `mesh_common::fast`). So this stream reports its reads, every
//! `FAST_CREDIT_EVERY` bytes, and forgets the report when it closes. Without
//! reports the application merely falls back to TCP: the window fails safe.

use std::{
    io::{self, IoSlice},
    net::SocketAddr,
    ops::Deref,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use mesh_common::fast::FAST_CREDIT_EVERY;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Where the agent reports what it has read from its fast-path sockets: the
/// kernel's `mesh_fast_read` map in the agent (see `app`).
pub trait FastPathCredit: Send + Sync {
    /// The agent has read `total` bytes so far from its socket `local` ⇄
    /// `peer` in the network namespace `netns_cookie`.
    fn read(&self, netns_cookie: u64, local: SocketAddr, peer: SocketAddr, total: u64);
    /// That socket is closing.
    fn closed(&self, netns_cookie: u64, local: SocketAddr, peer: SocketAddr);
}

/// A connection with an application, as a `TcpStream` (it derefs to one)
/// whose reads return fast-path credit.
pub struct AppStream {
    inner: TcpStream,
    credit: Option<Credit>,
}

struct Credit {
    to: Arc<dyn FastPathCredit>,
    netns_cookie: u64,
    /// (local, peer), looked up at the first report: most connections
    /// never read a quarter window and never need them.
    addrs: Option<(SocketAddr, SocketAddr)>,
    read: u64,
    reported: u64,
}

impl AppStream {
    /// Wraps `inner`; with `to`, reads are reported there.
    pub fn new(inner: TcpStream, netns_cookie: u64, to: Option<&Arc<dyn FastPathCredit>>) -> Self {
        let credit = to.map(|to| Credit {
            to: to.clone(),
            netns_cookie,
            addrs: None,
            read: 0,
            reported: 0,
        });
        Self { inner, credit }
    }

    fn count(&mut self, n: usize) {
        let Some(c) = &mut self.credit else { return };
        c.read += n as u64;
        if c.read - c.reported < FAST_CREDIT_EVERY {
            return;
        }
        if c.addrs.is_none() {
            let (Ok(local), Ok(peer)) = (self.inner.local_addr(), self.inner.peer_addr()) else {
                // No address, no key: the application falls back to TCP.
                self.credit = None;
                return;
            };
            c.addrs = Some((local, peer));
        }
        let (local, peer) = c.addrs.expect("set above");
        c.to.read(c.netns_cookie, local, peer, c.read);
        c.reported = c.read;
    }
}

impl Drop for AppStream {
    fn drop(&mut self) {
        // Reported at least once exactly when the addresses were looked up.
        if let Some(c) = &self.credit
            && let Some((local, peer)) = c.addrs
        {
            c.to.closed(c.netns_cookie, local, peer);
        }
    }
}

impl Deref for AppStream {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for AppStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            self.count(n);
        }
        r
    }
}

impl AsyncWrite for AppStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[derive(Default)]
    struct Reports(Mutex<Vec<Option<u64>>>);

    impl FastPathCredit for Reports {
        fn read(&self, _: u64, _: SocketAddr, _: SocketAddr, total: u64) {
            self.0.lock().unwrap().push(Some(total));
        }
        fn closed(&self, _: u64, _: SocketAddr, _: SocketAddr) {
            self.0.lock().unwrap().push(None);
        }
    }

    #[tokio::test]
    async fn reads_are_reported_every_quarter_window_and_forgotten_at_close() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let reports = Arc::new(Reports::default());
        let to: Arc<dyn FastPathCredit> = reports.clone();
        let mut agent = AppStream::new(accepted, 7, Some(&to));

        let total = 4 * FAST_CREDIT_EVERY + 10;
        let writer = tokio::spawn(async move {
            app.write_all(&vec![1u8; total as usize]).await.unwrap();
            app
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0u64;
        while got < total {
            got += agent.read(&mut buf).await.unwrap() as u64;
        }
        drop(writer.await.unwrap());
        let seen: Vec<u64> = reports
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.unwrap())
            .collect();
        // A report once a quarter window has been read since the last one,
        // so the sender's credit never lags by a quarter window or more.
        assert!(seen.len() >= 3, "{seen:?}");
        assert!(seen[0] >= FAST_CREDIT_EVERY, "{seen:?}");
        assert!(
            seen.windows(2).all(|w| w[1] - w[0] >= FAST_CREDIT_EVERY),
            "{seen:?}"
        );
        assert!(total - seen[seen.len() - 1] < FAST_CREDIT_EVERY, "{seen:?}");
        drop(agent);
        assert_eq!(reports.0.lock().unwrap().last(), Some(&None));
    }
}
