//! The signing key and certificates, in Istio's plug-in CA layout:
//!
//! | file | what |
//! |---|---|
//! | `ca-cert.pem` | the signing certificate (the root, or an intermediate) |
//! | `ca-key.pem` | its private key |
//! | `cert-chain.pem` | the chain from the signing certificate up to the root |
//! | `root-cert.pem` | the trust bundle: every root agents should trust (two during a rotation) |
//!
//! `mesh-agent ca init` writes a new self-signed root in this layout; an
//! existing root or intermediate is used by writing these files yourself.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use time::OffsetDateTime;

use super::Error;
use crate::{spiffe::SpiffeId, tls};

/// Holds the signing key.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates to send after a leaf: the signing certificate and any
    /// intermediates above it, without the roots.
    chain: Vec<String>,
    bundle: Vec<String>,
    signing_not_after: SystemTime,
    pub trust_domain: String,
}

/// What a new leaf certificate is for.
#[derive(Debug, Clone, Copy)]
pub enum Usage {
    /// A workload: server and client authentication (HBONE both ways).
    Workload,
    /// A node agent authenticating to the CA.
    Node,
    /// The CA's own endpoint.
    Server,
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 });
    std::io::Write::write_all(
        &mut o.open(path).map_err(|source| Error::Write {
            path: path.into(),
            source,
        })?,
        text.as_bytes(),
    )
    .map_err(|source| Error::Write {
        path: path.into(),
        source,
    })
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    // The system RNG does not fail on Linux; a zero serial would still be unique enough to notice.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// The file, next to Istio's four, that remembers the trust domain a CA
/// was made for.
pub const TRUST_DOMAIN_FILE: &str = "trust-domain";

/// The trust domain of the CA in `dir`: the one it was made for (its
/// `trust-domain` file), which a `--trust-domain` flag must not contradict;
/// for a CA without that file (Istio plug-in CA files made elsewhere) the
/// flag, else `cluster.local`.
pub fn trust_domain(dir: &Path, flag: Option<&str>) -> Result<String, Error> {
    let path = dir.join(TRUST_DOMAIN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(stored) => {
            let stored = stored.trim().to_owned();
            match flag {
                Some(f) if f != stored => Err(Error::TrustDomainConflict {
                    path,
                    stored,
                    flag: f.into(),
                }),
                _ => Ok(stored),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(flag.unwrap_or(DEFAULT_TRUST_DOMAIN).to_owned())
        }
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Creates a new CA in `dir` (Istio's file layout): a self-signed root, or,
/// with `parent`, an intermediate signed by the CA in that directory (which
/// then need not be online: only this directory is served).
pub fn init(
    dir: &Path,
    trust_domain: &str,
    validity: Duration,
    parent: Option<&Path>,
) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.into(),
        source,
    })?;
    let key_path = dir.join("ca-key.pem");
    if key_path.exists() {
        return Err(Error::Exists { path: key_path });
    }
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // A CA's name says which one it is, so rotations show in /config_dump.
    let serial = serial();
    let tag: String = serial
        .to_bytes()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let role = if parent.is_some() {
        "intermediate"
    } else {
        "root"
    };
    dn.push(DnType::CommonName, format!("mesh {role} CA {tag}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(if parent.is_some() {
        // An intermediate signs workloads only, never another CA.
        BasicConstraints::Constrained(0)
    } else {
        BasicConstraints::Unconstrained
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + validity;
    p.serial_number = Some(serial);
    let (cert_pem, chain, roots) = match parent {
        None => {
            let cert = p.self_signed(&key)?.pem();
            (cert.clone(), cert.clone(), cert)
        }
        Some(parent_dir) => {
            let up = Signer::load(parent_dir, trust_domain)?;
            p.use_authority_key_identifier_extension = true;
            p.not_after = p.not_after.min(up.signing_not_after.into());
            let cert = p.signed_by(&key, &up.issuer)?.pem();
            // The chain runs from this certificate up to the root.
            let parent_chain = read(&parent_dir.join("cert-chain.pem"))?;
            let roots = read(&parent_dir.join("root-cert.pem"))?;
            (cert.clone(), format!("{cert}{parent_chain}"), roots)
        }
    };
    write(&key_path, &key.serialize_pem(), true)?;
    write(
        &dir.join(TRUST_DOMAIN_FILE),
        &format!("{trust_domain}\n"),
        false,
    )?;
    write(&dir.join("ca-cert.pem"), &cert_pem, false)?;
    write(&dir.join("cert-chain.pem"), &chain, false)?;
    write(&dir.join("root-cert.pem"), &roots, false)?;
    Ok(key_path)
}

impl Signer {
    /// Loads the signing material from `dir`.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let cert_path = dir.join("ca-cert.pem");
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&dir.join("ca-key.pem"))?)?;
        let signing = tls::certs_from_pem("ca-cert.pem", &cert_pem)?;
        let info = tls::cert_info(&signing[0])?;
        let bundle_text = read(&dir.join("root-cert.pem"))?;
        let bundle = tls::TrustBundle::from_pems("root-cert.pem", &[bundle_text])?
            .pems()
            .to_vec();
        let chain_path = dir.join("cert-chain.pem");
        let chain_text = if chain_path.exists() {
            read(&chain_path)?
        } else {
            cert_pem.clone()
        };
        let chain: Vec<String> = tls::certs_from_pem("cert-chain.pem", &chain_text)?
            .iter()
            .map(tls::pem_of)
            .filter(|p| !bundle.contains(p))
            .collect();
        // A key that is not the certificate's would sign certificates no
        // one can verify: refuse the pair (a rotation written file by file
        // passes through such a state).
        {
            use x509_parser::prelude::FromDer as _;
            let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&signing[0])
                .map_err(|e| {
                    Error::Tls(tls::Error::BadCert {
                        what: "ca-cert.pem".into(),
                        reason: e.to_string(),
                    })
                })?;
            if *cert.tbs_certificate.subject_pki.subject_public_key.data != *key.public_key_raw() {
                return Err(Error::KeyMismatch { path: cert_path });
            }
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        if !issuer.key_usages().is_empty()
            && !issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign)
        {
            return Err(Error::NotCa { path: cert_path });
        }
        Ok(Self {
            issuer,
            chain,
            bundle,
            signing_not_after: info.not_after,
            trust_domain: trust_domain.into(),
        })
    }

    /// The roots agents should trust.
    pub fn bundle(&self) -> &[String] {
        &self.bundle
    }

    fn params(
        &self,
        id: &SpiffeId,
        usage: Usage,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, Error> {
        let mut p = CertificateParams::default();
        // SPIFFE X.509 SVIDs identify by URI SAN; the subject stays empty.
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = match usage {
            Usage::Workload => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::Node => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        };
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before.into();
        // Never outlive the signing certificate.
        p.not_after = not_after.min(self.signing_not_after).into();
        p.serial_number = Some(serial());
        Ok(p)
    }

    fn window(ttl: Duration) -> (SystemTime, SystemTime) {
        let now = SystemTime::now();
        // A minute of slack for clocks that disagree a little.
        (now - Duration::from_secs(60), now + ttl)
    }

    /// Signs `csr_pem` for `id`. The CSR must ask for exactly that identity;
    /// everything else in it (validity, usages) is the CA's choice.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        usage: Usage,
        ttl: Duration,
    ) -> Result<Vec<String>, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("bad CSR: {e}"))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [id.to_string()] {
            return Err(format!("the CSR asks for {asked:?}, not {id}"));
        }
        let (nb, na) = Self::window(ttl);
        let params = self.params(id, usage, nb, na).map_err(|e| e.to_string())?;
        let cert = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| format!("signing failed: {e}"))?;
        Ok(self.with_chain(cert.pem()))
    }

    /// Issues a key and certificate for `id` (node credentials, the CA's
    /// endpoint, operators' tools). `expired` backdates it, for testing how
    /// peers refuse an expired certificate.
    pub fn issue(
        &self,
        id: &SpiffeId,
        usage: Usage,
        ttl: Duration,
        expired: bool,
    ) -> Result<(Vec<String>, String), Error> {
        let key = KeyPair::generate()?;
        let (nb, na) = if expired {
            let now = SystemTime::now();
            (
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
        } else {
            Self::window(ttl)
        };
        let cert = self
            .params(id, usage, nb, na)?
            .signed_by(&key, &self.issuer)?;
        Ok((self.with_chain(cert.pem()), key.serialize_pem()))
    }

    /// `issue`, with the certificate's parameters changed by `tweak` first
    /// (tests of how peers refuse a defective certificate).
    #[cfg(test)]
    pub(crate) fn issue_tweaked(
        &self,
        id: &SpiffeId,
        usage: Usage,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<(Vec<String>, String), Error> {
        let key = KeyPair::generate()?;
        let (nb, na) = Self::window(Duration::from_secs(3600));
        let mut p = self.params(id, usage, nb, na)?;
        tweak(&mut p);
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((self.with_chain(cert.pem()), key.serialize_pem()))
    }

    fn with_chain(&self, leaf: String) -> Vec<String> {
        std::iter::once(leaf)
            .chain(self.chain.iter().cloned())
            .collect()
    }
}

/// Writes a chain, key and trust bundle as `<prefix>.crt`, `<prefix>.key`
/// and `<dir>/root-cert.pem`.
pub fn write_credential(
    out: &Path,
    name: &str,
    chain: &[String],
    key: &str,
    bundle: &[String],
) -> Result<(PathBuf, PathBuf), Error> {
    std::fs::create_dir_all(out).map_err(|source| Error::Write {
        path: out.into(),
        source,
    })?;
    let (crt, k) = (
        out.join(format!("{name}.crt")),
        out.join(format!("{name}.key")),
    );
    write(&crt, &chain.concat(), false)?;
    write(&k, key, true)?;
    write(&out.join("root-cert.pem"), &bundle.concat(), false)?;
    Ok((crt, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-ca-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_then_sign_a_csr_for_exactly_the_asked_identity() {
        let dir = tmp("sign");
        init(&dir, "td.local", Duration::from_secs(3600 * 24), None).unwrap();
        assert!(matches!(
            init(&dir, "td.local", Duration::from_secs(60), None),
            Err(Error::Exists { .. })
        ));
        let s = Signer::load(&dir, "td.local").unwrap();
        let id = SpiffeId::workload("td.local", "ns1", "sa1");
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let chain = s
            .sign_csr(&csr, &id, Usage::Workload, Duration::from_secs(600))
            .unwrap();
        assert_eq!(chain.len(), 1, "a root signer sends the leaf only");
        let der = tls::certs_from_pem("leaf", &chain[0]).unwrap();
        let info = tls::cert_info(&der[0]).unwrap();
        assert_eq!(info.identity.as_deref(), Some(id.to_string().as_str()));
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        assert!(
            lifetime <= Duration::from_secs(660) && lifetime >= Duration::from_secs(600),
            "{lifetime:?}"
        );
        // A CSR for another identity is refused.
        let other = SpiffeId::workload("td.local", "ns1", "admin");
        assert!(
            s.sign_csr(&csr, &other, Usage::Workload, Duration::from_secs(600))
                .unwrap_err()
                .contains("asks for")
        );
        assert!(
            s.sign_csr("garbage", &id, Usage::Workload, Duration::from_secs(60))
                .unwrap_err()
                .starts_with("bad CSR")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ca_remembers_its_trust_domain_and_refuses_a_contradiction() {
        let dir = tmp("td-stored");
        init(&dir, "foo.local", Duration::from_secs(3600), None).unwrap();
        assert_eq!(trust_domain(&dir, None).unwrap(), "foo.local");
        assert_eq!(trust_domain(&dir, Some("foo.local")).unwrap(), "foo.local");
        let e = trust_domain(&dir, Some("cluster.local"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("made for trust domain foo.local")
                && e.contains("--trust-domain cluster.local"),
            "{e}"
        );
        // CA files made elsewhere (no record): the flag, else Istio's default.
        std::fs::remove_file(dir.join(TRUST_DOMAIN_FILE)).unwrap();
        assert_eq!(trust_domain(&dir, Some("bar")).unwrap(), "bar");
        assert_eq!(trust_domain(&dir, None).unwrap(), DEFAULT_TRUST_DOMAIN);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_intermediate_signer_sends_its_certificate_with_the_leaf() {
        let root_dir = tmp("root");
        init(&root_dir, "td", Duration::from_secs(86400), None).unwrap();
        let root = Signer::load(&root_dir, "td").unwrap();
        // Make an intermediate signed by the root, in a second directory.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let inter = p.signed_by(&key, &root.issuer).unwrap();
        let dir = tmp("inter");
        std::fs::create_dir_all(&dir).unwrap();
        let root_pem = std::fs::read_to_string(root_dir.join("root-cert.pem")).unwrap();
        write(&dir.join("ca-cert.pem"), &inter.pem(), false).unwrap();
        write(&dir.join("ca-key.pem"), &key.serialize_pem(), true).unwrap();
        write(
            &dir.join("cert-chain.pem"),
            &format!("{}{root_pem}", inter.pem()),
            false,
        )
        .unwrap();
        write(&dir.join("root-cert.pem"), &root_pem, false).unwrap();
        let s = Signer::load(&dir, "td").unwrap();
        let (chain, _) = s
            .issue(
                &SpiffeId::node("td", "n1"),
                Usage::Node,
                Duration::from_secs(60),
                false,
            )
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf + intermediate, never the root");
        assert_eq!(
            chain[1],
            tls::pem_of(&tls::certs_from_pem("i", &inter.pem()).unwrap()[0])
        );
        for d in [root_dir, dir] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
