//! `mesh-agent ca …` as an operator runs it, without root: the trust domain
//! the CA remembers, node credentials listed and revoked, and help that
//! describes every flag.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .env_remove("MESH_TRUST_DOMAIN")
        .env_remove("MESH_CA_DIR")
        .output()
        .expect("run mesh-agent");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory of this test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mesh-ca-cli-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn at(&self, p: &str) -> String {
        self.0.join(p).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn identity_in(crt: &Path) -> String {
    let pem = std::fs::read_to_string(crt).unwrap();
    let der = mesh_agent::tls::certs_from_pem("crt", &pem).unwrap();
    mesh_agent::tls::cert_info(&der[0])
        .unwrap()
        .identity
        .expect("a SPIFFE ID")
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = agent(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}

#[test]
fn the_ca_remembers_its_trust_domain() {
    let d = Dir::new("td");
    let (ca, out) = (d.at("ca"), d.at("out"));
    ok(&["ca", "init", "--dir", &ca, "--trust-domain", "foo.local"]);
    // No flag: the CA's own trust domain, not cluster.local.
    let said = ok(&["ca", "join", "--dir", &ca, "--node", "n1", "--out", &out]);
    assert!(said.contains("valid until"), "{said}");
    assert_eq!(
        identity_in(&d.0.join("out/n1.crt")),
        "spiffe://foo.local/mesh/node/n1"
    );
    ok(&[
        "ca",
        "issue",
        "--dir",
        &ca,
        "--identity",
        "spiffe://foo.local/ns/a/sa/b",
        "--out",
        &out,
    ]);
    // A contradicting flag is refused, by every command that signs.
    for args in [
        &["ca", "join", "--dir", &ca, "--node", "n2", "--out", &out][..],
        &[
            "ca",
            "issue",
            "--dir",
            &ca,
            "--identity",
            "spiffe://x/ns/a/sa/b",
            "--out",
            &out,
        ],
        &[
            "ca",
            "run",
            "--dir",
            &ca,
            "--config",
            &out,
            "--listen",
            "127.0.0.1:0",
        ],
        &["ca", "init", "--dir", &d.at("sub"), "--signed-by", &ca],
    ] {
        let mut args = args.to_vec();
        args.extend(["--trust-domain", "cluster.local"]);
        let (code, _, err) = agent(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(
            err.contains("made for trust domain foo.local")
                && err.contains("--trust-domain cluster.local contradicts it"),
            "{args:?}: {err}"
        );
    }
    assert!(!d.0.join("out/n2.crt").exists(), "nothing issued");
    // An intermediate takes its parent's.
    let said = ok(&["ca", "init", "--dir", &d.at("sub"), "--signed-by", &ca]);
    assert!(said.contains("for trust domain foo.local"), "{said}");
}

#[test]
fn node_credentials_are_listed_and_revoked() {
    let d = Dir::new("nodes");
    let (ca, out) = (d.at("ca"), d.at("out"));
    ok(&["ca", "init", "--dir", &ca]);
    let empty = ok(&["ca", "nodes", "--dir", &ca]);
    assert!(empty.contains("no node credentials recorded"), "{empty}");
    for n in ["n1", "n2"] {
        ok(&[
            "ca", "join", "--dir", &ca, "--node", n, "--out", &out, "--ttl", "720h",
        ]);
    }
    let status = |text: &str, node: &str| -> String {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .unwrap_or_else(|| panic!("{node} not listed: {text}"))
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned()
    };
    let listed = ok(&["ca", "nodes", "--dir", &ca]);
    assert_eq!(status(&listed, "n1"), "valid", "{listed}");
    assert_eq!(status(&listed, "n2"), "valid", "{listed}");

    let said = ok(&["ca", "revoke", "--dir", &ca, "--node", "n1"]);
    assert!(
        said.starts_with("revoked 1 node credential of n1"),
        "{said}"
    );
    let listed = ok(&["ca", "nodes", "--dir", &ca]);
    assert_eq!(status(&listed, "n1"), "revoked", "{listed}");
    assert_eq!(status(&listed, "n2"), "valid", "{listed}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["ca", "nodes", "--dir", &ca, "--json"])).unwrap();
    let revoked: Vec<_> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("revokedAt").is_some())
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(revoked, ["n1"]);

    let (code, _, err) = agent(&["ca", "revoke", "--dir", &ca, "--node", "n3"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("no node credential of n3 is recorded"),
        "{err}"
    );
}

/// The flags of a `--help` text and whether each has a description (on
/// its line, or on the lines under it).
fn described_flags(help: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = help.lines().collect();
    let mut flags = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if !t.starts_with('-') || line.len() - t.len() > 6 {
            continue;
        }
        let name = t
            .split([' ', ','])
            .find(|w| w.starts_with("--"))
            .unwrap_or(t)
            .to_owned();
        // `--dir <DIR>  What it is` or the description on the next lines.
        let inline = t
            .split_once("  ")
            .is_some_and(|(_, d)| !d.trim().is_empty());
        let below = lines.get(i + 1).is_some_and(|next| {
            let n = next.trim_start();
            next.len() - n.len() > 6 && !n.is_empty() && !n.starts_with('[')
        });
        flags.push((name, inline || below));
    }
    flags
}

#[test]
fn every_ca_flag_is_described() {
    for sub in ["init", "run", "join", "nodes", "revoke", "issue"] {
        let (code, help, _) = agent(&["ca", sub, "--help"]);
        assert_eq!(code, 0);
        let flags = described_flags(&help);
        assert!(flags.len() >= 2, "ca {sub}: no flags parsed from {help}");
        let bare: Vec<_> = flags.iter().filter(|(_, d)| !d).map(|(f, _)| f).collect();
        assert!(
            bare.is_empty(),
            "ca {sub}: {bare:?} without a description:\n{help}"
        );
    }
    let (_, help, _) = agent(&["ca", "run", "--help"]);
    assert!(help.contains("required unless --kubernetes"), "{help}");
}
