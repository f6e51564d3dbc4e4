//! Enrolling a pod: the agent's listeners in its network namespace, its
//! addresses in the inbound map, and the capture programs attached to its
//! cgroup and namespace — in that order, so capture never points at a
//! listener that does not exist yet. Removal runs in reverse.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    ebpf::{self, Loaded, Maps, PodLinks},
    handover::{
        Offered,
        wire::{Listener, Message},
    },
    netns::{self, Netns},
    proxy::{self, PodContext, ProxyContext, hbone, inbound, outbound, socket},
    spiffe::SpiffeId,
    sys,
    workload::{Workload, WorkloadKey},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workload {pod}: {source}")]
    Netns {
        pod: WorkloadKey,
        #[source]
        source: netns::Error,
    },
    #[error(
        "workload {pod} is scheduled on this node but has neither netns and cgroup paths nor a \
         uid to find them by (add `netns:` and `cgroup:`, or `uid:`, to its registry entry)"
    )]
    NoPaths { pod: WorkloadKey },
    #[error("workload {pod} has no address yet (it is starting)")]
    NoAddress { pod: WorkloadKey },
    #[error("workload {pod}: {source}")]
    Discover {
        pod: WorkloadKey,
        #[source]
        source: crate::discover::Error,
    },
    #[error("workload {pod}: cgroup {path} does not exist")]
    CgroupMissing { pod: WorkloadKey, path: PathBuf },
    #[error(
        "workload {pod}: {path} is not a cgroup v2 directory (the agent attaches to cgroup v2 \
         only; is the unified hierarchy mounted there?)"
    )]
    NotCgroup2 { pod: WorkloadKey, path: PathBuf },
    #[error("workload {pod}: cannot open cgroup {path}: {source}")]
    CgroupOpen {
        pod: WorkloadKey,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workload {pod}: {source}")]
    Listen {
        pod: WorkloadKey,
        #[source]
        source: proxy::Error,
    },
    #[error("workload {pod}: {source}")]
    Ebpf {
        pod: WorkloadKey,
        // Boxed: aya's errors are large and this travels on every Result.
        #[source]
        source: Box<ebpf::Error>,
    },
}

/// A pod the agent is capturing and proxying for.
pub struct EnrolledPod {
    pub workload: Arc<Workload>,
    netns_cookie: u64,
    identity: Option<SpiffeId>,
    /// Copies of the listening sockets (with their addresses, which
    /// `/config_dump` shows), for the next agent.
    handover: Vec<(Listener, std::net::TcpListener)>,
    links: PodLinks,
    stop: CancellationToken,
    maps: Arc<Maps>,
}

/// What `/config_dump` shows of an enrolled pod.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodDump {
    #[serde(flatten)]
    pub workload: Workload,
    pub netns_cookie: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
    pub listeners: Vec<SocketAddr>,
    pub links: Vec<PathBuf>,
}

fn open_cgroup(pod: &WorkloadKey, path: &Path) -> Result<File, Error> {
    match sys::fs_magic(path) {
        Ok(sys::CGROUP2_SUPER_MAGIC) => {}
        Ok(_) => {
            return Err(Error::NotCgroup2 {
                pod: pod.clone(),
                path: path.into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::CgroupMissing {
                pod: pod.clone(),
                path: path.into(),
            });
        }
        Err(source) => {
            return Err(Error::CgroupOpen {
                pod: pod.clone(),
                path: path.into(),
                source,
            });
        }
    }
    File::open(path).map_err(|source| Error::CgroupOpen {
        pod: pod.clone(),
        path: path.into(),
        source,
    })
}

/// The directory name of a pod's links under `<bpffs>/links/`.
pub fn links_dir_name(key: &WorkloadKey) -> String {
    key.to_string().replace('/', "_")
}

/// Listeners a previous agent handed over for a pod, and when this agent
/// may start accepting on them: once it is ready (until then the previous
/// agent still accepts on the same sockets).
pub struct Handed {
    pub listeners: Vec<(Listener, std::net::TcpListener)>,
    pub gate: watch::Receiver<bool>,
}

/// Enrols `w` on `handed` listeners, or new ones. Must run inside the tokio
/// runtime (it starts the accept loops).
pub fn enrol(
    w: Workload,
    handed: Option<Handed>,
    loaded: &mut Loaded,
    ctx: &Arc<ProxyContext>,
) -> Result<EnrolledPod, Error> {
    let key = w.key();
    let netns = Netns::open(&w.netns).map_err(|source| Error::Netns {
        pod: key.clone(),
        source,
    })?;
    let cgroup = open_cgroup(&key, &w.cgroup)?;
    let mut gate = None;
    let adopted = handed.and_then(|h| {
        match socket::PodListeners::adopt(&netns, &w, &ctx.config, h.listeners) {
            Ok(l) => {
                gate = Some(h.gate);
                Some(l)
            }
            Err(why) => {
                tracing::warn!(pod = %key, "not adopting the listeners handed over: {why}; opening new ones");
                None
            }
        }
    });
    let listeners = match adopted {
        Some(l) => l,
        None => {
            socket::open_listeners(&netns, &w, &ctx.config).map_err(|source| Error::Listen {
                pod: key.clone(),
                source,
            })?
        }
    };
    let listen_err = |source: std::io::Error| Error::Listen {
        pod: key.clone(),
        source: source.into(),
    };
    let handover = listeners.handover().map_err(listen_err)?;
    let workload = Arc::new(w);
    let maps = loaded.maps();
    let flags = if workload.fails_open() {
        mesh_common::config::POD_FAIL_OPEN
    } else {
        0
    };
    let forget = |maps: &crate::ebpf::Maps| {
        workload.ips.iter().for_each(|ip| maps.remove_inbound(*ip));
        maps.remove_pod(listeners.netns_cookie);
    };
    let added = maps.add_pod(listeners.netns_cookie, flags).and_then(|()| {
        listeners
            .inbound
            .iter()
            .try_for_each(|(ip, l)| maps.add_inbound(*ip, flags, l))
    });
    if let Err(source) = added {
        forget(&maps);
        return Err(Error::Ebpf {
            pod: key,
            source: Box::new(source),
        });
    }
    let links = match loaded.attach_pod(
        &links_dir_name(&key),
        (&workload.cgroup, &cgroup),
        (netns.path(), netns.file()),
    ) {
        Ok(l) => l,
        Err(source) => {
            forget(&maps);
            return Err(Error::Ebpf {
                pod: key,
                source: Box::new(source),
            });
        }
    };

    let stop = CancellationToken::new();
    let identity = ctx
        .identities
        .as_ref()
        .map(|i| workload.identity(i.trust_domain()));
    let pod = Arc::new(PodContext {
        workload: workload.clone(),
        netns: Arc::new(netns),
        netns_cookie: listeners.netns_cookie,
        identity: identity.clone(),
        connections: ctx.limits.pod(),
    });
    let tokio_listener = |l: std::net::TcpListener| tokio::net::TcpListener::from_std(l);
    // Handed-over sockets are accepted on once the gate opens.
    let spawn = |serve: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
        let (gate, stop) = (gate.clone(), stop.clone());
        tokio::spawn(async move {
            if let Some(mut g) = gate {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = g.wait_for(|open| *open) => if r.is_err() { return },
                }
            }
            serve.await;
        });
    };
    let start = || -> std::io::Result<()> {
        for l in listeners.outbound {
            spawn(Box::pin(outbound::serve(
                tokio_listener(l)?,
                pod.clone(),
                ctx.clone(),
                stop.clone(),
            )));
        }
        for (_, l) in listeners.inbound {
            spawn(Box::pin(inbound::serve_plaintext(
                tokio_listener(l)?,
                pod.clone(),
                ctx.clone(),
                stop.clone(),
            )));
        }
        for l in listeners.hbone {
            spawn(Box::pin(hbone::serve(
                tokio_listener(l)?,
                pod.clone(),
                ctx.clone(),
                stop.clone(),
            )));
        }
        Ok(())
    };
    if let Err(e) = start() {
        stop.cancel();
        forget(&maps);
        drop(links);
        return Err(Error::Listen {
            pod: key,
            source: e.into(),
        });
    }
    if let (Some(identities), Some(id)) = (&ctx.identities, &identity) {
        identities.acquire(id);
    }
    ctx.local.insert_local(&pod);
    tracing::info!(pod = %key, netns_cookie = pod.netns_cookie, identity = %identity.as_ref().map_or_else(|| "none (no mTLS)".to_owned(), ToString::to_string), "enrolled");
    Ok(EnrolledPod {
        workload,
        netns_cookie: pod.netns_cookie,
        identity,
        handover,
        links,
        stop,
        maps,
    })
}

impl EnrolledPod {
    /// Stops capturing and proxying for this pod: programs detached first
    /// (new connections go direct), then listeners closed and map entries
    /// removed. Connections already open finish on their own.
    pub fn remove(self, ctx: &ProxyContext) {
        let key = self.workload.key();
        drop(self.links);
        self.stop.cancel();
        for ip in &self.workload.ips {
            self.maps.remove_inbound(*ip);
        }
        self.maps.remove_pod(self.netns_cookie);
        ctx.local.remove_local(&self.workload);
        if let (Some(identities), Some(id)) = (&ctx.identities, &self.identity) {
            identities.release(id);
        }
        tracing::info!(pod = %key, "removed");
    }

    /// Pins again the links whose pins went with a bpffs remount; how many.
    pub fn repin(&mut self) -> Result<usize, ebpf::Error> {
        self.links.repin()
    }

    /// Closes the listeners but leaves the programs attached and pinned: the
    /// pod stays captured and fails closed until the next agent adopts it.
    pub fn keep(self) {
        self.links.keep();
        self.stop.cancel();
    }

    /// This pod's listening sockets, for the next agent.
    pub fn offer(&self) -> std::io::Result<Offered> {
        let fds = self
            .handover
            .iter()
            .map(|(_, l)| l.try_clone().map(OwnedFd::from))
            .collect::<std::io::Result<_>>()?;
        Ok(Offered {
            msg: Message::Pod {
                key: self.workload.key().to_string(),
                listeners: self.handover.iter().map(|(l, _)| l.clone()).collect(),
            },
            fds,
        })
    }

    pub fn dump(&self) -> PodDump {
        PodDump {
            workload: (*self.workload).clone(),
            netns_cookie: self.netns_cookie,
            identity: self.identity.clone(),
            listeners: self.handover.iter().map(|(l, _)| l.addr).collect(),
            links: self.links.paths(),
        }
    }
}
