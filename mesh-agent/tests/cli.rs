//! The command line, without root: bad settings are refused before the
//! agent touches anything, with exit code 64 and one line naming the flag.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .output()
        .expect("run mesh-agent");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    let (code, out, _) = agent(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--kubernetes",
        "--cgroup-root",
        "--cluster-domain",
        "--bpffs-dir",
        "--keep-pins",
        "--exclude-outbound-cidrs",
        "--connect-timeout",
        "--log-level",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
    assert!(out.contains("[env: MESH_BPFFS_DIR=]"), "{out}");
    assert!(out.contains("[default: /sys/fs/bpf/mesh]"), "{out}");
}

#[test]
fn conflicting_ports_are_refused_with_one_line() {
    let (code, _, err) = agent(&["run", "--workloads", "/w.yaml", "--inbound-port", "15001"]);
    assert_eq!(code, 64);
    assert_eq!(
        err,
        "mesh-agent: invalid configuration: --inbound-port: port 15001 is already used by --outbound-port\n"
    );
}

#[test]
fn bad_values_are_refused_before_anything_is_touched() {
    for (args, want) in [
        (
            &["--exclude-outbound-cidrs", "10.0.0.0/40"][..],
            "prefix length 40",
        ),
        (&["--connect-timeout", "soon"][..], "--connect-timeout"),
        (&["--log-level", "info,[bad"][..], "--log-level"),
        (&["--agent-mark", "0"][..], "--agent-mark"),
    ] {
        let mut all = vec!["run", "--workloads", "/w.yaml"];
        all.extend_from_slice(args);
        let (code, _, err) = agent(&all);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn running_without_a_configuration_source_is_a_usage_error() {
    let (code, _, err) = agent(&["run"]);
    assert_eq!(code, 64);
    assert_eq!(
        err,
        "mesh-agent: invalid configuration: --config: give configuration files (--config PATH) or --kubernetes, or both\n"
    );
}

fn corpus(dir: &str) -> String {
    format!("{}/tests/corpus/{dir}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_reports_every_problem_and_fails() {
    let broken = corpus("broken");
    let (code, out, err) = agent(&["validate", "--errors-only", &broken]);
    assert_eq!(code, 1, "{err}");
    let want = format!(
        "{broken}/vs-weights-and-regex.yaml:12: error: VirtualService default/reviews: spec.http[0].match[0].uri.regex: invalid regex: error: unclosed group\n"
    );
    assert!(out.contains(&want), "{out}");
    assert!(!out.contains(": note: "), "--errors-only: {out}");
    assert!(
        err.starts_with("validated 9 files: ")
            && err.contains(" accepted, ")
            && err.contains(" errors, "),
        "{err}"
    );
    let (code, out, _) = agent(&["validate", "--json", &format!("{broken}/syntax.yaml")]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["line"], 7);
    assert_eq!(v[0]["severity"], "error");
}

#[test]
fn validate_accepts_the_documented_examples() {
    let (code, out, err) = agent(&["validate", &corpus("good")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(": note: ") && !out.contains(": error: "),
        "{out}"
    );
    let (code, _, err) = agent(&["validate", "/nonexistent.yaml"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "validated 0 files: 0 documents accepted, 1 error, 0 notes\n"
    );
}
