//! The value matchers AuthorizationPolicy fields use, as Istio defines
//! them: strings with `*` (presence, prefix `x*`, suffix `*x`), paths with
//! Istio's `{*}` / `{**}` templates, IP blocks, ports.

use std::net::IpAddr;

use regex::Regex;

use crate::config::Cidr;

/// Istio's string match: `*` is "present and not empty", `abc*` a prefix,
/// `*abc` a suffix, anything else exact.
#[derive(Debug, Clone)]
pub enum Str {
    Present,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl Str {
    pub fn new(s: &str) -> Self {
        if s == "*" {
            Self::Present
        } else if let Some(p) = s.strip_suffix('*') {
            Self::Prefix(p.into())
        } else if let Some(p) = s.strip_prefix('*') {
            Self::Suffix(p.into())
        } else {
            Self::Exact(s.into())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Present => !v.is_empty(),
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(p) => v.ends_with(p.as_str()),
            Self::Exact(p) => v == p,
        }
    }

    /// Case-insensitive, for host names.
    pub fn matches_ignoring_case(&self, v: &str) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            Self::Present => !v.is_empty(),
            Self::Prefix(p) => lower(v).starts_with(&lower(p)),
            Self::Suffix(p) => lower(v).ends_with(&lower(p)),
            Self::Exact(p) => v.eq_ignore_ascii_case(p),
        }
    }
}

/// A host in `hosts`: matched against the request's authority, with or
/// without its port (Istio generates both `host` and `host:*`).
pub fn host_matches(m: &Str, authority: &str) -> bool {
    if m.matches_ignoring_case(authority) {
        return true;
    }
    match strip_port(authority) {
        Some(host) => m.matches_ignoring_case(host),
        None => false,
    }
}

/// `host` of `host:port` (and `[v6]:port`); `None` when there is no port.
fn strip_port(authority: &str) -> Option<&str> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        return tail.starts_with(':').then_some(host);
    }
    let (host, port) = authority.rsplit_once(':')?;
    (!host.contains(':') && port.bytes().all(|b| b.is_ascii_digit())).then_some(host)
}

/// A `paths` entry: the string forms, or a path template with `{*}` (one
/// segment) and `{**}` (the rest: zero or more segments, last only).
#[derive(Debug, Clone)]
pub enum PathMatch {
    Str(Str),
    Template(Regex),
}

impl PathMatch {
    pub fn new(s: &str) -> Result<Self, String> {
        if !s.contains('{') {
            return Ok(Self::Str(Str::new(s)));
        }
        let mut re = String::from("^");
        let segments: Vec<&str> = s.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                re.push('/');
            }
            match *seg {
                "{*}" => re.push_str("[^/]+"),
                "{**}" if i + 1 == segments.len() => re.push_str(".*"),
                "{**}" => return Err(format!("{s:?}: {{**}} must be the last segment")),
                other if other.contains('{') || other.contains('}') => {
                    return Err(format!(
                        "{s:?}: a template operator must be a whole segment ({{*}} or {{**}})"
                    ));
                }
                other => re.push_str(&regex::escape(other)),
            }
        }
        re.push('$');
        Regex::new(&re)
            .map(Self::Template)
            .map_err(|e| format!("{s:?}: {e}"))
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Str(m) => m.matches(path),
            Self::Template(re) => re.is_match(path),
        }
    }
}

/// An `ipBlocks` entry: an address or a CIDR.
pub fn cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

/// Whether `ip` is in any of `blocks` (IPv4-mapped IPv6 seen as IPv4).
pub fn in_blocks(blocks: &[Cidr], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    blocks.iter().any(|b| b.contains(ip))
}

/// The path a policy sees: without query or fragment, with `.` and `..`
/// segments resolved and percent-encoded unreserved characters decoded
/// (RFC 3986 §6.2.2), so `/admin/../secret` and `/%61dmin` cannot slip
/// past a rule naming `/secret` or `/admin`, as Istio's default path
/// normalization ensures.
pub fn normalize_path(path_and_query: &str) -> String {
    let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

fn decode_unreserved(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(c) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            && (c.is_ascii_alphanumeric() || b"-._~".contains(&c))
        {
            out.push(c as char);
            i += 3;
            continue;
        }
        // Multi-byte characters are copied whole.
        let ch = s[i..].chars().next().unwrap_or_default();
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_match_as_istio() {
        assert!(Str::new("*").matches("x") && !Str::new("*").matches(""));
        assert!(Str::new("/api*").matches("/api/v1") && !Str::new("/api*").matches("/ap"));
        assert!(Str::new("*.jpg").matches("/a.jpg") && !Str::new("*.jpg").matches("/a.png"));
        assert!(Str::new("GET").matches("GET") && !Str::new("GET").matches("get"));
    }

    #[test]
    fn hosts_match_with_or_without_port_and_case() {
        let m = Str::new("Example.com");
        assert!(host_matches(&m, "example.com"));
        assert!(host_matches(&m, "example.com:8080"));
        assert!(!host_matches(&m, "example.org"));
        assert!(host_matches(&Str::new("*.example.com"), "a.example.com:80"));
        assert!(host_matches(&Str::new("::1"), "[::1]:80"));
    }

    #[test]
    fn path_templates() {
        let t = PathMatch::new("/books/{*}/chapters/{**}").unwrap();
        assert!(t.matches("/books/1/chapters/2"));
        assert!(t.matches("/books/1/chapters/2/3"));
        assert!(t.matches("/books/1/chapters/"));
        assert!(!t.matches("/books/1/2/chapters/3"));
        assert!(!t.matches("/books//chapters/3"));
        let one = PathMatch::new("/a/{*}").unwrap();
        assert!(one.matches("/a/b") && !one.matches("/a/b/c") && !one.matches("/a/"));
        assert!(PathMatch::new("/a/{**}/b").is_err());
        assert!(PathMatch::new("/a/x{*}").is_err());
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(normalize_path("/a/b?x=1"), "/a/b");
        assert_eq!(normalize_path("/admin/../secret"), "/secret");
        assert_eq!(normalize_path("/../../secret"), "/secret");
        assert_eq!(normalize_path("/a/./b/."), "/a/b/");
        assert_eq!(normalize_path("/%61dmin/%2Fx"), "/admin/%2Fx");
        assert_eq!(normalize_path("/é%7e"), "/é~");
        assert_eq!(normalize_path("/a%"), "/a%");
    }

    #[test]
    fn ip_blocks_see_mapped_v4() {
        let b = [cidr("10.0.0.0/8").unwrap()];
        assert!(in_blocks(&b, "10.1.2.3".parse().unwrap()));
        assert!(in_blocks(&b, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!in_blocks(&b, "11.1.2.3".parse().unwrap()));
    }
}
