//! Upstream HTTP connections kept for reuse by every client connection of
//! the same pod (they are opened from the pod, with its identity): an
//! HTTP/2 connection is shared by concurrent requests, an HTTP/1.1 one
//! serves one request at a time and waits idle in between. Bounded: at
//! most `MAX_IDLE` idle HTTP/1.1 connections per endpoint, none kept past
//! `IDLE_TIMEOUT`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::Body;

/// Idle HTTP/1.1 connections kept per (pod, endpoint).
const MAX_IDLE: usize = 32;

/// An idle connection older than this is closed rather than reused (it
/// also holds an HBONE stream open).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request sender on an upstream connection, and the requests it carried.
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

#[derive(Default)]
struct Idle {
    h2: Option<(
        hyper::client::conn::http2::SendRequest<Body>,
        usize,
        Instant,
    )>,
    h1: Vec<(
        hyper::client::conn::http1::SendRequest<Body>,
        usize,
        Instant,
    )>,
}

/// (source pod, endpoint).
type Key = (String, SocketAddr);

#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Idle>>,
}

impl Upstreams {
    /// A connection to `addr` for `pod` that is not known to be closed,
    /// with the requests it carried; `None` to open a new one.
    pub fn take(&self, pod: &str, addr: SocketAddr, h2: bool) -> Option<(Sender, usize)> {
        let mut map = self.idle.lock().expect("upstreams lock");
        let idle = map.get_mut(&(pod.to_owned(), addr))?;
        let now = Instant::now();
        if h2 {
            match &idle.h2 {
                Some((s, uses, at)) if !s.is_closed() && now - *at < IDLE_TIMEOUT => {
                    let taken = (Sender::H2(s.clone()), *uses);
                    idle.h2 = Some((s.clone(), uses + 1, now));
                    return Some(taken);
                }
                _ => idle.h2 = None,
            }
            return None;
        }
        while let Some((s, uses, at)) = idle.h1.pop() {
            if !s.is_closed() && now - at < IDLE_TIMEOUT {
                return Some((Sender::H1(s), uses));
            }
        }
        None
    }

    /// Keeps a connection for the next request (an HTTP/2 one at once, an
    /// HTTP/1.1 one when its response is done).
    pub fn put(&self, pod: &str, addr: SocketAddr, sender: Sender, uses: usize) {
        let mut map = self.idle.lock().expect("upstreams lock");
        let idle = map.entry((pod.to_owned(), addr)).or_default();
        match sender {
            Sender::H2(s) => idle.h2 = Some((s, uses, Instant::now())),
            Sender::H1(s) => {
                if idle.h1.len() < MAX_IDLE && !s.is_closed() {
                    idle.h1.push((s, uses, Instant::now()));
                }
            }
        }
    }

    /// Drops connections that are closed or idle too long (called
    /// periodically, so idle pods do not keep HBONE streams open).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut map = self.idle.lock().expect("upstreams lock");
        map.retain(|_, idle| {
            idle.h1
                .retain(|(s, _, at)| !s.is_closed() && now - *at < IDLE_TIMEOUT);
            if idle
                .h2
                .as_ref()
                .is_some_and(|(s, _, at)| s.is_closed() || now - *at >= IDLE_TIMEOUT)
            {
                idle.h2 = None;
            }
            idle.h2.is_some() || !idle.h1.is_empty()
        });
    }
}

/// Puts an HTTP/1.1 connection back in the pool once the response it
/// carried is done with.
pub struct GiveBack {
    pub pool: Arc<Upstreams>,
    pub pod: String,
    pub addr: SocketAddr,
    pub sender: Option<(Sender, usize)>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some((s, uses)) = self.sender.take() {
            self.pool.put(&self.pod, self.addr, s, uses);
        }
    }
}
