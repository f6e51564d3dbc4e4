//! Ending an HTTP client connection when the agent drains (a hand-over
//! to the next agent, or a shutdown) without failing a request.
//!
//! HTTP/2 has a way to say it: GOAWAY. The client's open streams finish
//! and it sends new ones on a new connection, which the next agent
//! accepts. HTTP/1.1 has none that is safe between requests: a close on an
//! idle keep-alive connection races a request the client may already be
//! sending. So an HTTP/1.1 connection is told on its next response
//! (`Connection: close`, as Envoy does while draining) and closes once that
//! response is written; one that stays idle is closed at the drain
//! deadline, when the agent exits.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::Body;

/// Serves one client connection with the agent's HTTP server
/// ([`super::server`]: HTTP/1.1 and HTTP/2, upgrades allowed), each request
/// answered by `handle`, until the connection ends or — once `draining` is
/// cancelled — is drained as above.
pub(in crate::proxy) async fn serve_http<T, H, F>(
    io: T,
    draining: &CancellationToken,
    header_timeout: std::time::Duration,
    handle: H,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain = Arc::new(Drain::default());
    let service = {
        let (drain, draining, handle) = (drain.clone(), draining.clone(), Arc::new(handle));
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (drain, draining, handle) = (drain.clone(), draining.clone(), handle.clone());
            async move {
                let version = req.version();
                let mut resp = handle(req).await;
                drain.respond(version, &draining, &mut resp);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let builder = super::server(header_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    drain.serve(conn, draining, |c| c.graceful_shutdown()).await
}

/// One client connection's side of the drain.
#[derive(Default)]
struct Drain {
    /// The client spoke HTTP/2 (it sent a request over it).
    h2: AtomicBool,
}

impl Drain {
    /// Notes the protocol a request came in, and asks an HTTP/1.1 client to
    /// close after `resp` while the agent drains.
    fn respond<B>(&self, version: Version, draining: &CancellationToken, resp: &mut Response<B>) {
        if version == Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        } else if draining.is_cancelled() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// Drives `conn` (hyper's server connection) to its end. When the
    /// agent drains, an HTTP/2 connection gets GOAWAY through `goaway`
    /// (hyper's `graceful_shutdown`); an HTTP/1.1 one is left to its next
    /// response.
    async fn serve<C, T>(
        &self,
        mut conn: Pin<&mut C>,
        draining: &CancellationToken,
        goaway: impl FnOnce(Pin<&mut C>),
    ) -> T
    where
        C: Future<Output = T>,
    {
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            () = draining.cancelled() => {}
        }
        if self.h2.load(Ordering::Relaxed) {
            goaway(conn.as_mut());
        }
        conn.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_responses_ask_to_close_only_while_draining() {
        let d = Drain::default();
        let draining = CancellationToken::new();
        let close = |d: &Drain, v, status| {
            let mut r = Response::new(());
            *r.status_mut() = status;
            d.respond(v, &draining, &mut r);
            r.headers().get(header::CONNECTION).cloned()
        };
        assert_eq!(close(&d, Version::HTTP_11, StatusCode::OK), None);
        draining.cancel();
        assert_eq!(
            close(&d, Version::HTTP_11, StatusCode::OK),
            Some(HeaderValue::from_static("close"))
        );
        // An upgrade's 101 keeps its connection: it becomes the tunnel.
        assert_eq!(
            close(&d, Version::HTTP_11, StatusCode::SWITCHING_PROTOCOLS),
            None
        );
        // HTTP/2 has GOAWAY; `Connection` is not allowed there.
        assert_eq!(close(&d, Version::HTTP_2, StatusCode::OK), None);
        assert!(d.h2.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn only_an_http2_connection_gets_goaway() {
        for h2 in [false, true] {
            let d = Drain::default();
            d.h2.store(h2, Ordering::Relaxed);
            let draining = CancellationToken::new();
            draining.cancel();
            let conn = std::future::ready(());
            tokio::pin!(conn);
            let mut told = false;
            d.serve(conn.as_mut(), &draining, |_| told = true).await;
            // A ready connection ends before the drain is looked at.
            assert!(!told);
            let conn = std::future::pending::<()>();
            tokio::pin!(conn);
            let r = tokio::time::timeout(
                std::time::Duration::from_millis(10),
                d.serve(conn.as_mut(), &draining, |_| told = true),
            )
            .await;
            assert!(r.is_err(), "a pending connection stays pending");
            assert_eq!(told, h2);
        }
    }
}
