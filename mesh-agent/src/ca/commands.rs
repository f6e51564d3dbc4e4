//! The offline `mesh-agent ca` commands (everything but `ca run`): each
//! works on the CA's directory and returns what to print.

use std::{path::Path, time::Duration};

use super::{
    Error,
    nodes::{self, How, Record},
    signer::{self, Signer, Usage},
};
use crate::{config::CaCommand, spiffe::SpiffeId, tls};

/// Runs one offline command; `ca run` is the caller's (it needs a runtime).
pub fn run(command: CaCommand) -> Result<String, Error> {
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            validity,
            signed_by,
        } => init(
            &dir,
            trust_domain.as_deref(),
            validity,
            signed_by.as_deref(),
        ),
        CaCommand::Join {
            dir,
            trust_domain,
            node,
            out,
            ttl,
        } => join(&dir, trust_domain.as_deref(), &node, &out, ttl),
        CaCommand::Issue {
            dir,
            trust_domain,
            identity,
            out,
            name,
            ttl,
            expired,
        } => {
            let s = load(&dir, trust_domain.as_deref())?;
            let id: SpiffeId = identity.parse()?;
            let (chain, key) = s.issue(&id, Usage::Workload, ttl, expired)?;
            let (crt, k) = signer::write_credential(&out, &name, &chain, &key, s.bundle())?;
            Ok(format!(
                "certificate for {id}: {} and {}",
                crt.display(),
                k.display()
            ))
        }
        CaCommand::Nodes { dir, json } => list(&dir, json),
        CaCommand::Revoke { dir, node } => {
            let n = nodes::revoke(&dir, &node)?;
            Ok(format!(
                "revoked {n} node credential{} of {node}: the CA refuses it from now on \
                 (certificates the node already holds stay valid until they expire; \
                 `ca join --node {node}` gives the node a new credential)",
                if n == 1 { "" } else { "s" }
            ))
        }
        CaCommand::Run(_) => unreachable!("ca run needs the caller's runtime"),
    }
}

/// The signer of the CA in `dir`, in the trust domain it was made for.
fn load(dir: &Path, flag: Option<&str>) -> Result<Signer, Error> {
    let td = signer::trust_domain(dir, flag)?;
    Signer::load(dir, &td)
}

fn init(
    dir: &Path,
    flag: Option<&str>,
    validity: Duration,
    parent: Option<&Path>,
) -> Result<String, Error> {
    // An intermediate is in its parent's trust domain.
    let td = match parent {
        Some(p) => signer::trust_domain(p, flag)?,
        None => flag.unwrap_or(signer::DEFAULT_TRUST_DOMAIN).to_owned(),
    };
    signer::init(dir, &td, validity, parent)?;
    let what = if parent.is_some() {
        "an intermediate"
    } else {
        "a root"
    };
    Ok(format!(
        "created {what} CA for trust domain {td} in {}",
        dir.display()
    ))
}

fn join(
    dir: &Path,
    flag: Option<&str>,
    node: &str,
    out: &Path,
    ttl: Duration,
) -> Result<String, Error> {
    let s = load(dir, flag)?;
    let (chain, key) = s.issue(
        &SpiffeId::node(&s.trust_domain, node),
        Usage::Node,
        ttl,
        false,
    )?;
    let info =
        tls::certs_from_pem("node credential", &chain[0]).and_then(|d| tls::cert_info(&d[0]))?;
    // Recorded before it is handed out: a credential `ca revoke` cannot
    // find must not exist.
    nodes::add(
        dir,
        Record::new(node, &info.serial, info.not_after, How::Join),
    )?;
    let (crt, k) = signer::write_credential(out, node, &chain, &key, s.bundle())?;
    let until = humantime::format_rfc3339_seconds(info.not_after);
    Ok(format!(
        "node credential for {node}: {} and {}\n\
         serial {}, valid until {until}; the agent renews it with the CA at half its lifetime \
         (`mesh-agent ca nodes` lists credentials, `ca revoke --node {node}` withdraws them)",
        crt.display(),
        k.display(),
        info.serial
    ))
}

fn list(dir: &Path, json: bool) -> Result<String, Error> {
    let records = nodes::list(dir)?;
    if json {
        return Ok(serde_json::to_string_pretty(&records).unwrap_or_default());
    }
    let now = std::time::SystemTime::now();
    let mut out = format!(
        "{:<24} {:<34} {:<8} {:<8} {:<21} {}",
        "NODE", "SERIAL", "STATUS", "HOW", "ISSUED", "EXPIRES"
    );
    for r in &records {
        let how = match r.how {
            How::Join => "join",
            How::Renewal => "renewal",
        };
        out.push_str(&format!(
            "\n{:<24} {:<34} {:<8} {:<8} {:<21} {}",
            r.node,
            r.serial,
            r.status(now),
            how,
            nodes::rfc3339(r.issued_at),
            nodes::rfc3339(r.not_after)
        ));
    }
    if records.is_empty() {
        out.push_str(&format!(
            "\n(no node credentials recorded in {})",
            dir.display()
        ));
    }
    Ok(out)
}
