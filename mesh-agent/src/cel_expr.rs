//! CEL expressions over Envoy's attributes (`response.code >= 400`), as
//! Istio's Telemetry filters and tag overrides write them: compiled with
//! the `cel` crate and checked to name only attributes the agent fills, so
//! a typo is refused with the configuration instead of silently matching
//! nothing. A leaf: the validator and the access log both use it.

use cel::Program;

/// The attribute roots an expression may use.
pub const ROOTS: [&str; 7] = [
    "request",
    "response",
    "source",
    "destination",
    "connection",
    "upstream",
    "xds",
];

/// Compiles `expression`; the error says what is wrong with it.
pub fn compile(expression: &str) -> Result<Program, String> {
    let program = Program::compile(expression).map_err(|e| e.to_string())?;
    let references = program.references();
    let mut unknown: Vec<&str> = references
        .variables()
        .into_iter()
        .filter(|v| !ROOTS.contains(v))
        .collect();
    unknown.sort_unstable();
    if let Some(v) = unknown.first() {
        return Err(format!(
            "unknown attribute {v:?} (use {})",
            ROOTS.join(", ")
        ));
    }
    drop(references);
    Ok(program)
}
