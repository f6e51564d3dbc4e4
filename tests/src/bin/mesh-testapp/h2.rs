//! HTTP/2 without TLS (h2c, prior knowledge) and gRPC-shaped traffic, for
//! the L7 tests:
//!
//! - `h2 NAME ADDR`: answers plain requests with `hello from NAME`, and
//!   gRPC requests (`content-type: application/grpc`) by echoing every
//!   length-prefixed message as it arrives, then `grpc-status: 0` in the
//!   trailers.
//! - `h2-count URL N [NAME:VALUE]...`: N requests on one HTTP/2
//!   connection; answers counted by server.
//! - `grpc-call URL MESSAGES`: one streaming call sending MESSAGES
//!   messages, one at a time, each answered before the next is sent
//!   (proves the stream is not buffered), then the trailers.

use std::{collections::BTreeMap, convert::Infallible};

use anyhow::{Context as _, Result, bail};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

pub async fn serve(name: &str, addr: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "{}",
        json!({"event": "listening", "local": listener.local_addr()?.to_string()})
    );
    loop {
        let (tcp, peer) = listener.accept().await?;
        let name = name.to_owned();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(answer(&name, peer, req).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn answer(
    name: &str,
    peer: std::net::SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !*crate::QUIET {
        println!(
            "{}",
            json!({"event": "h2", "path": req.uri().path(), "version": format!("{:?}", req.version()),
               "grpc": grpc, "peer": peer.to_string(),
               "te": req.headers().get("te").and_then(|v| v.to_str().ok())})
        );
    }
    if !grpc {
        let body = format!("hello from {name}: HTTP/2\n");
        return Response::new(Full::new(Bytes::from(body)).boxed());
    }
    // Echo each message as it arrives, then the trailers.
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut pending = BytesMut::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(d) = frame.into_data() {
                pending.extend_from_slice(&d);
                while let Some(msg) = take_message(&mut pending) {
                    if tx.send(Frame::data(msg)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("header value"));
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        "content-type",
        "application/grpc".parse().expect("header value"),
    );
    resp
}

/// One length-prefixed gRPC message (flag byte, 4-byte length, payload),
/// whole, from the front of `buf`.
fn take_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    Some(buf.split_to(5 + len).freeze())
}

fn message(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

async fn connect(url: &str) -> Result<(hyper::client::conn::http2::SendRequest<Body>, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let hostport = rest.split('/').next().unwrap_or(rest).to_owned();
    let tcp = tokio::net::TcpStream::connect(&hostport)
        .await
        .with_context(|| format!("connect {hostport}"))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok((sender, hostport))
}

pub async fn count(url: &str, n: usize, headers: &[&str]) -> Result<()> {
    let (mut sender, _) = connect(url).await?;
    let mut answers = BTreeMap::<String, u64>::new();
    for _ in 0..n {
        let mut req = Request::get(url).body(Full::new(Bytes::new()).boxed())?;
        for h in headers {
            let (k, v) = h.split_once(':').context("NAME:VALUE")?;
            req.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.trim().as_bytes())?,
                v.trim().parse()?,
            );
        }
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        let answer = if status == 200 {
            text.split(':').next().unwrap_or_default().to_owned()
        } else {
            format!("HTTP {}", status.as_u16())
        };
        *answers.entry(answer).or_default() += 1;
    }
    println!("{}", json!({"event": "counts", "answers": answers}));
    Ok(())
}

pub async fn grpc_call(url: &str, messages: usize) -> Result<()> {
    let (mut sender, _) = connect(url).await?;
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(1);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    let mut req = Request::post(url).body(StreamBody::new(stream).boxed())?;
    req.headers_mut()
        .insert("content-type", "application/grpc".parse()?);
    req.headers_mut().insert("te", "trailers".parse()?);
    sender.ready().await?;
    tx.send(Frame::data(message(b"message 0"))).await?;
    let resp = sender.send_request(req).await?;
    if resp.status() != 200 {
        bail!("HTTP {}", resp.status());
    }
    // A trailers-only response (a refusal) has its status in the headers.
    let mut status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let mut body = resp.into_body();
    let mut echoed = 0usize;
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(t) = frame.trailers_ref() {
            status = t
                .get("grpc-status")
                .map(|v| v.to_str().unwrap_or("?").to_owned());
            continue;
        }
        if let Ok(d) = frame.into_data() {
            pending.extend_from_slice(&d);
            while let Some(mut m) = take_message(&mut pending) {
                m.advance(5);
                let want = format!("message {echoed}");
                if m != want.as_bytes() {
                    bail!("echo {echoed}: got {m:?}");
                }
                echoed += 1;
                // The next message only once this one came back.
                if echoed < messages {
                    tx.send(Frame::data(message(format!("message {echoed}").as_bytes())))
                        .await?;
                }
            }
            if echoed == messages {
                // End the request stream: the server then sends trailers.
                break;
            }
        }
    }
    drop(tx);
    while let Some(frame) = body.frame().await {
        if let Some(t) = frame?.trailers_ref() {
            status = t
                .get("grpc-status")
                .map(|v| v.to_str().unwrap_or("?").to_owned());
        }
    }
    println!(
        "{}",
        json!({"event": "grpc", "echoed": echoed, "grpc_status": status})
    );
    if echoed != messages || status.as_deref() != Some("0") {
        bail!("echoed {echoed} of {messages}, grpc-status {status:?}");
    }
    Ok(())
}
