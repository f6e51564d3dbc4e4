use super::*;
use crate::{istio::telemetry::AccessLogging, mesh_config::MeshConfig};

fn entries(yaml: &str) -> Vec<AccessLogging> {
    serde_yaml::from_str(yaml).unwrap()
}

fn providers(mesh: &str) -> Providers {
    Providers::from_mesh(&MeshConfig::parse(mesh).unwrap()).unwrap()
}

const MESH: &str = "
defaultProviders: {accessLogging: [envoy]}
extensionProviders:
- {name: file, envoyFileAccessLog: {path: /tmp/file.log}}
- {name: json, envoyFileAccessLog: {path: /tmp/json.log, logFormat: {labels: {code: '%RESPONSE_CODE%'}}}}
";

/// Names of the providers a side logs to, with their filters.
fn names(plan: &LogPlan, p: &Providers, mode: Mode) -> Vec<String> {
    plan.resolve(p)
        .side(mode)
        .iter()
        .map(|(t, f)| match f {
            Some(f) => format!("{}[{}]", t.name, f.source()),
            None => t.name.clone(),
        })
        .collect()
}

fn plan(levels: &[&str]) -> LogPlan {
    let parsed: Vec<Vec<AccessLogging>> = levels.iter().map(|l| entries(l)).collect();
    LogPlan::new(
        parsed
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("Telemetry t/{i}"), e.as_slice())),
    )
    .unwrap()
}

#[test]
fn default_providers_and_legacy_file() {
    let p = providers(MESH);
    // No Telemetry: no legacy file either, so nothing.
    assert!(names(&plan(&[]), &p, Mode::Client).is_empty());
    // An empty entry enables the default providers.
    assert_eq!(names(&plan(&["[{}]"]), &p, Mode::Client), ["envoy"]);
    // No Telemetry and accessLogFile: the legacy log, both sides.
    let legacy = providers("accessLogFile: /tmp/legacy.log\n");
    let none = plan(&[]);
    let r = none.resolve(&legacy);
    assert_eq!(r.client[0].0.path, PathBuf::from("/tmp/legacy.log"));
    assert_eq!(r.server.len(), 1);
}

#[test]
fn levels_replace_the_scope_and_disable_or_filter_providers() {
    let p = providers(MESH);
    // Mesh-wide both `envoy` and `file`; the namespace disables them; the
    // workload turns `file` back on with a filter.
    let plan = plan(&[
        "[{providers: [{name: envoy}]}, {providers: [{name: file}]}]",
        "[{disabled: true}]",
        "[{providers: [{name: file}], filter: {expression: 'response.code >= 400'}}]",
    ]);
    assert_eq!(
        names(&plan, &p, Mode::Server),
        ["file[response.code >= 400]"]
    );
    // A later level naming other providers drops the earlier ones.
    let replaced = super::LogPlan::new([
        (
            "Telemetry a/root".to_owned(),
            entries("[{providers: [{name: envoy}]}]").as_slice(),
        ),
        (
            "Telemetry b/ns".to_owned(),
            entries("[{providers: [{name: json}]}]").as_slice(),
        ),
    ])
    .unwrap();
    assert_eq!(names(&replaced, &p, Mode::Client), ["json"]);
}

#[test]
fn match_mode_selects_the_side() {
    let p = providers(MESH);
    let plan = plan(&["[{match: {mode: SERVER}, providers: [{name: file}]}]"]);
    assert_eq!(names(&plan, &p, Mode::Server), ["file"]);
    assert!(names(&plan, &p, Mode::Client).is_empty());
}

#[test]
fn the_merge_follows_mesh_config_changes() {
    let plan = plan(&["[{}]"]);
    assert_eq!(names(&plan, &providers(MESH), Mode::Client), ["envoy"]);
    let other = providers(
        "defaultProviders: {accessLogging: [file]}\nextensionProviders: [{name: file, envoyFileAccessLog: {path: /tmp/f}}]\n",
    );
    assert_eq!(names(&plan, &other, Mode::Client), ["file"]);
}

#[test]
fn bad_filters_and_formats_are_errors() {
    let e = LogPlan::new([(
        "Telemetry a/b".to_owned(),
        entries("[{filter: {expression: 'response.code >='}}]").as_slice(),
    )])
    .unwrap_err();
    assert!(e.to_string().contains("response.code >="), "{e}");
    let e = LogPlan::new([(
        "Telemetry a/b".to_owned(),
        entries("[{filter: {expression: 'respnse.code >= 400'}}]").as_slice(),
    )])
    .unwrap_err();
    assert!(
        e.to_string().contains("unknown attribute \"respnse\""),
        "{e}"
    );
    let e = Providers::from_mesh(
        &MeshConfig::parse(
            "extensionProviders: [{name: f, envoyFileAccessLog: {logFormat: {text: '%BAD%'}}}]\n",
        )
        .unwrap(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("\"f\"") && e.to_string().contains("%BAD%"),
        "{e}"
    );
}
