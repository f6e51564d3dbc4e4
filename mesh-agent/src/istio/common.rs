//! Types several Istio resources share.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration as StdDuration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration as Istio YAML writes it: Go syntax (`10s`, `1.5s`, `100ms`,
/// `1h30m`). Keeps its text, so a round trip is exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: StdDuration,
}

impl Duration {
    pub fn get(&self) -> StdDuration {
        self.value
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_go_duration(s).map(|value| Self {
            text: s.into(),
            value,
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string in Go syntax, e.g. \"10s\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// Go's `time.ParseDuration`, for non-negative durations.
fn parse_go_duration(s: &str) -> Result<StdDuration, String> {
    let bad = || format!("invalid duration {s:?} (use Go syntax: 10s, 1.5s, 100ms, 1h30m)");
    if s == "0" {
        return Ok(StdDuration::ZERO);
    }
    if let Some(positive) = s.strip_prefix('-') {
        return Err(if parse_go_duration(positive).is_ok() {
            format!("negative duration {s:?}: it must be zero or more")
        } else {
            bad()
        });
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e15 {
        return Err(bad());
    }
    Ok(StdDuration::from_secs_f64(total))
}

/// How a string is matched (exactly one of the three).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2 syntax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A percentage, 0 to 100.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// `selector: {matchLabels: …}` of workload-scoped resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `targetRef` / `targetRefs` of policies bound to a Gateway or Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// A port number, as `port: {number: 8080}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

/// A service port: number, protocol, name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    #[serde(default)]
    pub number: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s: &str| s.parse::<Duration>().map(|d| d.get());
        assert_eq!(d("10s").unwrap(), StdDuration::from_secs(10));
        assert_eq!(d("1.5s").unwrap(), StdDuration::from_millis(1500));
        assert_eq!(d("100ms").unwrap(), StdDuration::from_millis(100));
        assert_eq!(d("1h30m").unwrap(), StdDuration::from_secs(5400));
        assert_eq!(d("3m").unwrap(), StdDuration::from_secs(180));
        assert_eq!(d("0").unwrap(), StdDuration::ZERO);
        for bad in ["", "10", "s", "-1s", "1x", "1.2.3s", "ten seconds"] {
            assert!(d(bad).is_err(), "{bad}");
        }
        assert_eq!(
            d("-1s").unwrap_err(),
            "negative duration \"-1s\": it must be zero or more"
        );
        assert!(d("-x").unwrap_err().contains("use Go syntax"));
        assert_eq!(
            "1h30m".parse::<Duration>().unwrap().to_string(),
            "1h30m",
            "text kept for round trips"
        );
    }
}
