//! The HBONE client pool against an HTTP/2 CONNECT server on loopback
//! (plain TCP here: the pool is handed connected streams by its dialler;
//! TLS is the HBONE tests' business): sharing, limits, re-dialling, the
//! certificate generation a connection was dialled with, refusals, idling,
//! and the bounds on every wait: dial timeout, keepalive, maximum age.

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

fn settings() -> Settings {
    Settings {
        idle: Duration::from_secs(60),
        max_age: Duration::from_secs(3600),
        dial_timeout: Duration::from_secs(10),
        keepalive_interval: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(5),
    }
}

fn pool() -> Arc<Pool> {
    pool_with(settings())
}

fn pool_with(s: Settings) -> Arc<Pool> {
    Pool::new(s, Arc::new(Metrics::new().unwrap()))
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

/// A TCP relay to `server` that can freeze: from then on the connections it
/// relays carry nothing either way and are never closed (a peer node that
/// died without a word, or a cut link); later connections pass.
async fn freezing_relay(server: SocketAddr) -> (SocketAddr, Arc<tokio::sync::watch::Sender<bool>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (frozen, _) = tokio::sync::watch::channel(false);
    let frozen = Arc::new(frozen);
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let mut freeze = f.subscribe();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(server).await else {
                    return;
                };
                let (mut a, mut b) = (client, upstream);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    // A freeze after this connection was accepted.
                    () = async {
                        loop {
                            if freeze.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                            if *freeze.borrow() {
                                break;
                            }
                        }
                    } => {
                        // Hold both ends open, silent, for good.
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    (addr, frozen)
}

#[tokio::test]
async fn a_peer_that_stops_answering_is_noticed_by_keepalive_and_replaced() {
    let (server_addr, conns) = server(StatusCode::OK, None).await;
    let (relay, frozen) = freezing_relay(server_addr).await;
    let p = pool_with(Settings {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(100),
        ..settings()
    });
    let mut t = open(&p, relay, 1).await.unwrap();
    echoes(&mut t).await;
    frozen.send_replace(true);
    // The next stream would go on the frozen connection and wait for good;
    // the unanswered PING closes it and the pool dials again.
    let mut t2 = tokio::time::timeout(Duration::from_secs(5), open(&p, relay, 1))
        .await
        .expect("a stream on a dead connection waited on TCP")
        .expect("re-dialled");
    echoes(&mut t2).await;
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_dial_that_hangs_times_out_and_holds_up_no_stream_that_fits() {
    let (addr, _) = server(StatusCode::OK, None).await;
    let p = pool_with(Settings {
        dial_timeout: Duration::from_millis(500),
        ..settings()
    });
    let mut held = open(&p, addr, 1).await.unwrap();
    // A newer certificate needs a new connection; its peer never answers.
    let hanging = p.open(key(), "10.0.0.9:9000".parse().unwrap(), 2, || async {
        std::future::pending::<Result<TcpStream, Error>>().await
    });
    let fits = async {
        // Once the dial is under way: a stream that fits on the open
        // connection does not wait for it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let mut t = open(&p, addr, 1).await.unwrap();
        echoes(&mut t).await;
        started.elapsed()
    };
    let (hung, waited) = tokio::join!(hanging, fits);
    assert!(
        waited < Duration::from_millis(300),
        "a stream with room on an open connection waited {waited:?} for another's dial"
    );
    match hung {
        Err(Error::ConnectTimeout { timeout, .. }) => {
            assert_eq!(timeout, Duration::from_millis(500))
        }
        Err(e) => panic!("expected a dial timeout, got {e}"),
        Ok(_) => panic!("expected a dial timeout, got a stream"),
    }
    echoes(&mut held).await;
}

#[tokio::test]
async fn openers_that_need_a_connection_share_one_dial() {
    let (addr, conns) = server(StatusCode::OK, None).await;
    let p = pool();
    let opens: Vec<_> = (0..20).map(|_| open(&p, addr, 1)).collect();
    for t in futures::future::join_all(opens).await {
        echoes(&mut t.unwrap()).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_past_its_maximum_age_takes_no_new_stream() {
    let (addr, conns) = server(StatusCode::OK, None).await;
    let p = pool_with(Settings {
        max_age: Duration::from_millis(200),
        ..settings()
    });
    let mut old = open(&p, addr, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut new = open(&p, addr, 1).await.unwrap();
    assert_eq!(conns.load(Ordering::SeqCst), 2, "too old: a new connection");
    // The old one keeps its stream, and goes once that ends.
    echoes(&mut old).await;
    echoes(&mut new).await;
    drop((old, new));
    p.reap(Duration::from_secs(60));
    assert_eq!(
        p.open_connections(),
        1,
        "idle, the old one went; the new one stays"
    );
}
