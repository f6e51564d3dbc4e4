//! The HBONE server in process: mutual TLS 1.3 with a pod's certificate
//! from a real (in-process) CA, then HTTP/2 CONNECT streams to the pod's
//! application, from clients built with rustls and hyper on loopback.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    ca::signer::Usage,
    spiffe::SpiffeId,
    testing::{self, Agent, Identities, Pki, TRUST_DOMAIN, metric, workload_yaml},
    tls::{self, FixedCert, NoClientCert, SpiffeServerVerifier},
};

/// `server` (sa `server`) at `ip` on this node; `client` (sa `client`) at
/// 127.0.0.1 on another node.
fn registry(ip: &str) -> String {
    format!(
        "workloads:\n{}  - {{name: client, namespace: default, serviceAccount: client, ips: [127.0.0.1], node: node-b, labels: {{app: client}}}}\n",
        workload_yaml("server", ip, "server", "app: server")
    )
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::workload(TRUST_DOMAIN, "default", sa)
}

struct Setup {
    agent: Agent,
    ids: Identities,
    /// The server pod's address (each test its own: they run at once).
    ip: String,
}

/// The server pod at 127.0.0.`n`, its HBONE listener, an echo app on its
/// port 9000.
async fn setup(n: u8) -> Setup {
    let ip = format!("127.0.0.{n}");
    let reg = registry(&ip);
    let ids = Identities::start(&reg).await;
    let agent = Agent::new(testing::snapshot(&reg), Some(ids.manager.clone()));
    let pod = agent.pod("default/server");
    ids.manager
        .wait(&id("server"), std::time::Duration::from_secs(10))
        .await
        .expect("the server's certificate");
    agent.hbone(&pod).await;
    testing::echo(&format!("{ip}:9000")).await;
    Setup { agent, ids, ip }
}

/// A CONNECT (or `method`) for `authority` over a new HBONE connection to
/// the server pod, presenting `cert` (none: no client certificate): the
/// status, and the stream when it was accepted.
async fn hbone(
    s: &Setup,
    cert: Option<Arc<rustls::sign::CertifiedKey>>,
    method: Method,
    authority: &str,
) -> Result<(StatusCode, Option<hyper::upgrade::Upgraded>), String> {
    let resolver: Arc<dyn rustls::client::ResolvesClientCert> = match cert {
        Some(c) => Arc::new(FixedCert(c)),
        None => Arc::new(NoClientCert),
    };
    let config = tls::client_config(
        Arc::new(SpiffeServerVerifier::new(s.ids.pki.bundle(), id("server"))),
        resolver,
        &[tls::ALPN_H2],
    )
    .unwrap();
    let server = SocketAddr::new(s.ip.parse().unwrap(), 15008);
    let tcp = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(server.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(authority)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if status != StatusCode::OK {
        return Ok((status, None));
    }
    let up = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
    Ok((status, Some(up)))
}

#[tokio::test]
async fn a_connect_stream_reaches_the_application_and_is_counted_with_the_peer_identity() {
    let s = setup(20).await;
    let cert = s.ids.pki.certified(&id("client"), Usage::Workload);
    let (status, up) = hbone(&s, Some(cert), Method::CONNECT, &format!("{}:9000", s.ip))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut io = TokioIo::new(up.unwrap());
    io.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through the tunnel");
    let opened = metric(
        &s.agent.metrics(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/server",
            ),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(opened, Some(1.0), "{}", s.agent.metrics());
}

#[tokio::test]
async fn the_source_workload_is_named_only_when_its_identity_is_the_one_proved() {
    let s = setup(21).await;
    // A certificate for another service account, from the client's address:
    // the address alone does not make it the client workload.
    let cert = s.ids.pki.certified(&id("impostor"), Usage::Workload);
    let (status, _up) = hbone(&s, Some(cert), Method::CONNECT, &format!("{}:9000", s.ip))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let m = s.agent.metrics();
    let opened = |who: &str| {
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/default/sa/impostor",
                ),
                ("source_workload", who),
            ],
        )
    };
    assert_eq!(opened("unknown"), Some(1.0), "{m}");
    assert_eq!(opened("client"), None, "{m}");
}

#[tokio::test]
async fn streams_to_anything_but_this_pods_application_are_refused() {
    let s = setup(22).await;
    let cert = || Some(s.ids.pki.certified(&id("client"), Usage::Workload));
    let status = |r: Result<(StatusCode, Option<hyper::upgrade::Upgraded>), String>| r.unwrap().0;
    // Not a pod of this node with this identity.
    assert_eq!(
        status(hbone(&s, cert(), Method::CONNECT, "127.0.0.99:9000").await),
        StatusCode::MISDIRECTED_REQUEST
    );
    // Not an address.
    assert_eq!(
        status(hbone(&s, cert(), Method::CONNECT, "server.default:9000").await),
        StatusCode::BAD_REQUEST
    );
    // The agent's own listener in the pod.
    assert_eq!(
        status(hbone(&s, cert(), Method::CONNECT, &format!("{}:15008", s.ip)).await),
        StatusCode::BAD_REQUEST
    );
    // Not a CONNECT.
    assert_eq!(
        status(hbone(&s, cert(), Method::GET, &format!("http://{}:9000/", s.ip)).await),
        StatusCode::METHOD_NOT_ALLOWED
    );
    // Nobody listening there: the client sees the failure, not a hang.
    assert_eq!(
        status(hbone(&s, cert(), Method::CONNECT, &format!("{}:9001", s.ip)).await),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let m = s.agent.metrics();
    assert_eq!(
        metric(
            &m,
            "mesh_proxy_errors_total",
            &[("direction", "inbound"), ("reason", "hbone_misdirected")]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn clients_without_a_good_certificate_are_refused_and_counted() {
    let s = setup(23).await;
    let other_ca = Pki::new();
    for (cert, reason) in [
        (None, "no_client_certificate"),
        (
            Some(other_ca.certified(&id("client"), Usage::Workload)),
            "unknown_ca",
        ),
    ] {
        let r = hbone(&s, cert, Method::CONNECT, &format!("{}:9000", s.ip)).await;
        assert!(r.is_err(), "{reason}: got through");
        let counted = || {
            metric(
                &s.agent.metrics(),
                "mesh_tls_handshake_failures_total",
                &[("direction", "inbound"), ("reason", reason)],
            )
        };
        // The server counts after the client saw the refusal.
        for _ in 0..100 {
            if counted() == Some(1.0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(counted(), Some(1.0), "{reason}");
    }
}
