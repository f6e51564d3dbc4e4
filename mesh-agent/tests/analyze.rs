//! `mesh-agent analyze` against a corpus of its own: each directory under
//! `tests/corpus/analyze` is one input, its findings are in the
//! `.expected` file of the same name (`MESH_BLESS=1` rewrites them), and
//! the command's exit status follows `--failure-threshold`.

mod common;

use std::{path::Path, process::Command};

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/analyze")
}

#[test]
fn each_case_gives_exactly_its_expected_findings() {
    let dir = corpus();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 6, "{cases:?}");
    let mut failures = Vec::new();
    for case in cases {
        let got: String = mesh_agent::analyze::paths(
            std::slice::from_ref(&case),
            mesh_agent::registry::ambient::DEFAULT_LABEL,
        )
        .into_iter()
        .map(|mut m| {
            m.file = m.file.strip_prefix(&dir).unwrap_or(&m.file).to_path_buf();
            format!("{m}\n")
        })
        .collect();
        common::compare_or_bless(&case.with_extension("expected"), &got, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn analyze(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .arg("analyze")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_exit_status_follows_the_failure_threshold() {
    let case = |c: &str| corpus().join(c).display().to_string();
    let (code, out, err) = analyze(&[&case("clean")]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "", "no issues found\n")
    );
    // Errors fail the run (istioctl's 79)…
    let (code, _, err) = analyze(&[&case("subset-selects-nothing")]);
    assert_eq!((code, err.as_str()), (79, "1 error, 0 warnings, 0 info\n"));
    // …warnings only from --failure-threshold warning on.
    let (code, _, _) = analyze(&[&case("strict-with-pods-outside")]);
    assert_eq!(code, 0);
    let (code, _, _) = analyze(&[
        "--failure-threshold",
        "warning",
        &case("strict-with-pods-outside"),
    ]);
    assert_eq!(code, 79);
    let (code, out, _) = analyze(&["--json", &case("subset-selects-nothing")]);
    assert_eq!(code, 79);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["code"], "IST0173");
    assert_eq!(v[0]["line"], 17);
}
