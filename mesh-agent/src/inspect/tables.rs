//! The human tables of the inspect commands, from the admin port's JSON.

use serde_json::{Value, json};

use super::client::Admin;

/// Columns padded to their widest cell, two spaces apart.
pub(super) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(super) fn render(&self) -> String {
        let n = self.rows[0].len();
        let widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        if self.rows.len() == 1 {
            out.push_str("(none)\n");
        }
        out
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Sum of the samples of `name` (whose labels contain `filter`) in a
/// Prometheus text exposition.
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A counter's or gauge's value as a whole number (sums of nothing are
/// -0.0).
fn whole(v: f64) -> Value {
    json!(v.max(0.0).round() as u64)
}

/// Samples of `name` by the value of `label`.
fn metric_by(text: &str, name: &str, label: &str) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let key = format!("{label}=\"");
    for l in text.lines().filter(|l| l.starts_with(&format!("{name}{{"))) {
        let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if let Some(i) = l.find(&key) {
            let rest = &l[i + key.len()..];
            let value = rest.split('"').next().unwrap_or_default();
            out.insert(value.to_owned(), whole(v));
        }
    }
    out
}

/// What `status` shows, gathered from `/config_dump`, `/metrics` and the
/// readiness check.
pub fn status_data(dump: &Value, metrics: &str, admin: &Admin) -> Value {
    let ready = admin.text("/healthz/ready");
    let certs: Vec<Value> = dump["certificates"]["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!({"identity": c["identity"], "notAfter": c["notAfter"], "lastError": c["lastError"]}))
        .collect();
    json!({
        "ready": ready.is_ok(),
        "notReadyBecause": ready.err().map(|e| e.to_string()),
        "version": dump["version"],
        "mutualTls": dump["mutualTls"],
        "config": {
            "version": dump["snapshot"]["version"],
            "appliedAt": dump["snapshot"]["appliedAt"],
            "lastRejected": dump["sources"]["lastRejected"],
        },
        "workloads": {
            "enrolled": dump["workloads"].as_array().map_or(0, Vec::len),
            "pending": dump["pending"].as_array().map_or(0, Vec::len),
        },
        "certificates": certs,
        "programs": dump["ebpf"]["programs"].as_array().map_or(0, Vec::len),
        "pinDir": dump["ebpf"]["pinDir"],
        "mapEntries": metric_by(metrics, "mesh_ebpf_map_entries", "map"),
        "drops": {
            "programErrors": whole(metric_sum(metrics, "mesh_ebpf_program_events_total", "outcome=\"errors\"")),
            "proxyErrors": whole(metric_sum(metrics, "mesh_proxy_errors_total", "")),
            "limitsReached": whole(metric_sum(metrics, "mesh_limit_reached_total", "")),
            "accessLogDropped": whole(metric_sum(metrics, "mesh_access_log_records_total", "result=\"dropped\"")),
            "metricSeriesOverCap": whole(metric_sum(metrics, "mesh_metric_series_overflow_total", "")),
            "configRejected": whole(metric_sum(metrics, "mesh_config_rejected_total", "")),
        },
    })
}

pub fn status(d: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    line(
        &mut out,
        "Ready:",
        if d["ready"] == true {
            "yes".into()
        } else {
            format!("no ({})", s(&d["notReadyBecause"]))
        },
    );
    line(&mut out, "Version:", s(&d["version"]));
    line(&mut out, "Mutual TLS:", s(&d["mutualTls"]));
    line(
        &mut out,
        "Configuration:",
        format!(
            "version {}, applied {}",
            s(&d["config"]["version"]),
            s(&d["config"]["appliedAt"])
        ),
    );
    let rejected = d["config"]["lastRejected"]
        .as_object()
        .filter(|m| !m.is_empty())
        .map_or("none".into(), |m| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k} at {}: {}",
                        s(&v["at"]),
                        s(&v["problems"][0]).lines().next().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
    line(&mut out, "Last rejected:", rejected);
    line(
        &mut out,
        "Workloads:",
        format!(
            "{} enrolled, {} pending",
            d["workloads"]["enrolled"], d["workloads"]["pending"]
        ),
    );
    let certs = d["certificates"].as_array().cloned().unwrap_or_default();
    let soonest = certs
        .iter()
        .filter_map(|c| c["notAfter"].as_str())
        .min()
        .map_or(String::new(), |t| format!(", first expiry {t}"));
    let failing = certs.iter().filter(|c| !c["lastError"].is_null()).count();
    line(
        &mut out,
        "Certificates:",
        format!("{}{soonest}, {failing} failing", certs.len()),
    );
    line(
        &mut out,
        "eBPF:",
        format!("{} programs, pins in {}", d["programs"], s(&d["pinDir"])),
    );
    line(&mut out, "Map entries:", pairs(&d["mapEntries"]));
    let drops = pairs(&d["drops"]);
    line(&mut out, "Drops:", drops);
    out
}

/// `key value, key value` of an object; `-` when empty.
fn pairs(v: &Value) -> String {
    let joined = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    if joined.is_empty() {
        "-".into()
    } else {
        joined
    }
}

pub fn workloads(d: &Value) -> String {
    let mut t = Table::new(&["NAMESPACE", "NAME", "IPS", "IDENTITY", "NETNS", "LISTENERS"]);
    for w in d.as_array().into_iter().flatten() {
        t.row(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            s(&w["ips"]),
            s(&w["identity"]),
            s(&w["netnsCookie"]),
            w["listeners"].as_array().map_or(0, Vec::len).to_string(),
        ]);
    }
    t.render()
}

pub fn services(d: &Value) -> String {
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "HOSTNAME",
        "ADDRESSES",
        "PORTS",
        "ENDPOINTS",
    ]);
    for svc in d.as_array().into_iter().flatten() {
        let ports: Vec<String> = svc["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| match p["protocol"].as_str() {
                Some(proto) => format!("{}/{proto}", p["port"]),
                None => p["port"].to_string(),
            })
            .collect();
        let eps = svc["endpoints"].as_array().map_or(0, Vec::len);
        let ready = svc["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["ready"] != false)
            .count();
        t.row(vec![
            s(&svc["namespace"]),
            s(&svc["name"]),
            s(&svc["hostname"]),
            s(&svc["addresses"]),
            ports.join(","),
            format!("{ready}/{eps}"),
        ]);
    }
    t.render()
}

pub fn policies(d: &Value) -> String {
    let mut t = Table::new(&[
        "WORKLOAD",
        "MTLS",
        "AUTHORIZATION",
        "JWT",
        "RATE LIMITS",
        "TELEMETRY",
    ]);
    for (w, p) in d.as_object().into_iter().flatten() {
        let count = |v: &Value| match v {
            Value::Array(a) => a.len().to_string(),
            Value::Object(o) => o
                .values()
                .map(|x| x.as_array().map_or(0, Vec::len))
                .sum::<usize>()
                .to_string(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        t.row(vec![
            w.clone(),
            match &p["peerAuthentication"]["mode"] {
                Value::Null => "PERMISSIVE".into(),
                m => s(m),
            },
            count(&p["authorization"]),
            count(&p["requestAuthentication"]),
            count(&p["rateLimits"]),
            s(&p["telemetry"]),
        ]);
    }
    t.render()
}

pub fn certs(d: &Value) -> String {
    let mut t = Table::new(&["IDENTITY", "PODS", "SERIAL", "NOT AFTER", "ERROR"]);
    for c in d["certificates"].as_array().into_iter().flatten() {
        t.row(vec![
            s(&c["identity"]),
            s(&c["pods"]),
            s(&c["serial"]),
            s(&c["notAfter"]),
            s(&c["lastError"]),
        ]);
    }
    let mut out = t.render();
    let roots: Vec<String> = d["trustBundle"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{} (until {})", s(&r["issuer"]), s(&r["notAfter"])))
        .collect();
    if !roots.is_empty() {
        out.push_str(&format!("\nTrust bundle: {}\n", roots.join("; ")));
    }
    out
}

pub fn connections(d: &Value) -> String {
    let mut t = Table::new(&[
        "DIRECTION",
        "PROTOCOL",
        "POD",
        "SOURCE",
        "DESTINATION",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "BYTES IN/OUT",
        "AGE",
    ]);
    for c in d.as_array().into_iter().flatten() {
        let bytes = match (c["bytesFromSource"].as_u64(), c["bytesToSource"].as_u64()) {
            (Some(a), Some(b)) => format!("{a}/{b}"),
            _ => "-".into(),
        };
        t.row(vec![
            s(&c["direction"]),
            s(&c["protocol"]),
            s(&c["pod"]),
            s(&c["source"]),
            s(&c["destination"]),
            s(&c["sourceIdentity"]),
            s(&c["destinationIdentity"]),
            bytes,
            format!("{:.0}s", c["ageSeconds"].as_f64().unwrap_or(0.0)),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_say_none() {
        let mut t = Table::new(&["A", "BB"]);
        t.row(vec!["long".into(), "x".into()]);
        assert_eq!(t.render(), "A     BB\nlong  x\n");
        assert_eq!(Table::new(&["A"]).render(), "A\n(none)\n");
    }

    #[test]
    fn metric_sums_read_the_exposition() {
        let m = "# TYPE x counter\nx{a=\"1\",outcome=\"errors\"} 2\nx{a=\"2\",outcome=\"errors\"} 3\nxy 9\nmesh_ebpf_map_entries{map=\"orig_dst\"} 4\n";
        assert_eq!(metric_sum(m, "x", "outcome=\"errors\""), 5.0);
        assert_eq!(metric_by(m, "mesh_ebpf_map_entries", "map")["orig_dst"], 4);
        assert_eq!(whole(metric_sum(m, "none", "")), 0);
    }
}
