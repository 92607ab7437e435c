//! Retries: which failed tries may be sent again, how long to wait first, and how many
//! retries a backend may see (its budget). Pure functions and one small state machine over
//! explicit inputs (policy, counters, `now`, a random number); the loop that uses them is
//! `http::forward`.

use crate::error::ProxyError;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use trellis_api::retry::{HttpRouteRetry, RetryBudget, RetryOn, RetryPolicy, grpc_status_code};

/// Conditions, as bits.
const CONNECT: u8 = 1;
const RESET: u8 = 2;
const SERVER_ERROR: u8 = 4;
const GATEWAY_ERROR: u8 = 8;
const CODES: u8 = 16;
/// A try that ran out of its own time (`timeouts.backendRequest`).
const TRY_TIMEOUT: u8 = 32;

/// A compiled retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    on: u8,
    codes: Box<[u16]>,
    /// gRPC statuses, one bit per code.
    grpc: u32,
    /// Retries after the first try.
    pub retries: u32,
    /// Waits between tries.
    pub backoff: Backoff,
    /// Every method may be retried, not only idempotent ones.
    pub all_methods: bool,
    /// Request bodies up to this size are kept for replay.
    pub max_body: u64,
}

/// Backoff before retry `n`: uniform in `[floor, min(max, base × 2^(n-1))]`. `floor` is zero
/// (full jitter) for a `BackendPolicy`, and the rule's `backoff` for an HTTPRoute rule, whose
/// value the Gateway API defines as the minimum wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First retry's ceiling.
    pub base: Duration,
    /// Largest wait, and the longest `Retry-After` honoured.
    pub max: Duration,
    /// Shortest wait.
    pub floor: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from_config(&RetryPolicy::default())
    }
}

impl Policy {
    /// A `BackendPolicy.spec.retry` (validated).
    pub fn from_config(c: &RetryPolicy) -> Policy {
        let mut on = 0;
        for o in &c.on {
            on |= match o {
                RetryOn::ConnectFailure => CONNECT,
                RetryOn::Reset => RESET,
                // Envoy's reading too: a try that timed out is a server-side failure.
                RetryOn::ServerError => SERVER_ERROR | TRY_TIMEOUT,
                RetryOn::GatewayError => GATEWAY_ERROR | TRY_TIMEOUT,
                RetryOn::RetriableStatusCodes => CODES,
            };
        }
        Policy {
            on,
            codes: c.codes.clone().into(),
            grpc: c
                .grpc_statuses
                .iter()
                .filter_map(|s| grpc_status_code(s))
                .fold(0, |m, c| m | 1 << c),
            retries: c.attempts,
            backoff: Backoff {
                base: c.backoff.base.get(),
                max: c.backoff.max.get(),
                floor: Duration::ZERO,
            },
            all_methods: c.allow_non_idempotent,
            max_body: c.max_body_bytes,
        }
    }

    /// An HTTPRoute rule's `retry` over the backend's policy: the rule replaces the
    /// conditions (connect failures, resets, try timeouts and its `codes`), the count and
    /// the backoff's minimum; the rest stays the backend's.
    pub fn for_rule(&self, r: &HttpRouteRetry) -> Policy {
        let base = r.backoff.map_or(self.backoff.base, |b| b.get());
        Policy {
            on: CONNECT | RESET | TRY_TIMEOUT | CODES,
            codes: r.codes.clone().into(),
            retries: r.attempts.unwrap_or(self.retries),
            backoff: Backoff {
                base,
                max: self.backoff.max.max(base),
                floor: if r.backoff.is_some() {
                    base
                } else {
                    Duration::ZERO
                },
            },
            ..self.clone()
        }
    }
}

/// What a try came back with, as far as retrying is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// No response head.
    Error(&'a ProxyError),
    /// A response head, with the gRPC status it carries (a trailers-only response).
    Response(StatusCode, Option<u8>),
}

/// Why a try is retried: the `reason` label of `trellis_retries_total`.
pub mod reason {
    /// The request never left the proxy (a pooled connection was found closed): always
    /// sent again, whatever the policy.
    pub const NOT_SENT: &str = "not_sent";
    /// Connecting failed.
    pub const CONNECT_FAILURE: &str = "connect_failure";
    /// Closed or reset before a response.
    pub const RESET: &str = "reset";
    /// The try's own timeout ran out.
    pub const TIMEOUT: &str = "timeout";
    /// A 5xx.
    pub const SERVER_ERROR: &str = "5xx";
    /// A 502, 503 or 504.
    pub const GATEWAY_ERROR: &str = "gateway_error";
    /// A listed status.
    pub const STATUS_CODE: &str = "status_code";
    /// A listed gRPC status.
    pub const GRPC: &str = "grpc";
}

/// Whether the policy retries this outcome, and why (the metric's reason). Checks neither
/// the method, the count, the time left nor the budget.
pub fn reason(p: &Policy, o: Outcome<'_>) -> Option<&'static str> {
    let on = |bit| p.on & bit != 0;
    match o {
        Outcome::Error(ProxyError::NotSent(..)) => Some(reason::NOT_SENT),
        Outcome::Error(ProxyError::Connect(..)) if on(CONNECT) => Some(reason::CONNECT_FAILURE),
        Outcome::Error(ProxyError::Closed(..)) if on(RESET) => Some(reason::RESET),
        Outcome::Error(ProxyError::Timeout(..)) if on(TRY_TIMEOUT) => Some(reason::TIMEOUT),
        Outcome::Error(_) => None,
        Outcome::Response(_, Some(g)) if g < 32 && p.grpc & (1 << g) != 0 => Some(reason::GRPC),
        Outcome::Response(s, _) => {
            let code = s.as_u16();
            if on(CODES) && p.codes.contains(&code) {
                Some(reason::STATUS_CODE)
            } else if on(GATEWAY_ERROR) && matches!(code, 502..=504) {
                Some(reason::GATEWAY_ERROR)
            } else if on(SERVER_ERROR) && s.is_server_error() {
                Some(reason::SERVER_ERROR)
            } else {
                None
            }
        }
    }
}

/// Whether a request with this method may be sent again for `why`. A request that never
/// reached the endpoint (connect failure, not sent) may always be; a gRPC status the policy
/// lists is its opt-in (gRPC calls are all POST); otherwise idempotent methods only (RFC
/// 9110 §9.2.2) unless the policy allows all.
pub fn method_allows(p: &Policy, method: &Method, why: &str) -> bool {
    why == reason::NOT_SENT
        || why == reason::CONNECT_FAILURE
        || why == reason::GRPC
        || p.all_methods
        || idempotent(method)
}

/// Whether a request could be retried after it reached an endpoint, so that keeping a copy
/// of it (its body) is worth it. Unsent requests need no copy.
pub fn may_replay(p: &Policy, method: &Method, grpc: bool) -> bool {
    p.retries > 0 && (p.all_methods || idempotent(method) || (grpc && p.grpc != 0))
}

/// Methods whose requests may be sent twice with the effect of once (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The wait before retry `n` (from 1), given a uniform random number.
pub fn backoff(b: &Backoff, n: u32, random: u64) -> Duration {
    let ceiling = b
        .base
        .saturating_mul(1 << n.saturating_sub(1).min(20))
        .min(b.max)
        .max(b.floor);
    let span = (ceiling - b.floor).as_nanos() as u64;
    b.floor + Duration::from_nanos(random % span.saturating_add(1))
}

/// The wait before retry `n`, or `None` when there is no time for it: the response's
/// `Retry-After` asks for longer than the backoff's `max`, or the wait would use up the
/// request's remaining time.
pub fn wait(
    b: &Backoff,
    n: u32,
    random: u64,
    retry_after: Option<Duration>,
    remaining: Option<Duration>,
) -> Option<Duration> {
    let mut d = backoff(b, n, random);
    if let Some(ra) = retry_after {
        if ra > b.max {
            return None;
        }
        d = d.max(ra);
    }
    remaining.is_none_or(|r| d < r).then_some(d)
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds, or an HTTP date (`now` is Unix time).
pub fn retry_after(v: &HeaderValue, now: jiff::Timestamp) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(s.parse().unwrap_or(u64::MAX)));
    }
    // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is an RFC 2822 date.
    let at = jiff::fmt::rfc2822::parse(s).ok()?.timestamp();
    let d = at.duration_since(now);
    Some(Duration::try_from(d).unwrap_or(Duration::ZERO))
}

/// The gRPC status of a trailers-only response (in its headers).
pub fn grpc_status(h: &HeaderMap) -> Option<u8> {
    let v = h.get("grpc-status")?.as_bytes();
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Buckets per budget window.
const BUCKETS: usize = 10;

/// A backend's retry budget: over a sliding window, retries may add at most `ratio` of its
/// requests plus `min_per_second` per second of the window.
#[derive(Debug)]
pub struct Budget {
    config: RetryBudget,
    ratio: f64,
    floor: f64,
    window: Mutex<Window>,
}

impl Budget {
    /// A budget from config, its window starting at `now`.
    pub fn new(c: &trellis_api::retry::RetryBudget, now: Instant) -> Budget {
        let window = c.window.get();
        Budget {
            config: *c,
            ratio: c.ratio,
            floor: f64::from(c.min_per_second) * window.as_secs_f64(),
            window: Mutex::new(Window::new(window, now)),
        }
    }

    /// Whether it was built from `c` (then a reload keeps it, with its counts).
    pub fn configured_as(&self, c: &RetryBudget) -> bool {
        self.config == *c
    }

    /// Counts a request.
    pub fn request(&self, now: Instant) {
        self.lock().add(now, 1, 0);
    }

    /// Takes one retry from the budget, if it has one.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut w = self.lock();
        let (requests, retries) = w.totals(now);
        let ok = admits(self.ratio, self.floor, requests, retries);
        if ok {
            w.add(now, 0, 1);
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether one more retry fits: retries stay within `ratio × requests + floor`.
pub fn admits(ratio: f64, floor: f64, requests: u64, retries: u64) -> bool {
    (retries + 1) as f64 <= ratio * requests as f64 + floor
}

/// Requests and retries counted in fixed buckets over a sliding window.
#[derive(Debug)]
pub struct Window {
    origin: Instant,
    bucket: Duration,
    /// Index of the newest bucket, in buckets since `origin`.
    head: u64,
    counts: [(u64, u64); BUCKETS],
}

impl Window {
    /// An empty window of length `len`.
    pub fn new(len: Duration, now: Instant) -> Window {
        Window {
            origin: now,
            bucket: (len / BUCKETS as u32).max(Duration::from_millis(1)),
            head: 0,
            counts: [(0, 0); BUCKETS],
        }
    }

    /// Moves the window to `now`, forgetting buckets that fell out of it.
    fn advance(&mut self, now: Instant) {
        let at = (now.saturating_duration_since(self.origin).as_nanos()
            / self.bucket.as_nanos().max(1)) as u64;
        if at <= self.head {
            return;
        }
        for i in (self.head + 1)..=at.min(self.head + BUCKETS as u64) {
            self.counts[(i % BUCKETS as u64) as usize] = (0, 0);
        }
        self.head = at;
    }

    /// Adds requests and retries at `now`.
    pub fn add(&mut self, now: Instant, requests: u64, retries: u64) {
        self.advance(now);
        let c = &mut self.counts[(self.head % BUCKETS as u64) as usize];
        c.0 += requests;
        c.1 += retries;
    }

    /// Requests and retries in the window ending at `now`.
    pub fn totals(&mut self, now: Instant) -> (u64, u64) {
        self.advance(now);
        self.counts
            .iter()
            .fold((0, 0), |(a, b), (r, t)| (a + r, b + t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    fn policy(yaml: &str) -> Policy {
        Policy::from_config(&serde_saphyr::from_str(yaml).unwrap())
    }

    #[test]
    fn which_outcomes_are_retried() {
        let connect = ProxyError::Connect(addr(), "refused".into());
        let not_sent = ProxyError::NotSent(addr(), "closed".into());
        let closed = ProxyError::Closed(addr(), "reset".into());
        let timeout = ProxyError::Timeout(Duration::from_secs(1));
        let protocol = ProxyError::UpstreamProtocol(addr(), "bad".into());
        let s = |c: u16| Outcome::Response(StatusCode::from_u16(c).unwrap(), None);
        let grpc = |g: u8| Outcome::Response(StatusCode::OK, Some(g));
        let e = Outcome::Error;
        let default = Policy::default();
        let fivexx = policy("on: [5xx]");
        let gateway = policy("on: [gateway-error]");
        let codes = policy("on: [retriable-status-codes]\ncodes: [429, 503]");
        let grpc_p = policy("on: []\ngrpcStatuses: [UNAVAILABLE, RESOURCE_EXHAUSTED]");
        let rule = default.for_rule(&HttpRouteRetry {
            codes: vec![500],
            ..Default::default()
        });
        use reason::*;
        let cases: &[(&Policy, Outcome, Option<&str>)] = &[
            (&default, e(&connect), Some(CONNECT_FAILURE)),
            (&default, e(&not_sent), Some(NOT_SENT)),
            (&default, e(&closed), Some(RESET)),
            (&default, e(&timeout), None),
            (&default, e(&protocol), None),
            (&default, s(503), None),
            (&default, s(200), None),
            (&fivexx, e(&connect), None),
            (&fivexx, e(&not_sent), Some(NOT_SENT)),
            (&fivexx, e(&timeout), Some(TIMEOUT)),
            (&fivexx, s(500), Some(SERVER_ERROR)),
            (&fivexx, s(503), Some(SERVER_ERROR)),
            (&fivexx, s(429), None),
            (&fivexx, s(404), None),
            (&gateway, s(500), None),
            (&gateway, s(502), Some(GATEWAY_ERROR)),
            (&gateway, s(504), Some(GATEWAY_ERROR)),
            (&gateway, e(&timeout), Some(TIMEOUT)),
            (&codes, s(429), Some(STATUS_CODE)),
            (&codes, s(503), Some(STATUS_CODE)),
            (&codes, s(500), None),
            (&grpc_p, grpc(14), Some(GRPC)),
            (&grpc_p, grpc(8), Some(GRPC)),
            (&grpc_p, grpc(13), None),
            (&grpc_p, grpc(0), None),
            (&grpc_p, s(503), None),
            (&rule, s(500), Some(STATUS_CODE)),
            (&rule, s(503), None),
            (&rule, e(&connect), Some(CONNECT_FAILURE)),
            (&rule, e(&closed), Some(RESET)),
            (&rule, e(&timeout), Some(TIMEOUT)),
        ];
        for (i, (p, o, want)) in cases.iter().enumerate() {
            assert_eq!(reason(p, *o), *want, "case {i}: {o:?}");
        }
    }

    #[test]
    fn which_methods_may_be_sent_again() {
        let strict = Policy::default();
        let all = policy("allowNonIdempotent: true");
        use reason::*;
        let cases: &[(&Policy, Method, &str, bool)] = &[
            (&strict, Method::GET, RESET, true),
            (&strict, Method::PUT, SERVER_ERROR, true),
            (&strict, Method::DELETE, RESET, true),
            (&strict, Method::POST, RESET, false),
            (&strict, Method::PATCH, SERVER_ERROR, false),
            (&strict, Method::POST, CONNECT_FAILURE, true),
            (&strict, Method::POST, NOT_SENT, true),
            (&strict, Method::POST, GRPC, true),
            (&all, Method::POST, RESET, true),
            (&all, Method::PATCH, TIMEOUT, true),
        ];
        for (p, m, why, want) in cases {
            assert_eq!(method_allows(p, m, why), *want, "{m} {why}");
        }
        let grpc = policy("grpcStatuses: [UNAVAILABLE]");
        let none = policy("attempts: 0\nallowNonIdempotent: true");
        let cases: &[(&Policy, Method, bool, bool)] = &[
            (&strict, Method::GET, false, true),
            (&strict, Method::POST, false, false),
            (&strict, Method::POST, true, false),
            (&grpc, Method::POST, true, true),
            (&grpc, Method::POST, false, false),
            (&all, Method::PATCH, false, true),
            (&none, Method::GET, false, false),
        ];
        for (p, m, grpc, want) in cases {
            assert_eq!(may_replay(p, m, *grpc), *want, "{m} grpc={grpc}");
        }
    }

    #[test]
    fn backoff_is_exponential_with_full_jitter_up_to_max() {
        let b = Backoff {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
            floor: Duration::ZERO,
        };
        let ms = Duration::from_millis;
        // (retry, random, want): random 0 is the shortest wait, u64::MAX % (span+1) lands in it.
        let cases = [
            (1, 0, ms(0)),
            (1, 25_000_000, ms(25)),
            (1, 25_000_001, ms(0)),
            (2, 50_000_000, ms(50)),
            (3, 100_000_000, ms(100)),
            (4, 200_000_000, ms(200)),
            (5, 250_000_000, ms(250)),
            (30, 250_000_000, ms(250)),
        ];
        for (n, r, want) in cases {
            assert_eq!(backoff(&b, n, r), want, "retry {n} random {r}");
        }
        for n in 1..10 {
            for r in [1, 7, 1 << 40, u64::MAX] {
                assert!(backoff(&b, n, r) <= ms(250));
            }
        }
        // A route's `backoff` is a minimum.
        let floor = Backoff {
            floor: ms(100),
            base: ms(100),
            max: ms(250),
        };
        for (n, r) in [(1, 0), (1, u64::MAX), (2, 0), (3, 123_456_789)] {
            let d = backoff(&floor, n, r);
            assert!(d >= ms(100) && d <= ms(250), "{n}: {d:?}");
        }
        assert_eq!(backoff(&floor, 1, 999), ms(100));
    }

    #[test]
    fn retry_after_is_honoured_within_max_and_the_deadline() {
        let b = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(2),
            floor: Duration::ZERO,
        };
        let s = Duration::from_secs;
        let cases = [
            (None, None, Some(Duration::ZERO)),
            (Some(s(1)), None, Some(s(1))),
            (Some(s(2)), None, Some(s(2))),
            (Some(s(3)), None, None),
            (Some(s(1)), Some(s(5)), Some(s(1))),
            (Some(s(1)), Some(s(1)), None),
            (None, Some(Duration::ZERO), None),
        ];
        for (ra, remaining, want) in cases {
            assert_eq!(wait(&b, 1, 0, ra, remaining), want, "{ra:?} {remaining:?}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now: jiff::Timestamp = "2026-11-29T21:00:00Z".parse().unwrap();
        let v = |s: &'static str| HeaderValue::from_static(s);
        let cases = [
            ("3", Some(Duration::from_secs(3))),
            (" 0 ", Some(Duration::ZERO)),
            (
                "Sun, 29 Nov 2026 21:00:05 GMT",
                Some(Duration::from_secs(5)),
            ),
            ("Sun, 29 Nov 2026 20:59:00 GMT", Some(Duration::ZERO)),
            ("-1", None),
            ("soon", None),
            ("1.5", None),
        ];
        for (text, want) in cases {
            assert_eq!(retry_after(&v(text), now), want, "{text}");
        }
    }

    #[test]
    fn budget_arithmetic() {
        // (ratio, floor, requests, retries so far, admitted)
        let cases = [
            (0.2, 100.0, 0, 0, true),
            (0.2, 100.0, 0, 99, true),
            (0.2, 100.0, 0, 100, false),
            (0.2, 100.0, 1000, 299, true),
            (0.2, 100.0, 1000, 300, false),
            (0.0, 0.0, 1000, 0, false),
            (1.0, 0.0, 10, 9, true),
            (1.0, 0.0, 10, 10, false),
        ];
        for (ratio, floor, req, ret, want) in cases {
            assert_eq!(
                admits(ratio, floor, req, ret),
                want,
                "{ratio} {floor} {req} {ret}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_as_the_window_slides() {
        let cfg = RetryBudget {
            ratio: 0.5,
            min_per_second: 1,
            window: trellis_api::Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let b = Budget::new(&cfg, t0);
        // Floor: 1/s over 10 s = 10 retries with no requests.
        let granted = (0..20).filter(|_| b.try_retry(t0)).count();
        assert_eq!(granted, 10);
        // 20 requests add 10 more.
        for _ in 0..20 {
            b.request(t0);
        }
        assert_eq!((0..20).filter(|_| b.try_retry(t0)).count(), 10);
        // Half a window later nothing has left it.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.try_retry(Instant::now()));
        // A whole window later everything has: the floor again.
        tokio::time::advance(Duration::from_secs(6)).await;
        let now = Instant::now();
        assert_eq!((0..20).filter(|_| b.try_retry(now)).count(), 10);
        // Long idle periods skip many buckets at once.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let mut w = Window::new(Duration::from_secs(10), t0);
        w.add(t0, 5, 1);
        assert_eq!(w.totals(t0 + Duration::from_millis(9_999)), (5, 1));
        assert_eq!(w.totals(Instant::now()), (0, 0));
    }
}
