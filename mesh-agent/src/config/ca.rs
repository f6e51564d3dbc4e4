//! The settings of `mesh-agent ca …`: the CA's commands and the server's
//! flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::{LogFormat, humantime_serde_compat};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new root CA for a new mesh in DIR (Istio's plug-in CA
    /// files), or an intermediate signed by another CA.
    Init {
        /// Directory to create the CA's files in (ca-cert.pem, ca-key.pem,
        /// cert-chain.pem, root-cert.pem, trust-domain).
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        /// The mesh's SPIFFE trust domain, remembered with the CA's files
        /// [default: cluster.local; an intermediate takes its parent's].
        #[arg(long, env = "MESH_TRUST_DOMAIN")]
        trust_domain: Option<String>,
        /// How long the CA certificate is valid.
        #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Make an intermediate signed by the CA in this directory instead of a root.
        #[arg(long, value_name = "DIR")]
        signed_by: Option<PathBuf>,
    },
    /// Serve certificate requests from node agents.
    Run(Box<CaRunConfig>),
    /// Issue a node credential (written to OUT as <node>.crt, <node>.key and
    /// root-cert.pem) and record it, so that `ca revoke` can withdraw it.
    Join {
        /// The CA's directory.
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        /// Only checked: the CA's own trust domain is used, and a different
        /// one is refused.
        #[arg(long, env = "MESH_TRUST_DOMAIN")]
        trust_domain: Option<String>,
        /// The node's name, as the placement (workload registry or
        /// Kubernetes) names it.
        #[arg(long)]
        node: String,
        /// Directory to write the credential to.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the credential; the agent renews it with the CA at
        /// half of it (up to `ca run --max-node-cert-ttl`).
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// List the node credentials the CA issued (by `ca join` and renewals):
    /// serial, status (valid, revoked, expired), issue and expiry times.
    Nodes {
        /// The CA's directory.
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        /// Print the records as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every credential of a node: the CA refuses it from the next
    /// request on (a running `ca run` needs no restart). Certificates the
    /// node already holds stay valid until they expire.
    Revoke {
        /// The CA's directory.
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        /// The node whose credentials to revoke.
        #[arg(long)]
        node: String,
    },
    /// Issue a certificate for any SPIFFE ID (for clients outside the mesh, and tests).
    Issue {
        /// The CA's directory.
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        /// Only checked: the CA's own trust domain is used, and a different
        /// one is refused.
        #[arg(long, env = "MESH_TRUST_DOMAIN")]
        trust_domain: Option<String>,
        /// The SPIFFE ID to put in the certificate.
        #[arg(long)]
        identity: String,
        /// Directory to write the certificate, key and root-cert.pem to.
        #[arg(long)]
        out: PathBuf,
        /// File name stem for the certificate and key.
        #[arg(long, default_value = "cert")]
        name: String,
        /// Lifetime of the certificate.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Make it already expired (to check that peers refuse it).
        #[arg(long)]
        expired: bool,
    },
}

/// Settings of `mesh-agent ca run`.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaRunConfig {
    /// Directory with ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem
    /// (watched: a rotation needs no restart), and the node records.
    #[arg(long, env = "MESH_CA_DIR")]
    pub dir: PathBuf,
    /// Only checked: the CA's own trust domain (remembered by `ca init`) is
    /// used, and a different one is refused; for CA files made elsewhere,
    /// the trust domain [default: cluster.local].
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Address to serve agents on (Istio's CA port).
    #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Placement (required unless --kubernetes): configuration files or
    /// directories with the workload registry and/or Kubernetes Pods (each
    /// pod with its node), re-read when they change. Repeatable.
    #[arg(
        long,
        env = "MESH_CONFIG",
        value_name = "PATH",
        value_delimiter = ',',
        visible_alias = "workloads",
        required_unless_present = "kubernetes"
    )]
    pub config: Vec<PathBuf>,
    /// The label that puts pods in the mesh, as the agents are given it:
    /// the CA signs only for pods the agents enrol.
    #[arg(long, env = "MESH_DATAPLANE_MODE_LABEL", default_value = crate::registry::ambient::DEFAULT_LABEL)]
    pub dataplane_mode_label: String,
    /// Placement from the Kubernetes API too: every pod and its node (in a
    /// pod: its service account; elsewhere KUBECONFIG).
    #[arg(long, env = "MESH_KUBERNETES")]
    pub kubernetes: bool,
    /// Upper bound on the lifetime of a workload certificate.
    #[arg(long, env = "MESH_MAX_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub max_workload_cert_ttl: Duration,
    /// Upper bound on the lifetime of a renewed node credential (what
    /// `ca join --ttl` gives by default).
    #[arg(long, env = "MESH_MAX_NODE_CERT_TTL", default_value = "8760h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub max_node_cert_ttl: Duration,
    /// Kubernetes API server for TokenReview (agents authenticating with a token).
    #[arg(long, env = "MESH_KUBE_API")]
    pub kube_api: Option<String>,
    /// The CA's own token for the API server.
    #[arg(long, env = "MESH_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// CA bundle of the API server (https).
    #[arg(long, env = "MESH_KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,
    /// The service account node agents run as.
    #[arg(
        long,
        env = "MESH_KUBE_AGENT_SA",
        default_value = "system:serviceaccount:mesh-system:mesh-agent"
    )]
    pub kube_agent_sa: String,
    /// Audience agents' tokens are bound to (checked by the TokenReview).
    #[arg(long, env = "MESH_KUBE_AUDIENCE")]
    pub kube_audience: Option<String>,
    /// Log filter (tracing's syntax: `info`, `debug`, `mesh_agent=debug`).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
