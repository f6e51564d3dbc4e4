//! A body that counts its bytes as they stream through, and can run a
//! callback when it is dropped: a response's metrics are recorded when its
//! last byte went out (or the client went away), not when its headers did.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use super::Body;

/// Called with the bytes that went through and the `grpc-status` the
/// trailers carried, if any.
type OnDrop = Box<dyn FnOnce(u64, Option<String>) + Send + Sync>;

pub struct Metered {
    inner: Body,
    count: Arc<AtomicU64>,
    grpc_status: Option<String>,
    on_drop: Option<OnDrop>,
    /// Held while the body lives (pool slots, a connection to give back).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Metered {
    /// Adds the bytes of `inner` to `count`.
    pub fn counting(inner: Body, count: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            count,
            grpc_status: None,
            on_drop: None,
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as the body.
    pub fn guarding(inner: Body, guard: impl Send + Sync + 'static) -> Self {
        Self {
            inner,
            count: Arc::new(AtomicU64::new(0)),
            grpc_status: None,
            on_drop: None,
            _guard: Some(Box::new(guard)),
        }
    }

    /// Calls `on_drop` with the bytes sent once the body is done with.
    pub fn recording(
        inner: Body,
        on_drop: impl FnOnce(u64, Option<String>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            count: Arc::new(AtomicU64::new(0)),
            grpc_status: None,
            on_drop: Some(Box::new(on_drop)),
            _guard: None,
        }
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            } else if let Some(s) = f
                .trailers_ref()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
            {
                this.grpc_status = Some(s.to_owned());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f(self.count.load(Ordering::Relaxed), self.grpc_status.take());
        }
    }
}

/// What a response said once its last byte went, for its metrics.
pub struct Finished {
    pub code: u16,
    /// The response flag of a reply the agent made, else `-`.
    pub flags: String,
    /// gRPC's status, from the trailers or the headers of a trailers-only
    /// response; `-` when none.
    pub grpc_status: String,
    pub response_bytes: u64,
}

impl Finished {
    /// The request's outcome for Istio's request metrics: `grpc` when the
    /// client spoke gRPC, `started` when its first byte came.
    pub fn outcome(
        &self,
        grpc: bool,
        started: std::time::Instant,
        request_bytes: u64,
    ) -> crate::telemetry::metrics::RequestOutcome<'_> {
        crate::telemetry::metrics::RequestOutcome {
            protocol: if grpc { "grpc" } else { "http" },
            code: self.code,
            grpc_status: if grpc { &self.grpc_status } else { "-" },
            flags: &self.flags,
            duration: started.elapsed(),
            request_bytes,
            response_bytes: self.response_bytes,
        }
    }
}

/// `resp` with its body metered: `done` learns how it ended once the body
/// is done with (the source's L7 path and the destination's alike).
pub fn when_done(
    resp: http::Response<Body>,
    done: impl FnOnce(Finished) + Send + Sync + 'static,
) -> http::Response<Body> {
    use http_body_util::BodyExt as _;
    let (parts, body) = resp.into_parts();
    let code = parts.status.as_u16();
    let text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (flags, grpc_status) = (text(super::FLAGS_HEADER), text("grpc-status"));
    let body = Metered::recording(body, move |response_bytes, trailer_status| {
        done(Finished {
            code,
            flags,
            grpc_status: trailer_status.unwrap_or(grpc_status),
            response_bytes,
        })
    });
    http::Response::from_parts(parts, body.boxed())
}
