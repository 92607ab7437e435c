//! gRPC deadlines: the `grpc-timeout` request header (gRPC over HTTP/2, PROTOCOL-HTTP2.md:
//! `TimeoutValue TimeoutUnit`, at most 8 ASCII digits and one of `H M S m u n`). A call's
//! deadline is the smaller of its own and the route's; each try carries the time left.

use http::HeaderValue;
use std::time::Duration;

/// The `grpc-timeout` header.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Reads a `grpc-timeout` value; `None` when malformed (then ignored, as gRPC servers do).
pub fn parse(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (digits, unit) = b.split_at(b.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes `d` in the finest unit that fits 8 digits, rounding down (the upstream should
/// give up no later than the proxy does).
pub fn format(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let nanos = d.as_nanos();
    for (per, unit) in units {
        let n = nanos / per;
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}"))
                .unwrap_or_else(|_| HeaderValue::from_static("0n"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The time a request may take: the route's timeout and the call's own, whichever is less.
pub fn effective(route: Option<Duration>, call: Option<Duration>) -> Option<Duration> {
    match (route, call) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}

/// How long one try may wait for its response head: until the request's deadline, or its
/// own timeout if that comes first. `None`: no limit.
pub fn try_limit(
    now: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
    per_try: Option<Duration>,
) -> Option<tokio::time::Instant> {
    let own = per_try.map(|t| now + t);
    match (deadline, own) {
        (Some(d), Some(o)) => Some(d.min(o)),
        (d, o) => d.or(o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn grpc_timeouts_parse() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("30S", Some(Duration::from_secs(30))),
            ("250m", Some(Duration::from_millis(250))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("5n", Some(Duration::from_nanos(5))),
            ("0m", Some(Duration::ZERO)),
            ("123456789S", None),
            ("S", None),
            ("10", None),
            ("10s", None),
            ("-1S", None),
            ("1.5S", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse(&HeaderValue::from_static(text)), *want, "{text:?}");
        }
    }

    #[test]
    fn grpc_timeouts_format_in_the_finest_unit_that_fits() {
        let cases = [
            (Duration::from_nanos(5), "5n"),
            (Duration::from_millis(50), "50000000n"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_millis(1_999), "1999000u"),
            (Duration::from_secs(200), "200000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(100_000_000 * 60), "1666666H"),
        ];
        for (d, want) in cases {
            let v = format(d);
            assert_eq!(v, want, "{d:?}");
            // Round trip, never longer than the original.
            let back = parse(&v).unwrap();
            assert!(
                back <= d && d - back < Duration::from_secs(3600),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn the_smaller_deadline_wins() {
        let s = |n| Some(Duration::from_secs(n));
        let cases = [
            (s(5), None, s(5)),
            (None, s(2), s(2)),
            (s(5), s(2), s(2)),
            (s(1), s(2), s(1)),
            (None, None, None),
        ];
        for (route, call, want) in cases {
            assert_eq!(effective(route, call), want, "{route:?} {call:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_ends_at_its_own_timeout_or_the_request_deadline() {
        let start = Instant::now();
        let s = Duration::from_secs;
        tokio::time::advance(s(3)).await;
        let now = Instant::now();
        let cases = [
            (Some(start + s(5)), Some(s(1)), Some(now + s(1))),
            (Some(start + s(5)), Some(s(4)), Some(start + s(5))),
            (Some(start + s(5)), None, Some(start + s(5))),
            (None, Some(s(4)), Some(now + s(4))),
            (None, None, None),
        ];
        for (deadline, per_try, want) in cases {
            assert_eq!(
                try_limit(now, deadline, per_try),
                want,
                "{deadline:?} {per_try:?}"
            );
        }
    }
}
