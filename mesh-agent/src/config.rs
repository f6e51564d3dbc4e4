//! The agent's settings: one `Config`, every field a clap flag with a
//! `MESH_*` environment variable (clap is the only reader of the
//! environment), logged at start and served at `/config_dump`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

mod ca;
mod cidr;
mod commands;
pub use ca::{CaCommand, CaRunConfig};
pub use cidr::Cidr;
pub use commands::{BpfCommand, CniCommand, Inspect, Output, Pins, Threshold};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version = crate::BUILD,
    about = "Node agent of the eBPF service mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs, enrol the node's pods and proxy their traffic.
    Run(Box<Config>),
    /// Check Istio configuration files the way `istioctl validate` does:
    /// every problem with its file, line, resource and field; exit status 1
    /// when any is an error.
    Validate {
        /// Files or directories (walked recursively) of YAML or JSON; `-`
        /// reads standard input.
        #[arg(required = true, value_name = "FILE|DIR|-")]
        paths: Vec<PathBuf>,
        /// Print errors (and warnings) only, not notes (fields accepted but
        /// not yet enforced, skipped objects).
        #[arg(long)]
        errors_only: bool,
        /// Treat warnings (policies the agent does not enforce) as errors:
        /// exit status 1 when there is any. For CI pipelines.
        #[arg(long)]
        strict: bool,
        /// Print the problems as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check configuration across resources, as `istioctl analyze` does: a
    /// route to an undefined subset or an unknown host, two VirtualServices
    /// for one host, a subset that selects no pod, a missing gateway,
    /// STRICT mTLS with pods outside the mesh. Each finding has a stable
    /// code and a one-line fix; exit status 79 when one is at or above
    /// --failure-threshold.
    Analyze {
        /// Files or directories (walked recursively) of YAML or JSON: the
        /// Istio resources with the Services, Pods and registries they
        /// refer to.
        #[arg(required = true, value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
        /// The lowest level that fails the run.
        #[arg(long, value_enum, default_value_t = Threshold::Error)]
        failure_threshold: Threshold,
        /// The label that puts pods in the mesh, as the agents are given it.
        #[arg(long, env = "MESH_DATAPLANE_MODE_LABEL", default_value = crate::registry::ambient::DEFAULT_LABEL)]
        dataplane_mode_label: String,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Detach every program from every pod and remove every pin an agent
    /// left under --bpffs-dir, a crashed or killed one's included (after
    /// the DaemonSet is deleted: a cleanup Job, or `kubectl debug node`).
    /// Run it when no agent runs there: a running agent holds its own
    /// attachments until it exits.
    Uninstall {
        /// Directory on bpffs where the agents pin maps and links.
        #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
        bpffs_dir: PathBuf,
        /// Also take the CNI plugin out of the network configurations here
        /// (the node's `/etc/cni/net.d`).
        #[arg(long, requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        /// …and remove its binary from here (the node's `/opt/cni/bin`).
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
    /// The CNI plugin that enrols pods before their containers start.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
    /// Ask a running agent what it is doing (its admin port):
    /// readiness, configuration, pods, certificates, programs, drops.
    Status(Inspect),
    /// The pods the agent enrolled: addresses, identity, listeners.
    Workloads(Inspect),
    /// The services the agent routes to: addresses, ports, endpoints.
    Services(Inspect),
    /// The policies in force for each enrolled pod.
    Policies(Inspect),
    /// Workload certificates and their expiry, and the trust bundle.
    Certs(Inspect),
    /// Live connections: source, destination, identities, bytes, age.
    Connections(Inspect),
    /// Show the log filter, or set it (`info`, `mesh_agent::proxy=debug`).
    LogLevel {
        /// The new filter, in tracing's syntax; none shows the current one.
        level: Option<String>,
        #[command(flatten)]
        inspect: Inspect,
    },
    /// Everything the agent knows, as JSON (`/config_dump`).
    ConfigDump(Inspect),
    /// The node's eBPF programs and maps, read from the agent's pins.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of `mesh-agent run`.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Configuration files or directories (YAML/JSON, re-read when they
    /// change): Istio resources, Kubernetes Services, EndpointSlices,
    /// Endpoints, Pods and Namespaces, and workload registries. Repeatable.
    #[arg(
        long,
        env = "MESH_CONFIG",
        value_name = "PATH",
        value_delimiter = ',',
        visible_alias = "workloads",
        alias = "istio-config"
    )]
    pub config: Vec<PathBuf>,

    /// Read configuration from the Kubernetes API too (in a pod: its service
    /// account; elsewhere KUBECONFIG): this node's Pods, Services,
    /// EndpointSlices, Namespaces and the Istio resources.
    #[arg(long, env = "MESH_KUBERNETES")]
    pub kubernetes: bool,

    /// With --kubernetes, also watch the pods of other nodes, to know the
    /// identity to expect from each.
    #[arg(long, env = "MESH_KUBE_REMOTE_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kube_remote_pods: bool,

    /// Where pod cgroups are found for pods known by UID (Kubernetes Pods).
    #[arg(long, env = "MESH_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// The cluster's DNS domain (service host names end with `.svc.<domain>`).
    #[arg(long, env = "MESH_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// The label (on a pod, or its namespace) whose value `ambient` puts
    /// Kubernetes pods in this mesh, `none` keeping a pod out. Our own by
    /// default, so that a cluster running Istio ambient keeps its pods;
    /// `istio.io/dataplane-mode` carries the pods ztunnel would. A pod
    /// Istio's data plane captures on its node is never enrolled.
    #[arg(long, env = "MESH_DATAPLANE_MODE_LABEL", default_value = crate::registry::ambient::DEFAULT_LABEL)]
    pub dataplane_mode_label: String,

    /// Directory on bpffs where maps and links are pinned.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs_dir: PathBuf,

    /// Leave maps and links pinned at shutdown, so pods stay captured (and
    /// fail closed) until the next agent adopts them.
    #[arg(long, env = "MESH_KEEP_PINS")]
    pub keep_pins: bool,

    /// Unix socket where the running agent offers its listening sockets to
    /// the next one (restart and upgrade without a refused connection).
    /// A new agent that finds an agent there takes the sockets over.
    #[arg(
        long,
        env = "MESH_HANDOVER_SOCKET",
        default_value = "/run/mesh-agent/handover.sock"
    )]
    pub handover_socket: PathBuf,

    /// Where the CNI plugin (`mesh-cni`) asks this agent to enrol a pod
    /// before its containers start. Unset: no plugin is served, and pods
    /// are enrolled as their records arrive (their first connections may
    /// leave uncaptured).
    #[arg(long, env = "MESH_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    /// How long a new agent may take to become ready (pods enrolled,
    /// certificates issued) after receiving the sockets; past it, the hand-
    /// over is abandoned and the running agent keeps serving.
    #[arg(long, env = "MESH_HANDOVER_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub handover_timeout: Duration,

    /// Admin endpoint: /config_dump, /logging.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus endpoint: /metrics and /stats/prometheus.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Label sets each Istio metric family (TCP, requests) may hold; more
    /// are counted in `mesh_metric_series_overflow_total` instead.
    /// Series of workloads and services that are gone are removed.
    #[arg(long, env = "MESH_METRICS_MAX_SERIES", default_value_t = crate::telemetry::metrics::DEFAULT_MAX_SERIES)]
    pub metrics_max_series: usize,

    /// Readiness endpoint: /healthz/ready.
    #[arg(long, env = "MESH_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Outbound capture listener, on loopback inside each pod.
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,

    /// Inbound plaintext listener inside each pod (target of sk_lookup).
    #[arg(long, env = "MESH_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,

    /// Inbound HBONE (mTLS tunnel) listener on each pod address.
    #[arg(long, env = "MESH_HBONE_PORT", default_value_t = 15008)]
    pub hbone_port: u16,

    /// Destination ports never captured on the way out (comma-separated).
    #[arg(
        long,
        env = "MESH_EXCLUDE_OUTBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS"
    )]
    pub exclude_outbound_ports: Vec<u16>,

    /// Destination CIDRs never captured on the way out (comma-separated).
    #[arg(
        long,
        env = "MESH_EXCLUDE_OUTBOUND_CIDRS",
        value_delimiter = ',',
        value_name = "CIDRS"
    )]
    pub exclude_outbound_cidrs: Vec<Cidr>,

    /// Pod ports never captured on the way in (comma-separated).
    #[arg(
        long,
        env = "MESH_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ',',
        value_name = "PORTS"
    )]
    pub exclude_inbound_ports: Vec<u16>,

    /// Give up connecting to a destination after this long.
    #[arg(long, env = "MESH_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,

    /// An HTTP request whose route sets no `timeout` waits at most this
    /// long for the upstream's response head, then gets 504 (flag `SI`):
    /// Envoy's default stream idle timeout, so an upstream that accepts
    /// and never answers does not hold the request for ever.
    #[arg(long, env = "MESH_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub stream_idle_timeout: Duration,

    /// A client must send a request's head within this long of its first
    /// byte (or of the previous response, on a keep-alive connection), or
    /// the connection is closed: slow clients (slowloris) hold nothing
    /// for long.
    #[arg(long, env = "MESH_REQUEST_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub request_header_timeout: Duration,

    /// Open connections (captured, inbound and HBONE) the agent holds at
    /// most; one more is reset and counted (`mesh_limit_reached_total`).
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Open connections one pod's listeners hold at most, so one busy or
    /// hostile pod cannot take the whole agent's share.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_POD", default_value_t = 20_000)]
    pub max_connections_per_pod: usize,

    /// Captured connections the kernel can track at once (the capacity of
    /// `mesh_orig_dst` and `mesh_conn_dst`). One more connect is refused
    /// (EPERM) and counted, never let through untracked. Changing it on a
    /// node needs `mesh-agent uninstall` first (pinned maps keep their size).
    #[arg(long, env = "MESH_MAX_TRACKED_CONNECTIONS", default_value_t = 65_536)]
    pub max_tracked_connections: u32,

    /// On shutdown, how long open connections may finish before they are cut.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,

    /// How often configuration files are re-read in case a change
    /// notification was missed (changes are normally seen at once, through
    /// inotify).
    #[arg(long, env = "MESH_CONFIG_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration, alias = "workload-poll-interval")]
    #[serde(with = "humantime_serde_compat")]
    pub config_poll_interval: Duration,

    /// The same-node fast path: `sock_ops` + `sk_msg` splice bytes between an
    /// application's socket and the agent's peer socket inside a pod,
    /// skipping the loopback TCP/IP stack (also switchable at run time:
    /// `POST /fast_path?enabled=true|false` on the admin port). Off by
    /// default: Linux answers a *blocking* read on a socket in a sockmap
    /// with EAGAIN when a wakeup finds nothing to read (e.g. the ACK of the
    /// application's own FIN), which applications with blocking sockets
    /// take as an error. Safe for non-blocking I/O (Go, tokio, Node, Java
    /// NIO, Envoy, nginx).
    #[arg(long, env = "MESH_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    pub fast_path: bool,

    /// The agent's own cgroup, where the fast path attaches `sock_ops` to see
    /// the agent's ends of application connections. Default: the cgroup of
    /// the pod whose UID is MESH_POD_UID (the DaemonSet sets it), else this
    /// process's cgroup under --cgroup-root. Never the root cgroup.
    #[arg(long, env = "MESH_AGENT_CGROUP")]
    pub agent_cgroup: Option<PathBuf>,

    /// The agent's own pod UID (downward API), to find its cgroup.
    #[arg(long, env = "MESH_POD_UID")]
    pub pod_uid: Option<String>,

    /// Copy buffer per direction of a proxied connection, in bytes.
    #[arg(long, env = "MESH_BUFFER_SIZE", default_value_t = 16 * 1024)]
    pub buffer_size: usize,

    /// SO_MARK set on the agent's own sockets; the capture programs skip it.
    #[arg(long, env = "MESH_AGENT_MARK", default_value = "0x539", value_parser = parse_u32)]
    pub agent_mark: u32,

    /// Access-log every request and connection to standard output in
    /// Istio's format: MeshConfig's `accessLogFile: /dev/stdout`, for
    /// workloads no Telemetry configures, unless the MeshConfig names a file.
    #[arg(long, env = "MESH_ACCESS_LOG")]
    pub access_log: bool,

    /// Append the audit log (requests AUDIT policies match, and every
    /// authorization denial, one JSON object per line) to this file
    /// instead of the log's `mesh::audit` target.
    #[arg(long, env = "MESH_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Istio's MeshConfig: the `istio` ConfigMap of the root namespace (its
    /// `data.mesh`), or the MeshConfig YAML itself: `extensionProviders`,
    /// `defaultProviders`, `accessLogFile/Encoding/Format`. Watched: a
    /// change applies live, a bad one is refused and the last good stays.
    #[arg(long, env = "MESH_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,

    /// This node's locality, `region/zone/subzone` (Kubernetes
    /// `topology.kubernetes.io/region` and `zone`): pods without an
    /// `istio-locality` label are taken to be here, for locality-aware
    /// load balancing.
    #[arg(long, env = "MESH_LOCALITY", default_value = "")]
    pub locality: String,

    /// Cluster name used in metric labels (Istio's default).
    #[arg(long, env = "MESH_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,mesh_agent::proxy=debug`).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log_level: String,

    /// Log output format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Tokio worker threads (default: one per CPU).
    #[arg(long, env = "MESH_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// This node's name: pods listed on other nodes are reached over HBONE.
    #[arg(long, env = "MESH_NODE_NAME", default_value_t = default_node_name())]
    pub node_name: String,

    /// The mesh's SPIFFE trust domain [default: the node credential's;
    /// with a token, cluster.local].
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,

    /// Certificate authority (host:port): workload certificates for mutual
    /// TLS between pods. Required, unless --insecure-no-mtls.
    #[arg(long, env = "MESH_CA_ADDR")]
    pub ca_addr: Option<String>,

    /// Run without mutual TLS: traffic between pods of different nodes
    /// goes in plaintext and no identity is checked. For trying the mesh
    /// without a CA only; said at start, in /config_dump and as the
    /// `mesh_insecure_no_mtls` metric.
    #[arg(long, env = "MESH_INSECURE_NO_MTLS")]
    pub insecure_no_mtls: bool,

    /// Roots to trust before the CA has sent its bundle (verifies the CA).
    #[arg(long, env = "MESH_CA_ROOT")]
    pub ca_root: Option<PathBuf>,

    /// Node credential (from `mesh-agent ca join`): certificate chain.
    #[arg(long, env = "MESH_NODE_CERT")]
    pub node_cert: Option<PathBuf>,

    /// Node credential: private key.
    #[arg(long, env = "MESH_NODE_KEY")]
    pub node_key: Option<PathBuf>,

    /// Kubernetes: authenticate to the CA with this service-account token instead.
    #[arg(long, env = "MESH_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// Lifetime asked for workload certificates (renewed at half-life).
    #[arg(long, env = "MESH_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub workload_cert_ttl: Duration,

    /// How often the trust bundle is re-read from the CA.
    #[arg(long, env = "MESH_TRUST_BUNDLE_REFRESH", default_value = "5m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub trust_bundle_refresh: Duration,

    /// Istio's root namespace (mesh-wide policies live there).
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// Close a pooled HBONE connection after this long without streams.
    #[arg(long, env = "MESH_HBONE_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub hbone_idle_timeout: Duration,

    /// A pooled HBONE connection this old takes no new stream, and closes
    /// once its streams end.
    #[arg(long, env = "MESH_HBONE_MAX_CONNECTION_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub hbone_max_connection_age: Duration,

    /// Send an HTTP/2 PING on every HBONE connection (client and server)
    /// this often, so a peer that stopped answering is noticed.
    #[arg(long, env = "MESH_HBONE_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub hbone_keepalive_interval: Duration,

    /// Close an HBONE connection whose PING is unanswered for this long.
    #[arg(long, env = "MESH_HBONE_KEEPALIVE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub hbone_keepalive_timeout: Duration,

    /// How old a RequestAuthentication's remote key set (`jwksUri`) may
    /// get before it is fetched again (Istio's default: 20 minutes). A
    /// token naming an unknown key fetches it at once.
    #[arg(long, env = "MESH_JWKS_REFRESH_INTERVAL", default_value = "20m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub jwks_refresh_interval: Duration,

    /// How long one `jwksUri` fetch may take.
    #[arg(long, env = "MESH_JWKS_FETCH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub jwks_fetch_timeout: Duration,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_owned())
}

impl Config {
    /// Checks what clap's parsers cannot: relations between settings.
    pub fn validate(&self) -> Result<(), Error> {
        let ports = [
            ("outbound-port", self.outbound_port),
            ("inbound-port", self.inbound_port),
            ("hbone-port", self.hbone_port),
        ];
        for (i, (flag, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return Err(Error::Invalid {
                    flag,
                    reason: "port 0 is not allowed".into(),
                });
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(Error::Invalid {
                    flag,
                    reason: format!("port {port} is already used by --{other}"),
                });
            }
        }
        if !(1024..=1 << 20).contains(&self.buffer_size) {
            return Err(Error::Invalid {
                flag: "buffer-size",
                reason: format!("{} is outside 1024..=1048576 bytes", self.buffer_size),
            });
        }
        if self.agent_mark == 0 {
            return Err(Error::Invalid {
                flag: "agent-mark",
                reason: "must be non-zero, or the agent's own connections would be captured".into(),
            });
        }
        for (flag, d) in [
            ("stream-idle-timeout", self.stream_idle_timeout),
            ("request-header-timeout", self.request_header_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(Error::Invalid {
                    flag,
                    reason: "must be at least 100ms".into(),
                });
            }
        }
        if self.config_poll_interval < Duration::from_millis(10) {
            return Err(Error::Invalid {
                flag: "config-poll-interval",
                reason: "must be at least 10ms".into(),
            });
        }
        if self.config.is_empty() && !self.kubernetes {
            return Err(Error::Invalid {
                flag: "config",
                reason: "give configuration files (--config PATH) or --kubernetes, or both".into(),
            });
        }
        match (&self.ca_addr, self.insecure_no_mtls) {
            (None, false) => {
                return Err(Error::Invalid {
                    flag: "ca-addr",
                    reason: "mutual TLS needs a CA: give --ca-addr (with --ca-root and a node \
                             credential or --ca-token-file), or --insecure-no-mtls to run without \
                             it"
                    .into(),
                });
            }
            (Some(_), true) => {
                return Err(Error::Invalid {
                    flag: "insecure-no-mtls",
                    reason: "cannot go with --ca-addr".into(),
                });
            }
            _ => {}
        }
        if self.ca_addr.is_some() {
            if self.ca_root.is_none() {
                return Err(Error::Invalid {
                    flag: "ca-root",
                    reason: "required with --ca-addr (it verifies the CA)".into(),
                });
            }
            let credential = self.node_cert.is_some() || self.node_key.is_some();
            if credential && (self.node_cert.is_none() || self.node_key.is_none()) {
                return Err(Error::Invalid {
                    flag: "node-cert",
                    reason: "--node-cert and --node-key go together".into(),
                });
            }
            if credential == self.ca_token_file.is_some() {
                return Err(Error::Invalid {
                    flag: "ca-addr",
                    reason: "authenticate to the CA with either --node-cert/--node-key or --ca-token-file".into(),
                });
            }
        }
        if self.workload_cert_ttl < Duration::from_secs(2) {
            return Err(Error::Invalid {
                flag: "workload-cert-ttl",
                reason: "must be at least 2s".into(),
            });
        }
        if self.worker_threads == Some(0) {
            return Err(Error::Invalid {
                flag: "worker-threads",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}

/// Durations appear in `/config_dump` as humantime strings ("10s").
mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["mesh-agent", "run", "--config", "/w.yaml"];
        all.extend_from_slice(args);
        if !args.contains(&"--ca-addr") && !args.contains(&"--insecure-no-mtls") {
            all.push("--insecure-no-mtls");
        }
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        let Command::Run(c) = cli.command else {
            unreachable!()
        };
        c.validate().map_err(|e| e.to_string())?;
        Ok(*c)
    }

    #[test]
    fn without_a_ca_the_insecure_mode_must_be_asked_for() {
        let run = |args: &[&str]| {
            let mut all = vec!["mesh-agent", "run", "--config", "/w.yaml"];
            all.extend_from_slice(args);
            let Command::Run(c) = Cli::try_parse_from(all).unwrap().command else {
                unreachable!()
            };
            c.validate().map_err(|e| e.to_string())
        };
        assert_eq!(
            run(&[]).unwrap_err(),
            "--ca-addr: mutual TLS needs a CA: give --ca-addr (with --ca-root and a node credential \
             or --ca-token-file), or --insecure-no-mtls to run without it"
        );
        assert!(run(&["--insecure-no-mtls"]).is_ok());
        assert_eq!(
            run(&[
                "--insecure-no-mtls",
                "--ca-addr",
                "a:1",
                "--ca-root",
                "/r",
                "--ca-token-file",
                "/t"
            ])
            .unwrap_err(),
            "--insecure-no-mtls: cannot go with --ca-addr"
        );
    }

    #[test]
    fn defaults_match_ztunnel_ports() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.outbound_port, c.inbound_port, c.hbone_port),
            (15001, 15006, 15008)
        );
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.readiness_addr.port(), 15021);
        assert_eq!(c.bpffs_dir, PathBuf::from("/sys/fs/bpf/mesh"));
        assert_eq!(c.agent_mark, 0x539);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn exclusions_parse_lists() {
        let c = parse(&[
            "--exclude-outbound-ports",
            "22,3306",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,fd00::/8,192.0.2.7",
        ])
        .unwrap();
        assert_eq!(c.exclude_outbound_ports, vec![22, 3306]);
        assert_eq!(
            c.exclude_outbound_cidrs[2],
            Cidr {
                addr: "192.0.2.7".parse().unwrap(),
                len: 32
            }
        );
        assert_eq!(c.exclude_outbound_cidrs[1].len, 8);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--exclude-outbound-cidrs", "10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("prefix length 33"), "{e}");
        let e = parse(&["--inbound-port", "15001"]).unwrap_err();
        assert_eq!(
            e,
            "--inbound-port: port 15001 is already used by --outbound-port"
        );
        let e = parse(&["--buffer-size", "12"]).unwrap_err();
        assert!(e.starts_with("--buffer-size:"), "{e}");
        let e = parse(&["--connect-timeout", "soon"]).unwrap_err();
        assert!(e.contains("--connect-timeout"), "{e}");
        let e = parse(&["--ca-addr", "10.0.0.1:15012"]).unwrap_err();
        assert_eq!(e, "--ca-root: required with --ca-addr (it verifies the CA)");
        let e = parse(&["--ca-addr", "a:1", "--ca-root", "/r"]).unwrap_err();
        assert!(
            e.contains("either --node-cert/--node-key or --ca-token-file"),
            "{e}"
        );
        let e = parse(&["--ca-addr", "a:1", "--ca-root", "/r", "--node-cert", "/c"]).unwrap_err();
        assert!(e.contains("go together"), "{e}");
        parse(&[
            "--ca-addr",
            "a:1",
            "--ca-root",
            "/r",
            "--node-cert",
            "/c",
            "--node-key",
            "/k",
        ])
        .unwrap();
        parse(&[
            "--ca-addr",
            "a:1",
            "--ca-root",
            "/r",
            "--ca-token-file",
            "/t",
        ])
        .unwrap();
    }

    #[test]
    fn configuration_sources() {
        let c = parse(&[
            "--config",
            "/d1,/d2",
            "--workloads",
            "/r.yaml",
            "--istio-config",
            "/p.yaml",
        ])
        .unwrap();
        let paths: Vec<&str> = c.config.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(paths, ["/w.yaml", "/d1", "/d2", "/r.yaml", "/p.yaml"]);
        assert!(!c.kubernetes && c.kube_remote_pods);
        let cli = Cli::try_parse_from(["mesh-agent", "run"]).unwrap();
        let Command::Run(c) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--config: give configuration files (--config PATH) or --kubernetes, or both"
        );
        let cli = Cli::try_parse_from([
            "mesh-agent",
            "run",
            "--kubernetes",
            "--kube-remote-pods",
            "false",
            "--insecure-no-mtls",
        ])
        .unwrap();
        let Command::Run(c) = cli.command else {
            unreachable!()
        };
        c.validate().unwrap();
        assert!(c.kubernetes && !c.kube_remote_pods);
    }

    #[test]
    fn config_dump_shape() {
        let c = parse(&["--exclude-outbound-cidrs", "10.0.0.0/8"]).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["connectTimeout"], "10s");
        assert_eq!(v["excludeOutboundCidrs"][0], "10.0.0.0/8");
        assert_eq!(v["logFormat"], "text");
    }
}
