//! `mesh-agent bpf progs|maps`: the node's capture programs and maps, read
//! from the agent's pins (as `cilium bpf` reads Cilium's), so they can be
//! looked at with no agent running, the way `uninstall` finds them.

use std::path::Path;

use serde_json::{Value, json};

use super::Error;
use crate::config::{Output, Pins};

fn pins_error(path: &Path, reason: impl ToString) -> Error {
    Error::Pins {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn print(data: Value, output: Output, table: impl FnOnce(&Value) -> String) -> String {
    match output {
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&data).unwrap_or_default()
        ),
        Output::Yaml => serde_yaml::to_string(&data).unwrap_or_default(),
        Output::Table => table(&data),
    }
}

/// The maps pinned directly under the pin directory.
pub fn maps(p: &Pins) -> Result<String, Error> {
    let mut rows = Vec::new();
    let entries = std::fs::read_dir(&p.bpffs_dir).map_err(|e| pins_error(&p.bpffs_dir, e))?;
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths.iter().filter(|p| p.is_file()) {
        let info = aya::maps::MapInfo::from_pin(path).map_err(|e| pins_error(path, e))?;
        let kind = info
            .map_type()
            .map_or_else(|e| e.to_string(), |t| format!("{t:?}"));
        // Arrays always hold max_entries slots, and socket storage has no
        // keys to walk: only keyed maps are counted.
        let keyed = !["Array", "RingBuf", "Storage"]
            .iter()
            .any(|k| kind.contains(k));
        let count = if keyed {
            let fd = info.fd().map_err(|e| pins_error(path, e))?;
            use std::os::fd::AsFd as _;
            crate::sys::map_key_count(fd.as_fd(), info.key_size(), info.max_entries())
                .map(|n| json!(n))
                .unwrap_or_else(|e| json!(format!("? ({e})")))
        } else {
            Value::Null
        };
        rows.push(json!({
            "pin": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "id": info.id(),
            "name": info.name_as_str(),
            "type": kind,
            "keySize": info.key_size(),
            "valueSize": info.value_size(),
            "maxEntries": info.max_entries(),
            "entries": count,
        }));
    }
    if rows.is_empty() {
        return Err(pins_error(
            &p.bpffs_dir,
            "no pinned maps (is this the agent's --bpffs-dir?)",
        ));
    }
    Ok(print(Value::Array(rows), p.output, |d| {
        let mut t =
            super::tables::Table::new(&["PIN", "ID", "TYPE", "KEY", "VALUE", "ENTRIES", "MAX"]);
        for r in d.as_array().into_iter().flatten() {
            t.row(vec![
                r["pin"].as_str().unwrap_or("-").into(),
                r["id"].to_string(),
                r["type"].as_str().unwrap_or("-").into(),
                r["keySize"].to_string(),
                r["valueSize"].to_string(),
                match &r["entries"] {
                    Value::Null => "-".into(),
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                },
                r["maxEntries"].to_string(),
            ]);
        }
        t.render()
    }))
}

/// The programs behind the links pinned under `links/` (one directory per
/// pod), with what the kernel says of each.
pub fn progs(p: &Pins) -> Result<String, Error> {
    let links = p.bpffs_dir.join("links");
    let programs: std::collections::HashMap<u32, aya::programs::ProgramInfo> =
        aya::programs::loaded_programs()
            .flatten()
            .map(|i| (i.id(), i))
            .collect();
    let mut rows = Vec::new();
    let mut pods: Vec<_> = std::fs::read_dir(&links)
        .map_err(|e| pins_error(&links, e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    pods.sort();
    for pod in pods.iter().filter(|d| d.is_dir()) {
        let mut files: Vec<_> = std::fs::read_dir(pod)
            .map_err(|e| pins_error(pod, e))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for link in files {
            let (link_id, prog_id) =
                crate::sys::pinned_link_ids(&link).map_err(|e| pins_error(&link, e))?;
            let prog = programs.get(&prog_id);
            rows.push(json!({
                "pod": pod.file_name().map(|n| n.to_string_lossy().into_owned()),
                "link": link.file_name().map(|n| n.to_string_lossy().into_owned()),
                "linkId": link_id,
                "programId": prog_id,
                "program": prog.and_then(|p| p.name_as_str()),
                "type": prog.map(|p| format!("{:?}", p.program_type())),
            }));
        }
    }
    if rows.is_empty() {
        return Err(pins_error(&links, "no pinned links (no pod enrolled?)"));
    }
    Ok(print(Value::Array(rows), p.output, |d| {
        let mut t =
            super::tables::Table::new(&["POD", "LINK", "LINK ID", "PROGRAM", "PROG ID", "TYPE"]);
        for r in d.as_array().into_iter().flatten() {
            let cell = |k: &str| match &r[k] {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                v => v.to_string(),
            };
            t.row(vec![
                cell("pod"),
                cell("link"),
                cell("linkId"),
                cell("program"),
                cell("programId"),
                cell("type"),
            ]);
        }
        t.render()
    }))
}
