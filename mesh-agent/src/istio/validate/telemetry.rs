//! `telemetry.istio.io`: Telemetry.

use super::*;

pub(super) fn check(c: &mut Check<'_>, s: &Telemetry) {
    targets(c, &s.selector, &s.target_ref, &s.target_refs);
    for (i, t) in s.tracing.iter().enumerate() {
        let p = format!("spec.tracing[{i}]");
        if let Some(v) = t.random_sampling_percentage
            && !(0.0..=100.0).contains(&v)
        {
            c.err(
                format!("{p}.randomSamplingPercentage"),
                "not a percentage (0-100)",
            );
        }
        for (j, pr) in t.providers.iter().enumerate() {
            c.required(&format!("{p}.providers[{j}].name"), &pr.name);
        }
        for (name, tag) in &t.custom_tags {
            let n = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if n != 1 {
                c.err(
                    format!("{p}.customTags.{name}"),
                    "exactly one of literal, environment or header is required",
                );
            }
        }
    }
    for (i, m) in s.metrics.iter().enumerate() {
        let p = format!("spec.metrics[{i}]");
        for (j, pr) in m.providers.iter().enumerate() {
            c.required(&format!("{p}.providers[{j}].name"), &pr.name);
        }
        for (j, o) in m.overrides.iter().enumerate() {
            if let Some(sel) = &o.matches
                && sel.metric.is_some()
                && !sel.custom_metric.is_empty()
            {
                c.err(
                    format!("{p}.overrides[{j}].match"),
                    "metric and customMetric are mutually exclusive",
                );
            }
            for (tag, ov) in &o.tag_overrides {
                if ov.operation != Some(TagOperation::Remove) && ov.value.is_empty() {
                    c.err(
                        format!("{p}.overrides[{j}].tagOverrides.{tag}.value"),
                        "required unless the operation is REMOVE",
                    );
                }
                if ov.operation == Some(TagOperation::Remove) && !ov.value.is_empty() {
                    c.err(
                        format!("{p}.overrides[{j}].tagOverrides.{tag}.value"),
                        "REMOVE takes no value",
                    );
                }
            }
        }
        c.duration(
            &format!("{p}.reportingInterval"),
            &m.reporting_interval,
            MIN,
        );
    }
    for (i, a) in s.access_logging.iter().enumerate() {
        let p = format!("spec.accessLogging[{i}]");
        for (j, pr) in a.providers.iter().enumerate() {
            c.required(&format!("{p}.providers[{j}].name"), &pr.name);
        }
        if let Some(f) = &a.filter {
            let field = format!("{p}.filter.expression");
            c.required(&field, &f.expression);
            if !f.expression.is_empty()
                && let Err(e) = crate::cel_expr::compile(&f.expression)
            {
                c.err(field, format!("not a valid CEL expression: {e}"));
            }
        }
    }
}
