//! `networking.istio.io/v1alpha3` EnvoyFilter: patches to Envoy's
//! configuration, kept as written. This data plane has no Envoy to patch;
//! it reads the one shape Istio documents for local rate limiting
//! ([`crate::policy::rate_limit`]) and reports every other patch as
//! ignored.

use serde::{Deserialize, Serialize};

use super::{
    common::PolicyTargetReference,
    networking::{WorkloadLabels, spec},
};

spec! {
    pub struct EnvoyFilter {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub workload_selector: Option<WorkloadLabels>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub target_refs: Vec<PolicyTargetReference>,
        /// Envoy configuration fragments: free-form.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub config_patches: Vec<serde_json::Value>,
        #[serde(skip_serializing_if = "is_zero")]
        pub priority: i32,
    }
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}
