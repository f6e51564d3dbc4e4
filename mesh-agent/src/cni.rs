//! Enrolment at pod start. The container runtime runs the chained CNI
//! plugin `mesh-cni` while it sets up a new pod's network, before any of
//! the pod's containers exists; the plugin asks the agent, over a Unix
//! socket (`--cni-socket`), to enrol the pod — attach the capture programs
//! to its cgroup, open its listeners in the namespace the runtime just
//! made — and returns only when that is done. The pod's first packet is
//! captured: there is no window in which it talks to the network before
//! the agent has seen it.
//!
//! When the agent cannot enrol the pod (not running, not ready, does not
//! know the pod yet), the plugin fails the CNI ADD with "try again later":
//! the kubelet tears the sandbox down and retries, and the pod starts only
//! captured. Failing the ADD was chosen over letting the pod start and
//! blocking its traffic: a pod that is not enrolled has no program
//! attached, so nothing would block it; and a failed sandbox is what the
//! operator sees (`kubectl describe pod`, with the plugin's message).
//!
//! One JSON object per line each way on a stream socket: a [`Request`]
//! from the plugin, a [`Reply`] from the agent.

pub mod conflist;

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI configuration {path}: {source}")]
    ConfIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI configuration {path}: {reason}")]
    Conf { path: PathBuf, reason: String },
    #[error("no CNI network configuration (*.conflist or *.conf) in {0}")]
    NoConf(PathBuf),
}

/// The type name the plugin is installed and configured under.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// How long the agent waits for a pod it does not know yet (its
/// Kubernetes watch a little behind the kubelet's) before it says no.
pub const WAIT_FOR_POD: Duration = Duration::from_secs(10);

/// A request line's bound: a pod's names and addresses are far less.
const MAX_LINE: usize = 64 * 1024;

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The pod's identity as the runtime gives it (`CNI_ARGS`) and where its
/// network lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The sandbox's container ID (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The network namespace the runtime made (`CNI_NETNS`).
    pub netns: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// Enrol the pod; `ips` are what the previous plugins assigned.
    Add {
        #[serde(flatten)]
        pod: PodRef,
        ips: Vec<IpAddr>,
    },
    /// The sandbox is going away.
    Del {
        #[serde(flatten)]
        pod: PodRef,
    },
    /// Is the pod still enrolled as it was?
    Check {
        #[serde(flatten)]
        pod: PodRef,
    },
}

impl Request {
    pub fn pod(&self) -> &PodRef {
        match self {
            Request::Add { pod, .. } | Request::Del { pod } | Request::Check { pod } => pod,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Reply {
    /// Enrolled (ADD, CHECK) or released (DEL).
    Done,
    /// The pod is not the mesh's: nothing to do.
    Skipped { reason: String },
    /// Not enrolled; the ADD must fail.
    Failed { reason: String },
}

/// A request and where its answer goes.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// What the runtime said of a pod it set up: its network namespace and the
/// addresses it got. Used until the pod's own record has them.
#[derive(Debug, Clone)]
pub struct Given {
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
}

/// An ADD for a pod not known yet, answered once it is, or at `until`.
pub struct Parked {
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
    pub reply: oneshot::Sender<Reply>,
    pub until: std::time::Instant,
}

/// Listens at `path` (replacing a socket a previous agent left: the newest
/// agent answers) and hands each request to the returned channel.
pub fn serve(path: &Path) -> Result<mpsc::Receiver<Call>, Error> {
    let sock_err = |source| Error::Socket {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    // Only root (the runtime) may ask for pods to be enrolled.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, tx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

async fn answer(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE as u64));
    let reply = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Reply::Failed {
            reason: format!("no request within {READ_TIMEOUT:?}"),
        },
        Ok(Err(e)) => Reply::Failed {
            reason: format!("reading the request: {e}"),
        },
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Failed {
                reason: format!("malformed request: {e}"),
            },
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if calls.send(Call { request, reply: tx }).await.is_err() {
                    Reply::Failed {
                        reason: "the agent is shutting down".into(),
                    }
                } else {
                    rx.await.unwrap_or_else(|_| Reply::Failed {
                        reason: "the agent stopped before answering".into(),
                    })
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_read_back_as_written() {
        let pod = PodRef {
            namespace: "default".into(),
            name: "web-1".into(),
            uid: Some("u-1".into()),
            container_id: "abc".into(),
            netns: "/var/run/netns/cni-1".into(),
        };
        let add = Request::Add {
            pod: pod.clone(),
            ips: vec!["10.1.0.5".parse().unwrap()],
        };
        let text = serde_json::to_string(&add).unwrap();
        assert!(text.contains(r#""command":"ADD""#), "{text}");
        assert!(text.contains(r#""containerId":"abc""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), add);
        let del = Request::Del { pod };
        let text = serde_json::to_string(&del).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), del);
        let r = Reply::Skipped {
            reason: "not in the mesh".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"result":"skipped","reason":"not in the mesh"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
    }

    #[tokio::test]
    async fn a_malformed_request_is_answered_not_dropped() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-sock-{}", std::process::id()));
        let path = dir.join("cni.sock");
        let mut calls = serve(&path).unwrap();
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{not json\n").await.unwrap();
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).await.unwrap();
        let reply: Reply = serde_json::from_str(&out).unwrap();
        assert!(
            matches!(&reply, Reply::Failed { reason } if reason.contains("malformed")),
            "{reply:?}"
        );
        assert!(
            calls.try_recv().is_err(),
            "a malformed request reached the agent"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
