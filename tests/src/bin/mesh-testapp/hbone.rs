//! Rogue HBONE peers for the mTLS tests: a client and a server that speak
//! HBONE (HTTP/2 CONNECT over TLS 1.3) with whatever certificate the test
//! hands them, so the agent's refusals can be checked. Test-only: the
//! client accepts any server certificate.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    Ok(CertificateDer::pem_file_iter(path)
        .with_context(|| path.to_owned())?
        .collect::<Result<_, _>>()?)
}

#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `hbone-connect CERT|- KEY|- TARGET AUTHORITY PAYLOAD`: one CONNECT
/// stream through TARGET to AUTHORITY, echo check; prints one JSON line.
pub async fn connect(
    cert: &str,
    key: &str,
    target: &str,
    authority: &str,
    payload: &str,
) -> Result<()> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything));
    let mut config = if cert == "-" {
        builder.with_no_client_auth()
    } else {
        builder.with_client_auth_cert(certs(cert)?, PrivateKeyDer::from_pem_file(key)?)?
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let target: SocketAddr = target.parse()?;
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let result: Result<String> = async {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(target.ip().into()), tcp)
            .await?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .version(hyper::Version::HTTP_2)
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        if resp.status() != StatusCode::OK {
            bail!("CONNECT answered {}", resp.status());
        }
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await?);
        io.write_all(payload.as_bytes()).await?;
        io.shutdown().await?;
        let mut got = String::new();
        io.read_to_string(&mut got).await?;
        Ok(got)
    }
    .await;
    match result {
        Ok(got) => {
            println!("{}", json!({"ok": got == payload, "received": got}));
            Ok(())
        }
        Err(e) => {
            println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
            Err(e)
        }
    }
}

/// `hbone-serve CERT KEY ADDR`: an HBONE server presenting CERT that
/// accepts any client and echoes every stream.
pub async fn serve(cert: &str, key: &str, addr: &str) -> Result<()> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(cert)?, PrivateKeyDer::from_pem_file(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "{}",
        json!({"event": "listening", "local": listener.local_addr()?.to_string()})
    );
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                println!(
                    "{}",
                    json!({"event": "handshake_failed", "peer": peer.to_string()})
                );
                return;
            };
            println!("{}", json!({"event": "accepted", "peer": peer.to_string()}));
            let svc =
                hyper::service::service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    let up = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(u) = up.await {
                            let mut io = TokioIo::new(u);
                            let mut buf = Vec::new();
                            if io.read_to_end(&mut buf).await.is_ok() {
                                let _ = io.write_all(&buf).await;
                                let _ = io.shutdown().await;
                            }
                        }
                    });
                    Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
                });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// `tls-hello ADDR SNI`: sends a TLS ClientHello for SNI (the handshake
/// goes no further) and prints how many bytes came back: enough to see
/// where SNI-based routing sent it.
pub fn tls_hello(addr: &str, sni: &str) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(sni.to_owned())?)?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)?;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(&hello)?;
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back)?;
    println!(
        "{}",
        serde_json::json!({"event": "tls-hello", "sent": hello.len(), "echoed": back == hello})
    );
    Ok(())
}
