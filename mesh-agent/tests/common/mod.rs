//! What the golden-file tests share.

use std::path::Path;

/// Compares `got` with `expected_file`, or with `MESH_BLESS=1` rewrites the
/// file instead; a difference is added to `failures`.
pub fn compare_or_bless(expected_file: &Path, got: &str, failures: &mut Vec<String>) {
    if std::env::var_os("MESH_BLESS").is_some() {
        std::fs::write(expected_file, got).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(expected_file).unwrap_or_default();
    if got != expected {
        failures.push(format!(
            "{}:\n--- expected\n{expected}--- got\n{got}",
            expected_file.display()
        ));
    }
}
