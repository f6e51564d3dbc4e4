//! `cargo xtask chart`: renders the Helm chart (`deploy/chart`) with its
//! default values into the files `kubectl apply -k deploy/` applies, so
//! there is one source for the container spec and no copy to drift; a test
//! fails when the rendered files differ from the checked-in ones.
//!
//! Helm itself is not a Debian package here, so this renders the small
//! part of Helm's template language the chart keeps to — `.Values.x`,
//! `.Release.Namespace`, `| quote`, `toYaml … | nindent N` and `{{-`
//! trimming — the way Helm does (map keys sorted, as its `toYaml` does,
//! and its trailing newline dropped). Anything else in a template is an
//! error, so the chart cannot use a construct rendered differently here.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde_yaml::Value;

/// The chart's templates and the kustomize files they become.
pub const FILES: [&str; 4] = ["rbac.yaml", "workloads.yaml", "daemonset.yaml", "ca.yaml"];
/// The namespace the kustomize files install into.
const NAMESPACE: &str = "mesh-system";

/// Each kustomize file's text, rendered from the chart under `deploy`.
pub fn rendered(deploy: &Path) -> Result<Vec<(String, String)>> {
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy.join("chart/values.yaml"))
            .context("deploy/chart/values.yaml")?,
    )?;
    FILES
        .iter()
        .map(|f| {
            let path = deploy.join("chart/templates").join(f);
            let t =
                std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            let body =
                render(&t, &values, NAMESPACE).with_context(|| format!("chart/templates/{f}"))?;
            let header = format!(
                "# Rendered by `cargo xtask chart` from deploy/chart/templates/{f} with\n\
                 # deploy/chart/values.yaml: edit those, then run it; not this file.\n"
            );
            Ok((f.to_string(), header + &body))
        })
        .collect()
}

/// Writes the rendered files into `deploy`.
pub fn write(deploy: &Path) -> Result<()> {
    for (f, text) in rendered(deploy)? {
        std::fs::write(deploy.join(&f), text)?;
        eprintln!("xtask: wrote deploy/{f}");
    }
    Ok(())
}

fn render(template: &str, values: &Value, namespace: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").context("an unclosed {{")?;
        let mut expr = &after[..close];
        if let Some(e) = expr.strip_prefix('-') {
            // `{{-` trims the whitespace before it, newlines included.
            out.truncate(out.trim_end().len());
            expr = e;
        }
        if expr.ends_with('-') {
            bail!("`-}}}}` is not supported: {{{{{expr}}}}}");
        }
        out.push_str(&evaluate(expr.trim(), values, namespace)?);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn evaluate(expr: &str, values: &Value, namespace: &str) -> Result<String> {
    let parts: Vec<&str> = expr.split('|').map(str::trim).collect();
    match parts[..] {
        [".Release.Namespace"] => Ok(namespace.to_owned()),
        [v] => scalar(lookup(values, v)?, v),
        [v, "quote"] => Ok(quote(&scalar(lookup(values, v)?, v)?)),
        [to_yaml, nindent] => {
            let v = to_yaml
                .strip_prefix("toYaml ")
                .with_context(|| format!("unsupported: {{{{ {expr} }}}}"))?;
            let n: usize = nindent
                .strip_prefix("nindent ")
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("unsupported: {{{{ {expr} }}}}"))?;
            let yaml = serde_yaml::to_string(&sorted(lookup(values, v.trim())?))?;
            let pad = " ".repeat(n);
            Ok(yaml
                .trim_end_matches('\n')
                .lines()
                .map(|l| format!("\n{pad}{l}"))
                .collect())
        }
        _ => bail!("unsupported template expression: {{{{ {expr} }}}}"),
    }
}

fn lookup<'a>(values: &'a Value, path: &str) -> Result<&'a Value> {
    let keys = path
        .strip_prefix(".Values.")
        .with_context(|| format!("unsupported: {path} (only .Values.* and .Release.Namespace)"))?;
    let mut v = values;
    for k in keys.split('.') {
        v = v
            .get(k)
            .with_context(|| format!("{path}: no such value in values.yaml"))?;
    }
    Ok(v)
}

fn scalar(v: &Value, path: &str) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => bail!("{path} is not a scalar: use toYaml"),
    })
}

/// Go's `%q` for the strings the chart quotes.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Map keys in order, as Helm's `toYaml` (Go's YAML encoder) writes them.
fn sorted(v: &Value) -> Value {
    match v {
        Value::Mapping(m) => {
            let mut entries: Vec<(&Value, &Value)> = m.iter().collect();
            entries.sort_by_key(|(k, _)| k.as_str().unwrap_or_default().to_owned());
            Value::Mapping(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Sequence(s) => Value::Sequence(s.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
    }

    #[test]
    fn the_kustomize_files_are_the_chart_rendered() {
        for (f, text) in rendered(&deploy()).unwrap() {
            let on_disk = std::fs::read_to_string(deploy().join(&f)).unwrap();
            assert!(
                on_disk == text,
                "deploy/{f} differs from the chart rendered: run `cargo xtask chart`"
            );
        }
    }

    #[test]
    fn templates_render_as_helm_does() {
        let values: Value = serde_yaml::from_str(
            "image: {tag: 1.2}\nflag: false\nres: {requests: {memory: 1Mi, cpu: 1m}}\nsel: {}\n",
        )
        .unwrap();
        let t = "a: {{ .Values.image.tag }}\nb: {{ .Values.flag | quote }}\nns: {{ .Release.Namespace }}\nr:\n  {{- toYaml .Values.res | nindent 2 }}\nend\n";
        assert_eq!(
            render(t, &values, "x").unwrap(),
            "a: 1.2\nb: \"false\"\nns: x\nr:\n  requests:\n    cpu: 1m\n    memory: 1Mi\nend\n"
        );
        assert!(render("{{ .Values.nope }}", &values, "x").is_err());
        assert!(render("{{ if .Values.flag }}", &values, "x").is_err());
        assert!(render("{{ .Values.res }}", &values, "x").is_err());
    }
}
