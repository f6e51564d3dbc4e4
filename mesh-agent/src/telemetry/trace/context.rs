//! Trace context on the wire: W3C `traceparent`/`tracestate`, B3's
//! `x-b3-*` headers and its single `b3` header. Each agent a request
//! passes is a hop with a span of its own: it reads the caller's context,
//! decides sampling as Envoy does, and sends its own span as the parent.

use http::{HeaderMap, HeaderValue};

/// One span's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span, if the request came with one.
    pub parent_id: Option<u64>,
    pub sampled: bool,
    /// W3C `tracestate`, passed on unchanged.
    pub trace_state: Option<String>,
}

/// What a request says of its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parent {
    trace_id: u128,
    span_id: u64,
    /// `None`: the caller left sampling to us.
    sampled: Option<bool>,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn hex128(s: &str) -> Option<u128> {
    (matches!(s.len(), 16 | 32) && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

fn hex64(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

/// `00-<trace>-<parent>-<flags>`; other versions are read by the same
/// first four fields, as the W3C spec asks.
fn traceparent(h: &HeaderMap) -> Option<Parent> {
    let v = header(h, "traceparent")?;
    let mut it = v.split('-');
    let (version, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || flags.len() != 2 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent {
        trace_id: hex128(trace)?,
        span_id: hex64(span)?,
        sampled: Some(flags & 1 == 1),
    })
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]`, or `b3: 0|1|d` alone.
fn b3_single(h: &HeaderMap) -> Option<Parent> {
    let v = header(h, "b3")?;
    let mut it = v.split('-');
    let trace = hex128(it.next()?)?;
    let span = hex64(it.next()?)?;
    let sampled = match it.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    Some(Parent {
        trace_id: trace,
        span_id: span,
        sampled,
    })
}

fn b3_multi(h: &HeaderMap) -> Option<Parent> {
    let trace = hex128(header(h, "x-b3-traceid")?)?;
    let span = hex64(header(h, "x-b3-spanid")?)?;
    Some(Parent {
        trace_id: trace,
        span_id: span,
        sampled: b3_sampled(h),
    })
}

/// `x-b3-sampled` / `x-b3-flags: 1` (debug), or the single header's bare
/// sampling state.
fn b3_sampled(h: &HeaderMap) -> Option<bool> {
    if header(h, "x-b3-flags") == Some("1") {
        return Some(true);
    }
    match header(h, "x-b3-sampled") {
        Some("1" | "true") => return Some(true),
        Some("0" | "false") => return Some(false),
        _ => {}
    }
    match header(h, "b3") {
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        _ => None,
    }
}

/// The context of this hop's span for a request with `headers`: a child
/// of the caller's span, or the root of a new trace. Sampling: the
/// caller's decision when it made one; else forced by `x-client-trace-id`
/// or `x-envoy-force-trace`; else `percentage` (0-100) at random.
pub fn child(headers: &HeaderMap, percentage: f64) -> SpanContext {
    let parent = traceparent(headers)
        .or_else(|| b3_single(headers))
        .or_else(|| b3_multi(headers));
    let forced =
        headers.contains_key("x-client-trace-id") || headers.contains_key("x-envoy-force-trace");
    let decided = parent
        .as_ref()
        .and_then(|p| p.sampled)
        .or_else(|| b3_sampled(headers));
    let sampled = match decided {
        Some(s) => s,
        None => forced || fastrand::f64() * 100.0 < percentage,
    };
    let trace_state = parent
        .as_ref()
        .and(header(headers, "tracestate"))
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    SpanContext {
        trace_id: parent
            .as_ref()
            .map_or_else(|| fastrand::u128(1..), |p| p.trace_id),
        span_id: fastrand::u64(1..),
        parent_id: parent.map(|p| p.span_id),
        sampled,
        trace_state,
    }
}

fn set(h: &mut HeaderMap, name: &'static str, v: String) {
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(name, v);
    }
}

/// Writes `ctx` as the parent of the next hop, in both W3C and B3 (the
/// single `b3` header only where the request had one).
pub fn inject(h: &mut HeaderMap, ctx: &SpanContext) {
    let flag = if ctx.sampled { "1" } else { "0" };
    set(
        h,
        "traceparent",
        format!("00-{:032x}-{:016x}-0{flag}", ctx.trace_id, ctx.span_id),
    );
    match &ctx.trace_state {
        Some(s) => set(h, "tracestate", s.clone()),
        None => {
            h.remove("tracestate");
        }
    }
    set(h, "x-b3-traceid", format!("{:032x}", ctx.trace_id));
    set(h, "x-b3-spanid", format!("{:016x}", ctx.span_id));
    match ctx.parent_id {
        Some(p) => set(h, "x-b3-parentspanid", format!("{p:016x}")),
        None => {
            h.remove("x-b3-parentspanid");
        }
    }
    set(h, "x-b3-sampled", flag.to_owned());
    h.remove("x-b3-flags");
    if h.contains_key("b3") {
        let mut v = format!("{:032x}-{:016x}-{flag}", ctx.trace_id, ctx.span_id);
        if let Some(p) = ctx.parent_id {
            v.push_str(&format!("-{p:016x}"));
        }
        set(h, "b3", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn w3c_parent_is_continued_and_its_decision_kept() {
        let h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let c = child(&h, 0.0);
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.parent_id, Some(0x00f067aa0ba902b7));
        assert!(c.sampled, "the parent sampled it, whatever our percentage");
        assert_ne!(c.span_id, 0x00f067aa0ba902b7);
        let mut out = HeaderMap::new();
        inject(&mut out, &c);
        assert_eq!(
            out["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01", c.span_id).as_str()
        );
        assert_eq!(out["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(out["x-b3-parentspanid"], "00f067aa0ba902b7");
        let unsampled = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]);
        assert!(!child(&unsampled, 100.0).sampled);
    }

    #[test]
    fn b3_multi_and_single_headers() {
        let multi = headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]);
        let c = child(&multi, 0.0);
        assert_eq!(c.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!((c.parent_id, c.sampled), (Some(0xe457b5a2e4d86bd1), true));
        let single = headers(&[("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-0")]);
        let c = child(&single, 100.0);
        assert_eq!(c.trace_id, 0x463ac35c9f6413ad, "a 64-bit id is kept");
        assert!(!c.sampled);
        let mut out = single.clone();
        inject(&mut out, &c);
        assert_eq!(
            out["b3"],
            format!(
                "{:032x}-{:016x}-0-a2fb4a1d1a96d312",
                0x463ac35c9f6413adu128, c.span_id
            )
            .as_str()
        );
        // `b3: 0` alone: no parent, but the decision holds.
        assert!(!child(&headers(&[("b3", "0")]), 100.0).sampled);
        assert!(child(&headers(&[("x-b3-flags", "1")]), 0.0).sampled);
    }

    #[test]
    fn roots_are_sampled_by_percentage_or_forced() {
        let none = HeaderMap::new();
        let c = child(&none, 0.0);
        assert!(!c.sampled && c.parent_id.is_none() && c.trace_id != 0);
        assert!(child(&none, 100.0).sampled);
        assert!(child(&headers(&[("x-client-trace-id", "abc")]), 0.0).sampled);
        // A malformed parent is ignored, not trusted.
        let bad = headers(&[("traceparent", "00-zz-00f067aa0ba902b7-01")]);
        assert_eq!(child(&bad, 0.0).parent_id, None);
        let zero = headers(&[(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )]);
        assert_eq!(child(&zero, 0.0).parent_id, None);
    }
}
