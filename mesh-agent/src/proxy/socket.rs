//! Sockets made inside a pod's network namespace: the agent's listeners
//! there, and its connections out of (or into) the pod.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::Error;
use crate::{config::Config, netns::Netns, sys, workload::Workload};

/// Listen backlog of every in-pod listener.
const BACKLOG: i32 = 1024;

/// Source of the agent's IPv4 connections to an application (Istio's
/// inbound passthrough address; `sk_lookup` lets loopback sources through).
const AGENT_SRC_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(
    mesh_common::config::AGENT_INBOUND_SRC_V4[0],
    mesh_common::config::AGENT_INBOUND_SRC_V4[1],
    mesh_common::config::AGENT_INBOUND_SRC_V4[2],
    mesh_common::config::AGENT_INBOUND_SRC_V4[3],
));
const AGENT_SRC_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// The agent's listeners inside one pod.
pub struct PodListeners {
    /// `127.0.0.1:15001` and, when the pod has IPv6 loopback, `[::1]:15001`.
    pub outbound: Vec<std::net::TcpListener>,
    /// `podIP:15006` per pod address, keyed by that address for `sk_lookup`.
    pub inbound: Vec<(IpAddr, std::net::TcpListener)>,
    /// `podIP:15008` per pod address (HBONE; reserved until mTLS lands).
    pub hbone: Vec<std::net::TcpListener>,
    /// The pod's network namespace cookie, as `bpf_get_netns_cookie` sees it.
    pub netns_cookie: u64,
}

impl PodListeners {
    /// Every listening address, for `/config_dump`.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let all = self
            .outbound
            .iter()
            .chain(self.inbound.iter().map(|(_, l)| l))
            .chain(&self.hbone);
        all.filter_map(|l| l.local_addr().ok()).collect()
    }
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // A restarted agent must rebind while old connections sit in TIME_WAIT.
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Opens the agent's listeners inside `w`'s network namespace.
pub fn open_listeners(netns: &Netns, w: &Workload, cfg: &Config) -> Result<PodListeners, Error> {
    let pod = w.key().to_string();
    let bind_err = |what, addr: SocketAddr| {
        let pod = pod.clone();
        move |source: io::Error| match source.kind() {
            io::ErrorKind::AddrInUse => Error::PortInUse {
                port: addr.port(),
                addr: addr.ip(),
                pod,
            },
            _ => Error::Socket {
                what,
                addr,
                pod,
                source,
            },
        }
    };
    netns.run(|| {
        let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), cfg.outbound_port);
        let mut outbound = vec![listen(v4).map_err(bind_err("cannot listen on", v4))?];
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), cfg.outbound_port);
        match listen(v6) {
            Ok(l) => outbound.push(l),
            // No IPv6 loopback in this pod: IPv6 connects fail there anyway.
            Err(e)
                if e.kind() == io::ErrorKind::AddrNotAvailable
                    && !w.ips.iter().any(IpAddr::is_ipv6) =>
            {
                tracing::debug!(pod = %w.key(), "no IPv6 loopback; outbound capture is IPv4 only");
            }
            Err(e) => return Err(bind_err("cannot listen on", v6)(e)),
        }
        let mut inbound = Vec::new();
        let mut hbone = Vec::new();
        for ip in &w.ips {
            let a = SocketAddr::new(*ip, cfg.inbound_port);
            inbound.push((*ip, listen(a).map_err(bind_err("cannot listen on", a))?));
            let h = SocketAddr::new(*ip, cfg.hbone_port);
            hbone.push(listen(h).map_err(bind_err("cannot listen on", h))?);
        }
        let netns_cookie = sys::netns_cookie(outbound[0].as_fd())
            .map_err(bind_err("cannot read the netns cookie of", v4))?;
        Ok(PodListeners {
            outbound,
            inbound,
            hbone,
            netns_cookie,
        })
    })?
}

/// How the agent connects from inside a pod.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// The pod's own address, chosen by the kernel (outbound).
    Pod,
    /// The agent's loopback source, for connections to the pod's own
    /// application that `sk_lookup` must not capture again (inbound).
    AgentLoopback,
}

/// Connects to `dst` from inside `netns`, marked as the agent's own socket.
pub async fn connect(
    netns: &Netns,
    pod: &str,
    dst: SocketAddr,
    source: Source,
    cfg: &Config,
) -> Result<TcpStream, Error> {
    let sock_err = |what, source| Error::Socket {
        what,
        addr: dst,
        pod: pod.into(),
        source,
    };
    let socket = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))?
        .map_err(|e| sock_err("cannot create a socket for", e))?;
    socket
        .set_mark(cfg.agent_mark)
        .map_err(|e| sock_err("cannot mark the socket for", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| sock_err("cannot configure the socket for", e))?;
    if let Source::AgentLoopback = source {
        let src = if dst.is_ipv4() {
            AGENT_SRC_V4
        } else {
            AGENT_SRC_V6
        };
        socket
            .bind(&SockAddr::from(SocketAddr::new(src, 0)))
            .map_err(|e| sock_err("cannot bind the agent's source address for", e))?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = match tokio::time::timeout(cfg.connect_timeout, socket.connect(dst)).await {
        Err(_) => {
            return Err(Error::ConnectTimeout {
                dst,
                timeout: cfg.connect_timeout,
            });
        }
        Ok(Err(source)) => return Err(Error::Connect { dst, source }),
        Ok(Ok(s)) => s,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}
