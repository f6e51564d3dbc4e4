//! Rate-limit descriptors, as Envoy's local rate limit filter uses them.
//!
//! A route's `rate_limits` turn each request into descriptors: one per
//! `rate_limits` entry, a list of key/value entries appended by its
//! `actions` in order; an action that cannot produce its entry drops that
//! descriptor. The filter's `descriptors` give some descriptors a token
//! bucket of their own: a request whose descriptor equals one (every key
//! and value, in order) takes a token from it.

use std::{net::IpAddr, time::Duration};

use http::HeaderMap;
use regex::Regex;
use serde::Serialize;
use serde_json::Value;

/// A problem with a field: its path below the patch, and why.
pub type FieldError = (String, String);

/// One descriptor: key/value entries in order.
pub type Entries = Vec<(String, String)>;

/// A token bucket as configured.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketSpec {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    #[serde(serialize_with = "super::as_text")]
    pub fill_interval: Duration,
}

impl BucketSpec {
    /// Tokens per second, to take the strictest bucket first (Envoy's
    /// order, so a refused request spends as few tokens as it can).
    pub fn rate(&self) -> f64 {
        self.tokens_per_fill as f64 / self.fill_interval.as_secs_f64()
    }
}

/// A `descriptors` item: the descriptor and its own bucket.
#[derive(Debug, Clone, Serialize)]
pub struct DescriptorLimit {
    #[serde(serialize_with = "entries_as_text")]
    pub entries: Entries,
    #[serde(flatten)]
    pub bucket: BucketSpec,
}

fn entries_as_text<S: serde::Serializer>(e: &Entries, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(e.iter().map(|(k, v)| format!("{k}={v}")))
}

/// One `rate_limits` entry: the actions that build one descriptor.
#[derive(Debug, Clone, Serialize)]
pub struct RateLimitRule {
    /// As written, for `/config_dump`.
    #[serde(rename = "actions")]
    written: Value,
    #[serde(skip)]
    actions: Vec<Action>,
    /// Only a filter of the same `stage` uses it.
    #[serde(skip)]
    pub stage: u64,
    /// The inbound port whose routes carry it (`None`: every port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
enum Action {
    /// `request_headers`: the header's value under `key`.
    RequestHeaders {
        header: String,
        key: String,
        skip_if_absent: bool,
    },
    /// `generic_key`: a fixed entry.
    GenericKey { key: String, value: String },
    /// `header_value_match`: a fixed entry when the headers match (or,
    /// with `expect_match: false`, when they do not).
    HeaderValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        headers: Vec<HeaderMatcher>,
    },
    /// `remote_address`: the client's address.
    RemoteAddress,
    /// `destination_cluster`: the inbound cluster, `inbound|PORT||`.
    DestinationCluster,
}

/// What the actions read of a request.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Path and query, as `:path`.
    pub path: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    pub remote: IpAddr,
    pub port: u16,
}

impl RequestFacts<'_> {
    fn pseudo(&self, name: &str) -> Option<String> {
        Some(match name {
            ":path" => self.path.to_owned(),
            ":method" => self.method.to_owned(),
            ":authority" => self.authority.to_owned(),
            ":scheme" => "http".to_owned(),
            _ => return None,
        })
    }

    /// A header's value for a matcher, pseudo-headers included: repeated
    /// headers joined by `,`, as Envoy's header matchers see them.
    fn joined(&self, name: &str) -> Option<String> {
        if let Some(v) = self.pseudo(name) {
            return Some(v);
        }
        let mut values = self.headers.get_all(name).iter().peekable();
        values.peek()?;
        let joined: Vec<String> = values
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        Some(joined.join(","))
    }

    /// A header's first value, as Envoy's `request_headers` action takes
    /// it (a repeated header does not make another descriptor).
    fn first(&self, name: &str) -> Option<String> {
        if let Some(v) = self.pseudo(name) {
            return Some(v);
        }
        let v = self.headers.get(name)?;
        Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

impl RateLimitRule {
    /// The descriptor this rule makes of `req`, if every action makes its
    /// entry.
    pub fn descriptor(&self, req: &RequestFacts<'_>) -> Option<Entries> {
        let mut out = Vec::with_capacity(self.actions.len());
        for a in &self.actions {
            match a {
                Action::RequestHeaders {
                    header,
                    key,
                    skip_if_absent,
                } => match req.first(header) {
                    Some(v) => out.push((key.clone(), v)),
                    None if *skip_if_absent => {}
                    None => return None,
                },
                Action::GenericKey { key, value } => out.push((key.clone(), value.clone())),
                Action::HeaderValueMatch {
                    key,
                    value,
                    expect_match,
                    headers,
                } => {
                    if headers.iter().all(|h| h.matches(req)) != *expect_match {
                        return None;
                    }
                    out.push((key.clone(), value.clone()));
                }
                Action::RemoteAddress => {
                    out.push(("remote_address".into(), req.remote.to_string()))
                }
                Action::DestinationCluster => out.push((
                    "destination_cluster".into(),
                    format!("inbound|{}||", req.port),
                )),
            }
        }
        // An entry with no actions makes no descriptor.
        (!out.is_empty()).then_some(out)
    }
}

/// A route `HeaderMatcher`: the header's value (repeated values joined by
/// `,`) against one condition, optionally inverted.
#[derive(Debug, Clone)]
struct HeaderMatcher {
    name: String,
    how: ValueMatch,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug, Clone)]
enum ValueMatch {
    Present(bool),
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    /// Anchored at both ends, as RE2's full match.
    Regex(Regex),
}

impl HeaderMatcher {
    fn matches(&self, req: &RequestFacts<'_>) -> bool {
        let value = req
            .joined(&self.name)
            .or_else(|| self.missing_as_empty.then(String::new));
        let Some(v) = value else {
            // Absent: only a presence test can match (`present_match:
            // false`, or inverted `true`).
            return match self.how {
                ValueMatch::Present(p) => p == self.invert,
                _ => false,
            };
        };
        let fold = |s: &str, ic: bool| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        let m = match &self.how {
            ValueMatch::Present(p) => *p,
            ValueMatch::Exact(e, ic) => fold(&v, *ic) == *e,
            ValueMatch::Prefix(e, ic) => fold(&v, *ic).starts_with(e.as_str()),
            ValueMatch::Suffix(e, ic) => fold(&v, *ic).ends_with(e.as_str()),
            ValueMatch::Contains(e, ic) => fold(&v, *ic).contains(e.as_str()),
            ValueMatch::Regex(r) => r.is_match(&v),
        };
        m != self.invert
    }
}

fn err<T>(field: impl Into<String>, why: impl Into<String>) -> Result<T, FieldError> {
    Err((field.into(), why.into()))
}

fn text<'a>(v: &'a Value, field: &str) -> Result<&'a str, FieldError> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => err(field, "a non-empty string is required"),
    }
}

/// A `rate_limits` list (a route's, or the filter's own), every stage:
/// the rules, and the entries left out, each with why — one with an
/// action this data plane does not have makes no descriptor here (it may
/// serve a global rate limit service, which has no place on this data
/// plane either); one with a `disable_key` is skipped, as Envoy's local
/// filter does.
pub fn parse_rate_limits(
    v: &Value,
    field: &str,
    port: Option<u16>,
) -> Result<(Vec<RateLimitRule>, Vec<FieldError>), FieldError> {
    let Some(list) = v.as_array() else {
        return if v.is_null() {
            Ok((Vec::new(), Vec::new()))
        } else {
            err(field, "a list is required")
        };
    };
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for (i, r) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        if r["disable_key"].as_str().is_some_and(|k| !k.is_empty()) {
            continue;
        }
        let Some(actions) = r["actions"].as_array().filter(|a| !a.is_empty()) else {
            return err(format!("{at}.actions"), "at least one action is required");
        };
        let actions: Result<Vec<Action>, FieldError> = actions
            .iter()
            .enumerate()
            .map(|(j, a)| action(a, &format!("{at}.actions[{j}]")))
            .collect();
        let actions = match actions {
            Ok(a) => a,
            Err(e) if e.1.starts_with(UNSUPPORTED) => {
                skipped.push(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let stage = match &r["stage"] {
            Value::Null => 0,
            s => match super::number(s) {
                Some(n) => n,
                None => return err(format!("{at}.stage"), "a number from 0 to 10"),
            },
        };
        out.push(RateLimitRule {
            written: r["actions"].clone(),
            actions,
            stage,
            port,
        });
    }
    Ok((out, skipped))
}

/// How an action this data plane does not have is reported.
const UNSUPPORTED: &str = "not supported by this data plane";

fn action(a: &Value, at: &str) -> Result<Action, FieldError> {
    let Some((kind, v)) = a.as_object().and_then(|o| o.iter().next()) else {
        return err(at, "an action is required");
    };
    let key_or = |default: &str| -> Result<String, FieldError> {
        match &v["descriptor_key"] {
            Value::Null => Ok(default.to_owned()),
            k => text(k, &format!("{at}.{kind}.descriptor_key")).map(str::to_owned),
        }
    };
    Ok(match kind.as_str() {
        "request_headers" => Action::RequestHeaders {
            header: text(
                &v["header_name"],
                &format!("{at}.request_headers.header_name"),
            )?
            .to_ascii_lowercase(),
            key: text(
                &v["descriptor_key"],
                &format!("{at}.request_headers.descriptor_key"),
            )?
            .to_owned(),
            skip_if_absent: v["skip_if_absent"].as_bool().unwrap_or(false),
        },
        "generic_key" => Action::GenericKey {
            key: key_or("generic_key")?,
            value: text(
                &v["descriptor_value"],
                &format!("{at}.generic_key.descriptor_value"),
            )?
            .to_owned(),
        },
        "header_value_match" => Action::HeaderValueMatch {
            key: key_or("header_match")?,
            value: text(
                &v["descriptor_value"],
                &format!("{at}.header_value_match.descriptor_value"),
            )?
            .to_owned(),
            expect_match: v["expect_match"].as_bool().unwrap_or(true),
            headers: match v["headers"].as_array().filter(|h| !h.is_empty()) {
                Some(hs) => hs
                    .iter()
                    .enumerate()
                    .map(|(k, h)| {
                        header_matcher(h, &format!("{at}.header_value_match.headers[{k}]"))
                    })
                    .collect::<Result<_, _>>()?,
                None => {
                    return err(
                        format!("{at}.header_value_match.headers"),
                        "at least one header matcher is required",
                    );
                }
            },
        },
        "remote_address" => Action::RemoteAddress,
        "destination_cluster" => Action::DestinationCluster,
        other => {
            return err(
                format!("{at}.{other}"),
                format!(
                    "{UNSUPPORTED} (request_headers, generic_key, header_value_match, remote_address and destination_cluster are): the entry makes no descriptor"
                ),
            );
        }
    })
}

fn header_matcher(h: &Value, at: &str) -> Result<HeaderMatcher, FieldError> {
    let name = text(&h["name"], &format!("{at}.name"))?.to_ascii_lowercase();
    let regex = |re: &Value, field: &str| -> Result<ValueMatch, FieldError> {
        let re = text(re, field)?;
        Regex::new(&format!("^(?:{re})$"))
            .map(ValueMatch::Regex)
            .map_err(|e| (field.to_owned(), e.to_string()))
    };
    let how = if let Some(p) = h["present_match"].as_bool() {
        ValueMatch::Present(p)
    } else if let Some(e) = h["exact_match"].as_str() {
        ValueMatch::Exact(e.to_owned(), false)
    } else if let Some(e) = h["prefix_match"].as_str() {
        ValueMatch::Prefix(e.to_owned(), false)
    } else if let Some(e) = h["suffix_match"].as_str() {
        ValueMatch::Suffix(e.to_owned(), false)
    } else if let Some(e) = h["contains_match"].as_str() {
        ValueMatch::Contains(e.to_owned(), false)
    } else if !h["safe_regex_match"].is_null() {
        regex(
            &h["safe_regex_match"]["regex"],
            &format!("{at}.safe_regex_match.regex"),
        )?
    } else if let Some(sm) = h["string_match"].as_object() {
        let ic = sm
            .get("ignore_case")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let fold = |s: &str| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        let get = |k: &str| sm.get(k).and_then(Value::as_str);
        if let Some(e) = get("exact") {
            ValueMatch::Exact(fold(e), ic)
        } else if let Some(e) = get("prefix") {
            ValueMatch::Prefix(fold(e), ic)
        } else if let Some(e) = get("suffix") {
            ValueMatch::Suffix(fold(e), ic)
        } else if let Some(e) = get("contains") {
            ValueMatch::Contains(fold(e), ic)
        } else if let Some(re) = sm.get("safe_regex") {
            regex(&re["regex"], &format!("{at}.string_match.safe_regex.regex"))?
        } else {
            return err(
                format!("{at}.string_match"),
                "exact, prefix, suffix, contains or safe_regex is required",
            );
        }
    } else if !h["range_match"].is_null() {
        return err(
            format!("{at}.range_match"),
            "not supported by this data plane",
        );
    } else {
        // No condition: the header must be present (Envoy's default).
        ValueMatch::Present(true)
    };
    Ok(HeaderMatcher {
        name,
        how,
        invert: h["invert_match"].as_bool().unwrap_or(false),
        missing_as_empty: h["treat_missing_header_as_empty"]
            .as_bool()
            .unwrap_or(false),
    })
}

/// The filter's `descriptors`, each with a bucket whose fill interval is a
/// multiple of the default bucket's (Envoy refuses others), none twice.
pub fn parse_descriptors(
    v: &Value,
    default_interval: Duration,
    bucket: impl Fn(&Value, &str) -> Result<BucketSpec, FieldError>,
) -> Result<Vec<DescriptorLimit>, FieldError> {
    let Some(list) = v.as_array() else {
        return if v.is_null() {
            Ok(Vec::new())
        } else {
            err("descriptors", "a list is required")
        };
    };
    let mut out: Vec<DescriptorLimit> = Vec::new();
    for (i, d) in list.iter().enumerate() {
        let at = format!("descriptors[{i}]");
        let Some(items) = d["entries"].as_array().filter(|e| !e.is_empty()) else {
            return err(format!("{at}.entries"), "at least one entry is required");
        };
        let mut entries = Vec::new();
        for (j, e) in items.iter().enumerate() {
            let key = text(&e["key"], &format!("{at}.entries[{j}].key"))?;
            // Envoy's newer blank-value wildcard makes a bucket per value
            // seen: not supported, and refused rather than never matching.
            let value =
                text(&e["value"], &format!("{at}.entries[{j}].value")).map_err(|(f, _)| {
                    (
                        f,
                        "a value is required (wildcard descriptors are not supported)".to_owned(),
                    )
                })?;
            entries.push((key.to_owned(), value.to_owned()));
        }
        let bucket = bucket(&d["token_bucket"], &format!("{at}.token_bucket"))?;
        if bucket.fill_interval.as_nanos() % default_interval.as_nanos() != 0 {
            return err(
                format!("{at}.token_bucket.fill_interval"),
                "must be a multiple of the filter's token_bucket.fill_interval (as Envoy requires)",
            );
        }
        if out.iter().any(|o| o.entries == entries) {
            return err(&at, "the same descriptor twice");
        }
        out.push(DescriptorLimit { entries, bucket });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn facts<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts {
            method: "GET",
            path,
            authority: "web.default",
            headers,
            remote: "10.0.0.7".parse().unwrap(),
            port: 8080,
        }
    }

    #[test]
    fn actions_build_a_descriptor_in_order_or_none() {
        let rules = parse_rate_limits(
            &json!([
                {"actions": [{"request_headers": {"header_name": ":path", "descriptor_key": "PATH"}},
                             {"generic_key": {"descriptor_value": "web"}}]},
                {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]},
                {"actions": [{"header_value_match": {"descriptor_value": "admin",
                    "headers": [{"name": ":path", "string_match": {"prefix": "/ADMIN", "ignore_case": true}}]}}]},
                {"actions": [{"header_value_match": {"descriptor_value": "not-get", "expect_match": false,
                    "headers": [{"name": ":method", "exact_match": "GET"}]}}]},
                {"actions": [{"remote_address": {}}, {"destination_cluster": {}}]},
                {"stage": 1, "actions": [{"generic_key": {"descriptor_value": "other stage"}}]},
                {"disable_key": "off", "actions": [{"generic_key": {"descriptor_value": "disabled"}}]},
            ]),
            "route.rate_limits",
            Some(8080),
        )
        .unwrap()
        .0;
        assert_eq!(rules.len(), 6, "a disabled entry is skipped");
        assert_eq!(rules[5].stage, 1);
        let mut h = HeaderMap::new();
        let r = facts("/admin/x?y=1", &h);
        let got: Vec<Option<Entries>> = rules.iter().map(|x| x.descriptor(&r)).collect();
        let e = |v: &[(&str, &str)]| {
            Some(
                v.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Entries>(),
            )
        };
        assert_eq!(
            got[0],
            e(&[("PATH", "/admin/x?y=1"), ("generic_key", "web")])
        );
        assert_eq!(got[1], None, "x-user absent: no descriptor");
        assert_eq!(got[2], e(&[("header_match", "admin")]));
        assert_eq!(got[3], None, "a GET matches, expect_match false");
        assert_eq!(
            got[4],
            e(&[
                ("remote_address", "10.0.0.7"),
                ("destination_cluster", "inbound|8080||")
            ])
        );
        h.append("x-user", "a".parse().unwrap());
        h.append("x-user", "b".parse().unwrap());
        assert_eq!(
            rules[1].descriptor(&facts("/", &h)),
            e(&[("user", "a")]),
            "request_headers takes the first value"
        );
        // Unsupported actions: the entry is left out, with why.
        let (rules, skipped) = parse_rate_limits(
            &json!([{"actions": [{"masked_remote_address": {}}]},
                    {"actions": [{"generic_key": {"descriptor_value": "x"}}]}]),
            "rate_limits",
            None,
        )
        .unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            skipped[0].0,
            "rate_limits[0].actions[0].masked_remote_address"
        );
    }

    #[test]
    fn header_matchers_follow_envoy() {
        let m = |h: Value| header_matcher(&h, "h").unwrap();
        let h = HeaderMap::new();
        let r = facts("/p", &h);
        assert!(m(json!({"name": "x", "present_match": false})).matches(&r));
        assert!(!m(json!({"name": "x", "present_match": true})).matches(&r));
        assert!(!m(json!({"name": "x", "exact_match": ""})).matches(&r));
        assert!(
            !m(json!({"name": "x", "exact_match": "a", "invert_match": true})).matches(&r),
            "absent never matches a value"
        );
        assert!(m(json!({"name": "x", "exact_match": "a", "invert_match": true, "treat_missing_header_as_empty": true})).matches(&r));
        assert!(m(json!({"name": ":path", "safe_regex_match": {"regex": "/p"}})).matches(&r));
        assert!(
            !m(json!({"name": ":path", "safe_regex_match": {"regex": "/"}})).matches(&r),
            "anchored"
        );
        assert!(header_matcher(&json!({"name": "x", "range_match": {"start": 1}}), "h").is_err());
    }

    #[test]
    fn descriptors_are_checked_as_envoy_does() {
        let bucket = |v: &Value, at: &str| -> Result<BucketSpec, FieldError> {
            let secs = v["fill_interval"]
                .as_u64()
                .ok_or((at.to_owned(), "x".to_owned()))?;
            Ok(BucketSpec {
                max_tokens: 1,
                tokens_per_fill: 1,
                fill_interval: Duration::from_secs(secs),
            })
        };
        let one = json!({"entries": [{"key": "PATH", "value": "/a"}], "token_bucket": {"fill_interval": 2}});
        let d = parse_descriptors(&json!([one]), Duration::from_secs(1), bucket).unwrap();
        assert_eq!(d[0].entries, vec![("PATH".to_owned(), "/a".to_owned())]);
        let twice = parse_descriptors(&json!([one, one]), Duration::from_secs(1), bucket);
        assert_eq!(twice.unwrap_err().0, "descriptors[1]");
        let odd = parse_descriptors(&json!([one]), Duration::from_secs(3), bucket);
        assert_eq!(
            odd.unwrap_err().0,
            "descriptors[0].token_bucket.fill_interval"
        );
        let wildcard =
            json!([{"entries": [{"key": "PATH"}], "token_bucket": {"fill_interval": 2}}]);
        let e = parse_descriptors(&wildcard, Duration::from_secs(1), bucket).unwrap_err();
        assert!(e.1.contains("wildcard"), "{e:?}");
    }
}
