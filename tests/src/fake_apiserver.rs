//! A fake Kubernetes API server: real HTTP on a real socket, serving
//! `list` and streaming `watch` the way kube-apiserver does, so the agent's
//! real kube-rs client and transport are what the tests exercise.
//!
//! * Collections are registered by path (`/api/v1/pods`,
//!   `/apis/networking.istio.io/v1/virtualservices`); anything else is 404,
//!   as a CRD that is not installed.
//! * Every change gets the next resource version and is kept in a history,
//!   so a watch from version N replays what came after N.
//! * `expire` answers open watches with `410 Gone` (and refuses watches from
//!   older versions) — the client must list again; `drop_watches` closes
//!   them — the client must watch again from the last version it saw.
//! * `GET <collection>/<name>` reads one object of a cluster-scoped
//!   collection (the agent reads its own Node).
//! * Field selectors `a.b=x` and `a.b!=x` are honoured unless
//!   `ignore_field_selectors` is set (a server that misbehaves).
//! * `fail_with(Some(503))` answers everything with that status and closes
//!   the watches, until `fail_with(None)`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming},
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

impl Logged {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

#[derive(Clone)]
struct Change {
    collection: String,
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Clone)]
enum Signal {
    Change(Change),
    Expire,
    Drop,
}

#[derive(Default)]
struct State {
    collections: BTreeMap<String, BTreeMap<String, Value>>,
    history: Vec<Change>,
    rv: u64,
    /// Watches from a version before this are `410 Gone`.
    compacted: u64,
    ignore_field_selectors: bool,
    /// Every request answered with this status (an API server in trouble).
    failing: Option<u16>,
    requests: Vec<Logged>,
}

/// The running server; dropping it stops it.
pub struct FakeApiServer {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
    _runtime: std::thread::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl FakeApiServer {
    /// Serves on `listener` (bound wherever the test needs it, e.g. inside
    /// a network namespace) from a thread of its own.
    pub fn start(listener: std::net::TcpListener) -> Self {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("listener address");
        let state = Arc::new(Mutex::new(State::default()));
        let (signals, _) = broadcast::channel(4096);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (st, sig) = (state.clone(), signals.clone());
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = stopped => {}
                    _ = accept(listener, st, sig) => {}
                }
            });
        });
        Self {
            addr,
            state,
            signals,
            _runtime: runtime,
            stop: Some(stop),
        }
    }

    /// A kubeconfig for clients of this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.addr
        )
    }

    /// Serves `collection` (empty until objects are applied).
    pub fn register(&self, collection: &str) {
        self.state
            .lock()
            .unwrap()
            .collections
            .entry(collection.into())
            .or_default();
    }

    /// Creates or replaces `object` in `collection`; watchers see it.
    pub fn apply(&self, collection: &str, object: Value) -> u64 {
        self.change(collection, object, true)
    }

    /// Changes `object` without telling watchers, as if the event had been
    /// compacted away: only a new list shows it.
    pub fn apply_silently(&self, collection: &str, object: Value) -> u64 {
        self.change(collection, object, false)
    }

    fn change(&self, collection: &str, mut object: Value, notify: bool) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key(&object);
        let objects = s.collections.entry(collection.into()).or_default();
        let kind = if objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        objects.insert(key, object.clone());
        if notify {
            let c = Change {
                collection: collection.into(),
                rv,
                kind,
                object,
            };
            s.history.push(c.clone());
            let _ = self.signals.send(Signal::Change(c));
        }
        rv
    }

    /// Deletes `namespace/name` (or `name`) from `collection`.
    pub fn delete(&self, collection: &str, key: &str) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        if let Some(mut object) = s
            .collections
            .get_mut(collection)
            .and_then(|c| c.remove(key))
        {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let c = Change {
                collection: collection.into(),
                rv,
                kind: "DELETED",
                object,
            };
            s.history.push(c.clone());
            let _ = self.signals.send(Signal::Change(c));
        }
    }

    /// `410 Gone` to every open watch, and to watches from older versions.
    pub fn expire(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv;
        let _ = self.signals.send(Signal::Expire);
    }

    /// Closes every open watch stream.
    pub fn drop_watches(&self) {
        let _ = self.signals.send(Signal::Drop);
    }

    /// From now on every request is answered with `status` (`500`,
    /// `503`…), and the open watches are closed; `None` heals it.
    pub fn fail_with(&self, status: Option<u16>) {
        self.state.lock().unwrap().failing = status;
        if status.is_some() {
            let _ = self.signals.send(Signal::Drop);
        }
    }

    pub fn ignore_field_selectors(&self, ignore: bool) {
        self.state.lock().unwrap().ignore_field_selectors = ignore;
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().unwrap().rv
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn key(o: &Value) -> String {
    let name = o["metadata"]["name"].as_str().unwrap_or_default();
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (state, signals) = (state.clone(), signals.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (state, signals) = (state.clone(), signals.clone());
                async move { Ok::<_, Infallible>(handle(req, &state, &signals)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Whether `o` passes a field selector such as `spec.nodeName=a,x!=y`.
fn selected(o: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (path, want, eq) = match term.split_once("!=") {
            Some((p, w)) => (p, w, false),
            None => match term.split_once('=') {
                Some((p, w)) => (p, w.trim_start_matches('='), true),
                None => return true,
            },
        };
        let got = path
            .split('.')
            .fold(o, |v, k| &v[k])
            .as_str()
            .unwrap_or_default();
        (got == want) == eq
    })
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(
    req: Request<Incoming>,
    state: &Mutex<State>,
    signals: &broadcast::Sender<Signal>,
) -> Resp {
    let path = req.uri().path().to_owned();
    let q = query(req.uri().query());
    let mut s = state.lock().unwrap();
    s.requests.push(Logged {
        path: path.clone(),
        query: q.clone(),
    });
    if let Some(code) = s.failing {
        let status_code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return json_response(
            status_code,
            &status(
                code,
                "InternalError",
                "the fake API server is failing on purpose",
            ),
        );
    }
    // One cluster-scoped object (`GET /api/v1/nodes/NAME`).
    if !s.collections.contains_key(&path)
        && let Some((collection, name)) = path.rsplit_once('/')
        && let Some(objects) = s.collections.get(collection)
    {
        return match objects.get(name) {
            Some(o) => json_response(StatusCode::OK, o),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("{name} not found")),
            ),
        };
    }
    let Some(objects) = s.collections.get(&path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let selector = if s.ignore_field_selectors {
        None
    } else {
        q.get("fieldSelector").cloned()
    };
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watch {
        let items: Vec<Value> = objects
            .values()
            .filter(|o| selected(o, selector.as_ref()))
            .cloned()
            .collect();
        let list = json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        return json_response(StatusCode::OK, &list);
    }
    let since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    let gone = move || {
        line(json!({"type": "ERROR",
                    "object": status(410, "Expired", "too old resource version")}))
    };
    if since < s.compacted {
        let _ = tx.send(gone());
        drop(tx);
        return stream_response(rx);
    }
    // Subscribe before reading the history, under the lock: no change can
    // fall between the two.
    let mut live = signals.subscribe();
    let event = move |c: &Change| line(json!({"type": c.kind, "object": c.object}));
    for c in s
        .history
        .iter()
        .filter(|c| c.collection == path && c.rv > since && selected(&c.object, selector.as_ref()))
    {
        let _ = tx.send(event(c));
    }
    let mut last = s.rv.max(since);
    drop(s);
    tokio::spawn(async move {
        loop {
            match live.recv().await {
                Ok(Signal::Change(c)) => {
                    if c.collection == path && c.rv > last && selected(&c.object, selector.as_ref())
                    {
                        last = c.rv;
                        if tx.send(event(&c)).is_err() {
                            return;
                        }
                    }
                }
                Ok(Signal::Expire) => {
                    let _ = tx.send(gone());
                    return;
                }
                Ok(Signal::Drop) | Err(_) => return,
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Resp {
    let mut r = Response::new(BoxBody::new(Lines(rx)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A response body fed by a channel: ends when the sender is dropped.
struct Lines(mpsc::UnboundedReceiver<Bytes>);

impl Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Runs `f` in network namespace `netns` (a name under /run/netns), on a
/// thread of its own: a socket created there stays in that namespace.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}
