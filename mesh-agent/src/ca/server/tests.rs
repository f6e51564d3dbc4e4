//! The CA in process, over real TLS on loopback: who gets what, every
//! refusal with its reason, a rotation of its files without a restart, and
//! a node renewing its own credential.

use std::{path::PathBuf, time::Duration};

use super::*;
use crate::{
    identity::ca_client::{self, CaAuth, CaClient},
    testing::{NODE, Pki, TRUST_DOMAIN, TempDir, ca_config, workload_yaml},
};

/// A CA placing `web` (sa `web`) on `NODE` and `db` on `node-b`.
async fn ca(pki: &Pki) -> (Running, TempDir) {
    let placement = TempDir::new("placement");
    let yaml = format!(
        "workloads:\n{}  - {{name: db, namespace: default, serviceAccount: db, ips: [10.0.0.9], node: node-b}}\n",
        workload_yaml("web", "127.0.0.2", "web", "app: web"),
    );
    std::fs::write(placement.join("w.yaml"), yaml).unwrap();
    (
        start(ca_config(pki, &placement.0)).await.unwrap(),
        placement,
    )
}

fn client(pki: &Pki, ca: &Running, cred: (PathBuf, PathBuf)) -> CaClient {
    CaClient::new(
        &ca.addr.to_string(),
        pki.bundle(),
        TRUST_DOMAIN,
        CaAuth::NodeCredential {
            cert: cred.0,
            key: cred.1,
        },
    )
    .unwrap()
}

/// A client of `ca` presenting a fresh hour-long credential of `node`.
fn node_client(pki: &Pki, ca: &Running, node: &str) -> CaClient {
    client(
        pki,
        ca,
        pki.node_credential(node, Duration::from_secs(3600)),
    )
}

/// A key and CSR asking for `id`.
fn csr(id: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn refused(r: Result<protocol::CertificateResponse, ca_client::Error>) -> (StatusCode, String) {
    match r {
        Err(ca_client::Error::Refused { status, reason }) => (status, reason),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a certificate"),
    }
}

#[tokio::test]
async fn a_node_gets_certificates_only_for_pods_placed_on_it() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    let c = node_client(&pki, &ca, NODE);
    let web = SpiffeId::workload(TRUST_DOMAIN, "default", "web");
    let r = c
        .sign(&web, csr(&web.to_string()), Duration::from_secs(600))
        .await
        .unwrap();
    let leaf = &tls::certs_from_pem("leaf", &r.cert_chain[0]).unwrap()[0];
    let info = tls::cert_info(leaf).unwrap();
    assert_eq!(info.identity.as_deref(), Some(web.to_string().as_str()));
    let life = info.not_after.duration_since(info.not_before).unwrap();
    // 600 s asked for, 60 s of backdating for clock skew.
    assert_eq!(life, Duration::from_secs(660));
    assert_eq!(r.trust_bundle, pki.signer.bundle());

    let db = SpiffeId::workload(TRUST_DOMAIN, "default", "db");
    let (status, why) = refused(
        c.sign(&db, csr(&db.to_string()), Duration::from_secs(600))
            .await,
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        why,
        format!("no pod with identity {db} is scheduled on node {NODE}")
    );
    ca.stop().await;
}

#[tokio::test]
async fn requests_that_do_not_add_up_are_refused_with_the_reason() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    let c = node_client(&pki, &ca, NODE);
    let web = SpiffeId::workload(TRUST_DOMAIN, "default", "web");
    // The CSR asks for another identity than the request.
    let (status, why) = refused(
        c.sign(
            &web,
            csr("spiffe://cluster.local/ns/default/sa/db"),
            Duration::from_secs(60),
        )
        .await,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(why.contains("the CSR asks for"), "{why}");
    // Another trust domain.
    let foreign = SpiffeId::workload("elsewhere.local", "default", "web");
    let (status, why) = refused(
        c.sign(&foreign, csr(&foreign.to_string()), Duration::from_secs(60))
            .await,
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        why.contains("is not in trust domain cluster.local"),
        "{why}"
    );
    // Another node's credential.
    let other = SpiffeId::node(TRUST_DOMAIN, "node-b");
    let (status, why) = refused(
        c.sign(&other, csr(&other.to_string()), Duration::from_secs(60))
            .await,
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        why,
        format!("node {NODE} may renew only its own credential, not node-b's")
    );
    // The CA's own identity.
    let ca_id = SpiffeId::ca(TRUST_DOMAIN);
    let (status, _) = refused(
        c.sign(&ca_id, csr(&ca_id.to_string()), Duration::from_secs(60))
            .await,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    ca.stop().await;
}

#[tokio::test]
async fn callers_without_a_credential_of_this_ca_are_refused_at_the_handshake() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    let stranger = Pki::new();
    let c = CaClient::new(
        &ca.addr.to_string(),
        pki.bundle(),
        TRUST_DOMAIN,
        CaAuth::NodeCredential {
            cert: stranger.node_credential(NODE, Duration::from_secs(3600)).0,
            key: stranger.node_credential(NODE, Duration::from_secs(3600)).1,
        },
    )
    .unwrap();
    let err = c.trust_bundle().await.unwrap_err().to_string();
    assert!(
        err.contains("UnknownCA"),
        "another CA's node credential: {err}"
    );
    ca.stop().await;
}

#[tokio::test]
async fn a_rotation_of_the_ca_files_is_picked_up_without_a_restart() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    let c = node_client(&pki, &ca, NODE);
    assert_eq!(c.trust_bundle().await.unwrap().len(), 1);

    // Phase 1: a second root published next to the first.
    let next = Pki::new();
    let root1 = std::fs::read_to_string(pki.dir.join("root-cert.pem")).unwrap();
    let root2 = std::fs::read_to_string(next.dir.join("root-cert.pem")).unwrap();
    std::fs::write(pki.dir.join("root-cert.pem"), format!("{root1}{root2}")).unwrap();
    let mut roots = 0;
    for _ in 0..100 {
        roots = c.trust_bundle().await.unwrap().len();
        if roots == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(roots, 2, "the second root was not published");

    let web = SpiffeId::workload(TRUST_DOMAIN, "default", "web");
    let r = c
        .sign(&web, csr(&web.to_string()), Duration::from_secs(60))
        .await
        .unwrap();
    let issuer = |r: &protocol::CertificateResponse| {
        tls::cert_info(&tls::certs_from_pem("leaf", &r.cert_chain[0]).unwrap()[0])
            .unwrap()
            .issuer
    };
    let old_issuer = issuer(&r);

    // Phase 2: the new root signs.
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        std::fs::copy(next.dir.join(f), pki.dir.join(f)).unwrap();
    }
    let mut new_issuer = old_issuer.clone();
    for _ in 0..100 {
        let r = c
            .sign(&web, csr(&web.to_string()), Duration::from_secs(60))
            .await
            .unwrap();
        new_issuer = issuer(&r);
        if new_issuer != old_issuer {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(
        new_issuer, old_issuer,
        "the new signing certificate never signed"
    );
    ca.stop().await;
}

#[tokio::test]
async fn a_node_renews_its_credential_and_uses_the_new_one() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    // A credential that expires in 3 s (valid from a minute ago: half-life
    // long past, so it is due at once).
    let (cert, key) = pki.node_credential(NODE, Duration::from_secs(3));
    let c = client(&pki, &ca, (cert.clone(), key.clone()));
    let old = c.node_credential().unwrap();
    assert!(c.node_credential_due().unwrap() <= std::time::SystemTime::now());
    let new = c.renew_node_credential().await.unwrap();
    assert_ne!(new.serial, old.serial);
    assert_eq!(new.identity, old.identity);
    assert_eq!(c.node_credential().unwrap().serial, new.serial);
    // Written back for the next start.
    let on_disk = tls::cert_info(
        &tls::certs_from_pem("crt", &std::fs::read_to_string(&cert).unwrap()).unwrap()[0],
    )
    .unwrap();
    assert_eq!(on_disk.serial, new.serial);
    let restarted = client(&pki, &ca, (cert, key));
    assert_eq!(restarted.node_credential().unwrap().serial, new.serial);
    // Once the old credential has expired, requests still get through:
    // the new one is the one presented.
    while std::time::SystemTime::now() <= old.not_after + Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let web = SpiffeId::workload(TRUST_DOMAIN, "default", "web");
    c.sign(&web, csr(&web.to_string()), Duration::from_secs(60))
        .await
        .expect("signed with the renewed credential");
    ca.stop().await;
}

#[tokio::test]
async fn the_agent_renews_its_node_credential_when_it_is_due() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    // Valid from a minute ago for 3 s more: past its half-life already.
    let c = client(&pki, &ca, pki.node_credential(NODE, Duration::from_secs(3)));
    let first = c.node_credential().unwrap().serial;
    let manager = crate::identity::IdentityManager::new(
        TRUST_DOMAIN,
        c,
        pki.bundle(),
        Duration::from_secs(3600),
        std::sync::Arc::new(crate::telemetry::metrics::Metrics::new().unwrap()),
    );
    let task = manager.renew_node_credential_when_due();
    let renewed = || {
        manager
            .dump()
            .node_credential
            .map(|i| i.serial)
            .filter(|s| *s != first)
    };
    let mut serial = None;
    for _ in 0..200 {
        serial = renewed();
        if serial.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(serial.is_some(), "not renewed");
    task.abort();
    ca.stop().await;
}

#[tokio::test]
async fn a_revoked_node_is_refused_from_its_next_request_renewals_included() {
    let pki = Pki::new();
    let (ca, _p) = ca(&pki).await;
    let c = node_client(&pki, &ca, NODE);
    let joined = c.node_credential().unwrap();
    nodes::add(
        &pki.dir.0,
        nodes::Record::new(NODE, &joined.serial, joined.not_after, nodes::How::Join),
    )
    .unwrap();
    let other = node_client(&pki, &ca, "node-b");
    let web = SpiffeId::workload(TRUST_DOMAIN, "default", "web");
    let db = SpiffeId::workload(TRUST_DOMAIN, "default", "db");
    c.sign(&web, csr(&web.to_string()), Duration::from_secs(60))
        .await
        .expect("not revoked yet");
    // A renewal is recorded as one of the node's credentials.
    let renewed = c.renew_node_credential().await.unwrap();
    let recorded: Vec<_> = nodes::list(&pki.dir.0)
        .unwrap()
        .into_iter()
        .map(|r| (r.serial, r.how))
        .collect();
    assert_eq!(
        recorded,
        [
            (joined.serial.clone(), nodes::How::Join),
            (renewed.serial.clone(), nodes::How::Renewal)
        ]
    );

    assert_eq!(nodes::revoke(&pki.dir.0, NODE).unwrap(), 2);
    // The renewed credential (the one the client presents now) is refused
    // at once: no reload, no restart.
    let (status, why) = refused(
        c.sign(&web, csr(&web.to_string()), Duration::from_secs(60))
            .await,
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        why.contains(&format!("serial {}", renewed.serial)) && why.contains("revoked"),
        "{why}"
    );
    assert!(
        c.renew_node_credential().await.is_err(),
        "no way back by renewal"
    );
    other
        .sign(&db, csr(&db.to_string()), Duration::from_secs(60))
        .await
        .expect("another node is not affected");
    ca.stop().await;
}
