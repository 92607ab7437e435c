//! The fleet view on the config API (admin token required, like every `/v1/` read):
//! `GET /v1/stats` (JSON) and `GET /v1/tap` (newline-delimited JSON, streamed until the tap
//! ends by itself).

use crate::Control;
use crate::fleet::{Query, TapLine, TapSpec};
use axum::Json;
use axum::extract::{Query as Params, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use trellis_api::wire;

/// The default window of `GET /v1/stats`.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// The longest a tap runs, and the most events it shows.
pub const MAX_TAP_DURATION: Duration = Duration::from_secs(600);
/// The most events one tap shows.
pub const MAX_TAP_EVENTS: u64 = 100_000;

fn bad(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(crate::http::ErrorBody {
            errors: vec![message],
        }),
    )
        .into_response()
}

fn duration(
    name: &str,
    value: Option<&str>,
    default: Duration,
    max: Duration,
) -> Result<Duration, String> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(default);
    };
    let d = trellis_api::duration::parse(v)
        .map(|d| d.get())
        .map_err(|e| format!("{name}: {e}"))?;
    if d.is_zero() || d > max {
        return Err(format!("{name} {v}: between 1s and {}s", max.as_secs()));
    }
    Ok(d)
}

/// Parameters of `GET /v1/stats`.
#[derive(Deserialize, Default)]
pub(crate) struct StatsParams {
    window: Option<String>,
    namespace: Option<String>,
    service: Option<String>,
    route: Option<String>,
}

fn some(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

pub(crate) async fn stats(
    State(c): State<Arc<Control>>,
    Params(p): Params<StatsParams>,
) -> Response {
    let window = match duration(
        "window",
        p.window.as_deref(),
        DEFAULT_WINDOW,
        crate::fleet::MAX_WINDOW,
    ) {
        Ok(w) => w,
        Err(e) => return bad(e),
    };
    let q = Query {
        namespace: some(p.namespace),
        service: some(p.service),
        route: some(p.route),
    };
    let mut view = c.fleet.view(window, &q, tokio::time::Instant::now());
    // An instance belongs to the service it registered as; a backend may be a subset
    // Service of it (a canary's `payment-v2`), so the registry decides, by address.
    let state = c.state();
    let mine: std::collections::HashSet<&str> = state
        .workloads
        .values()
        .filter(|w| q.namespace.as_ref().is_none_or(|n| *n == w.namespace))
        .filter(|w| q.service.as_ref().is_none_or(|s| *s == w.service))
        .map(|w| w.address.as_str())
        .collect();
    if q.namespace.is_some() || q.service.is_some() {
        view.instances.retain(|r| mine.contains(r.address.as_str()));
    }
    Json(view).into_response()
}

/// Parameters of `GET /v1/stats/history`.
#[derive(Deserialize, Default)]
pub(crate) struct HistoryParams {
    window: Option<String>,
    step: Option<String>,
    namespace: Option<String>,
    service: Option<String>,
    route: Option<String>,
}

/// The default window and step of `GET /v1/stats/history`.
pub const DEFAULT_HISTORY: (Duration, Duration) =
    (Duration::from_secs(300), Duration::from_secs(10));

/// `GET /v1/stats/history`: the stats view in slices (`step`, default 10s) over the last
/// `window` (default 5m), oldest first, for sparklines.
pub(crate) async fn history(
    State(c): State<Arc<Control>>,
    Params(p): Params<HistoryParams>,
) -> Response {
    let window = match duration(
        "window",
        p.window.as_deref(),
        DEFAULT_HISTORY.0,
        crate::fleet::MAX_WINDOW,
    ) {
        Ok(w) => w,
        Err(e) => return bad(e),
    };
    let step = match duration("step", p.step.as_deref(), DEFAULT_HISTORY.1, window) {
        Ok(s) => s,
        Err(e) => return bad(e),
    };
    // Bounded work per request: at most 120 slices.
    if window.as_secs_f64() / step.as_secs_f64() > 120.0 {
        return bad(format!(
            "window {}s / step {}s: at most 120 slices",
            window.as_secs(),
            step.as_secs()
        ));
    }
    let q = Query {
        namespace: some(p.namespace),
        service: some(p.service),
        route: some(p.route),
    };
    let points = c
        .fleet
        .history(window, step, &q, tokio::time::Instant::now());
    Json(serde_json::json!({
        "windowSeconds": window.as_secs_f64(),
        "stepSeconds": step.as_secs_f64(),
        "points": points,
    }))
    .into_response()
}

/// Parameters of `GET /v1/tap`.
#[derive(Deserialize, Default)]
pub(crate) struct TapParams {
    namespace: Option<String>,
    service: Option<String>,
    route: Option<String>,
    path: Option<String>,
    method: Option<String>,
    status: Option<String>,
    direction: Option<String>,
    #[serde(default)]
    headers: bool,
    /// Comma-separated header names to redact besides the built-in ones.
    redact: Option<String>,
    max: Option<u64>,
    duration: Option<String>,
}

pub(crate) async fn tap(State(c): State<Arc<Control>>, Params(p): Params<TapParams>) -> Response {
    let status = p.status.clone().unwrap_or_default();
    if let Err(e) = crate::fleet::check_status(&status) {
        return bad(e);
    }
    let direction = p.direction.clone().unwrap_or_default();
    if !["", "inbound", "outbound"].contains(&direction.as_str()) {
        return bad(format!("direction {direction:?}: inbound or outbound"));
    }
    // The tap's client sends nothing while it reads: the connection's idle timeout
    // (`trellis control --idle-timeout`) would cut a longer tap.
    let longest = MAX_TAP_DURATION.min(
        c.settings
            .limits
            .idle_timeout
            .saturating_sub(Duration::from_secs(5))
            .max(Duration::from_secs(1)),
    );
    let limit = match duration(
        "duration",
        p.duration.as_deref(),
        Duration::from_secs(30).min(longest),
        longest,
    ) {
        Ok(d) => d,
        Err(e) => return bad(e),
    };
    let max = p.max.unwrap_or(100);
    if max == 0 || max > MAX_TAP_EVENTS {
        return bad(format!("max {max}: between 1 and {MAX_TAP_EVENTS}"));
    }
    let spec = TapSpec {
        namespace: some(p.namespace),
        service: some(p.service),
        request: wire::TapRequest {
            id: String::new(),
            route: p.route.unwrap_or_default(),
            path_prefix: p.path.unwrap_or_default(),
            method: p.method.unwrap_or_default(),
            status,
            headers: p.headers,
            redact: p
                .redact
                .unwrap_or_default()
                .split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            direction,
        },
    };
    let proxies = c.fleet.reach(&spec);
    let handle = c.fleet.open_tap(spec);
    let deadline = tokio::time::Instant::now() + limit;
    let line = |l: &TapLine| {
        let mut v = serde_json::to_vec(l).unwrap_or_default();
        v.push(b'\n');
        Ok::<Bytes, std::convert::Infallible>(Bytes::from(v))
    };
    let first = line(&TapLine::Started { proxies });
    // State: the tap (dropping it closes it on every proxy; none once the end line is
    // out) and the events sent.
    let state = (Some(handle), 0u64);
    let events = futures_util::stream::unfold(state, move |(handle, sent)| async move {
        let mut handle = handle?;
        let reason = if sent >= max {
            "max"
        } else {
            tokio::select! {
                e = handle.events.recv() => match e {
                    Some(e) => {
                        return Some((line(&TapLine::Event(Box::new(e))), (Some(handle), sent + 1)));
                    }
                    None => "closed",
                },
                () = tokio::time::sleep_until(deadline) => "duration",
            }
        };
        let end = TapLine::End {
            events: sent,
            dropped: handle.dropped.load(Ordering::Relaxed),
            reason: reason.into(),
        };
        drop(handle);
        Some((line(&end), (None, sent)))
    });
    let body = futures_util::StreamExt::chain(futures_util::stream::iter([first]), events);
    (
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_default_and_stay_within_bounds() {
        let (d, max) = (Duration::from_secs(30), Duration::from_secs(115));
        for (value, want) in [
            (None, Ok(d)),
            (Some(""), Ok(d)),
            (Some("10s"), Ok(Duration::from_secs(10))),
            (Some("1500ms"), Ok(Duration::from_millis(1500))),
            (Some("115s"), Ok(max)),
        ] {
            assert_eq!(duration("duration", value, d, max), want, "{value:?}");
        }
        for bad in ["116s", "0s", "soon"] {
            assert!(duration("duration", Some(bad), d, max).is_err(), "{bad}");
        }
    }
}
