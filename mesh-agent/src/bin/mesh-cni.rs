//! `mesh-cni`: the chained CNI plugin. The container runtime runs it after
//! the plugins that give a new pod its network; it asks the node's agent to
//! enrol the pod and returns only once that is done, so the pod's
//! containers start captured (see `mesh_agent::cni`). It changes nothing
//! in the pod's network itself: its result is the previous plugins'.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use mesh_agent::cni::{PodRef, Reply, Request};
use serde_json::{Value, json};

/// CNI's "try again later": the runtime retries the sandbox.
const TRY_AGAIN_LATER: u32 = 11;
/// CNI's "invalid network config".
const INVALID_CONFIG: u32 = 7;
/// CNI's "invalid environment variables".
const INVALID_ENV: u32 = 4;

const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: &str, details: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        println!(
            "{}",
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED})
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = String::new();
    let conf: Value = match std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&stdin).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            return report(
                "1.0.0",
                fail(INVALID_CONFIG, "cannot read the network configuration", e),
            );
        }
    };
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    match run(&command, &conf) {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => report(&version, f),
    }
}

/// Prints a CNI error result (stdout, as the runtime reads it) and a line
/// for the node's log.
fn report(version: &str, f: Failure) -> ExitCode {
    eprintln!("mesh-cni: {}: {}", f.msg, f.details);
    println!(
        "{}",
        json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details})
    );
    ExitCode::FAILURE
}

fn run(command: &str, conf: &Value) -> Result<Option<Value>, Failure> {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let args = cni_args(&env("CNI_ARGS"));
    let arg = |k: &str| args.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    // What ADD hands on: the previous plugins' result, unchanged.
    let pass = || {
        let mut r = conf.get("prevResult").cloned().unwrap_or_else(|| json!({}));
        r["cniVersion"] = conf["cniVersion"].clone();
        (command == "ADD").then_some(r)
    };
    if matches!(command, "GC" | "STATUS") {
        return Ok(None);
    }
    let (Some(namespace), Some(name)) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) else {
        // Not a Kubernetes pod: nothing the agent knows of.
        return Ok(pass());
    };
    let excluded = conf["excludeNamespaces"]
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n.as_str() == Some(namespace.as_str())));
    if excluded {
        return Ok(pass());
    }
    let pod = PodRef {
        namespace,
        name,
        uid: arg("K8S_POD_UID"),
        container_id: env("CNI_CONTAINERID"),
        netns: PathBuf::from(env("CNI_NETNS")),
    };
    let request = match command {
        "ADD" => {
            if pod.netns.as_os_str().is_empty() {
                return Err(fail(INVALID_ENV, "CNI_NETNS is not set", ""));
            }
            let Some(prev) = conf.get("prevResult") else {
                return Err(fail(
                    INVALID_CONFIG,
                    "mesh-cni must be chained after the plugin that gives the pod its addresses",
                    "no prevResult in the configuration",
                ));
            };
            Request::Add {
                pod,
                ips: addresses(prev),
            }
        }
        "DEL" => Request::Del { pod },
        "CHECK" => Request::Check { pod },
        other => {
            return Err(fail(
                INVALID_ENV,
                "unknown CNI_COMMAND",
                format!("{other:?}"),
            ));
        }
    };
    let socket = conf["agentSocket"]
        .as_str()
        .unwrap_or("/run/mesh-agent/cni.sock");
    let timeout = Duration::from_secs(conf["timeoutSeconds"].as_u64().unwrap_or(15));
    let reply = match ask(socket, &request, timeout) {
        Ok(r) => r,
        // A sandbox going away is released whether the agent answers or
        // not (the agent lets go of pods that leave on its own too).
        Err(_) if command == "DEL" => return Ok(None),
        Err(e) => {
            return Err(fail(
                TRY_AGAIN_LATER,
                "the mesh agent on this node did not answer; the pod starts once it has enrolled it",
                format!("{socket}: {e}"),
            ));
        }
    };
    match reply {
        Reply::Done | Reply::Skipped { .. } => Ok(pass()),
        Reply::Failed { reason } if command == "DEL" => {
            eprintln!("mesh-cni: DEL: {reason}");
            Ok(None)
        }
        Reply::Failed { reason } => Err(fail(
            TRY_AGAIN_LATER,
            "the mesh agent could not enrol the pod; the pod starts once it has",
            reason,
        )),
    }
}

/// `K=V;K=V` pairs.
fn cni_args(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The pod's addresses in a previous result (`ips[].address`, CIDR form).
fn addresses(prev: &Value) -> Vec<IpAddr> {
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

fn ask(socket: &str, request: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s.take(64 * 1024)).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable answer {answer:?}: {e}"),
        )
    })
}
