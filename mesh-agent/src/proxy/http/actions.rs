//! What a VirtualService route does to a request besides choosing where it
//! goes: fault injection, redirects, direct responses, rewrites and header
//! operations, with Envoy's semantics (Istio compiles routes to Envoy).

use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};

use crate::{
    istio::networking::{
        HeaderOperations, HttpDirectResponse, HttpRedirect, RedirectPortSelection,
    },
    snapshot::compile::{CompiledHttpRoute, Matcher},
};

/// Whether a draw falls within `percent` (0-100) of requests.
pub fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

/// The fault to inject into one request, drawn by the route's percentages.
#[derive(Debug, Default)]
pub struct Fault {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

impl Fault {
    /// Delay: `percentage`, else the deprecated integer `percent` (unset:
    /// never), as Istio translates it. Abort: `percentage`, unset meaning
    /// every request (Envoy's default when no percentage is given).
    pub fn draw(route: &CompiledHttpRoute) -> Self {
        let Some(f) = &route.spec.fault else {
            return Self::default();
        };
        let delay = f.delay.as_ref().and_then(|d| {
            let pct = d
                .percentage
                .as_ref()
                .map(|p| p.value)
                .unwrap_or_else(|| f64::from(d.percent.unwrap_or(0)));
            let fixed = d.fixed_delay.as_ref().or(d.exponential_delay.as_ref())?;
            chance(pct).then(|| fixed.get())
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let status = a
                .http_status
                .and_then(|s| u16::try_from(s).ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                // gRPC and HTTP/2 error aborts: a 503 is what a plain
                // HTTP client can see.
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let pct = a.percentage.as_ref().map_or(100.0, |p| p.value);
            chance(pct).then_some(status)
        });
        Self { delay, abort }
    }
}

/// The `Location` a redirect sends the client to.
pub fn redirect_location(rd: &HttpRedirect, uri: &Uri, host: &str, port: u16) -> String {
    let scheme = if rd.scheme.is_empty() {
        uri.scheme_str().unwrap_or("http")
    } else {
        rd.scheme.as_str()
    };
    let (req_host, _) = split_host_port(host);
    let authority = if rd.authority.is_empty() {
        req_host
    } else {
        rd.authority.as_str()
    };
    let port = match (rd.port, rd.derive_port) {
        (Some(p), _) => Some(p as u16),
        (None, Some(RedirectPortSelection::FromRequestPort)) => Some(port),
        _ => split_host_port(host).1,
    };
    let default =
        (scheme == "http" && port == Some(80)) || (scheme == "https" && port == Some(443));
    let authority = match port {
        Some(p) if !default => format!("{authority}:{p}"),
        _ => authority.to_owned(),
    };
    let path = if rd.uri.is_empty() {
        uri.path_and_query().map_or("/", |p| p.as_str())
    } else {
        rd.uri.as_str()
    };
    format!("{scheme}://{authority}{path}")
}

/// The status of a redirect (`redirectCode`, 301 by default).
pub fn redirect_status(rd: &HttpRedirect) -> StatusCode {
    rd.redirect_code
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::MOVED_PERMANENTLY)
}

fn split_host_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        // An IPv6 address without brackets has no port.
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (host, None),
        Some((h, p)) => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (host, None),
        },
        None => (host, None),
    }
}

/// The body of a direct response (`string`, or base64 `bytes`).
pub fn direct_body(d: &HttpDirectResponse) -> bytes::Bytes {
    match &d.body {
        Some(b) => match (&b.string, &b.bytes) {
            (Some(s), _) => bytes::Bytes::from(s.clone()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(bytes::Bytes::from)
                .unwrap_or_default(),
            (None, None) => bytes::Bytes::new(),
        },
        None => bytes::Bytes::new(),
    }
}

/// The path and authority after the route's `rewrite`: `uri` replaces the
/// prefix the route matched (or the whole path after an exact or regex
/// match), `uriRegexRewrite` replaces every match of its pattern in the
/// path; the query string is kept.
pub fn rewrite(
    route: &CompiledHttpRoute,
    matched: Option<usize>,
    path_and_query: &str,
) -> Option<String> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let new_path = if let Some((re, with)) = &route.uri_regex_rewrite {
        re.replace_all(path, with.as_str()).into_owned()
    } else {
        let uri = route.spec.rewrite.as_ref().map(|r| r.uri.as_str())?;
        if uri.is_empty() {
            return None;
        }
        let prefix = matched
            .and_then(|i| route.matches.get(i))
            .and_then(|m| match &m.uri {
                Some(Matcher::Prefix(p)) => Some(p.len()),
                _ => None,
            });
        match prefix {
            Some(n) if n <= path.len() => format!("{uri}{}", &path[n..]),
            _ => uri.to_owned(),
        }
    };
    Some(match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    })
}

/// `headers.request` or `headers.response`: `set` replaces, `add`
/// appends, `remove` deletes (Envoy applies removals last).
pub fn apply_headers(h: &mut HeaderMap, ops: Option<&HeaderOperations>) {
    let Some(ops) = ops else { return };
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    for k in &ops.remove {
        // Envoy refuses to remove pseudo-headers and Host.
        if !k.eq_ignore_ascii_case("host") {
            h.remove(k.as_str());
        }
    }
}

/// What the route's `corsPolicy` makes of a request from another origin.
pub enum Cors {
    /// A preflight from an allowed origin: answered here with these headers.
    Preflight(HeaderMap),
    /// An actual request from an allowed origin: these headers go on the
    /// response.
    Actual(HeaderMap),
}

/// Envoy's CORS filter: only requests with an `Origin` the policy allows
/// get CORS headers; others pass untouched (the browser then refuses).
pub fn cors(route: &CompiledHttpRoute, method: &http::Method, headers: &HeaderMap) -> Option<Cors> {
    let policy = route.spec.cors_policy.as_ref()?;
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    if !route.cors_origins.iter().any(|m| m.matches(origin)) {
        return None;
    }
    let mut h = HeaderMap::new();
    let mut set = |name: HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.to_owned());
    if policy.allow_credentials == Some(true) {
        set(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true".into());
    }
    let preflight = method == http::Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !policy.allow_methods.is_empty() {
            set(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                policy.allow_methods.join(","),
            );
        }
        if !policy.allow_headers.is_empty() {
            set(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                policy.allow_headers.join(","),
            );
        }
        if let Some(age) = &policy.max_age {
            set(
                header::ACCESS_CONTROL_MAX_AGE,
                age.get().as_secs().to_string(),
            );
        }
        return Some(Cors::Preflight(h));
    }
    if !policy.expose_headers.is_empty() {
        set(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            policy.expose_headers.join(","),
        );
    }
    Some(Cors::Actual(h))
}

/// Adds `x-request-id` (a random UUID, as Envoy makes them) to a request
/// that has none, so its access-log lines and traces can be joined.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if headers.contains_key("x-request-id") {
        return;
    }
    let r = fastrand::u128(..);
    // Version 4, variant 1.
    let r = (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let id = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        r >> 96,
        (r >> 80) & 0xffff,
        (r >> 64) & 0xffff,
        (r >> 48) & 0xffff,
        r & 0xffff_ffff_ffff
    );
    if let Ok(v) = http::HeaderValue::from_str(&id) {
        headers.insert("x-request-id", v);
    }
}

/// The request's authority: `:authority` (HTTP/2, absolute URIs) or Host.
pub fn authority(uri: &Uri, headers: &HeaderMap) -> String {
    uri.authority()
        .map(|a| a.to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default()
}

/// Points the request at `host`: the Host header says it, and the URI drops
/// its own authority (an HTTP/2 `:authority` would otherwise win).
pub fn set_authority(uri: &mut Uri, headers: &mut HeaderMap, host: HeaderValue) {
    headers.insert(header::HOST, host);
    if let Ok(u) = uri.path_and_query().map_or("/", |p| p.as_str()).parse() {
        *uri = u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::networking::HttpRewrite;

    fn route_with(rewrite: HttpRewrite, prefix: Option<&str>) -> CompiledHttpRoute {
        let mut spec = crate::istio::networking::HttpRoute {
            rewrite: Some(rewrite),
            ..Default::default()
        };
        if let Some(p) = prefix {
            spec.matches = vec![crate::istio::networking::HttpMatchRequest {
                uri: Some(crate::istio::common::StringMatch {
                    prefix: Some(p.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }];
        }
        crate::snapshot::compile::compile_route_for_tests(&spec)
    }

    #[test]
    fn rewrites_follow_envoy() {
        let r = route_with(
            HttpRewrite {
                uri: "/v2/".into(),
                ..Default::default()
            },
            Some("/v1/"),
        );
        assert_eq!(
            rewrite(&r, Some(0), "/v1/items?x=1").unwrap(),
            "/v2/items?x=1"
        );
        let whole = route_with(
            HttpRewrite {
                uri: "/health".into(),
                ..Default::default()
            },
            None,
        );
        assert_eq!(rewrite(&whole, None, "/anything").unwrap(), "/health");
        let re = route_with(
            HttpRewrite {
                uri_regex_rewrite: Some(crate::istio::networking::RegexRewrite {
                    pattern: "^/service/([^/]+)(/.*)$".into(),
                    rewrite: "\\2/instance/\\1".into(),
                }),
                ..Default::default()
            },
            None,
        );
        assert_eq!(
            rewrite(&re, None, "/service/foo/v1/api").unwrap(),
            "/v1/api/instance/foo"
        );
    }

    #[test]
    fn redirects_keep_what_they_do_not_replace() {
        let uri: Uri = "/old?q=1".parse().unwrap();
        let rd = HttpRedirect {
            uri: "/new".into(),
            ..Default::default()
        };
        assert_eq!(
            redirect_location(&rd, &uri, "web:8080", 8080),
            "http://web:8080/new"
        );
        let rd = HttpRedirect {
            authority: "other".into(),
            scheme: "https".into(),
            port: Some(443),
            ..Default::default()
        };
        assert_eq!(
            redirect_location(&rd, &uri, "web", 80),
            "https://other/old?q=1"
        );
        assert_eq!(redirect_status(&rd), StatusCode::MOVED_PERMANENTLY);
    }

    #[test]
    fn header_operations_set_add_then_remove() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let ops = HeaderOperations {
            set: [("x-a".to_string(), "2".to_string())].into(),
            add: [("x-a".to_string(), "3".to_string())].into(),
            remove: vec!["x-gone".into()],
        };
        apply_headers(&mut h, Some(&ops));
        let a: Vec<_> = h
            .get_all("x-a")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(a, ["2", "3"]);
        assert!(h.get("x-gone").is_none());
    }
}
