//! The HBONE client pool against an HTTP/2 CONNECT server on loopback
//! (plain TCP here: the pool is handed connected streams by its dialler;
//! TLS is the HBONE tests' business): sharing, limits, re-dialling, the
//! certificate generation a connection was dialled with, refusals, idling.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::{spiffe::SpiffeId, telemetry::metrics::Metrics, testing, workload::Workload};

/// A CONNECT server: answers `status` and echoes each stream; counts the
/// TCP connections it accepted. When stream number `close_after` ends, it
/// closes the connection (a peer going away between uses).
async fn server(status: StatusCode, close_after: Option<usize>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let streams = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(tokio::sync::Notify::new());
            let (seen, stop2) = (streams.clone(), stop.clone());
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                let last = close_after.is_some_and(|c| n >= c);
                let stop = stop2.clone();
                let up = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(u) = up.await {
                        let mut io = TokioIo::new(u);
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    if last {
                        stop.notify_one();
                    }
                });
                async move {
                    let mut r = Response::new(Empty::<Bytes>::new());
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(256)
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.notified() => {}
                }
            });
        }
    });
    (addr, conns)
}

fn key() -> PoolKey {
    PoolKey {
        source: Workload::for_tests("client", "default", &[]).key(),
        destination_node: "node-b".into(),
        destination_identity: SpiffeId::workload(testing::TRUST_DOMAIN, "default", "server"),
    }
}

fn pool() -> Arc<Pool> {
    Pool::new(Duration::from_secs(60), Arc::new(Metrics::new().unwrap()))
}

/// Opens a stream on `p` to `server`, dialling with plain TCP.
async fn open(p: &Pool, server: SocketAddr, generation: u64) -> Result<Tunnel, Error> {
    p.open(
        key(),
        "10.0.0.9:9000".parse().unwrap(),
        generation,
        || async move { Ok(TcpStream::connect(server).await?) },
    )
    .await
}

async fn echoes(t: &mut Tunnel) {
    t.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
}

#[tokio::test]
async fn streams_one_after_another_share_one_connection() {
    let (addr, conns) = server(StatusCode::OK, None).await;
    let p = pool();
    for _ in 0..50 {
        let mut t = open(&p, addr, 1).await.unwrap();
        echoes(&mut t).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn more_streams_than_one_connection_carries_dial_another() {
    let (addr, conns) = server(StatusCode::OK, None).await;
    let p = pool();
    let mut held = Vec::new();
    for _ in 0..(h2::STREAMS_PER_CONNECTION + 1) {
        held.push(open(&p, addr, 1).await.unwrap());
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "100 streams, then a second connection"
    );
    echoes(held.last_mut().unwrap()).await;
    // With a place free again, the next stream goes on an open connection.
    held.remove(0);
    held.push(open(&p, addr, 1).await.unwrap());
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_dialled_with_an_older_certificate_takes_no_new_stream() {
    let (addr, conns) = server(StatusCode::OK, None).await;
    let p = pool();
    let mut old = open(&p, addr, 1).await.unwrap();
    let mut new = open(&p, addr, 2).await.unwrap();
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "generation 2 needs its own connection"
    );
    // Both keep working; the older one is closed once idle.
    echoes(&mut old).await;
    echoes(&mut new).await;
    drop(old);
    p.reap(Duration::from_secs(60));
    assert_eq!(p.open_connections(), 1, "the superseded connection went");
    let mut again = open(&p, addr, 2).await.unwrap();
    echoes(&mut again).await;
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_peer_closed_is_replaced() {
    // The server closes each connection after its first stream.
    let (addr, conns) = server(StatusCode::OK, Some(1)).await;
    let p = pool();
    let mut t = open(&p, addr, 1).await.unwrap();
    echoes(&mut t).await;
    drop(t);
    // Wait until the pool has seen the peer close the connection.
    let mut gone = false;
    for _ in 0..200 {
        p.reap(Duration::from_secs(60));
        if p.open_connections() == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "the closed connection is still pooled");
    let mut t = open(&p, addr, 1).await.expect("re-dialled");
    echoes(&mut t).await;
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refusal_is_reported_with_the_status() {
    let (addr, _) = server(StatusCode::FORBIDDEN, None).await;
    let p = pool();
    match open(&p, addr, 1).await {
        Err(Error::HboneRefused { status, .. }) => assert_eq!(status, StatusCode::FORBIDDEN),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a stream"),
    }
}

#[tokio::test]
async fn idle_connections_are_closed_busy_ones_kept() {
    let (addr, _) = server(StatusCode::OK, None).await;
    let p = pool();
    let busy = open(&p, addr, 1).await.unwrap();
    p.reap(Duration::ZERO);
    assert_eq!(p.open_connections(), 1, "a connection with a stream stays");
    drop(busy);
    p.reap(Duration::ZERO);
    assert_eq!(p.open_connections(), 0, "idle, it goes");
}
