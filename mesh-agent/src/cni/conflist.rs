//! Putting the plugin on a node and taking it off: its binary in the CNI
//! binary directory, its entry at the end of the chain of the network
//! configuration the runtime uses (the first file of the configuration
//! directory by name, as libcni picks it). Each file is replaced whole
//! (written beside it, then renamed), so the runtime never reads half of
//! one.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Error, PLUGIN_TYPE};

/// The plugin's own settings in its conflist entry.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agent_socket: PathBuf,
    /// Pods of these namespaces are never sent to the agent (the system's
    /// own must start while the agent is away).
    pub exclude_namespaces: Vec<String>,
    /// How long the plugin waits for the agent's answer.
    pub timeout_seconds: u64,
}

impl Settings {
    fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
            "excludeNamespaces": self.exclude_namespaces,
            "timeoutSeconds": self.timeout_seconds,
        })
    }
}

/// Copies `plugin_bin` to `bin_dir` and chains the plugin into the
/// node's network configuration (replacing an entry a previous install
/// left). Says what it did.
pub fn install(
    plugin_bin: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    settings: &Settings,
) -> Result<String, Error> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::ConfIo { path, source }
    };
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(plugin_bin, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io(&target))?;

    let path = primary(conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let conf: Value = serde_json::from_str(&text).map_err(|e| Error::Conf {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let is_list = path.extension().is_some_and(|e| e == "conflist");
    let list = with_plugin(conf, is_list, settings).map_err(|reason| Error::Conf {
        path: path.clone(),
        reason,
    })?;
    // A single-plugin `.conf` becomes a list: only lists chain.
    let out = if is_list {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    write(&out, &list)?;
    if out != path {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(format!(
        "installed {} and chained it in {}",
        target.display(),
        out.display()
    ))
}

/// Takes the plugin out of every network configuration in `conf_dir` and
/// removes its binary. Says what it did.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<String, Error> {
    let mut done = Vec::new();
    for path in conf_files(conf_dir)? {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(mut conf) = serde_json::from_str::<Value>(&text) else {
            continue; // not ours to judge
        };
        if remove_plugin(&mut conf) {
            write(&path, &conf)?;
            done.push(format!("removed the plugin from {}", path.display()));
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&bin) {
        Ok(()) => done.push(format!("removed {}", bin.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::ConfIo { path: bin, source }),
    }
    Ok(if done.is_empty() {
        "no CNI plugin installed".into()
    } else {
        done.join("\n")
    })
}

/// `conf` (a conflist, or with `is_list` false a single plugin's conf)
/// as a conflist whose chain ends with the plugin.
pub fn with_plugin(conf: Value, is_list: bool, settings: &Settings) -> Result<Value, String> {
    let mut list = if is_list {
        conf
    } else {
        json!({
            "cniVersion": conf.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
            "name": conf.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
            "plugins": [conf],
        })
    };
    remove_plugin(&mut list);
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("no `plugins` list")?;
    if plugins.is_empty() {
        return Err("`plugins` is empty: there is no network to chain to".into());
    }
    plugins.push(settings.entry());
    Ok(list)
}

/// Removes the plugin's entries from a conflist; whether there were any.
fn remove_plugin(conf: &mut Value) -> bool {
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.len() != before
}

/// The network configuration files, in the order libcni reads them.
fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::ConfIo {
        path: dir.into(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The file the runtime uses: the first by name.
fn primary(dir: &Path) -> Result<PathBuf, Error> {
    conf_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoConf(dir.into()))
}

fn write(path: &Path, conf: &Value) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Not ending in .conf/.conflist: the runtime must not read it.
    let tmp = dir.join(format!(".{PLUGIN_TYPE}-conf.tmp"));
    let mut text = serde_json::to_string_pretty(conf).expect("JSON value");
    text.push('\n');
    std::fs::write(&tmp, text).map_err(|source| Error::ConfIo {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::ConfIo {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            agent_socket: "/run/mesh-agent/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
            timeout_seconds: 15,
        }
    }

    #[test]
    fn chains_at_the_end_once_and_comes_out_again() {
        let dir = std::env::temp_dir().join(format!("mesh-conflist-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let plugin = dir.join("mesh-cni-built");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        // The runtime uses the first file by name: 05-… not 10-….
        let first = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#;
        std::fs::write(conf.join("05-net.conflist"), first).unwrap();
        std::fs::write(conf.join("10-other.conflist"), first).unwrap();

        for _ in 0..2 {
            install(&plugin, &bin, &conf, &settings()).unwrap();
        }
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(conf.join(name)).unwrap()).unwrap()
        };
        let types = |v: &Value| -> Vec<String> {
            v["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["type"].as_str().unwrap().to_string())
                .collect()
        };
        let list = read("05-net.conflist");
        assert_eq!(types(&list), ["bridge", "portmap", "mesh-cni"]);
        assert_eq!(
            list["plugins"][2]["agentSocket"],
            "/run/mesh-agent/cni.sock"
        );
        assert_eq!(types(&read("10-other.conflist")), ["bridge", "portmap"]);
        assert!(bin.join("mesh-cni").exists());

        let said = uninstall(&bin, &conf).unwrap();
        assert!(said.contains("05-net.conflist"), "{said}");
        assert_eq!(types(&read("05-net.conflist")), ["bridge", "portmap"]);
        assert!(!bin.join("mesh-cni").exists());
        assert_eq!(uninstall(&bin, &conf).unwrap(), "no CNI plugin installed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf = json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge"});
        let list = with_plugin(conf, false, &settings()).unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert_eq!(list["plugins"][1]["type"], "mesh-cni");
        let err = with_plugin(json!({"plugins": []}), true, &settings()).unwrap_err();
        assert!(err.contains("empty"), "{err}");
        let err = with_plugin(json!({"name": "x"}), true, &settings()).unwrap_err();
        assert!(err.contains("plugins"), "{err}");
    }
}
