//! Trace context: reading and writing W3C `traceparent`/`tracestate` and Zipkin B3 (multi-
//! and single-header) propagation, and the head-sampling decision. Pure functions over header
//! values; the request path decides when to call them.
//!
//! A request may carry several formats at once (a W3C-speaking app behind a B3-speaking
//! gateway). The first valid one in the order `traceparent`, `b3`, `X-B3-*` is the parent; the
//! proxy's own span becomes the new parent for the next hop, written back in every format the
//! request came with (W3C alone when it came with none), so neither kind of app loses the
//! trace.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Single-header B3.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// Multi-header B3.
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// Multi-header B3.
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// Multi-header B3.
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// Multi-header B3.
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// Multi-header B3 (`1`: debug, which implies sampled).
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A 128-bit trace id (never all zero).
pub type TraceId = [u8; 16];
/// A 64-bit span id (never all zero).
pub type SpanId = [u8; 8];

/// Which propagation formats a request carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Formats {
    /// `traceparent` (with `tracestate`).
    pub w3c: bool,
    /// `b3`.
    pub b3_single: bool,
    /// `X-B3-TraceId` and friends.
    pub b3_multi: bool,
}

/// The caller's span, as the request carried it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span (absent for a B3 sampling-only header, which starts a trace).
    pub span_id: Option<SpanId>,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
    /// `tracestate`, passed on unchanged (vendors' entries are theirs to edit).
    pub tracestate: Option<HeaderValue>,
}

/// The context read from a request: its parent, if any valid one, and its formats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The parent span; none: this hop starts the trace (or continues a sampling-only B3).
    pub parent: Option<Parent>,
    /// A decision carried without a trace (`b3: 0`, `b3: 1`, `b3: d`, or `X-B3-Sampled`
    /// alone).
    pub sampled_only: Option<bool>,
    /// Formats present, valid or not: the next hop gets the same ones.
    pub formats: Formats,
}

/// This hop's span: what the proxy records and passes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The trace.
    pub trace_id: TraceId,
    /// This hop's span id.
    pub span_id: SpanId,
    /// The caller's span id, if there was one.
    pub parent_id: Option<SpanId>,
    /// Recorded and exported.
    pub sampled: bool,
    /// `tracestate` to pass on.
    pub tracestate: Option<HeaderValue>,
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex of exactly `N` bytes; W3C forbids uppercase.
fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

/// B3 ids are lowercase hex too, and a trace id may be 64-bit (left-padded to 128).
fn b3_trace_id(s: &[u8]) -> Option<TraceId> {
    let id = match s.len() {
        32 => hex::<16>(s)?,
        16 => {
            let low = hex::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    nonzero(id)
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    id.iter().any(|b| *b != 0).then_some(id)
}

/// `traceparent`: `version-traceid-parentid-flags`. Version `ff` is invalid; a later
/// version may append fields, which are ignored (the spec's forward compatibility).
pub fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, bool)> {
    if v.len() < 55 {
        return None;
    }
    let version = hex::<1>(&v[..2])?[0];
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if version == 0 && v.len() != 55 {
        return None;
    }
    if v.len() > 55 && v[55] != b'-' {
        return None;
    }
    let trace = nonzero(hex::<16>(&v[3..35])?)?;
    let span = nonzero(hex::<8>(&v[36..52])?)?;
    let flags = hex::<1>(&v[53..55])?[0];
    Some((trace, span, flags & 1 == 1))
}

/// A B3 sampling state: `1`, `0` or `d` (debug, which is sampled). Multi-header `true` and
/// `false` are accepted, as older Zipkin clients send them.
fn b3_sampled(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"d" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Single-header B3: `{trace}-{span}[-{sampled}[-{parent}]]`, or the sampling state alone.
fn parse_b3_single(v: &[u8]) -> Option<Result<Parent, bool>> {
    let fields: Vec<&[u8]> = v.split(|b| *b == b'-').collect();
    match fields.as_slice() {
        [state] => b3_sampled(state).map(Err),
        [trace, span, rest @ ..] if rest.len() <= 2 => {
            let sampled = match rest.first() {
                Some(s) => Some(b3_sampled(s)?),
                None => None,
            };
            if let Some(parent) = rest.get(1) {
                nonzero(hex::<8>(parent)?)?;
            }
            Some(Ok(Parent {
                trace_id: b3_trace_id(trace)?,
                span_id: Some(nonzero(hex::<8>(span)?)?),
                sampled,
                tracestate: None,
            }))
        }
        _ => None,
    }
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    h.get(name).map(|v| v.as_bytes())
}

/// Reads the trace context a request carries.
pub fn extract(h: &HeaderMap) -> Incoming {
    let formats = Formats {
        w3c: h.contains_key(TRACEPARENT),
        b3_single: h.contains_key(B3),
        b3_multi: h.contains_key(B3_TRACE_ID) || h.contains_key(B3_SAMPLED),
    };
    let mut out = Incoming {
        formats,
        ..Incoming::default()
    };
    // Several `traceparent` headers make it invalid (the spec: treat as absent).
    if h.get_all(TRACEPARENT).iter().count() == 1
        && let Some((trace_id, span_id, sampled)) =
            header(h, &TRACEPARENT).and_then(parse_traceparent)
    {
        out.parent = Some(Parent {
            trace_id,
            span_id: Some(span_id),
            sampled: Some(sampled),
            tracestate: h.get(TRACESTATE).cloned(),
        });
        return out;
    }
    if let Some(v) = header(h, &B3) {
        match parse_b3_single(v) {
            Some(Ok(p)) => {
                out.parent = Some(p);
                return out;
            }
            Some(Err(sampled)) => {
                out.sampled_only = Some(sampled);
                return out;
            }
            None => {}
        }
    }
    let debug = header(h, &B3_FLAGS) == Some(b"1");
    let sampled = header(h, &B3_SAMPLED).and_then(b3_sampled);
    let sampled = if debug { Some(true) } else { sampled };
    let trace = header(h, &B3_TRACE_ID).and_then(b3_trace_id);
    let span = header(h, &B3_SPAN_ID).and_then(hex::<8>).and_then(nonzero);
    match (trace, span) {
        (Some(trace_id), Some(span_id)) => {
            out.parent = Some(Parent {
                trace_id,
                span_id: Some(span_id),
                sampled,
                tracestate: None,
            })
        }
        _ => out.sampled_only = sampled,
    }
    out
}

/// Head sampling: the caller's decision when it made one; otherwise `rate` (0.0 to 1.0) of
/// traces, decided from the trace id so that every proxy on the trace agrees without
/// talking (the W3C trace id's right half is random).
pub fn sample(parent_decision: Option<bool>, trace_id: &TraceId, rate: f64) -> bool {
    if let Some(d) = parent_decision {
        return d;
    }
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    // The top 53 bits as a fraction in [0, 1).
    let x = (u64::from_be_bytes(low) >> 11) as f64 / (1u64 << 53) as f64;
    x < rate
}

/// This hop's span for a request that carried `incoming`: a child of its parent, or a new
/// trace; `random` supplies fresh ids.
pub fn child(incoming: &Incoming, rate: f64, mut random: impl FnMut() -> u64) -> Span {
    let mut span_id = [0u8; 8];
    while span_id == [0u8; 8] {
        span_id = random().to_be_bytes();
    }
    match &incoming.parent {
        Some(p) => Span {
            trace_id: p.trace_id,
            span_id,
            parent_id: p.span_id,
            sampled: sample(p.sampled, &p.trace_id, rate),
            tracestate: p.tracestate.clone(),
        },
        None => {
            let mut trace_id = [0u8; 16];
            while trace_id == [0u8; 16] {
                trace_id[..8].copy_from_slice(&random().to_be_bytes());
                trace_id[8..].copy_from_slice(&random().to_be_bytes());
            }
            Span {
                sampled: sample(incoming.sampled_only, &trace_id, rate),
                trace_id,
                span_id,
                parent_id: None,
                tracestate: None,
            }
        }
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// A trace id as 32 lowercase hex digits (logs, exemplars).
pub fn trace_hex(id: &TraceId) -> String {
    to_hex(id)
}

/// A span id as 16 lowercase hex digits.
pub fn span_hex(id: &SpanId) -> String {
    to_hex(id)
}

fn value(s: String) -> HeaderValue {
    // Hex digits and dashes only.
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Writes `span` as the parent for the next hop, in every format the request came with
/// (W3C when it came with none), replacing what the caller sent.
pub fn inject(h: &mut HeaderMap, span: &Span, formats: Formats) {
    let none = formats == Formats::default();
    let (trace, id) = (to_hex(&span.trace_id), to_hex(&span.span_id));
    let flag = if span.sampled { "1" } else { "0" };
    if formats.w3c || none {
        h.insert(TRACEPARENT, value(format!("00-{trace}-{id}-0{flag}")));
        match &span.tracestate {
            Some(ts) => {
                h.insert(TRACESTATE, ts.clone());
            }
            None => {
                h.remove(TRACESTATE);
            }
        }
    }
    if formats.b3_single {
        let parent = span
            .parent_id
            .map(|p| format!("-{}", to_hex(&p)))
            .unwrap_or_default();
        h.insert(B3, value(format!("{trace}-{id}-{flag}{parent}")));
    }
    if formats.b3_multi {
        h.insert(B3_TRACE_ID, value(trace));
        h.insert(B3_SPAN_ID, value(id));
        match span.parent_id {
            Some(p) => {
                h.insert(B3_PARENT_SPAN_ID, value(to_hex(&p)));
            }
            None => {
                h.remove(B3_PARENT_SPAN_ID);
            }
        }
        h.insert(
            B3_SAMPLED,
            HeaderValue::from_static(if span.sampled { "1" } else { "0" }),
        );
        h.remove(B3_FLAGS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE: TraceId = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    const SPAN: SpanId = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn traceparent_table() {
        let cases: &[(&str, Option<bool>)] = &[
            (TP, Some(true)),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                Some(false),
            ),
            // Unknown flag bits are ignored; only "sampled" counts.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
                Some(true),
            ),
            // A later version may append fields.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                Some(true),
            ),
            // Version 00 may not.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                None,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                None,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                None,
            ),
            ("", None),
        ];
        for (v, want) in cases {
            let got = parse_traceparent(v.as_bytes());
            assert_eq!(got.map(|(_, _, s)| s), *want, "{v}");
            if let Some((t, s, _)) = got {
                assert_eq!((t, s), (TRACE, SPAN), "{v}");
            }
        }
    }

    #[test]
    fn extract_table() {
        let short = "a3ce929d0e0e4736";
        let mut short_trace = [0u8; 16];
        short_trace[8..].copy_from_slice(&[0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36]);
        // (headers, trace id, span id, sampled, sampled-only)
        type Want = (Option<TraceId>, Option<SpanId>, Option<bool>, Option<bool>);
        let cases: Vec<(Vec<(&str, &str)>, Want)> = vec![
            (vec![], (None, None, None, None)),
            (
                vec![("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")],
                (Some(TRACE), Some(SPAN), Some(true), None),
            ),
            // Two traceparent headers: invalid, so the B3 context is used.
            (
                vec![
                    ("traceparent", TP),
                    ("traceparent", TP),
                    ("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"),
                ],
                (Some(TRACE), Some(SPAN), Some(false), None),
            ),
            // W3C wins over B3.
            (
                vec![("traceparent", TP), ("b3", "0")],
                (Some(TRACE), Some(SPAN), Some(true), None),
            ),
            (
                vec![("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")],
                (Some(TRACE), Some(SPAN), None, None),
            ),
            (
                vec![(
                    "b3",
                    "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-d-05e3ac9a4f6e3b90",
                )],
                (Some(TRACE), Some(SPAN), Some(true), None),
            ),
            (vec![("b3", "0")], (None, None, None, Some(false))),
            (vec![("b3", "d")], (None, None, None, Some(true))),
            (
                vec![("b3", "4bf92f35-00f067aa0ba902b7")],
                (None, None, None, None),
            ),
            // 64-bit trace ids are left-padded.
            (
                vec![
                    ("x-b3-traceid", short),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-sampled", "1"),
                ],
                (Some(short_trace), Some(SPAN), Some(true), None),
            ),
            (
                vec![
                    ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-sampled", "0"),
                    ("x-b3-flags", "1"),
                ],
                (Some(TRACE), Some(SPAN), Some(true), None),
            ),
            (vec![("x-b3-sampled", "0")], (None, None, None, Some(false))),
            (
                vec![("x-b3-traceid", "zz"), ("x-b3-spanid", "00f067aa0ba902b7")],
                (None, None, None, None),
            ),
        ];
        for (pairs, (trace, span, sampled, only)) in cases {
            let got = extract(&headers(&pairs));
            assert_eq!(got.parent.as_ref().map(|p| p.trace_id), trace, "{pairs:?}");
            assert_eq!(
                got.parent.as_ref().and_then(|p| p.span_id),
                span,
                "{pairs:?}"
            );
            assert_eq!(
                got.parent.as_ref().and_then(|p| p.sampled),
                sampled,
                "{pairs:?}"
            );
            assert_eq!(got.sampled_only, only, "{pairs:?}");
        }
        let got = extract(&headers(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        assert_eq!(got.parent.unwrap().tracestate.unwrap(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn sampling_honours_the_parent_and_is_consistent_per_trace() {
        assert!(sample(Some(true), &TRACE, 0.0));
        assert!(!sample(Some(false), &TRACE, 1.0));
        assert!(sample(None, &TRACE, 1.0));
        assert!(!sample(None, &TRACE, 0.0));
        // Same trace, same answer, at any proxy.
        let at = |rate| sample(None, &TRACE, rate);
        assert_eq!(at(0.5), at(0.5));
        // The share of sampled random traces matches the rate.
        let mut next = 1u64;
        let mut random = || {
            next = crate::rand::mix(next.wrapping_add(0x9e37_79b9_7f4a_7c15));
            next
        };
        for rate in [0.01, 0.1, 0.5] {
            let n = 20_000;
            let hits = (0..n)
                .filter(|_| child(&Incoming::default(), rate, &mut random).sampled)
                .count();
            let share = hits as f64 / n as f64;
            assert!((share - rate).abs() < 0.01 + rate * 0.2, "{rate}: {share}");
        }
    }

    #[test]
    fn a_child_continues_the_trace_and_is_written_in_the_formats_it_came_with() {
        let incoming = extract(&headers(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ]));
        let span = child(&incoming, 0.0, || 0x1122_3344_5566_7788);
        assert_eq!(span.trace_id, TRACE);
        assert_eq!(span.parent_id, Some(SPAN));
        assert!(span.sampled, "the parent's decision wins over the rate");
        let mut h = headers(&[
            ("x-b3-flags", "1"),
            ("x-b3-parentspanid", "0102030405060708"),
        ]);
        inject(&mut h, &span, incoming.formats);
        assert_eq!(
            h[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01"
        );
        assert_eq!(h[TRACESTATE], "congo=t61rcWkgMzE");
        assert_eq!(h[B3_TRACE_ID], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h[B3_SPAN_ID], "1122334455667788");
        assert_eq!(h[B3_PARENT_SPAN_ID], "00f067aa0ba902b7");
        assert_eq!(h[B3_SAMPLED], "1");
        assert!(!h.contains_key(B3_FLAGS) && !h.contains_key(B3));

        // No context: a new trace, written as W3C only.
        let fresh = Incoming::default();
        let span = child(&fresh, 1.0, || 7);
        assert_ne!(span.trace_id, [0; 16]);
        assert_eq!(span.parent_id, None);
        let mut h = HeaderMap::new();
        inject(&mut h, &span, fresh.formats);
        assert!(parse_traceparent(h[TRACEPARENT].as_bytes()).is_some());
        assert_eq!(h.len(), 1);

        // Single-header B3 in, single-header B3 out, with the parent.
        let incoming = extract(&headers(&[(
            "b3",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        )]));
        let span = child(&incoming, 1.0, || 9);
        assert!(!span.sampled);
        let mut h = HeaderMap::new();
        inject(&mut h, &span, incoming.formats);
        assert_eq!(
            h[B3],
            "4bf92f3577b34da6a3ce929d0e0e4736-0000000000000009-0-00f067aa0ba902b7"
        );
        assert_eq!(h.len(), 1);
    }
}
