//! Moving bytes both ways with bounded buffers, honouring half-close, and
//! counting them into the connection's metrics as they pass.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose reads add to a counter.
struct Counted<S> {
    inner: S,
    read: IntCounter,
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
            self.read.inc_by((buf.filled().len() - before) as u64);
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
/// reverse direction keeps flowing (TCP half-close). Each direction uses one
/// buffer of `buf_size` bytes. Returns (client→upstream, upstream→client) bytes.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    from_client: IntCounter,
    from_upstream: IntCounter,
    buf_size: usize,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Counted {
        inner: client,
        read: from_client,
    };
    let mut u = Counted {
        inner: upstream,
        read: from_upstream,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, buf_size, buf_size).await
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
        let relay = tokio::spawn(relay(accepted, upstream, up.clone(), down.clone(), 1024));
        (client, server, relay, up, down)
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
