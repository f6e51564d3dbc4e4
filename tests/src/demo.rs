//! Sending your own traffic from a pod of a running demo: the demo writes
//! where its pods are (network namespace, cgroup) and which names its
//! services have; `mesh-demo exec POD -- CMD` (`cargo xtask demo exec`)
//! runs CMD as one of that pod's processes.
//!
//! A pod's process is in the pod's cgroup, or the capture programs (which
//! are attached to that cgroup) never see its connections: `ip netns exec`
//! alone shares the pod's network but bypasses the mesh, and a STRICT
//! destination refuses it. CMD also sees an `/etc/hosts` naming the
//! services (`httpbin` → its ClusterIP), bind-mounted in a mount namespace
//! of its own so that nothing outside it changes.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

/// The demo's Service: `httpbin` on 10.96.0.80:8000, the pods labelled
/// `app: server` on 8080.
pub const HTTPBIN_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: default}
spec:
  clusterIP: 10.96.0.80
  selector: {app: server}
  ports: [{name: http, port: 8000, targetPort: 8080}]
";

/// The file a holding demo writes, in its directory.
pub const STATE_FILE: &str = "demo.json";

/// What `exec` needs to know about a running demo.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The demo's process, to tell a live demo from a file left behind.
    pub pid: u32,
    pub pods: Vec<PodPlace>,
    /// `/etc/hosts` as the pods see it.
    pub hosts: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPlace {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

impl PodPlace {
    pub fn of(p: &crate::Pod) -> Self {
        Self {
            name: p.name.clone(),
            netns: p.netns_path(),
            cgroup: p.cgroup.clone(),
        }
    }
}

/// `/etc/hosts` lines for a service: its short name, with the namespace,
/// and the cluster-local FQDN.
pub fn service_hosts(vip: &str, name: &str, namespace: &str) -> String {
    format!(
        "{vip} {name} {name}.{namespace} {name}.{namespace}.svc {name}.{namespace}.svc.cluster.local\n"
    )
}

impl State {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("hosts"), &self.hosts)?;
        std::fs::write(
            dir.join(STATE_FILE),
            serde_json::to_vec_pretty(self).expect("state as JSON"),
        )
    }

    /// The state of the demo holding in `dir`, or why there is none.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let none = "no demo is holding: start one with `cargo xtask demo --hold` in another \
                    terminal, and run this while it waits";
        let text = std::fs::read(dir.join(STATE_FILE)).map_err(|_| none.to_owned())?;
        let state: Self = serde_json::from_slice(&text).map_err(|e| format!("{none} ({e})"))?;
        if !Path::new(&format!("/proc/{}", state.pid)).exists() {
            return Err(none.into());
        }
        Ok(state)
    }

    /// `cmd` as a process of `pod`: in its cgroup and network namespace,
    /// with the demo's `/etc/hosts` (from `dir`).
    pub fn command(&self, dir: &Path, pod: &str, cmd: &[String]) -> Result<Command, String> {
        let Some(p) = self.pods.iter().find(|p| p.name == pod) else {
            let names: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
            return Err(format!(
                "no pod {pod} in the demo; its pods are {}",
                names.join(", ")
            ));
        };
        if cmd.is_empty() {
            return Err("give a command after --, e.g. -- curl -s http://httpbin:8000/".into());
        }
        let mut c = Command::new("unshare");
        // A private mount namespace: the bind mount is this process's only.
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                r#"hosts=$1; cg=$2; ns=$3; shift 3
mount --bind "$hosts" /etc/hosts || exit 125
echo $$ > "$cg/cgroup.procs" || exit 125
exec nsenter --net="$ns" -- "$@""#,
            )
            .arg("sh")
            .arg(dir.join("hosts"))
            .arg(&p.cgroup)
            .arg(&p.netns)
            .args(cmd);
        Ok(c)
    }
}
