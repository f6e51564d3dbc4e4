//! A configuration file as a user (or the Kubernetes API) hands it over:
//! YAML or JSON, Istio resources, Kubernetes objects or the workload
//! registry, parsed, checked and compiled as `mesh-agent validate` does.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut parsed = mesh_agent::documents::Parsed::default();
    mesh_agent::documents::parse_file(Path::new("fuzz.yaml"), data, &mut parsed);
    let _ = mesh_agent::documents::check::documents(&parsed);
    let _ = mesh_agent::analyze::documents_across(parsed, "istio.io/dataplane-mode");
});
