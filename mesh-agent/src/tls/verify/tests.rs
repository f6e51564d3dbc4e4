//! The verifiers' decisions, one certificate defect at a time, through
//! real TLS 1.3 handshakes on loopback: what each side refuses, and the
//! reason it is counted under.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::{
    ca::signer::Usage,
    testing::{Pki, TRUST_DOMAIN},
    tls::{self, FixedCert, NoClientCert},
};

fn workload(name: &str) -> SpiffeId {
    SpiffeId::workload(TRUST_DOMAIN, "default", name)
}

fn certified(chain_key: (Vec<String>, String)) -> Arc<rustls::sign::CertifiedKey> {
    let (chain, key) = chain_key;
    tls::certified_key(
        "test",
        tls::certs_from_pem("chain", &chain.concat()).unwrap(),
        tls::key_from_pem("key", &key).unwrap(),
    )
    .unwrap()
}

/// What one handshake gave each side: `Ok(peer identity)` or the reason.
struct Outcome {
    server: Result<Option<String>, &'static str>,
    client: Result<(), &'static str>,
}

/// A handshake between a server presenting `server_cert` (trusting
/// `server_roots`) and a client presenting `client_cert` (trusting
/// `client_roots`, expecting `expect`).
async fn handshake(
    server_cert: Arc<rustls::sign::CertifiedKey>,
    server_roots: &Pki,
    client_cert: Option<Arc<rustls::sign::CertifiedKey>>,
    client_roots: &Pki,
    expect: &SpiffeId,
) -> Outcome {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        server_roots.bundle(),
        TRUST_DOMAIN,
        true,
    ));
    let server =
        tls::server_config(verifier, Arc::new(FixedCert(server_cert)), &[tls::ALPN_H2]).unwrap();
    let resolver: Arc<dyn rustls::client::ResolvesClientCert> = match client_cert {
        Some(c) => Arc::new(FixedCert(c)),
        None => Arc::new(NoClientCert),
    };
    let client = tls::client_config(
        Arc::new(SpiffeServerVerifier::new(
            client_roots.bundle(),
            expect.clone(),
        )),
        resolver,
        &[tls::ALPN_H2],
    )
    .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        match tokio_rustls::TlsAcceptor::from(Arc::new(server))
            .accept(tcp)
            .await
        {
            Ok(mut s) => {
                let peer = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(tls::cert_identity)
                    .map(|i| i.to_string());
                // One byte, so the client can tell a session from a refusal.
                tokio::io::AsyncWriteExt::write_all(&mut s, b"x")
                    .await
                    .unwrap();
                tokio::io::AsyncWriteExt::flush(&mut s).await.unwrap();
                Ok(peer)
            }
            Err(e) => Err(failure_reason(&e)),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let client = match tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
    {
        // TLS 1.3: the client finishes before the server has read its
        // certificate; a refusal reaches it as an alert on the first read.
        Ok(mut s) => {
            let mut b = [0u8; 1];
            match tokio::io::AsyncReadExt::read(&mut s, &mut b).await {
                Ok(_) => Ok(()),
                Err(e) => Err(failure_reason(&e)),
            }
        }
        Err(e) => Err(failure_reason(&e)),
    };
    Outcome {
        server: accept.await.unwrap(),
        client,
    }
}

#[tokio::test]
async fn a_valid_pair_connects_and_the_server_learns_the_client_identity() {
    let pki = Pki::new();
    let (server, client) = (workload("server"), workload("client"));
    let o = handshake(
        pki.certified(&server, Usage::Workload),
        &pki,
        Some(pki.certified(&client, Usage::Workload)),
        &pki,
        &server,
    )
    .await;
    assert_eq!(o.server, Ok(Some(client.to_string())));
    assert_eq!(o.client, Ok(()));
}

#[tokio::test]
async fn the_client_refuses_servers_by_defect() {
    let pki = Pki::new();
    let other_ca = Pki::new();
    let other_domain = Pki::for_domain("elsewhere.local");
    let server = workload("server");
    let client = Some(pki.certified(&workload("client"), Usage::Workload));
    let cases: Vec<(&str, Arc<rustls::sign::CertifiedKey>)> = vec![
        ("unknown_ca", other_ca.certified(&server, Usage::Workload)),
        (
            "expired",
            certified(
                pki.signer
                    .issue(&server, Usage::Workload, std::time::Duration::ZERO, true)
                    .unwrap(),
            ),
        ),
        (
            "not_yet_valid",
            certified(
                pki.signer
                    .issue_tweaked(&server, Usage::Workload, |p| {
                        p.not_before = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
                    })
                    .unwrap(),
            ),
        ),
        (
            "wrong_identity",
            pki.certified(&workload("impostor"), Usage::Workload),
        ),
        (
            "wrong_trust_domain",
            // Signed by a CA this client trusts, for another trust domain.
            certified(
                pki.signer
                    .issue(
                        &SpiffeId::workload("elsewhere.local", "default", "server"),
                        Usage::Workload,
                        std::time::Duration::from_secs(3600),
                        false,
                    )
                    .unwrap(),
            ),
        ),
        (
            "no_identity",
            certified(
                pki.signer
                    .issue_tweaked(&server, Usage::Workload, |p| p.subject_alt_names.clear())
                    .unwrap(),
            ),
        ),
    ];
    drop(other_domain);
    for (want, cert) in cases {
        let o = handshake(cert, &pki, client.clone(), &pki, &server).await;
        assert_eq!(o.client, Err(want), "a server with {want}");
        assert!(
            o.server.is_err(),
            "{want}: the server must not see a session"
        );
    }
}

#[tokio::test]
async fn the_server_refuses_clients_by_defect() {
    let pki = Pki::new();
    let other_ca = Pki::new();
    let server = workload("server");
    let client = workload("client");
    let cases: Vec<(&str, Option<Arc<rustls::sign::CertifiedKey>>)> = vec![
        ("no_client_certificate", None),
        (
            "unknown_ca",
            Some(other_ca.certified(&client, Usage::Workload)),
        ),
        (
            "expired",
            Some(certified(
                pki.signer
                    .issue(&client, Usage::Workload, std::time::Duration::ZERO, true)
                    .unwrap(),
            )),
        ),
        (
            "wrong_trust_domain",
            Some(certified(
                pki.signer
                    .issue(
                        &SpiffeId::workload("elsewhere.local", "default", "client"),
                        Usage::Workload,
                        std::time::Duration::from_secs(3600),
                        false,
                    )
                    .unwrap(),
            )),
        ),
        (
            "no_identity",
            Some(certified(
                pki.signer
                    .issue_tweaked(&client, Usage::Workload, |p| p.subject_alt_names.clear())
                    .unwrap(),
            )),
        ),
        (
            // A server-only certificate is no client credential.
            "bad_certificate",
            Some(pki.certified(&client, Usage::Server)),
        ),
    ];
    for (want, cert) in cases {
        let o = handshake(
            pki.certified(&server, Usage::Workload),
            &pki,
            cert,
            &pki,
            &server,
        )
        .await;
        assert_eq!(o.server, Err(want), "a client with {want}");
        assert!(o.client.is_err(), "{want}: the client must see the refusal");
    }
}

#[test]
fn every_reason_a_failure_can_be_counted_under_is_exported() {
    for r in [
        Rejection::NoIdentity,
        Rejection::WrongTrustDomain {
            found: String::new(),
            found_domain: String::new(),
            want: String::new(),
        },
        Rejection::WrongIdentity {
            found: String::new(),
            want: String::new(),
        },
    ] {
        assert!(FAILURE_REASONS.contains(&r.reason()), "{}", r.reason());
    }
}
