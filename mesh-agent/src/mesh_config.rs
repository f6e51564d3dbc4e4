//! The part of Istio's MeshConfig the agent reads (`--mesh-config`): the
//! `istio` ConfigMap of the root namespace (its `data.mesh`), or the
//! MeshConfig YAML itself. Re-read when the file changes; a file that does
//! not parse is refused and the last good one stays.
//!
//! * `extensionProviders`: `envoyExtAuthzHttp` (the CUSTOM action),
//!   `envoyFileAccessLog` (access logs), `zipkin` and `opentelemetry`
//!   (traces); the other kinds are recognised and reported as not
//!   supported.
//! * `defaultProviders.accessLogging` and `.tracing`, and the legacy
//!   `accessLogFile`, `accessLogEncoding`, `accessLogFormat`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;

use crate::policy::ext_authz::{HttpProvider, go_duration};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
}

/// What the agent reads of a MeshConfig.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    pub extension_providers: Vec<ProviderSpec>,
    pub default_providers: DefaultProviders,
    /// Legacy access logging for every workload no Telemetry configures:
    /// the file (`/dev/stdout` for the agent's standard output).
    pub access_log_file: String,
    pub access_log_encoding: Encoding,
    /// An Envoy format string (TEXT), or a JSON object of labels to format
    /// strings (JSON); Istio's default when empty.
    pub access_log_format: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DefaultProviders {
    pub access_logging: Vec<String>,
    pub tracing: Vec<String>,
    pub metrics: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Encoding {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    pub name: String,
    pub envoy_ext_authz_http: Option<HttpProvider>,
    pub envoy_file_access_log: Option<FileAccessLog>,
    pub zipkin: Option<ZipkinProvider>,
    pub opentelemetry: Option<OtelProvider>,
    /// Kinds recognised and not supported yet, kept to name them.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl ProviderSpec {
    /// The provider's kind as MeshConfig names it.
    pub fn kind(&self) -> &str {
        if self.envoy_ext_authz_http.is_some() {
            "envoyExtAuthzHttp"
        } else if self.envoy_file_access_log.is_some() {
            "envoyFileAccessLog"
        } else if self.zipkin.is_some() {
            "zipkin"
        } else if self.opentelemetry.is_some() {
            "opentelemetry"
        } else {
            self.other.keys().next().map_or("none", String::as_str)
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FileAccessLog {
    /// `/dev/stdout` when empty.
    pub path: String,
    pub log_format: Option<LogFormat>,
    /// Absent values render empty (text) or are left out (JSON) instead of
    /// `-`.
    pub omit_empty_values: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogFormat {
    pub text: Option<String>,
    /// JSON: each label's Envoy format string.
    pub labels: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ZipkinProvider {
    pub service: String,
    pub port: u16,
    pub max_tag_length: Option<u32>,
    /// `/api/v2/spans` when absent.
    pub path: Option<String>,
    #[serde(with = "go_duration")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OtelProvider {
    pub service: String,
    pub port: u16,
    pub max_tag_length: Option<u32>,
    /// OTLP/HTTP; without it Istio exports over gRPC (not supported yet).
    pub http: Option<OtelHttp>,
    pub grpc: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OtelHttp {
    /// `/v1/traces` when absent.
    pub path: Option<String>,
    #[serde(with = "go_duration")]
    pub timeout: Option<Duration>,
    pub headers: Vec<HeaderValue>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

/// The built-in provider Istio's default MeshConfig defines: a file log to
/// standard output in the mesh's encoding and format.
pub const ENVOY_PROVIDER: &str = "envoy";

impl MeshConfig {
    /// Reads a MeshConfig: the `istio` ConfigMap (its `data.mesh`), or the
    /// MeshConfig YAML itself.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| Error::Read {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mesh = match doc.get("kind").and_then(|k| k.as_str()) {
            Some("ConfigMap") => {
                let inner = doc
                    .get("data")
                    .and_then(|d| d.get("mesh"))
                    .and_then(|m| m.as_str())
                    .ok_or("a ConfigMap without data.mesh")?;
                serde_yaml::from_str(inner).map_err(|e| format!("data.mesh: {e}"))?
            }
            _ => doc,
        };
        // An empty file (or `mesh: ""`) is the default MeshConfig.
        if mesh.is_null() {
            return Ok(Self::default());
        }
        let config: Self = serde_path_to_error::deserialize(mesh).map_err(|e| {
            let at = e.path().to_string();
            format!("{at}: {}", e.into_inner())
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in config.extension_providers.iter().enumerate() {
            if p.name.is_empty() {
                return Err(format!("extensionProviders[{i}].name: required"));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(format!(
                    "extensionProviders[{i}].name: {:?} is defined twice",
                    p.name
                ));
            }
        }
        Ok(config)
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderSpec> {
        self.extension_providers.iter().find(|p| p.name == name)
    }

    pub fn http_provider(&self, name: &str) -> Option<&HttpProvider> {
        self.provider(name)
            .and_then(|p| p.envoy_ext_authz_http.as_ref())
    }

    /// Warns once about each provider kind the agent does not serve.
    pub fn report_unsupported(&self) {
        for p in &self.extension_providers {
            if p.envoy_ext_authz_http.is_none()
                && p.envoy_file_access_log.is_none()
                && p.zipkin.is_none()
                && p.opentelemetry.is_none()
            {
                let what = match p.kind() {
                    "envoyExtAuthzGrpc" => {
                        "CUSTOM policies naming it deny every request they match"
                    }
                    _ => "Telemetry naming it has no effect",
                };
                tracing::warn!(provider = %p.name, kind = p.kind(), "mesh config: this provider kind is not supported yet; {what}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_the_istio_config_map_and_plain_mesh_config() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    accessLogFile: /dev/stdout\n    accessLogEncoding: JSON\n    defaultProviders: {accessLogging: [file]}\n    extensionProviders:\n    - name: authz\n      envoyExtAuthzHttp:\n        service: ext-authz.foo.svc.cluster.local\n        port: 8000\n        timeout: 250ms\n        includeRequestHeadersInCheck: [x-ext-authz]\n    - name: grpc\n      envoyExtAuthzGrpc: {service: g, port: 9000}\n    - name: file\n      envoyFileAccessLog: {path: /tmp/x.log, logFormat: {labels: {code: '%RESPONSE_CODE%'}}}\n";
        let m = MeshConfig::parse(cm).unwrap();
        let p = m.http_provider("authz").unwrap();
        assert_eq!(
            (
                p.port,
                p.timeout,
                p.include_request_headers_in_check.as_slice()
            ),
            (
                8000,
                Some(Duration::from_millis(250)),
                &["x-ext-authz".to_string()][..]
            )
        );
        assert!(m.http_provider("grpc").is_none());
        assert_eq!(m.provider("grpc").unwrap().kind(), "envoyExtAuthzGrpc");
        assert_eq!(m.provider("file").unwrap().kind(), "envoyFileAccessLog");
        assert_eq!(m.access_log_encoding, Encoding::Json);
        assert_eq!(m.default_providers.access_logging, ["file"]);
        let plain =
            "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: 10.0.0.1, port: 80}}]\n";
        assert!(
            MeshConfig::parse(plain)
                .unwrap()
                .http_provider("a")
                .is_some()
        );
    }

    #[test]
    fn a_bad_mesh_config_names_the_field() {
        let e = MeshConfig::parse(
            "extensionProviders: [{name: a, envoyExtAuthzHttp: {timeout: soon}}]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("extensionProviders[0].envoyExtAuthzHttp.timeout") && e.contains("soon"),
            "{e}"
        );
        assert!(
            MeshConfig::parse("")
                .unwrap()
                .extension_providers
                .is_empty()
        );
        let e = MeshConfig::parse("accessLogEncoding: XML\n").unwrap_err();
        assert!(e.contains("accessLogEncoding"), "{e}");
        let e = MeshConfig::parse("extensionProviders: [{name: a}, {name: a}]\n").unwrap_err();
        assert!(e.contains("defined twice"), "{e}");
    }
}
