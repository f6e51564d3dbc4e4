//! Request bodies that can be sent again: small ones are kept so that a
//! retry or a mirror can resend them; larger or unsized ones stream once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{Body, LocalReply, full, metered};

/// How long an HTTP/1.1 chunked request body may be held back to be read
/// (and checked) before anything goes upstream.
pub(super) const CHUNKED_HOLD: Duration = Duration::from_millis(50);

/// Request bodies up to this size are kept so that a retry or a mirror
/// can send them again; larger or unsized bodies stream once.
pub(super) const MAX_REPLAY: u64 = 64 * 1024;
/// A request body that can be sent more than once when it was small.
pub(super) enum Replay {
    Buffered(Bytes),
    Stream(Option<Body>),
}
impl Replay {
    /// Reads a small body now; `bytes` gets the body's size either way.
    /// An HTTP/1.1 body of unknown length (chunked) is read up to
    /// `MAX_REPLAY`, for at most `CHUNKED_HOLD`, before anything goes
    /// upstream, so that bad chunking early in it is refused here; HTTP/2
    /// bodies of unknown length (gRPC streams) are never held back.
    pub(super) async fn new(
        body: Incoming,
        bytes: &Arc<AtomicU64>,
        h1: bool,
    ) -> Result<Self, LocalReply> {
        let bad_body = |e: hyper::Error| {
            LocalReply::new(
                StatusCode::BAD_REQUEST,
                "DPE",
                format!("invalid request body: {e}"),
            )
        };
        let hint = hyper::body::Body::size_hint(&body);
        if h1 && hint.upper().is_none() {
            let mut body = body;
            let mut buf = bytes::BytesMut::new();
            // A client that streams slowly (or waits for the response
            // before finishing) is not held back for longer than this.
            let deadline = tokio::time::Instant::now() + CHUNKED_HOLD;
            loop {
                let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(f) => f,
                    Err(_) => {
                        let head = futures::stream::once(std::future::ready(
                            Ok::<_, hyper::Error>(hyper::body::Frame::data(buf.freeze())),
                        ));
                        let rest = http_body_util::BodyStream::new(metered::Metered::counting(
                            body.boxed(),
                            bytes.clone(),
                        ));
                        return Ok(Self::Stream(Some(
                            http_body_util::StreamBody::new(futures::StreamExt::chain(head, rest))
                                .boxed(),
                        )));
                    }
                };
                match frame {
                    None => {
                        bytes.store(buf.len() as u64, Ordering::Relaxed);
                        return Ok(Self::Buffered(buf.freeze()));
                    }
                    Some(Err(e)) => return Err(bad_body(e)),
                    Some(Ok(frame)) => {
                        // Trailers of a chunked request are not forwarded.
                        if let Ok(d) = frame.into_data() {
                            buf.extend_from_slice(&d);
                        }
                        if buf.len() as u64 > MAX_REPLAY {
                            bytes.store(buf.len() as u64, Ordering::Relaxed);
                            let head =
                                futures::stream::once(std::future::ready(Ok::<_, hyper::Error>(
                                    hyper::body::Frame::data(buf.freeze()),
                                )));
                            let rest = http_body_util::BodyStream::new(metered::Metered::counting(
                                body.boxed(),
                                bytes.clone(),
                            ));
                            let stream = futures::StreamExt::chain(head, rest);
                            return Ok(Self::Stream(Some(
                                http_body_util::StreamBody::new(stream).boxed(),
                            )));
                        }
                    }
                }
            }
        }
        if hint.upper().is_some_and(|u| u <= MAX_REPLAY) {
            // Bounded by the declared length, which hyper enforces.
            let b = body.collect().await.map_err(bad_body)?;
            let b = b.to_bytes();
            bytes.store(b.len() as u64, Ordering::Relaxed);
            return Ok(Self::Buffered(b));
        }
        Ok(Self::Stream(Some(
            metered::Metered::counting(body.boxed(), bytes.clone()).boxed(),
        )))
    }

    /// The body for the next attempt (`None`: already streamed away).
    pub(super) fn next(&mut self) -> Option<Body> {
        match self {
            Self::Buffered(b) => Some(full(b.clone())),
            Self::Stream(s) => s.take(),
        }
    }

    pub(super) fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }
}
