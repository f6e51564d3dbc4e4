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
use crate::{
    config::Config,
    handover::wire::{Listener, Role},
    netns::Netns,
    sys,
    workload::Workload,
};

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
const AGENT_SRC_V6: Ipv6Addr = {
    let o = mesh_common::config::AGENT_INBOUND_SRC_V6;
    let mut seg = [0u16; 8];
    let mut i = 0;
    while i < 8 {
        seg[i] = u16::from_be_bytes([o[2 * i], o[2 * i + 1]]);
        i += 1;
    }
    Ipv6Addr::new(
        seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
    )
};

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
        if w.ips.iter().any(IpAddr::is_ipv6) {
            let a = SocketAddr::new(IpAddr::V6(AGENT_SRC_V6), 0);
            add_loopback_address(AGENT_SRC_V6).map_err(bind_err(
                "cannot add the agent's source address to lo for",
                a,
            ))?;
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

impl PodListeners {
    /// The listeners a previous agent handed over for `w`, if they are
    /// exactly the ones `open_listeners` would open, in `netns`.
    pub fn adopt(
        netns: &Netns,
        w: &Workload,
        cfg: &Config,
        handed: Vec<(Listener, std::net::TcpListener)>,
    ) -> Result<Self, String> {
        let (mut outbound, mut inbound, mut hbone) = (Vec::new(), Vec::new(), Vec::new());
        for (l, s) in handed {
            let (ip, port) = (l.addr.ip(), l.addr.port());
            match l.role {
                Role::Outbound if ip.is_loopback() && port == cfg.outbound_port => {
                    outbound.push(s);
                }
                Role::Inbound if w.ips.contains(&ip) && port == cfg.inbound_port => {
                    inbound.push((ip, s));
                }
                Role::Hbone if w.ips.contains(&ip) && port == cfg.hbone_port => hbone.push(s),
                _ => {
                    return Err(format!(
                        "{:?} listener {} is not one this agent opens",
                        l.role, l.addr
                    ));
                }
            }
        }
        if inbound.len() != w.ips.len() || hbone.len() != w.ips.len() {
            return Err(format!("the pod's addresses are now {:?}", w.ips));
        }
        let first = outbound
            .first()
            .ok_or_else(|| "no outbound listener".to_owned())?;
        let netns_cookie = sys::netns_cookie(first.as_fd()).map_err(|e| e.to_string())?;
        // The pod's namespace as this agent found it, seen from a socket
        // made in it: a recreated pod has a new one.
        let probe = netns
            .run(|| Socket::new(Domain::IPV4, Type::STREAM, None))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if sys::netns_cookie(probe.as_fd()).map_err(|e| e.to_string())? != netns_cookie {
            return Err("the listeners are in another network namespace".into());
        }
        Ok(Self {
            outbound,
            inbound,
            hbone,
            netns_cookie,
        })
    }

    /// Copies of the listening sockets, to hand to the next agent.
    pub fn handover(&self) -> io::Result<Vec<(Listener, std::net::TcpListener)>> {
        let roles = self
            .outbound
            .iter()
            .map(|l| (Role::Outbound, l))
            .chain(self.inbound.iter().map(|(_, l)| (Role::Inbound, l)))
            .chain(self.hbone.iter().map(|l| (Role::Hbone, l)));
        roles
            .map(|(role, l)| {
                Ok((
                    Listener {
                        role,
                        addr: l.local_addr()?,
                    },
                    l.try_clone()?,
                ))
            })
            .collect()
    }
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

/// Ends `stream` with a reset instead of a FIN, so a client whose
/// destination refused sees a refusal rather than an empty answer.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
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
    // A real agent always marks its sockets (`--agent-mark` must be
    // non-zero); 0 means "no mark" for in-process tests, which run without
    // the privilege SO_MARK needs and without capture programs to skip.
    if cfg.agent_mark != 0 {
        socket
            .set_mark(cfg.agent_mark)
            .map_err(|e| sock_err("cannot mark the socket for", e))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| sock_err("cannot configure the socket for", e))?;
    if let Source::AgentLoopback = source {
        let src = if dst.is_ipv4() {
            AGENT_SRC_V4
        } else {
            IpAddr::V6(AGENT_SRC_V6)
        };
        crate::sys::set_bind_address_no_port(socket.as_fd())
            .map_err(|e| sock_err("cannot configure the socket for", e))?;
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

/// Adds `addr/128` to `lo` in the current thread's network namespace (one
/// rtnetlink RTM_NEWADDR request); an address already there is fine.
fn add_loopback_address(addr: Ipv6Addr) -> io::Result<()> {
    const RTM_NEWADDR: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const NLMSG_ERROR: u16 = 2;
    const IFA_F_NODAD: u8 = 0x2;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    /// `lo` is interface 1 in every network namespace.
    const LOOPBACK_IFINDEX: u32 = 1;

    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&64u32.to_ne_bytes()); // nlmsghdr.len
    msg.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 128, IFA_F_NODAD, 0]); // ifaddrmsg
    msg.extend_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
    for attr in [IFA_LOCAL, IFA_ADDRESS] {
        msg.extend_from_slice(&20u16.to_ne_bytes());
        msg.extend_from_slice(&attr.to_ne_bytes());
        msg.extend_from_slice(&addr.octets());
    }
    let sock = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW.cloexec(),
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    sock.send(&msg)?;
    let mut reply = [0u8; 256];
    let n = io::Read::read(&mut &sock, &mut reply)?;
    if n < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
        return Err(io::Error::other("unexpected rtnetlink reply"));
    }
    match -i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 | libc::EEXIST => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}
