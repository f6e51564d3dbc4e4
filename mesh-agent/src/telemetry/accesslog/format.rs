//! Envoy's access-log format strings (`%REQ(:METHOD)%`, `%RESPONSE_CODE%`
//! …), parsed once when the configuration changes and rendered per
//! record: as text, or as JSON with one format string per label.
//!
//! An operator with no value renders `-` (or nothing, with
//! `omitEmptyValues`, which also leaves such a JSON label out), and a JSON
//! label that is one numeric operator alone is a number, as Envoy does.
//! Operators Envoy knows but this agent has no data for (metadata, filter
//! state) are accepted and render as absent; anything else is refused.

use std::{fmt::Write as _, time::SystemTime};

use super::{Error, Record};

/// Istio's text format when MeshConfig `accessLogFormat` is empty.
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% \
%CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% \
%BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \
\"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" \
%UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% \
%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's JSON labels when `accessLogEncoding: JSON` and no format is given.
pub const ISTIO_JSON: [(&str, &str); 24] = [
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

/// What a line looks like.
#[derive(Debug, Clone)]
pub enum Format {
    Text(Template),
    Json(Vec<(String, Template)>),
}

impl Format {
    /// Text from an Envoy format string; a line ends with one newline.
    pub fn text(s: &str) -> Result<Self, Error> {
        Template::parse(s).map(Format::Text)
    }

    /// JSON with these labels, each an Envoy format string.
    pub fn json<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, Error> {
        labels
            .into_iter()
            .map(|(k, v)| Ok((k.to_owned(), Template::parse(v)?)))
            .collect::<Result<_, Error>>()
            .map(Format::Json)
    }

    /// Istio's default of the encoding.
    pub fn istio_default(json: bool) -> Self {
        if json {
            Self::json(ISTIO_JSON).expect("Istio's JSON format parses")
        } else {
            Self::text(ISTIO_TEXT).expect("Istio's text format parses")
        }
    }

    /// The line for `r`, newline included.
    pub fn render(&self, r: &Record, omit_empty: bool) -> String {
        match self {
            Format::Text(t) => {
                let mut s = String::with_capacity(256);
                t.render_text(r, omit_empty, &mut s);
                if !s.ends_with('\n') {
                    s.push('\n');
                }
                s
            }
            Format::Json(labels) => {
                let map: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .filter_map(|(k, t)| Some((k.clone(), t.render_json(r, omit_empty)?)))
                    .collect();
                let mut s = serde_json::Value::Object(map).to_string();
                s.push('\n');
                s
            }
        }
    }
}

/// A parsed format string: literal text and operators.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    Op { op: Op, max_len: Option<usize> },
}

/// Envoy's command operators this agent renders.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    StartTime(Option<String>),
    /// `REQ(main?alternative)`, names lower-cased.
    Request(String, Option<String>),
    Response(String, Option<String>),
    Trailer(String, Option<String>),
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    RequestDuration,
    ResponseDuration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamRemoteAddress {
        port: bool,
    },
    DownstreamLocalAddress {
        port: bool,
    },
    DownstreamPeerUriSan,
    DownstreamLocalUriSan,
    UpstreamPeerUriSan,
    RequestedServerName,
    RouteName,
    Hostname,
    ConnectionId,
    GrpcStatus,
    UpstreamRequestAttemptCount,
    Environment(String),
    /// Known to Envoy, with no data here (metadata, filter state).
    Absent,
}

/// A rendered value, before it becomes text or JSON.
enum Value {
    None,
    Str(String),
    Num(u64),
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::Format {
            format: s.to_owned(),
            reason,
        };
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('%') {
            literal.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            // `%%` is a literal percent sign.
            if let Some(r) = rest.strip_prefix('%') {
                literal.push('%');
                rest = r;
                continue;
            }
            let end =
                operator_end(rest).ok_or_else(|| bad(format!("unterminated operator %{rest}")))?;
            let (op, max_len) = parse_op(&rest[..end]).map_err(bad)?;
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Op { op, max_len });
            rest = &rest[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self(pieces))
    }

    fn render_text(&self, r: &Record, omit_empty: bool, out: &mut String) {
        for p in &self.0 {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Op { op, max_len } => match op.value(r) {
                    Value::None if omit_empty => {}
                    Value::None => out.push('-'),
                    Value::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::Str(s) => out.push_str(truncate(&s, *max_len)),
                },
            }
        }
    }

    /// `None`: leave the label out.
    fn render_json(&self, r: &Record, omit_empty: bool) -> Option<serde_json::Value> {
        if let [Piece::Op { op, max_len }] = self.0.as_slice() {
            return match op.value(r) {
                Value::None if omit_empty => None,
                Value::None => Some("-".into()),
                Value::Num(n) => Some(n.into()),
                Value::Str(s) => Some(truncate(&s, *max_len).into()),
            };
        }
        let mut s = String::new();
        self.render_text(r, omit_empty, &mut s);
        Some(s.into())
    }
}

/// The `%` closing an operator, skipping those inside its parentheses
/// (`%START_TIME(%s)%`).
fn operator_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '%' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn truncate(s: &str, max: Option<usize>) -> &str {
    match max {
        Some(n) if s.len() > n => {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        _ => s,
    }
}

/// `NAME`, `NAME(arg)` or `NAME(arg):max_len`.
fn parse_op(s: &str) -> Result<(Op, Option<usize>), String> {
    let (head, max_len) = match s.rfind("):") {
        Some(i) => {
            let n = &s[i + 2..];
            let n = n
                .parse::<usize>()
                .map_err(|_| format!("%{s}%: the length after ':' is not a number"))?;
            (&s[..=i], Some(n))
        }
        None => (s, None),
    };
    let (name, arg) = match head.find('(') {
        Some(i) if head.ends_with(')') => (&head[..i], Some(&head[i + 1..head.len() - 1])),
        Some(_) => return Err(format!("%{s}%: unbalanced parentheses")),
        None => (head, None),
    };
    let headers = |arg: Option<&str>| -> Result<(String, Option<String>), String> {
        let a = arg
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("%{name}% needs a header name, as %{name}(X-NAME)%"))?;
        let mut it = a.splitn(2, '?');
        let main = it.next().unwrap_or_default().to_ascii_lowercase();
        Ok((main, it.next().map(str::to_ascii_lowercase)))
    };
    let no_arg = |op: Op| match arg {
        None => Ok(op),
        Some(_) => Err(format!("%{name}% takes no argument")),
    };
    let op = match name {
        "START_TIME" => Op::StartTime(arg.map(str::to_owned)),
        "REQ" => {
            let (a, b) = headers(arg)?;
            Op::Request(a, b)
        }
        "RESP" => {
            let (a, b) = headers(arg)?;
            Op::Response(a, b)
        }
        "TRAILER" => {
            let (a, b) = headers(arg)?;
            Op::Trailer(a, b)
        }
        "ENVIRONMENT" => Op::Environment(
            arg.filter(|a| !a.is_empty())
                .ok_or("%ENVIRONMENT% needs a variable name")?
                .to_owned(),
        ),
        "PROTOCOL" => no_arg(Op::Protocol)?,
        "RESPONSE_CODE" => no_arg(Op::ResponseCode)?,
        "RESPONSE_CODE_DETAILS" => no_arg(Op::ResponseCodeDetails)?,
        "RESPONSE_FLAGS" | "RESPONSE_FLAGS_LONG" => no_arg(Op::ResponseFlags)?,
        "CONNECTION_TERMINATION_DETAILS" => no_arg(Op::ConnectionTerminationDetails)?,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_arg(Op::UpstreamTransportFailureReason)?,
        "BYTES_RECEIVED" | "UPSTREAM_WIRE_BYTES_RECEIVED" | "DOWNSTREAM_WIRE_BYTES_RECEIVED" => {
            no_arg(Op::BytesReceived)?
        }
        "BYTES_SENT" | "UPSTREAM_WIRE_BYTES_SENT" | "DOWNSTREAM_WIRE_BYTES_SENT" => {
            no_arg(Op::BytesSent)?
        }
        "DURATION" => no_arg(Op::Duration)?,
        "REQUEST_DURATION" => no_arg(Op::RequestDuration)?,
        "RESPONSE_DURATION" => no_arg(Op::ResponseDuration)?,
        "UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS" => no_arg(Op::UpstreamHost)?,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => no_arg(Op::UpstreamCluster)?,
        "UPSTREAM_LOCAL_ADDRESS" => no_arg(Op::UpstreamLocalAddress)?,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            no_arg(Op::DownstreamRemoteAddress { port: true })?
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
        | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(Op::DownstreamRemoteAddress { port: false })?
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(Op::DownstreamLocalAddress { port: true })?,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => {
            no_arg(Op::DownstreamLocalAddress { port: false })?
        }
        "DOWNSTREAM_PEER_URI_SAN" => no_arg(Op::DownstreamPeerUriSan)?,
        "DOWNSTREAM_LOCAL_URI_SAN" => no_arg(Op::DownstreamLocalUriSan)?,
        "UPSTREAM_PEER_URI_SAN" => no_arg(Op::UpstreamPeerUriSan)?,
        "REQUESTED_SERVER_NAME" => no_arg(Op::RequestedServerName)?,
        "ROUTE_NAME" => no_arg(Op::RouteName)?,
        "HOSTNAME" => no_arg(Op::Hostname)?,
        "CONNECTION_ID" => no_arg(Op::ConnectionId)?,
        "GRPC_STATUS" | "GRPC_STATUS_NUMBER" => no_arg(Op::GrpcStatus)?,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => no_arg(Op::UpstreamRequestAttemptCount)?,
        "DYNAMIC_METADATA"
        | "CLUSTER_METADATA"
        | "UPSTREAM_METADATA"
        | "FILTER_STATE"
        | "UPSTREAM_FILTER_STATE"
        | "METADATA" => Op::Absent,
        other => return Err(format!("%{other}% is not an Envoy command operator")),
    };
    if let Op::StartTime(Some(f)) = &op {
        check_time_format(f)?;
    }
    Ok((op, max_len))
}

impl Op {
    fn value(&self, r: &Record) -> Value {
        let text = |s: &str| {
            if s.is_empty() {
                Value::None
            } else {
                Value::Str(s.to_owned())
            }
        };
        let addr = |a: Option<std::net::SocketAddr>, port: bool| match a {
            Some(a) if port => Value::Str(a.to_string()),
            Some(a) => Value::Str(a.ip().to_string()),
            None => Value::None,
        };
        match self {
            Op::StartTime(f) => Value::Str(format_time(r.start, f.as_deref())),
            Op::Request(a, b) => r.http.as_ref().map_or(Value::None, |h| {
                h.request_header(a)
                    .or_else(|| b.as_deref().and_then(|b| h.request_header(b)))
                    .map_or(Value::None, text)
            }),
            Op::Response(a, b) => r.http.as_ref().map_or(Value::None, |h| {
                header(&h.response_headers, a)
                    .or_else(|| b.as_deref().and_then(|b| header(&h.response_headers, b)))
                    .map_or(Value::None, text)
            }),
            Op::Trailer(a, b) => r.http.as_ref().map_or(Value::None, |h| {
                header(&h.response_trailers, a)
                    .or_else(|| b.as_deref().and_then(|b| header(&h.response_trailers, b)))
                    .map_or(Value::None, text)
            }),
            Op::Protocol => r
                .http
                .as_ref()
                .map_or(Value::None, |h| Value::Str(h.protocol.into())),
            // Envoy prints 0 for a connection that had no HTTP response.
            Op::ResponseCode => Value::Num(r.http.as_ref().map_or(0, |h| u64::from(h.code))),
            Op::ResponseCodeDetails => text(&r.code_details),
            Op::ResponseFlags => text(&r.flags),
            Op::ConnectionTerminationDetails => text(&r.termination_details),
            Op::UpstreamTransportFailureReason => text(&r.upstream_failure),
            Op::BytesReceived => Value::Num(r.bytes_received),
            Op::BytesSent => Value::Num(r.bytes_sent),
            Op::Duration => Value::Num(millis(r.duration)),
            Op::RequestDuration => r
                .http
                .as_ref()
                .and_then(|h| h.request_duration)
                .map_or(Value::None, |d| Value::Num(millis(d))),
            Op::ResponseDuration => r
                .http
                .as_ref()
                .and_then(|h| h.response_duration)
                .map_or(Value::None, |d| Value::Num(millis(d))),
            Op::UpstreamHost => addr(r.upstream_host, true),
            Op::UpstreamCluster => text(&r.upstream_cluster),
            Op::UpstreamLocalAddress => addr(r.upstream_local, true),
            Op::DownstreamRemoteAddress { port } => addr(Some(r.downstream_remote), *port),
            Op::DownstreamLocalAddress { port } => addr(Some(r.downstream_local), *port),
            Op::DownstreamPeerUriSan => text(&r.downstream_peer_san),
            Op::DownstreamLocalUriSan => text(&r.downstream_local_san),
            Op::UpstreamPeerUriSan => text(&r.upstream_peer_san),
            Op::RequestedServerName => text(&r.requested_server_name),
            Op::RouteName => text(&r.route_name),
            Op::Hostname => text(hostname()),
            Op::ConnectionId => Value::Num(r.connection_id),
            Op::GrpcStatus => r
                .http
                .as_ref()
                .and_then(|h| h.grpc_status.as_deref())
                .map_or(Value::None, text),
            Op::UpstreamRequestAttemptCount => r
                .http
                .as_ref()
                .map_or(Value::None, |h| Value::Num(u64::from(h.attempts))),
            Op::Environment(v) => std::env::var(v).map_or(Value::None, |v| text(&v)),
            Op::Absent => Value::None,
        }
    }
}

/// The node's host name, read once.
fn hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The strftime subset accepted in `%START_TIME(…)%`: Envoy's own
/// extensions `%E<n>S`/`%<n>f` (fractions) and `%s` (epoch seconds), and
/// the common fields.
fn check_time_format(f: &str) -> Result<(), String> {
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        let spec: String = match chars.next() {
            Some('E') => {
                let n = chars.next();
                let s = chars.next();
                match (n, s) {
                    (Some(n), Some('S')) if n.is_ascii_digit() || n == 's' => continue,
                    _ => return Err(format!("START_TIME({f}): %E must be %E<n>S")),
                }
            }
            Some(d) if d.is_ascii_digit() => match chars.next() {
                Some('f') => continue,
                _ => return Err(format!("START_TIME({f}): %<n> must be %<n>f")),
            },
            Some(c) => c.into(),
            None => return Err(format!("START_TIME({f}): ends with %")),
        };
        if !"YmdHMSsjzZFTbaAeyfp%".contains(spec.as_str()) {
            return Err(format!("START_TIME({f}): %{spec} is not supported"));
        }
    }
    Ok(())
}

/// Formats `t` (UTC) with Envoy's default `%Y-%m-%dT%H:%M:%E3SZ` when
/// `f` is `None`.
pub(super) fn format_time(t: SystemTime, f: Option<&str>) -> String {
    let dt = time::OffsetDateTime::from(t);
    let f = f.unwrap_or("%Y-%m-%dT%H:%M:%E3SZ");
    let nanos = dt.nanosecond();
    let mut out = String::with_capacity(32);
    let mut chars = f.chars().peekable();
    let frac = |n: u32| -> String {
        let n = n.clamp(1, 9);
        format!("{:09}", nanos)[..n as usize].to_owned()
    };
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('E') => {
                let n = chars.next().and_then(|n| n.to_digit(10)).unwrap_or(9);
                chars.next(); // 'S'
                write!(out, "{:02}.{}", dt.second(), frac(n))
            }
            Some(d) if d.is_ascii_digit() => {
                chars.next(); // 'f'
                write!(out, "{}", frac(d.to_digit(10).unwrap_or(9)))
            }
            Some('Y') => write!(out, "{}", dt.year()),
            Some('y') => write!(out, "{:02}", dt.year() % 100),
            Some('m') => write!(out, "{:02}", u8::from(dt.month())),
            Some('d') => write!(out, "{:02}", dt.day()),
            Some('e') => write!(out, "{:2}", dt.day()),
            Some('H') => write!(out, "{:02}", dt.hour()),
            Some('M') => write!(out, "{:02}", dt.minute()),
            Some('S') => write!(out, "{:02}", dt.second()),
            Some('f') => write!(out, "{:09}", nanos),
            Some('s') => write!(out, "{}", dt.unix_timestamp()),
            Some('j') => write!(out, "{:03}", dt.ordinal()),
            Some('z') => out.write_str("+0000"),
            Some('Z') => out.write_str("UTC"),
            Some('F') => write!(
                out,
                "{}-{:02}-{:02}",
                dt.year(),
                u8::from(dt.month()),
                dt.day()
            ),
            Some('T') => write!(
                out,
                "{:02}:{:02}:{:02}",
                dt.hour(),
                dt.minute(),
                dt.second()
            ),
            Some('b') => out.write_str(&dt.month().to_string()[..3]),
            Some('a') => out.write_str(&dt.weekday().to_string()[..3]),
            Some('A') => write!(out, "{}", dt.weekday()),
            Some('p') => out.write_str(if dt.hour() < 12 { "AM" } else { "PM" }),
            Some('%') => out.write_str("%"),
            Some(other) => write!(out, "%{other}"),
            None => out.write_str("%"),
        };
    }
    out
}

#[cfg(test)]
mod tests;
