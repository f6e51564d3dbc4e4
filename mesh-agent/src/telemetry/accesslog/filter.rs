//! Telemetry `accessLogging.filter.expression`: a CEL expression over
//! Envoy's attributes (`response.code >= 400`,
//! `request.headers['x-debug'] == 'true'`), evaluated with the `cel`
//! crate on the writer thread, never on the data path.
//!
//! As in Envoy, a record is written when the expression yields `true`; an
//! error while evaluating (a missing header, a type mismatch) or any other
//! result leaves it out.

use std::{collections::HashMap, sync::Arc};

use cel::{Context, Program, Value};
use http::HeaderMap;

use super::{Error, Record};

/// A compiled filter expression.
#[derive(Debug)]
pub struct Filter {
    source: String,
    program: Program,
}

impl Filter {
    pub fn compile(expression: &str) -> Result<Self, Error> {
        let program = crate::cel_expr::compile(expression).map_err(|reason| Error::Filter {
            expression: expression.to_owned(),
            reason,
        })?;
        Ok(Self {
            source: expression.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `r` passes.
    pub fn accepts(&self, r: &Record) -> bool {
        let mut ctx = Context::default();
        for (name, value) in attributes(r) {
            ctx.add_variable_from_value(name, value);
        }
        matches!(self.program.execute(&ctx), Ok(Value::Bool(true)))
    }
}

fn map(entries: Vec<(&'static str, Value)>) -> Value {
    Value::from(entries.into_iter().collect::<HashMap<_, _>>())
}

fn headers(h: &HeaderMap) -> Value {
    // Repeated headers are joined with a comma, as Envoy presents them.
    let mut m: HashMap<String, String> = HashMap::with_capacity(h.len());
    for (k, v) in h {
        let v = String::from_utf8_lossy(v.as_bytes());
        m.entry(k.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    Value::from(m)
}

fn string(s: &str) -> Value {
    Value::String(Arc::new(s.to_owned()))
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn duration(d: std::time::Duration) -> Value {
    Value::Duration(chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX))
}

/// Envoy's attributes of `r`, by root.
fn attributes(r: &Record) -> [(&'static str, Value); 7] {
    let h = r.http.as_deref();
    let request = match h {
        Some(h) => {
            let url_path = h.path.split('?').next().unwrap_or_default();
            let mut headers = headers(&h.request_headers);
            if let Value::Map(m) = &mut headers {
                // Envoy's request.headers include the pseudo-headers.
                let mut all: HashMap<cel::objects::Key, Value> = (*m.map).clone();
                for p in [":method", ":path", ":authority", ":scheme"] {
                    if let Some(v) = h.request_header(p) {
                        all.insert(p.into(), string(v));
                    }
                }
                headers = Value::Map(cel::objects::Map { map: Arc::new(all) });
            }
            map(vec![
                ("headers", headers),
                ("method", string(&h.method)),
                ("path", string(&h.path)),
                ("url_path", string(url_path)),
                ("host", string(&h.authority)),
                ("scheme", string(h.scheme)),
                ("protocol", string(h.protocol)),
                (
                    "id",
                    string(h.request_header("x-request-id").unwrap_or_default()),
                ),
                (
                    "useragent",
                    string(h.request_header("user-agent").unwrap_or_default()),
                ),
                (
                    "referer",
                    string(h.request_header("referer").unwrap_or_default()),
                ),
                ("duration", duration(r.duration)),
                ("size", int(r.bytes_received)),
                ("total_size", int(r.bytes_received)),
                (
                    "time",
                    Value::Timestamp(chrono::DateTime::<chrono::Utc>::from(r.start).into()),
                ),
            ])
        }
        None => map(vec![
            ("duration", duration(r.duration)),
            (
                "time",
                Value::Timestamp(chrono::DateTime::<chrono::Utc>::from(r.start).into()),
            ),
        ]),
    };
    let response = map(vec![
        ("code", int(h.map_or(0, |h| u64::from(h.code)))),
        ("code_details", string(&r.code_details)),
        ("flags", string(&r.flags)),
        (
            "grpc_status",
            h.and_then(|h| h.grpc_status.as_deref())
                .and_then(|s| s.parse::<u64>().ok())
                .map_or(Value::Null, int),
        ),
        (
            "headers",
            h.map_or_else(
                || headers(&HeaderMap::new()),
                |h| headers(&h.response_headers),
            ),
        ),
        (
            "trailers",
            h.map_or_else(
                || headers(&HeaderMap::new()),
                |h| headers(&h.response_trailers),
            ),
        ),
        ("size", int(r.bytes_sent)),
        ("total_size", int(r.bytes_sent)),
    ]);
    let peer = |a: std::net::SocketAddr| {
        map(vec![
            ("address", string(&a.ip().to_string())),
            ("port", int(u64::from(a.port()))),
        ])
    };
    let upstream = match r.upstream_host {
        Some(a) => map(vec![
            ("address", string(&a.ip().to_string())),
            ("port", int(u64::from(a.port()))),
            ("uri_san_peer_certificate", string(&r.upstream_peer_san)),
            ("transport_failure_reason", string(&r.upstream_failure)),
        ]),
        None => map(vec![
            ("uri_san_peer_certificate", string(&r.upstream_peer_san)),
            ("transport_failure_reason", string(&r.upstream_failure)),
        ]),
    };
    [
        ("request", request),
        ("response", response),
        ("source", peer(r.downstream_remote)),
        ("destination", peer(r.downstream_local)),
        (
            "connection",
            map(vec![
                ("id", int(r.connection_id)),
                ("mtls", Value::Bool(r.mtls)),
                ("requested_server_name", string(&r.requested_server_name)),
                ("uri_san_peer_certificate", string(&r.downstream_peer_san)),
                ("uri_san_local_certificate", string(&r.downstream_local_san)),
                ("termination_details", string(&r.termination_details)),
            ]),
        ),
        ("upstream", upstream),
        (
            "xds",
            map(vec![
                ("cluster_name", string(&r.upstream_cluster)),
                ("route_name", string(&r.route_name)),
            ]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passes(expr: &str, r: &Record) -> bool {
        Filter::compile(expr).unwrap().accepts(r)
    }

    #[test]
    fn envoy_attributes_decide() {
        let r = Record::sample();
        assert!(passes("response.code >= 400", &r));
        assert!(!passes("response.code < 400", &r));
        assert!(passes("request.headers['x-debug'] == 'true'", &r));
        assert!(passes(
            "request.url_path == '/ratings/1' && request.method == 'GET'",
            &r
        ));
        assert!(passes("connection.mtls && response.flags == 'UF'", &r));
        assert!(passes("request.duration < duration('1s')", &r));
        assert!(passes(
            "source.address == '10.10.1.2' && destination.port == 9080",
            &r
        ));
        assert!(passes("xds.cluster_name.startsWith('outbound|9080')", &r));
        assert!(passes(
            "request.headers[':authority'] == 'ratings:9080'",
            &r
        ));
    }

    #[test]
    fn errors_and_non_booleans_leave_the_record_out() {
        let r = Record::sample();
        // A missing header is an error in CEL, as in Envoy: not logged.
        assert!(!passes("request.headers['x-none'] == 'x'", &r));
        assert!(!passes("response.code", &r));
        let mut tcp = r.clone();
        tcp.http = None;
        assert!(!passes("request.method == 'GET'", &tcp));
        assert!(passes("response.code == 0", &tcp));
    }
}
