//! Restarting or upgrading the agent without refusing a connection.
//!
//! The running agent offers its listening sockets at a Unix socket
//! (`--handover-socket`). A new agent that finds it there asks for them
//! before it binds anything, and receives the very sockets — every pod's
//! outbound, inbound and HBONE listener and the agent's own endpoints —
//! over `SCM_RIGHTS`. Nothing is closed or re-bound, so a connect during the
//! hand-over waits in the same accept queue it always did. The new agent
//! enrols the pods on them but accepts only once it is ready (pods
//! enrolled, certificates issued); then it says `Ready`, and the old agent
//! stops accepting, tells its HBONE peers GOAWAY, drains, and waits for its
//! SIGTERM. If the new agent goes away before `Ready`, the old one simply
//! keeps serving.
//!
//! Chosen over `SO_REUSEPORT` (closing the old listener resets the
//! connections in its accept queue unless `tcp_migrate_req` is set in every
//! pod's namespace) and `pidfd_getfd` (needs ptrace rights and a side
//! channel anyway to say which descriptor is which).

#[allow(
    unsafe_code,
    reason = "SCM_RIGHTS and seqpacket sockets have no safe wrapper in std or socket2"
)]
pub mod wire;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot, watch};
use wire::{Listener, Message};

/// Bound on each exchange before `Ready` (both sides are local processes).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hand-over socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hand-over from the agent at {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error(
        "not ready within --handover-timeout {0:?} of receiving the running agent's sockets; it \
         keeps serving"
    )]
    NotReady(Duration),
}

/// Sockets to hand over, with the message that names them.
pub struct Offered {
    pub msg: Message,
    pub fds: Vec<OwnedFd>,
}

/// What the offering side's thread asks of the agent.
pub enum Event {
    /// A successor asks for the listeners: reply with them.
    Requested {
        pid: u32,
        reply: oneshot::Sender<Vec<Offered>>,
    },
    /// The successor is ready and accepting: stop accepting and drain.
    TakenOver { pid: u32 },
    /// The successor went away or was not ready in time: this agent
    /// serves on as before.
    Abandoned,
}

/// Offers this agent's listeners at `path` to the next agent. The thread
/// ends once one has taken over.
pub fn offer(path: &Path, ready_timeout: Duration) -> Result<mpsc::Receiver<Event>, Error> {
    let sock_err = |source| Error::Socket {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    let listener = wire::listen(path).map_err(sock_err)?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || serve(&listener, &tx, ready_timeout))
        .map_err(sock_err)?;
    Ok(rx)
}

fn serve(listener: &OwnedFd, events: &mpsc::Sender<Event>, ready_timeout: Duration) {
    loop {
        let conn = match wire::accept(listener) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("hand-over: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Over once a successor took over (or the agent is exiting).
        match hand_over(&conn, events, ready_timeout) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("hand-over abandoned, still serving: {e}");
                if events.blocking_send(Event::Abandoned).is_err() {
                    return;
                }
            }
        }
    }
}

/// One successor's request, to its `Ready` (or the agent's exit).
fn hand_over(
    conn: &OwnedFd,
    events: &mpsc::Sender<Event>,
    ready_timeout: Duration,
) -> io::Result<()> {
    wire::same_user(conn)?;
    wire::set_timeout(conn, Some(EXCHANGE_TIMEOUT))?;
    let pid = match wire::recv(conn)? {
        Some((Message::Hello { version, pid }, _)) => {
            tracing::info!(pid, %version, "hand-over: a new agent asks for the listeners");
            pid
        }
        other => return Err(unexpected("Hello", other)),
    };
    let (reply, answer) = oneshot::channel();
    if events
        .blocking_send(Event::Requested { pid, reply })
        .is_err()
    {
        return Ok(());
    }
    let Ok(offered) = answer.blocking_recv() else {
        return Ok(());
    };
    let mut sockets = 0;
    for o in &offered {
        let fds: Vec<_> = o.fds.iter().map(AsFd::as_fd).collect();
        wire::send(conn, &o.msg, &fds)?;
        sockets += fds.len();
    }
    wire::send(conn, &Message::End, &[])?;
    tracing::info!(
        pid,
        sockets,
        "hand-over: listeners sent; serving on them until the new agent is ready"
    );
    // Longer than the successor's own deadline, so it is the one to give up.
    wire::set_timeout(conn, Some(ready_timeout + EXCHANGE_TIMEOUT))?;
    match wire::recv(conn) {
        Ok(Some((Message::Ready, _))) => {}
        Ok(None) => {
            return Err(io::Error::other(
                "the new agent went away before it was ready",
            ));
        }
        Ok(other) => return Err(unexpected("Ready", other)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(io::Error::other(format!(
                "the new agent was not ready within {ready_timeout:?}"
            )));
        }
        Err(e) => return Err(e),
    }
    let _ = events.blocking_send(Event::TakenOver { pid });
    let _ = wire::send(conn, &Message::Leaving, &[]);
    Ok(())
}

fn unexpected(wanted: &str, got: Option<(Message, Vec<OwnedFd>)>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("expected {wanted}, got {:?}", got.map(|(m, _)| m)),
    )
}

/// What a new agent received from the one it replaces.
pub struct Taken {
    conn: OwnedFd,
    path: PathBuf,
    /// The running agent's process.
    pub from_pid: u32,
    /// Its HTTP endpoints' listeners, by address.
    pub endpoints: HashMap<SocketAddr, std::net::TcpListener>,
    /// Each pod's listeners, by pod key.
    pub pods: HashMap<String, Vec<(Listener, std::net::TcpListener)>>,
}

/// Asks a running agent at `path` for its listeners; `None` when no agent
/// offers them (nothing there, or a stale socket of one that died).
pub fn take(path: &Path) -> Result<Option<Taken>, Error> {
    let sock_err = |source| Error::Socket {
        path: path.into(),
        source,
    };
    let protocol = |what: String| Error::Protocol {
        path: path.into(),
        what,
    };
    let conn = match wire::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(sock_err(e)),
    };
    let from_pid = wire::same_user(&conn).map_err(sock_err)?;
    wire::set_timeout(&conn, Some(EXCHANGE_TIMEOUT)).map_err(sock_err)?;
    let hello = Message::Hello {
        version: crate::BUILD.into(),
        pid: std::process::id(),
    };
    wire::send(&conn, &hello, &[]).map_err(sock_err)?;
    let mut taken = Taken {
        conn,
        path: path.into(),
        from_pid,
        endpoints: HashMap::new(),
        pods: HashMap::new(),
    };
    loop {
        let (msg, fds) = wire::recv(&taken.conn)
            .map_err(sock_err)?
            .ok_or_else(|| protocol("the running agent closed the connection".into()))?;
        match msg {
            Message::Endpoint { addr } => {
                let [fd] = <[OwnedFd; 1]>::try_from(fds).map_err(|f| {
                    protocol(format!("endpoint {addr} came with {} sockets", f.len()))
                })?;
                taken
                    .endpoints
                    .insert(addr, listening_at(fd, addr).map_err(protocol)?);
            }
            Message::Pod { key, listeners } => {
                if fds.len() != listeners.len() {
                    return Err(protocol(format!(
                        "pod {key}: {} listeners named, {} sockets sent",
                        listeners.len(),
                        fds.len()
                    )));
                }
                let mut ls = Vec::new();
                for (l, fd) in listeners.into_iter().zip(fds) {
                    let s = listening_at(fd, l.addr)
                        .map_err(|e| protocol(format!("pod {key}: {e}")))?;
                    ls.push((l, s));
                }
                taken.pods.insert(key, ls);
            }
            Message::End => return Ok(Some(taken)),
            other => return Err(protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// The received socket as a listener, if it is one at `addr`.
fn listening_at(fd: OwnedFd, addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let l = std::net::TcpListener::from(fd);
    match l.local_addr() {
        Ok(a) if a == addr => {}
        Ok(a) => return Err(format!("socket for {addr} is bound to {a}")),
        Err(e) => return Err(format!("socket for {addr}: {e}")),
    }
    l.set_nonblocking(true)
        .map_err(|e| format!("socket for {addr}: {e}"))?;
    Ok(l)
}

impl Taken {
    /// Waits until `ready` (pods enrolled, certificates issued), opens
    /// `gate` so the handed-over listeners are accepted on, and tells the
    /// agent being replaced, which stops accepting. Returns its pid.
    pub async fn complete(
        self,
        ready: impl Fn() -> bool,
        gate: watch::Sender<bool>,
        timeout: Duration,
    ) -> Result<u32, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Readiness has no change notification of its own; polled briefly.
        while !ready() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotReady(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = gate.send(true);
        let pid = self.from_pid;
        tokio::task::spawn_blocking(move || self.finish())
            .await
            .expect("hand-over task")?;
        Ok(pid)
    }

    fn finish(self) -> Result<(), Error> {
        let sock_err = |source| Error::Socket {
            path: self.path.clone(),
            source,
        };
        wire::send(&self.conn, &Message::Ready, &[]).map_err(sock_err)?;
        match wire::recv(&self.conn).map_err(sock_err)? {
            Some((Message::Leaving, _)) => Ok(()),
            other => Err(Error::Protocol {
                path: self.path.clone(),
                what: format!("expected Leaving, got {:?}", other.map(|(m, _)| m)),
            }),
        }
    }
}
