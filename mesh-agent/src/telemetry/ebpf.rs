//! The kernel programs' counters and the capture maps' sizes, read from
//! the maps at every scrape (per-CPU counters summed).

use std::sync::Arc;

use prometheus::{
    core::{Collector, Desc},
    proto,
};

use super::Error;
use crate::ebpf::Maps;

/// Reads the per-CPU program counters and map sizes at scrape time.
pub struct EbpfCollector {
    maps: Arc<Maps>,
    descs: Vec<Desc>,
}

const EVENTS: &str = "mesh_ebpf_program_events_total";
const ENTRIES: &str = "mesh_ebpf_map_entries";

impl EbpfCollector {
    pub fn new(maps: Arc<Maps>) -> Result<Self, Error> {
        let descs = vec![
            Desc::new(
                EVENTS.into(),
                "What each kernel program did (summed over CPUs).".into(),
                vec!["program".into(), "outcome".into()],
                Default::default(),
            )?,
            Desc::new(
                ENTRIES.into(),
                "Entries in the connection-tracking maps.".into(),
                vec!["map".into()],
                Default::default(),
            )?,
        ];
        Ok(Self { maps, descs })
    }
}

fn sample(labels: &[(&str, &str)], value: f64, counter: bool) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = proto::LabelPair::default();
                l.set_name((*k).into());
                l.set_value((*v).into());
                l
            })
            .collect(),
    );
    if counter {
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

fn family(
    name: &str,
    help: &str,
    kind: proto::MetricType,
    metrics: Vec<proto::Metric>,
) -> proto::MetricFamily {
    let mut f = proto::MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

impl Collector for EbpfCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut events = Vec::new();
        for (program, s) in self.maps.program_stats() {
            for (outcome, v) in [
                ("redirected", s.redirected),
                ("passed", s.passed),
                ("errors", s.errors),
            ] {
                events.push(sample(
                    &[("program", program), ("outcome", outcome)],
                    v as f64,
                    true,
                ));
            }
        }
        let e = self.maps.entries();
        let entries = vec![
            sample(&[("map", "mesh_orig_dst")], e.orig_dst as f64, false),
            sample(&[("map", "mesh_conn_dst")], e.conn_dst as f64, false),
            sample(&[("map", "mesh_fast_socks")], e.fast_socks as f64, false),
            sample(&[("map", "mesh_fast_apps")], e.fast_apps as f64, false),
        ];
        vec![
            family(
                EVENTS,
                &self.descs[0].help,
                proto::MetricType::COUNTER,
                events,
            ),
            family(
                ENTRIES,
                &self.descs[1].help,
                proto::MetricType::GAUGE,
                entries,
            ),
        ]
    }
}
