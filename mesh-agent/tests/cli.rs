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
    let (code, _, err) = agent(&[
        "run",
        "--workloads",
        "/w.yaml",
        "--insecure-no-mtls",
        "--inbound-port",
        "15001",
    ]);
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
        let mut all = vec!["run", "--workloads", "/w.yaml", "--insecure-no-mtls"];
        all.extend_from_slice(args);
        let (code, _, err) = agent(&all);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn running_without_a_ca_needs_the_insecure_flag() {
    let (code, _, err) = agent(&["run", "--workloads", "/w.yaml"]);
    assert_eq!(code, 64);
    assert_eq!(
        err,
        "mesh-agent: invalid configuration: --ca-addr: mutual TLS needs a CA: give --ca-addr (with \
         --ca-root and a node credential or --ca-token-file), or --insecure-no-mtls to run without \
         it\n"
    );
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
        "validated 0 files: 0 documents accepted, 1 error, 0 warnings, 0 notes\n"
    );
}

/// `mesh-agent validate ARGS`, the YAML on standard input.
fn validate_stdin(args: &[&str], yaml: &str) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .arg("validate")
        .args(args)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mesh-agent");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const DENY_ALL: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
";

#[test]
fn policies_are_enforced_and_what_cannot_apply_is_a_warning_strict_fails_on() {
    // Enforced by the destination's agent: nothing to say.
    let (code, out, err) = validate_stdin(&[], DENY_ALL);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert_eq!(
        err,
        "validated 1 file: 1 document accepted, 0 errors, 0 warnings, 0 notes\n"
    );
    // Bound to a gateway: not applied here, said so.
    let targeted = DENY_ALL.replace(
        "spec: {}",
        "spec: {targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: gw}}",
    );
    let (code, out, _) = validate_stdin(&[], &targeted);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "<stdin>:1: warning: AuthorizationPolicy shop/deny-all: spec: this AuthorizationPolicy binds to a gateway or service (targetRef), which this data plane does not have: it is not applied\n"
    );
    let (code, out, _) = validate_stdin(&["--strict"], &targeted);
    assert_eq!(code, 1);
    assert!(
        out.contains(": error: ") && out.ends_with("(--strict)\n"),
        "{out}"
    );
    // A condition on Envoy filter metadata fails closed, said so.
    let experimental = DENY_ALL.replace(
        "spec: {}",
        "spec: {rules: [{when: [{key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [x]}]}]}",
    );
    let (_, out, _) = validate_stdin(&[], &experimental);
    assert!(
        out.contains("warning:") && out.contains("fails closed"),
        "{out}"
    );
}

#[test]
fn a_misspelt_kind_of_an_istio_group_is_an_error_with_a_suggestion() {
    let (code, out, _) = validate_stdin(
        &[],
        "apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: r}\nspec: {hosts: [r]}\n",
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out,
        "<stdin>:2: error: VirtualServce default/r: kind: unknown kind \"VirtualServce\" in networking.istio.io: did you mean VirtualService?\n"
    );
    // A kind of the group that this data plane does not support is not a
    // typo; a kind of another group is skipped; a near miss of a core
    // kind the mesh reads is a typo.
    let (code, out, _) = validate_stdin(
        &[],
        "apiVersion: networking.istio.io/v1beta1\nkind: ProxyConfig\nmetadata: {name: f}\nspec: {}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Servce\nmetadata: {name: s}\n---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: lua}\nspec: {configPatches: [{applyTo: HTTP_FILTER, patch: {value: {name: envoy.filters.http.lua}}}]}\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("warning: ProxyConfig default/f: kind: ProxyConfig is not supported by this data plane: it is ignored"), "{out}");
    assert!(out.contains("warning: EnvoyFilter default/lua: spec.configPatches: configPatches[0] ignored: this data plane has no Envoy to patch"), "{out}");
    assert!(
        out.contains(
            "note: ConfigMap default/c: v1 ConfigMap is not configuration the mesh reads: skipped"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "error: Servce default/s: kind: unknown kind \"Servce\" in v1: did you mean Service?"
        ),
        "{out}"
    );
}

#[test]
fn a_negative_duration_is_reported_as_negative() {
    let (code, out, _) = validate_stdin(
        &["--errors-only"],
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http: [{timeout: -1s, route: [{destination: {host: r}}]}]\n",
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("negative duration \"-1s\": it must be zero or more"),
        "{out}"
    );
}

/// The README's YAML examples are what a user copies first: each must
/// validate without an error or a warning.
#[test]
fn the_readmes_yaml_examples_validate() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let examples: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or_default())
        .collect();
    assert!(!examples.is_empty(), "no ```yaml block in the README");
    for yaml in examples {
        let (code, out, err) = validate_stdin(&[], yaml);
        assert_eq!(code, 0, "{yaml}\n{out}{err}");
        assert!(
            err.contains(" 0 errors, 0 warnings") && !err.contains(" 0 documents accepted"),
            "{yaml}\n{out}{err}"
        );
    }
}
