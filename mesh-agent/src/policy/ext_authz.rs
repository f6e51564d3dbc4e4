//! The CUSTOM action: an external authorizer from Istio's MeshConfig
//! `extensionProviders` (`--mesh-config`), asked by the destination's
//! agent before DENY and ALLOW, as Envoy's HTTP `ext_authz` filter asks
//! its service:
//!
//! * the check request has the original method and path (after
//!   `pathPrefix`), no body, the `Host`, `Authorization` and the headers
//!   `includeRequestHeadersInCheck` names, plus
//!   `includeAdditionalHeadersInCheck`;
//! * a 200 answer allows, copying `headersToUpstreamOnAllow` to the request
//!   (and `headersToDownstreamOnAllow` to the response); any other answer
//!   denies with the service's status, body and `headersToDownstreamOnDeny`;
//! * an unreachable service, or none within `timeout`, fails closed with
//!   `statusOnError` (403 by default) unless `failOpen`.
//!
//! The service is reached in plaintext from the node: a Service of the
//! registry (an endpoint chosen at random), else a DNS name or an address.
//! `envoyExtAuthzGrpc` providers are reported, and a CUSTOM policy naming
//! one fails closed.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, request::Parts};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::registry::Registry;

/// The most body bytes of a denial passed on to the client.
const MAX_DENY_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpProvider {
    pub service: String,
    pub port: u16,
    pub path_prefix: String,
    #[serde(with = "go_duration")]
    pub timeout: Option<Duration>,
    pub fail_open: bool,
    pub status_on_error: String,
    pub include_request_headers_in_check: Vec<String>,
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    pub headers_to_upstream_on_allow: Vec<String>,
    pub headers_to_downstream_on_allow: Vec<String>,
    pub headers_to_downstream_on_deny: Vec<String>,
}

pub(crate) mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            s.parse::<crate::istio::common::Duration>()
                .map(|d| d.get())
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// What the authorizer decided.
pub enum Outcome {
    /// Allowed; headers for the request, and for its response.
    Allow {
        upstream: Vec<(HeaderName, HeaderValue)>,
        downstream: Vec<(HeaderName, HeaderValue)>,
    },
    /// Denied: the answer for the client.
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
}

impl HttpProvider {
    /// Asks the authorizer about the request `parts` (for `authority`).
    pub async fn check(&self, parts: &Parts, authority: &str, registry: &Registry) -> Outcome {
        let timeout = self.timeout.unwrap_or(Duration::from_millis(600));
        match tokio::time::timeout(timeout, self.ask(parts, authority, registry)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => self.on_error(e),
            Err(_) => self.on_error(format!("no answer within {timeout:?}")),
        }
    }

    fn on_error(&self, why: String) -> Outcome {
        tracing::warn!(service = %self.service, "ext_authz: {why}; {}", if self.fail_open { "allowing (failOpen)" } else { "denying" });
        if self.fail_open {
            return Outcome::Allow {
                upstream: vec![],
                downstream: vec![],
            };
        }
        Outcome::Deny {
            status: self
                .status_on_error
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::FORBIDDEN),
            headers: vec![],
            body: Bytes::new(),
        }
    }

    /// Where the service is: a Service of the registry, an address, or a
    /// DNS name.
    async fn target(&self, registry: &Registry) -> Result<SocketAddr, String> {
        if let Ok(ip) = self.service.parse() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let ready = registry.ready_endpoints(&self.service, self.port);
        if !ready.is_empty() {
            return Ok(ready[fastrand::usize(..ready.len())]);
        }
        tokio::net::lookup_host((self.service.as_str(), self.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", self.service))?
            .next()
            .ok_or_else(|| format!("{} has no address", self.service))
    }

    async fn ask(
        &self,
        parts: &Parts,
        authority: &str,
        registry: &Registry,
    ) -> Result<Outcome, String> {
        let addr = self.target(registry).await?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(format!("{}{path}", self.path_prefix))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(authority) {
            h.insert(http::header::HOST, v);
        }
        let mut names: Vec<&str> = vec!["authorization"];
        names.extend(
            self.include_request_headers_in_check
                .iter()
                .map(String::as_str),
        );
        for n in names {
            for v in parts.headers.get_all(n) {
                if let Ok(name) = HeaderName::from_bytes(n.as_bytes()) {
                    h.append(name, v.clone());
                }
            }
        }
        for (k, v) in &self.include_additional_headers_in_check {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let pick =
            |names: &[String]| -> Vec<(HeaderName, HeaderValue)> { pick_headers(&headers, names) };
        // Envoy's HTTP authorization service allows on 200 alone.
        if status == StatusCode::OK {
            return Ok(Outcome::Allow {
                upstream: pick(&self.headers_to_upstream_on_allow),
                downstream: pick(&self.headers_to_downstream_on_allow),
            });
        }
        let body = Limited::new(resp.into_body(), MAX_DENY_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok(Outcome::Deny {
            status,
            headers: pick(&self.headers_to_downstream_on_deny),
            body,
        })
    }
}

fn pick_headers(h: &HeaderMap, names: &[String]) -> Vec<(HeaderName, HeaderValue)> {
    names
        .iter()
        .filter_map(|n| HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok())
        .flat_map(|n| h.get_all(&n).iter().map(move |v| (n.clone(), v.clone())))
        .collect()
}
