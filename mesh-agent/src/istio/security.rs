//! `security.istio.io`: PeerAuthentication, RequestAuthentication,
//! AuthorizationPolicy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    common::{Duration, PolicyTargetReference, WorkloadSelector},
    networking::{enumeration, spec},
};

// ------------------------------------------------------------- PeerAuthentication

enumeration! {
    pub enum MtlsMode { Unset, Disable, Permissive, Strict }
}

spec! {
    pub struct PeerAuthentication {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub selector: Option<WorkloadSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mtls: Option<MutualTls>,
        /// Keyed by the workload's target port.
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        /// Keys are port numbers; kept as written so a bad key is reported
        /// by validation with its name.
        pub port_level_mtls: BTreeMap<String, MutualTls>,
    }
}

spec! {
    pub struct MutualTls {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<MtlsMode>,
    }
}

// ---------------------------------------------------------- RequestAuthentication

spec! {
    pub struct RequestAuthentication {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub selector: Option<WorkloadSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub target_ref: Option<PolicyTargetReference>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub target_refs: Vec<PolicyTargetReference>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub jwt_rules: Vec<JwtRule>,
    }
}

spec! {
    pub struct JwtRule {
        pub issuer: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub audiences: Vec<String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub jwks_uri: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub jwks: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub from_headers: Vec<JwtHeader>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub from_params: Vec<String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub output_payload_to_header: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub forward_original_token: bool,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub output_claim_to_headers: Vec<ClaimToHeader>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub from_cookies: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeout: Option<Duration>,
    }
}

spec! {
    pub struct JwtHeader {
        pub name: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub prefix: String,
    }
}

spec! {
    pub struct ClaimToHeader {
        pub header: String,
        pub claim: String,
    }
}

// ------------------------------------------------------------ AuthorizationPolicy

enumeration! {
    pub enum AuthorizationAction { Allow, Deny, Audit, Custom }
}

spec! {
    pub struct AuthorizationPolicy {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub selector: Option<WorkloadSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub target_ref: Option<PolicyTargetReference>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub target_refs: Vec<PolicyTargetReference>,
        /// `None` (no `rules:` at all) differs from an empty list: an ALLOW
        /// policy without rules allows nothing, `rules: [{}]` everything.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub rules: Option<Vec<Rule>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub action: Option<AuthorizationAction>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub provider: Option<ExtensionProvider>,
    }
}

spec! {
    pub struct ExtensionProvider {
        pub name: String,
    }
}

spec! {
    pub struct Rule {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub from: Vec<RuleFrom>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub to: Vec<RuleTo>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub when: Vec<Condition>,
    }
}

spec! {
    pub struct RuleFrom {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub source: Option<Source>,
    }
}

spec! {
    pub struct RuleTo {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub operation: Option<Operation>,
    }
}

spec! {
    pub struct Source {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub principals: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_principals: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub request_principals: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_request_principals: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub namespaces: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_namespaces: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub service_accounts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_service_accounts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub ip_blocks: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_ip_blocks: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub remote_ip_blocks: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_remote_ip_blocks: Vec<String>,
    }
}

spec! {
    pub struct Operation {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub hosts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_hosts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub ports: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_ports: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub methods: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_methods: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub paths: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_paths: Vec<String>,
    }
}

spec! {
    pub struct Condition {
        pub key: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub values: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub not_values: Vec<String>,
    }
}
