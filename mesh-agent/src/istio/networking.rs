//! `networking.istio.io`: VirtualService, DestinationRule, Gateway,
//! ServiceEntry, WorkloadEntry, Sidecar — every documented field.
//!
//! Structs deny unknown fields (a typo is an error, as with `istioctl
//! validate`), default every field, and skip empty ones when serialised.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Duration, Percent, Port, PortSelector, StringMatch, WorkloadSelector};

macro_rules! spec {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
        pub struct $name { $($body)* }
    };
}
pub(crate) use spec;

macro_rules! enumeration {
    ($(#[$m:meta])* pub enum $name:ident { $($v:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name { $($v),+ }
    };
}
pub(crate) use enumeration;

/// The selector of ServiceEntry and Sidecar (`workloadSelector: {labels:
/// …}`); policies use `selector: {matchLabels: …}` instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadLabels {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

// ---------------------------------------------------------------- VirtualService

spec! {
    pub struct VirtualService {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub hosts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub gateways: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub http: Vec<HttpRoute>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub tls: Vec<TlsRoute>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub tcp: Vec<TcpRoute>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub export_to: Vec<String>,
    }
}

spec! {
    pub struct HttpRoute {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub name: String,
        #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
        pub matches: Vec<HttpMatchRequest>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub route: Vec<HttpRouteDestination>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub redirect: Option<HttpRedirect>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub direct_response: Option<HttpDirectResponse>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub delegate: Option<Delegate>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub rewrite: Option<HttpRewrite>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeout: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub retries: Option<HttpRetry>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub fault: Option<HttpFaultInjection>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mirror: Option<Destination>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub mirrors: Vec<HttpMirrorPolicy>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mirror_percentage: Option<Percent>,
        /// Deprecated: use `mirrorPercentage`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mirror_percent: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cors_policy: Option<CorsPolicy>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub headers: Option<Headers>,
    }
}

spec! {
    pub struct HttpMatchRequest {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub uri: Option<StringMatch>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub scheme: Option<StringMatch>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub method: Option<StringMatch>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub authority: Option<StringMatch>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub headers: BTreeMap<String, StringMatch>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<u32>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub source_labels: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub gateways: Vec<String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub query_params: BTreeMap<String, StringMatch>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub ignore_uri_case: bool,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub without_headers: BTreeMap<String, StringMatch>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub source_namespace: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub stat_prefix: String,
    }
}

spec! {
    pub struct HttpRouteDestination {
        pub destination: Destination,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub weight: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub headers: Option<Headers>,
    }
}

spec! {
    pub struct Destination {
        pub host: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub subset: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<PortSelector>,
    }
}

spec! {
    pub struct Headers {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub request: Option<HeaderOperations>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub response: Option<HeaderOperations>,
    }
}

spec! {
    pub struct HeaderOperations {
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub set: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub add: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub remove: Vec<String>,
    }
}

enumeration! {
    pub enum RedirectPortSelection { FromProtocolDefault, FromRequestPort }
}

spec! {
    pub struct HttpRedirect {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub uri: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub authority: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub derive_port: Option<RedirectPortSelection>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub scheme: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub redirect_code: Option<u32>,
    }
}

spec! {
    pub struct HttpDirectResponse {
        pub status: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub body: Option<HttpBody>,
    }
}

spec! {
    pub struct HttpBody {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub string: Option<String>,
        /// Base64.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bytes: Option<String>,
    }
}

spec! {
    pub struct Delegate {
        pub name: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub namespace: String,
    }
}

spec! {
    pub struct HttpRewrite {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub uri: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub authority: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub uri_regex_rewrite: Option<RegexRewrite>,
    }
}

spec! {
    pub struct RegexRewrite {
        #[serde(rename = "match")]
        pub pattern: String,
        pub rewrite: String,
    }
}

spec! {
    pub struct HttpRetry {
        pub attempts: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub per_try_timeout: Option<Duration>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub retry_on: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub retry_remote_localities: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub backoff: Option<Duration>,
    }
}

spec! {
    pub struct HttpFaultInjection {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub delay: Option<FaultDelay>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub abort: Option<FaultAbort>,
    }
}

spec! {
    pub struct FaultDelay {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub fixed_delay: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub exponential_delay: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub percentage: Option<Percent>,
        /// Deprecated: use `percentage`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub percent: Option<i32>,
    }
}

spec! {
    pub struct FaultAbort {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub http_status: Option<i32>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub grpc_status: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub http2_error: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub percentage: Option<Percent>,
    }
}

spec! {
    pub struct HttpMirrorPolicy {
        pub destination: Destination,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub percentage: Option<Percent>,
    }
}

enumeration! {
    pub enum UnmatchedPreflights { UnspecifiedUnmatchedPreflights, Forward, Ignore }
}

spec! {
    pub struct CorsPolicy {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub allow_origins: Vec<StringMatch>,
        /// Deprecated: use `allowOrigins`.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub allow_origin: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub allow_methods: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub allow_headers: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub expose_headers: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_age: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub allow_credentials: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub unmatched_preflights: Option<UnmatchedPreflights>,
    }
}

spec! {
    pub struct TlsRoute {
        #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
        pub matches: Vec<TlsMatchAttributes>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub route: Vec<RouteDestination>,
    }
}

spec! {
    pub struct TlsMatchAttributes {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub sni_hosts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub destination_subnets: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<u32>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub source_labels: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub gateways: Vec<String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub source_namespace: String,
    }
}

spec! {
    pub struct TcpRoute {
        #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
        pub matches: Vec<L4MatchAttributes>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub route: Vec<RouteDestination>,
    }
}

spec! {
    pub struct L4MatchAttributes {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub destination_subnets: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<u32>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub source_subnet: String,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub source_labels: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub gateways: Vec<String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub source_namespace: String,
    }
}

spec! {
    pub struct RouteDestination {
        pub destination: Destination,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub weight: Option<i32>,
    }
}

// --------------------------------------------------------------- DestinationRule

spec! {
    pub struct DestinationRule {
        pub host: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub traffic_policy: Option<TrafficPolicy>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub subsets: Vec<Subset>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub export_to: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub workload_selector: Option<WorkloadSelector>,
    }
}

spec! {
    pub struct TrafficPolicy {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub load_balancer: Option<LoadBalancerSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub connection_pool: Option<ConnectionPoolSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub outlier_detection: Option<OutlierDetection>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls: Option<ClientTlsSettings>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub port_level_settings: Vec<PortTrafficPolicy>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tunnel: Option<TunnelSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub proxy_protocol: Option<ProxyProtocol>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub retry_budget: Option<RetryBudget>,
    }
}

spec! {
    pub struct Subset {
        pub name: String,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub labels: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub traffic_policy: Option<TrafficPolicy>,
    }
}

enumeration! {
    pub enum SimpleLb { Unspecified, LeastConn, Random, Passthrough, RoundRobin, LeastRequest }
}

spec! {
    pub struct LoadBalancerSettings {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub simple: Option<SimpleLb>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub consistent_hash: Option<ConsistentHashLb>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub locality_lb_setting: Option<LocalityLbSetting>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub warmup_duration_secs: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub warmup: Option<WarmupConfiguration>,
    }
}

spec! {
    pub struct WarmupConfiguration {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub duration: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub minimum_percent: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub aggression: Option<f64>,
    }
}

spec! {
    pub struct ConsistentHashLb {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub http_header_name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub http_cookie: Option<HttpCookie>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub use_source_ip: bool,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub http_query_parameter_name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ring_hash: Option<RingHash>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub maglev: Option<Maglev>,
        /// Deprecated: use `ringHash`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub minimum_ring_size: Option<u64>,
    }
}

spec! {
    pub struct HttpCookie {
        pub name: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ttl: Option<Duration>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub attributes: Vec<CookieAttribute>,
    }
}

spec! {
    pub struct CookieAttribute {
        pub name: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub value: String,
    }
}

spec! {
    pub struct RingHash {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub minimum_ring_size: Option<u64>,
    }
}

spec! {
    pub struct Maglev {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub table_size: Option<u64>,
    }
}

spec! {
    pub struct LocalityLbSetting {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub distribute: Vec<LocalityDistribute>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub failover: Vec<LocalityFailover>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub failover_priority: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub enabled: Option<bool>,
    }
}

spec! {
    pub struct LocalityDistribute {
        pub from: String,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub to: BTreeMap<String, u32>,
    }
}

spec! {
    pub struct LocalityFailover {
        pub from: String,
        pub to: String,
    }
}

enumeration! {
    pub enum H2UpgradePolicy { Default, DoNotUpgrade, Upgrade }
}

spec! {
    pub struct ConnectionPoolSettings {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tcp: Option<TcpSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub http: Option<HttpSettings>,
    }
}

spec! {
    pub struct TcpSettings {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_connections: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub connect_timeout: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tcp_keepalive: Option<TcpKeepalive>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_connection_duration: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub idle_timeout: Option<Duration>,
    }
}

spec! {
    pub struct TcpKeepalive {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub probes: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub time: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub interval: Option<Duration>,
    }
}

spec! {
    pub struct HttpSettings {
        #[serde(rename = "http1MaxPendingRequests", skip_serializing_if = "Option::is_none")]
        pub http1_max_pending_requests: Option<i32>,
        #[serde(rename = "http2MaxRequests", skip_serializing_if = "Option::is_none")]
        pub http2_max_requests: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_requests_per_connection: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_retries: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub idle_timeout: Option<Duration>,
        #[serde(rename = "h2UpgradePolicy", skip_serializing_if = "Option::is_none")]
        pub h2_upgrade_policy: Option<H2UpgradePolicy>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub use_client_protocol: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_concurrent_streams: Option<i32>,
    }
}

spec! {
    pub struct OutlierDetection {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub split_external_local_origin_errors: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub consecutive_local_origin_failures: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub consecutive_gateway_errors: Option<u32>,
        #[serde(rename = "consecutive5xxErrors", skip_serializing_if = "Option::is_none")]
        pub consecutive_5xx_errors: Option<u32>,
        /// Deprecated: use `consecutive5xxErrors`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub consecutive_errors: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub interval: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub base_ejection_time: Option<Duration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_ejection_percent: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub min_health_percent: Option<i32>,
    }
}

enumeration! {
    pub enum ClientTlsMode { Disable, Simple, Mutual, IstioMutual }
}

spec! {
    pub struct ClientTlsSettings {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<ClientTlsMode>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub client_certificate: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub private_key: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub ca_certificates: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub credential_name: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub subject_alt_names: Vec<String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub sni: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub insecure_skip_verify: Option<bool>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub ca_crl: String,
    }
}

spec! {
    pub struct PortTrafficPolicy {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<PortSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub load_balancer: Option<LoadBalancerSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub connection_pool: Option<ConnectionPoolSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub outlier_detection: Option<OutlierDetection>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls: Option<ClientTlsSettings>,
    }
}

spec! {
    pub struct TunnelSettings {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub protocol: String,
        pub target_host: String,
        pub target_port: u32,
    }
}

enumeration! {
    pub enum ProxyProtocolVersion { V1, V2 }
}

spec! {
    pub struct ProxyProtocol {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub version: Option<ProxyProtocolVersion>,
    }
}

spec! {
    pub struct RetryBudget {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub percent: Option<Percent>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub min_retry_concurrency: Option<u32>,
    }
}

// ------------------------------------------------------------------------ Gateway

spec! {
    pub struct Gateway {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub servers: Vec<Server>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub selector: BTreeMap<String, String>,
    }
}

spec! {
    pub struct Server {
        pub port: Port,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub bind: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub hosts: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls: Option<ServerTlsSettings>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub default_endpoint: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub name: String,
    }
}

enumeration! {
    pub enum ServerTlsMode { Passthrough, Simple, Mutual, AutoPassthrough, IstioMutual, OptionalMutual }
}

enumeration! {
    pub enum TlsProtocolVersion { TlsAuto, Tlsv10, Tlsv11, Tlsv12, Tlsv13 }
}

spec! {
    pub struct ServerTlsSettings {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub https_redirect: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<ServerTlsMode>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub server_certificate: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub private_key: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub ca_certificates: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub ca_crl: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub credential_name: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub credential_names: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub tls_certificates: Vec<TlsCertificate>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub subject_alt_names: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub verify_certificate_spki: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub verify_certificate_hash: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub min_protocol_version: Option<TlsProtocolVersion>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_protocol_version: Option<TlsProtocolVersion>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub cipher_suites: Vec<String>,
    }
}

spec! {
    pub struct TlsCertificate {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub server_certificate: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub private_key: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub ca_certificates: String,
    }
}

// ------------------------------------------------------------------ ServiceEntry

enumeration! {
    pub enum Location { MeshExternal, MeshInternal }
}

enumeration! {
    pub enum Resolution { None, Static, Dns, DnsRoundRobin }
}

spec! {
    pub struct ServiceEntry {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub hosts: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub addresses: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub ports: Vec<Port>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub location: Option<Location>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub resolution: Option<Resolution>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub endpoints: Vec<WorkloadEntry>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub workload_selector: Option<WorkloadLabels>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub export_to: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub subject_alt_names: Vec<String>,
    }
}

// ----------------------------------------------------------------- WorkloadEntry

spec! {
    pub struct WorkloadEntry {
        #[serde(skip_serializing_if = "String::is_empty")]
        pub address: String,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub ports: BTreeMap<String, u32>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        pub labels: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub network: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub locality: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub weight: Option<u32>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub service_account: String,
    }
}

// ------------------------------------------------------------------------ Sidecar

enumeration! {
    pub enum CaptureMode { Default, Iptables, None }
}

enumeration! {
    pub enum OutboundTrafficPolicyMode { RegistryOnly, AllowAny }
}

spec! {
    pub struct Sidecar {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub workload_selector: Option<WorkloadLabels>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub ingress: Vec<IstioIngressListener>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub egress: Vec<IstioEgressListener>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub inbound_connection_pool: Option<ConnectionPoolSettings>,
    }
}

spec! {
    pub struct IstioIngressListener {
        pub port: Port,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub bind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub capture_mode: Option<CaptureMode>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub default_endpoint: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tls: Option<ServerTlsSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub connection_pool: Option<ConnectionPoolSettings>,
    }
}

spec! {
    pub struct IstioEgressListener {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<Port>,
        #[serde(skip_serializing_if = "String::is_empty")]
        pub bind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub capture_mode: Option<CaptureMode>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub hosts: Vec<String>,
    }
}

spec! {
    pub struct OutboundTrafficPolicy {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub mode: Option<OutboundTrafficPolicyMode>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub egress_proxy: Option<Destination>,
    }
}
