//! `telemetry.istio.io`: Telemetry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    common::{Duration, PolicyTargetReference, WorkloadSelector},
    networking::{enumeration, spec},
};

spec! {
    pub struct Telemetry {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub selector: Option<WorkloadSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub target_ref: Option<PolicyTargetReference>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub target_refs: Vec<PolicyTargetReference>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub tracing: Vec<Tracing>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub metrics: Vec<Metrics>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub access_logging: Vec<AccessLogging>,
    }
}

enumeration! {
    pub enum WorkloadMode { ClientAndServer, Client, Server }
}

spec! {
    pub struct ModeSelector {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<WorkloadMode>,
    }
}

spec! {
    pub struct ProviderRef {
        pub name: String,
    }
}

spec! {
    pub struct Tracing {
        #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
        pub matches: Option<ModeSelector>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub providers: Vec<ProviderRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub random_sampling_percentage: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub disable_span_reporting: Option<bool>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub custom_tags: BTreeMap<String, CustomTag>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub use_request_id_for_trace_sampling: Option<bool>,
    }
}

spec! {
    pub struct CustomTag {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub literal: Option<LiteralTag>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub environment: Option<NamedTag>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub header: Option<NamedTag>,
    }
}

spec! {
    pub struct LiteralTag {
        pub value: String,
    }
}

spec! {
    pub struct NamedTag {
        pub name: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub default_value: String,
    }
}

spec! {
    pub struct Metrics {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub providers: Vec<ProviderRef>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub overrides: Vec<MetricsOverrides>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub reporting_interval: Option<Duration>,
    }
}

enumeration! {
    pub enum IstioMetric {
        AllMetrics,
        RequestCount,
        RequestDuration,
        RequestSize,
        ResponseSize,
        TcpOpenedConnections,
        TcpClosedConnections,
        TcpSentBytes,
        TcpReceivedBytes,
        GrpcRequestMessages,
        GrpcResponseMessages,
    }
}

spec! {
    pub struct MetricSelector {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub metric: Option<IstioMetric>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub custom_metric: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<WorkloadMode>,
    }
}

enumeration! {
    pub enum TagOperation { Upsert, Remove }
}

spec! {
    pub struct TagOverride {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub operation: Option<TagOperation>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub value: String,
    }
}

spec! {
    pub struct MetricsOverrides {
        #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
        pub matches: Option<MetricSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub disabled: Option<bool>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub tag_overrides: BTreeMap<String, TagOverride>,
    }
}

spec! {
    pub struct AccessLogging {
        #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
        pub matches: Option<ModeSelector>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub providers: Vec<ProviderRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub disabled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub filter: Option<AccessLogFilter>,
    }
}

spec! {
    pub struct AccessLogFilter {
        pub expression: String,
    }
}
