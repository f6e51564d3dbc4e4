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

type OnDrop = Box<dyn FnOnce(u64) + Send + Sync>;

pub struct Metered {
    inner: Body,
    count: Arc<AtomicU64>,
    on_drop: Option<OnDrop>,
}

impl Metered {
    /// Adds the bytes of `inner` to `count`.
    pub fn counting(inner: Body, count: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            count,
            on_drop: None,
        }
    }

    /// Calls `on_drop` with the bytes sent once the body is done with.
    pub fn recording(inner: Body, on_drop: impl FnOnce(u64) + Send + Sync + 'static) -> Self {
        Self {
            inner,
            count: Arc::new(AtomicU64::new(0)),
            on_drop: Some(Box::new(on_drop)),
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
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
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
            f(self.count.load(Ordering::Relaxed));
        }
    }
}
