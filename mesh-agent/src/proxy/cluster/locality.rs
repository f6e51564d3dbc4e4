//! Locality-aware load balancing (DestinationRule `localityLbSetting`), as
//! Istio configures Envoy: endpoints in the client's own locality first,
//! then the same zone, region, the `failover` region, anything else —
//! moving down a level only when a level has no healthy endpoint (which
//! is why Istio requires outlier detection for it); or, with
//! `distribute`, a weighted split across localities.

use crate::{
    istio::networking::LocalityLbSetting,
    registry::{Endpoint, Locality},
};

/// The endpoints requests should go to now, from those outlier detection
/// left healthy. `failover_enabled` is Istio's condition: outlier detection
/// configured and the setting not disabled.
pub fn prefer<'e>(
    healthy: Vec<&'e Endpoint>,
    client: &Locality,
    setting: Option<&LocalityLbSetting>,
    failover_enabled: bool,
    client_labels: &std::collections::BTreeMap<String, String>,
) -> Vec<&'e Endpoint> {
    if client.region.is_empty() || healthy.is_empty() {
        return healthy;
    }
    if setting.and_then(|s| s.enabled) == Some(false) {
        return healthy;
    }
    if let Some(s) = setting
        && let Some(d) = s.distribute.iter().find(|d| matches(&d.from, client))
    {
        // A weighted draw among the target localities that have endpoints.
        let targets: Vec<(&String, u32, Vec<&Endpoint>)> =
            d.to.iter()
                .map(|(pattern, w)| {
                    let eps: Vec<&Endpoint> = healthy
                        .iter()
                        .copied()
                        .filter(|e| matches(pattern, &e.locality))
                        .collect();
                    (pattern, *w, eps)
                })
                .filter(|(_, w, eps)| *w > 0 && !eps.is_empty())
                .collect();
        let total: u32 = targets.iter().map(|(_, w, _)| w).sum();
        if total > 0 {
            let mut x = fastrand::u32(0..total);
            for (_, w, eps) in targets {
                if x < w {
                    return eps;
                }
                x -= w;
            }
        }
        return healthy;
    }
    if !failover_enabled {
        return healthy;
    }
    let failover_to: Option<&str> = setting.and_then(|s| {
        s.failover
            .iter()
            .find(|f| f.from == client.region)
            .map(|f| f.to.as_str())
    });
    let priority_labels: &[String] = setting.map_or(&[], |s| s.failover_priority.as_slice());
    let best = healthy
        .iter()
        .map(|e| rank(e, client, failover_to, priority_labels, client_labels))
        .min()
        .unwrap_or_default();
    healthy
        .into_iter()
        .filter(|e| rank(e, client, failover_to, priority_labels, client_labels) == best)
        .collect()
}

/// Lower is closer. With `failoverPriority`, endpoints matching the
/// client on more of the listed labels (in order) come first; then the
/// locality: subzone, zone, region, the failover region, elsewhere.
fn rank(
    e: &Endpoint,
    client: &Locality,
    failover_to: Option<&str>,
    priority_labels: &[String],
    client_labels: &std::collections::BTreeMap<String, String>,
) -> (usize, u8) {
    let label_misses = if priority_labels.is_empty() {
        0
    } else {
        let matched = priority_labels
            .iter()
            .take_while(|l| {
                client_labels.get(l.as_str()).is_some()
                    && e.labels.get(l.as_str()) == client_labels.get(l.as_str())
            })
            .count();
        priority_labels.len() - matched
    };
    let l = &e.locality;
    let place = if l.region == client.region {
        if l.zone == client.zone {
            if l.subzone == client.subzone { 0 } else { 1 }
        } else {
            2
        }
    } else if Some(l.region.as_str()) == failover_to {
        3
    } else {
        4
    };
    (label_misses, place)
}

/// Istio's locality patterns: `region/zone/subzone`, where a part may be
/// `*` (or missing) to match anything below.
fn matches(pattern: &str, l: &Locality) -> bool {
    let mut parts = pattern.split('/');
    for actual in [&l.region, &l.zone, &l.subzone] {
        match parts.next() {
            None | Some("*") => return true,
            Some(p) if p == actual => {}
            Some(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::networking::{LocalityDistribute, LocalityFailover};

    fn ep(locality: &str) -> Endpoint {
        Endpoint {
            locality: Locality::parse(locality),
            ..Endpoint::at(None, Some(locality.into()))
        }
    }

    fn names(v: &[&Endpoint]) -> Vec<String> {
        v.iter().map(|e| e.hostname.clone().unwrap()).collect()
    }

    #[test]
    fn nearest_healthy_level_first_then_failover_region() {
        let eps = [
            ep("r1/z1/s1"),
            ep("r1/z2/s1"),
            ep("r2/z1/s1"),
            ep("r3/z1/s1"),
        ];
        let all: Vec<&Endpoint> = eps.iter().collect();
        let me = Locality::parse("r1/z1/s1");
        let none = Default::default();
        assert_eq!(
            names(&prefer(all.clone(), &me, None, true, &none)),
            ["r1/z1/s1"]
        );
        assert_eq!(
            names(&prefer(all[1..].to_vec(), &me, None, true, &none)),
            ["r1/z2/s1"]
        );
        let setting = LocalityLbSetting {
            failover: vec![LocalityFailover {
                from: "r1".into(),
                to: "r3".into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            names(&prefer(all[2..].to_vec(), &me, Some(&setting), true, &none)),
            ["r3/z1/s1"],
            "the failover region before other regions"
        );
        assert_eq!(
            prefer(all.clone(), &me, None, false, &none).len(),
            4,
            "no outlier detection"
        );
    }

    #[test]
    fn distribute_splits_by_weight() {
        let eps = [ep("r1/z1/s1"), ep("r1/z2/s1")];
        let all: Vec<&Endpoint> = eps.iter().collect();
        let setting = LocalityLbSetting {
            distribute: vec![LocalityDistribute {
                from: "r1/z1/*".into(),
                to: [("r1/z1/*".to_string(), 20), ("r1/z2/*".to_string(), 80)].into(),
            }],
            ..Default::default()
        };
        let me = Locality::parse("r1/z1/s1");
        let none = Default::default();
        let to_z2 = (0..10_000)
            .filter(|_| {
                names(&prefer(all.clone(), &me, Some(&setting), false, &none)) == ["r1/z2/s1"]
            })
            .count();
        assert!((7_600..8_400).contains(&to_z2), "{to_z2}");
    }
}
