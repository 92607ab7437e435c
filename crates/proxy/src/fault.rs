//! Fault injection: a `FaultInjection` referenced by a route rule delays and/or aborts a
//! share of the rule's requests, right after routing and before anything is forwarded, so a
//! team can rehearse one dependency's outage for one class of traffic (the rule's matches).
//!
//! Which requests are faulted is a pure function of two uniform draws ([`Fault::sample`]);
//! the delay runs on tokio's clock and counts against the route's request timeout, as a
//! slow upstream would.

use crate::body::{self, Body};
use crate::error::ProxyError;
use http::{HeaderValue, Response, StatusCode};
use std::time::Duration;
use tokio::time::Instant;

/// Draws are uniform in `0..SCALE`; shares are kept in millionths (percent to four decimals).
pub const SCALE: u32 = 1_000_000;

/// What an aborted request is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status (gRPC requests get the matching gRPC status).
    Http(StatusCode),
    /// This gRPC status code (plain HTTP requests get the matching HTTP status).
    Grpc(u16),
}

/// A compiled `FaultInjection`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// A delay and the share of requests (millionths) it applies to.
    pub delay: Option<(Duration, u32)>,
    /// An abort and the share of requests (millionths) it applies to.
    pub abort: Option<(Abort, u32)>,
}

/// What happens to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Hold the request this long first.
    pub delay: Option<Duration>,
    /// Then answer it with this instead of forwarding it.
    pub abort: Option<Abort>,
}

/// A percentage (0–100, validated) as millionths.
pub fn per_million(percentage: f64) -> u32 {
    (percentage * 10_000.0).round().clamp(0.0, f64::from(SCALE)) as u32
}

impl Fault {
    /// Compiles a validated spec.
    pub fn new(spec: &trellis_api::fault::FaultInjectionSpec) -> Fault {
        Fault {
            delay: spec
                .delay
                .as_ref()
                .map(|d| (d.fixed_delay.get(), per_million(d.percentage))),
            abort: spec.abort.as_ref().map(|a| {
                let abort = match (a.http_status, a.grpc_status) {
                    (_, Some(code)) => Abort::Grpc(code),
                    (Some(s), None) => Abort::Http(
                        StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    ),
                    (None, None) => Abort::Http(StatusCode::SERVICE_UNAVAILABLE),
                };
                (abort, per_million(a.percentage))
            }),
        }
    }

    /// The fault for one request, given two independent uniform draws in `0..SCALE`
    /// (pure). A request is delayed when its delay draw falls below the delay's share, and
    /// aborted when its abort draw falls below the abort's share.
    pub fn sample(&self, delay_draw: u32, abort_draw: u32) -> Injected {
        Injected {
            delay: self
                .delay
                .and_then(|(d, share)| (delay_draw < share).then_some(d)),
            abort: self
                .abort
                .and_then(|(a, share)| (abort_draw < share).then_some(a)),
        }
    }
}

/// The gRPC status for an HTTP status, as gRPC clients map them (gRPC's
/// http-grpc-status-mapping.md).
pub fn grpc_for_http(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// The HTTP status for a gRPC status (the usual gateway mapping).
pub fn http_for_grpc(code: u16) -> StatusCode {
    match code {
        1 => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The answer to an aborted request: a trailers-only response for gRPC, else the status
/// with a short body. Both say it was injected, so nobody debugs a rehearsal as an outage.
pub fn response(abort: Abort, grpc: bool) -> Response<Body> {
    const REASON: &str = "fault injected";
    let mut resp = if grpc {
        let code = match abort {
            Abort::Grpc(c) => c,
            Abort::Http(s) => grpc_for_http(s),
        };
        let mut r = Response::new(body::empty());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        h.insert("grpc-message", HeaderValue::from_static(REASON));
        r
    } else {
        let status = match abort {
            Abort::Http(s) => s,
            Abort::Grpc(c) => http_for_grpc(c),
        };
        let mut r = Response::new(body::full(format!("{REASON}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert(crate::ERROR_HEADER, HeaderValue::from_static(REASON));
    resp
}

/// Applies `fault` to one request of `route`: waits out a sampled delay (or fails with a
/// timeout at `deadline`, the route's request timeout), then returns the abort response
/// if one is sampled. `Ok(None)`: forward the request.
pub async fn inject(
    fault: &Fault,
    route: &std::sync::Arc<str>,
    grpc: bool,
    deadline: Option<(Instant, Duration)>,
    metrics: &crate::metrics::Metrics,
) -> Result<Option<Response<Body>>, ProxyError> {
    let draw = || crate::rand::below(u64::from(SCALE)) as u32;
    let injected = fault.sample(draw(), draw());
    if let Some(d) = injected.delay {
        metrics.fault(route, "delay");
        let until = Instant::now() + d;
        match deadline {
            Some((at, timeout)) if at < until => {
                tokio::time::sleep_until(at).await;
                return Err(ProxyError::Timeout(timeout));
            }
            _ => tokio::time::sleep_until(until).await,
        }
    }
    Ok(injected.abort.map(|a| {
        metrics.fault(route, "abort");
        response(a, grpc)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn sampling_compares_each_draw_with_its_share() {
        let both = Fault {
            delay: Some((MS, per_million(25.0))),
            abort: Some((Abort::Grpc(14), per_million(0.5))),
        };
        let abort = Some(Abort::Grpc(14));
        // (fault, delay draw, abort draw, result)
        let cases = [
            (&both, 0, 0, Some(MS), abort),
            (&both, 249_999, 4_999, Some(MS), abort),
            (&both, 250_000, 4_999, None, abort),
            (&both, 249_999, 5_000, Some(MS), None),
            (&both, SCALE - 1, SCALE - 1, None, None),
        ];
        for (f, d, a, delay, abort) in cases {
            assert_eq!(f.sample(d, a), Injected { delay, abort }, "{d} {a}");
        }
        let never = Fault {
            delay: Some((MS, 0)),
            abort: Some((Abort::Http(StatusCode::BAD_GATEWAY), 0)),
        };
        let always = Fault {
            delay: Some((MS, SCALE)),
            abort: Some((Abort::Http(StatusCode::BAD_GATEWAY), SCALE)),
        };
        for draw in [0, 1, SCALE / 2, SCALE - 1] {
            assert_eq!(never.sample(draw, draw), Injected::default());
            assert_eq!(
                always.sample(draw, draw),
                Injected {
                    delay: Some(MS),
                    abort: Some(Abort::Http(StatusCode::BAD_GATEWAY))
                }
            );
        }
    }

    #[test]
    fn percentages_become_millionths() {
        let cases = [
            (0.0, 0),
            (0.0001, 1),
            (0.01, 100),
            (0.5, 5_000),
            (30.0, 300_000),
            (99.9999, 999_999),
            (100.0, SCALE),
        ];
        for (pct, want) in cases {
            assert_eq!(per_million(pct), want, "{pct}");
        }
    }

    #[test]
    fn aborts_answer_in_the_request_protocol() {
        let text = |r: &Response<Body>, n: &str| {
            r.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        // (abort, gRPC request, HTTP status, grpc-status)
        let cases = [
            (Abort::Http(StatusCode::SERVICE_UNAVAILABLE), false, 503, ""),
            (
                Abort::Http(StatusCode::SERVICE_UNAVAILABLE),
                true,
                200,
                "14",
            ),
            (Abort::Http(StatusCode::NOT_FOUND), true, 200, "12"),
            (Abort::Http(StatusCode::IM_A_TEAPOT), true, 200, "2"),
            (Abort::Grpc(8), true, 200, "8"),
            (Abort::Grpc(8), false, 429, ""),
            (Abort::Grpc(4), false, 504, ""),
            (Abort::Grpc(13), false, 500, ""),
        ];
        for (abort, grpc, status, code) in cases {
            let r = response(abort, grpc);
            assert_eq!(r.status().as_u16(), status, "{abort:?} grpc={grpc}");
            assert_eq!(text(&r, "grpc-status"), code, "{abort:?} grpc={grpc}");
            assert_eq!(text(&r, crate::ERROR_HEADER), "fault injected");
            if grpc {
                // Trailers-only: the status is in the head, and there is no body.
                assert_eq!(text(&r, "content-type"), "application/grpc");
                assert!(http_body::Body::is_end_stream(r.body()));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_request_on_the_clock_within_the_timeout() {
        let m = crate::metrics::Metrics::default();
        let route: std::sync::Arc<str> = "default/r/0".into();
        let delay = Fault {
            delay: Some((Duration::from_secs(2), SCALE)),
            abort: None,
        };
        let t0 = Instant::now();
        assert!(
            inject(&delay, &route, false, None, &m)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        // A route timeout shorter than the delay: a timeout when it expires, as a slow
        // upstream would give.
        let t0 = Instant::now();
        let timeout = Duration::from_millis(500);
        let e = inject(&delay, &route, false, Some((t0 + timeout, timeout)), &m)
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::Timeout(_)), "{e}");
        assert_eq!(t0.elapsed(), timeout);
        // Delay then abort.
        let both = Fault {
            delay: Some((Duration::from_secs(1), SCALE)),
            abort: Some((Abort::Http(StatusCode::BAD_GATEWAY), SCALE)),
        };
        let t0 = Instant::now();
        let r = inject(&both, &route, false, None, &m)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        let count = |kind| {
            m.faults
                .get_or_create(&crate::metrics::FaultLabels {
                    route: route.clone(),
                    kind,
                })
                .get()
        };
        assert_eq!((count("delay"), count("abort")), (3, 1));
    }
}
