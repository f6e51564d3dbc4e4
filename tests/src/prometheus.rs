//! A real Prometheus (Debian's package) scraping the agents from a test's
//! own network namespace, and PromQL queries against it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{Env, sys};

/// Where Prometheus listens, inside its namespace.
const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus {
    netns: String,
}

/// The `prometheus` binary, or a failure naming how to get it.
fn binary(name: &str) -> PathBuf {
    sys::which(name).unwrap_or_else(|| {
        panic!("`{name}` is not installed: run `cargo xtask setup` (Debian's `prometheus` package)")
    })
}

/// `promtool check metrics` on `text`: the problems it reports, one per
/// line (empty when clean).
pub fn promtool_check(text: &str) -> Vec<String> {
    use std::io::Write as _;
    let mut child = Command::new(binary("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    // Exit 3: lint problems (listed); anything else non-zero is a failure
    // to read the input at all.
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "promtool could not check the metrics ({}): {problems:?}",
        out.status
    );
    assert!(
        out.status.success() || !problems.is_empty(),
        "promtool failed without saying why"
    );
    problems
}

impl Prometheus {
    /// Starts Prometheus in `netns`, scraping `targets` (`host:port`) every
    /// second, and waits until it answers queries.
    pub fn start(env: &Env, netns: &str, targets: &[String]) -> Self {
        let dir = env.dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n\
                 - job_name: mesh-agent\n  \
                   metrics_path: /stats/prometheus\n  \
                   static_configs: [{{targets: [{}]}}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdout(Stdio::null())
            .stderr(log(&dir))
            .spawn()
            .expect("prometheus");
        env.track(child);
        let p = Self {
            netns: netns.to_owned(),
        };
        assert!(
            sys::wait_until(Duration::from_secs(30), || p.get("/-/ready").is_ok()),
            "Prometheus did not become ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        p
    }

    fn get(&self, path_and_query: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "curl", "-sf", "-g"])
            .arg(format!("http://{LISTEN}{path_and_query}"))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// An instant query (at `time`, Unix seconds, when given): each
    /// sample's labels and value. A failed query fails the test.
    pub fn query_at(&self, promql: &str, time: Option<f64>) -> Vec<(Value, f64)> {
        let mut args = vec![
            "netns".to_owned(),
            "exec".into(),
            self.netns.clone(),
            "curl".into(),
            "-sf".into(),
            "-G".into(),
            "--data-urlencode".into(),
            format!("query={promql}"),
        ];
        if let Some(t) = time {
            args.extend(["--data-urlencode".into(), format!("time={t}")]);
        }
        args.push(format!("http://{LISTEN}/api/v1/query"));
        let out = Command::new("ip").args(&args).output().expect("curl");
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{promql}: not a Prometheus answer ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: no result vector: {body}"))
            .iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{promql}: a sample without a value: {s}"));
                (s["metric"].clone(), v)
            })
            .collect()
    }

    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        self.query_at(promql, None)
    }

    /// The one value `promql` yields now; `None` when it yields nothing.
    pub fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql);
        assert!(r.len() <= 1, "{promql}: more than one sample: {r:?}");
        r.first().map(|(_, v)| *v)
    }
}

fn log(dir: &Path) -> Stdio {
    std::fs::File::create(dir.join("prometheus.log"))
        .map(Stdio::from)
        .unwrap_or(Stdio::null())
}
