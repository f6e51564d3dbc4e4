//! Where bytes go next, decided in one place for the L4 and the L7 paths:
//! to a meshed workload over HBONE (mutual TLS, that workload's identity
//! expected), to anything else directly from the source pod.

use std::{net::SocketAddr, pin::Pin, sync::Arc, task, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Error, PodContext, ProxyContext, pool, socket};
use crate::{
    identity::CertFor,
    registry::{Endpoint, ServicePort},
    spiffe::SpiffeId,
    telemetry::metrics::Reporter,
    tls::{self, SpiffeServerVerifier},
    workload::Workload,
};

/// How long a new pod's first connection may wait for its certificate.
const CERT_WAIT: Duration = Duration::from_secs(10);

/// How a connection to a destination is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// HTTP/2 CONNECT over mutual TLS to the destination pod's `:15008`.
    Hbone {
        source: SpiffeId,
        destination: SpiffeId,
    },
    /// A TCP connection from the source pod: the destination is not
    /// meshed, or mutual TLS is off.
    Direct,
}

impl Via {
    /// HBONE when the destination is a meshed workload and this agent has
    /// identities (mutual TLS on, the source pod has its identity).
    pub fn to(ctx: &ProxyContext, pod: &PodContext, workload: Option<&Workload>) -> Self {
        match (&ctx.identities, &pod.identity, workload) {
            (Some(_), Some(src), Some(w)) => Via::Hbone {
                destination: w.identity(src.trust_domain()),
                source: src.clone(),
            },
            _ => Via::Direct,
        }
    }

    pub fn is_mtls(&self) -> bool {
        matches!(self, Via::Hbone { .. })
    }

    /// Istio's `connection_security_policy` for traffic carried this way
    /// (reporter: source).
    pub fn security_policy(&self) -> &'static str {
        if self.is_mtls() {
            "mutual_tls"
        } else {
            "unknown"
        }
    }

    /// The source and destination principals mutual TLS proves, as text.
    pub fn principals(&self) -> Option<(String, String)> {
        match self {
            Via::Hbone {
                source,
                destination,
            } => Some((source.to_string(), destination.to_string())),
            Via::Direct => None,
        }
    }
}

/// Opens a byte stream to `addr` (the workload `workload` when it is a
/// meshed one) as `via` says.
pub async fn open(
    pod: &PodContext,
    ctx: &ProxyContext,
    addr: SocketAddr,
    workload: Option<&Workload>,
    via: &Via,
) -> Result<Io, Error> {
    match (via, workload) {
        (
            Via::Hbone {
                source,
                destination,
            },
            Some(w),
        ) => {
            // Boxed: opening (a TLS handshake, perhaps) is a large future
            // that would otherwise stay part of every connection's task for
            // its whole life.
            let t = Box::pin(open_tunnel(pod, ctx, addr, w, destination, source)).await?;
            Ok(Io::Tunnel(Box::new(t)))
        }
        _ => {
            let name = pod.workload.key().to_string();
            let s =
                socket::connect(&pod.netns, &name, addr, socket::Source::Pod, &ctx.config).await?;
            s.set_nodelay(true)?;
            Ok(Io::Tcp(s))
        }
    }
}

/// A CONNECT stream to `dst` over the pooled mTLS connection to the
/// destination pod's node.
async fn open_tunnel(
    pod: &PodContext,
    ctx: &ProxyContext,
    dst: SocketAddr,
    w: &Workload,
    dst_id: &SpiffeId,
    src_id: &SpiffeId,
) -> Result<pool::Tunnel, Error> {
    let (identities, pool) = match (&ctx.identities, &ctx.pool) {
        (Some(i), Some(p)) => (i.clone(), p.clone()),
        _ => unreachable!("HBONE is only chosen with identities"),
    };
    identities.wait(src_id, CERT_WAIT).await?;
    let via = SocketAddr::new(dst.ip(), ctx.config.hbone_port);
    let verifier = Arc::new(SpiffeServerVerifier::new(
        identities.bundle(),
        dst_id.clone(),
    ));
    // The pool dials with the certificate and roots the source holds now,
    // and stops putting new streams on connections dialled with older ones.
    let generation = identities
        .generation(src_id)
        .max(identities.bundle().generation());
    let client_cert = Arc::new(CertFor {
        manager: identities,
        identity: src_id.clone(),
    });
    let tls_config = Arc::new(
        tls::client_config(verifier, client_cert, &[tls::ALPN_H2]).map_err(|e| Error::Hbone {
            dst,
            reason: e.to_string(),
        })?,
    );
    let key = pool::PoolKey {
        source: pod.workload.key(),
        destination_node: w
            .node
            .clone()
            .unwrap_or_else(|| ctx.config.node_name.clone()),
        destination_identity: dst_id.clone(),
    };
    let pod_name = pod.workload.key().to_string();
    pool.open(key, dst, generation, || {
        let (tls_config, pod_name) = (tls_config.clone(), pod_name.clone());
        async move {
            let tcp = socket::connect(&pod.netns, &pod_name, via, socket::Source::Pod, &ctx.config)
                .await?;
            let name = rustls::pki_types::ServerName::IpAddress(via.ip().into());
            tokio_rustls::TlsConnector::from(tls_config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    let reason = tls::failure_reason(&e);
                    ctx.metrics.tls_failure(Reporter::Source, reason);
                    Error::Tls {
                        peer: via,
                        reason,
                        detail: tls::failure_detail(&e),
                    }
                })
        }
    })
    .await
}

/// The most a DNS lookup of an endpoint's name may take (the resolver's own
/// timeouts and retries can add up to much more).
const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The socket address of endpoint `e` for service port `port` (resolving
/// a DNS endpoint's name now).
pub async fn endpoint_addr(e: &Endpoint, port: &ServicePort) -> Result<SocketAddr, Error> {
    let target_port = e.port_for(port);
    match (e.address, &e.hostname) {
        (Some(ip), _) => Ok(SocketAddr::new(ip, target_port)),
        (None, Some(host)) => {
            let lookup = tokio::net::lookup_host((host.as_str(), target_port));
            let mut addrs = tokio::time::timeout(DNS_TIMEOUT, lookup)
                .await
                .map_err(|_| Error::Resolve {
                    host: host.clone(),
                    reason: format!("no answer in {DNS_TIMEOUT:?}"),
                })?
                .map_err(|e| Error::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
            addrs.next().ok_or_else(|| Error::Resolve {
                host: host.clone(),
                reason: "no addresses".into(),
            })
        }
        (None, None) => unreachable!("registry endpoints have an address or a host name"),
    }
}

/// What an upstream connection runs on.
pub enum Io {
    Tcp(TcpStream),
    Tunnel(Box<pool::Tunnel>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}
