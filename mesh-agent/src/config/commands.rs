//! Subcommands beside `run`: the CNI plugin's installer, and the commands
//! that ask a running agent (or its pins) what it is doing.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy the plugin to the node's CNI binary directory and chain it at
    /// the end of the network configuration the runtime uses (a
    /// DaemonSet's init container; run again, it replaces its entry).
    Install {
        /// The plugin binary to install; by default `mesh-cni` beside this
        /// program.
        #[arg(long)]
        plugin: Option<PathBuf>,
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The agent's `--cni-socket`, as the runtime (on the node) sees it.
        #[arg(long, default_value = "/run/mesh-agent/cni.sock")]
        agent_socket: PathBuf,
        /// Namespaces whose pods never wait for the agent (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "kube-system")]
        exclude_namespaces: Vec<String>,
        /// How long the plugin waits for the agent's answer, in seconds.
        #[arg(long, default_value_t = 15)]
        timeout_seconds: u64,
    },
}

/// The lowest level of finding that makes `analyze` fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Threshold {
    Error,
    Warning,
    Info,
}

/// Where the running agent is, and how to print what it says.
#[derive(Debug, Clone, Args)]
pub struct Inspect {
    /// The agent's admin address (`--admin-addr` of the agent).
    #[arg(long, env = "MESH_ADMIN_URL", default_value = "http://127.0.0.1:15000")]
    pub admin: String,
    /// Tables for people, JSON or YAML for programs.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// The programs attached through the agent's pinned links.
    Progs(Pins),
    /// The agent's pinned maps: type, size, entries.
    Maps(Pins),
}

#[derive(Debug, Clone, Args)]
pub struct Pins {
    /// Directory on bpffs where the agent pins maps and links.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs_dir: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}
