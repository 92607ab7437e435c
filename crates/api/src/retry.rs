//! Retries: `BackendPolicy.spec.retry` (Trellis) and `HTTPRoute` `rules[].retry` (the Gateway
//! API's `HTTPRouteRetry`, GEP-1731).

use crate::Duration;
use serde::{Deserialize, Serialize};

/// A condition under which a failed try is sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// The connection to the endpoint could not be established.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection closed or was reset before any response.
    #[serde(rename = "reset")]
    Reset,
    /// Any 5xx response (and a per-try timeout).
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 or 504 (and a per-try timeout).
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// A status listed in `codes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

/// `BackendPolicy.spec.retry`: when and how often a request to this service is tried again.
/// Unset, every request still gets the defaults below (connect failures and resets of
/// idempotent requests, 2 retries, the budget on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Conditions that trigger a retry; default `[connect-failure, reset]`.
    #[serde(default = "default_on")]
    pub on: Vec<RetryOn>,
    /// Retries after the first try (as the Gateway API counts `attempts`); default 2, `0`
    /// disables retries.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// HTTP statuses retried with `retriable-status-codes` (400–599).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Exponential backoff between tries, with full jitter.
    #[serde(default)]
    pub backoff: RetryBackoff,
    /// gRPC statuses retried (by name, for example `UNAVAILABLE`), when the status comes in
    /// the response headers (a trailers-only response).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<String>,
    /// Retry every method, not only idempotent ones (GET, HEAD, OPTIONS, TRACE, PUT, DELETE).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_non_idempotent: bool,
    /// Request bodies up to this size are kept for replay; larger ones are streamed and not
    /// retried. Default 65536.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// How many retries the backend may see, relative to its requests.
    #[serde(default)]
    pub budget: RetryBudget,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            on: default_on(),
            attempts: default_attempts(),
            codes: Vec::new(),
            backoff: RetryBackoff::default(),
            grpc_statuses: Vec::new(),
            allow_non_idempotent: false,
            max_body_bytes: default_max_body(),
            budget: RetryBudget::default(),
        }
    }
}

fn default_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::Reset]
}

fn default_attempts() -> u32 {
    2
}

fn default_max_body() -> u64 {
    64 * 1024
}

/// Backoff before retry `n` (from 1): a random time up to `min(max, base × 2^(n-1))`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBackoff {
    /// Default `25ms`.
    #[serde(default = "default_base")]
    pub base: Duration,
    /// Default `250ms`; also the longest `Retry-After` honoured.
    #[serde(default = "default_max")]
    pub max: Duration,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            base: default_base(),
            max: default_max(),
        }
    }
}

fn default_base() -> Duration {
    Duration::from_millis(25)
}

fn default_max() -> Duration {
    Duration::from_millis(250)
}

/// Retries may add at most `ratio` of the backend's requests over `window`, plus
/// `minPerSecond` per second of it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Default 0.2.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Default 10.
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
    /// Default `10s`.
    #[serde(default = "default_window")]
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: default_ratio(),
            min_per_second: default_min_per_second(),
            window: default_window(),
        }
    }
}

fn default_ratio() -> f64 {
    0.2
}

fn default_min_per_second() -> u32 {
    10
}

fn default_window() -> Duration {
    Duration::from_secs(10)
}

/// `HTTPRoute` `rules[].retry`, as the Gateway API publishes it. It replaces the backend's
/// conditions (connect failures, resets and `codes`), count and backoff for this rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    /// HTTP statuses to retry (400–599).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Maximum number of retries (at least 1); the backend's (default 2) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Minimum wait between tries; later tries wait longer, up to the backend's `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

/// gRPC status codes by name (the gRPC `Code` enum), for `grpcStatuses`.
pub const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The numeric code of a gRPC status name.
pub fn grpc_status_code(name: &str) -> Option<u8> {
    GRPC_STATUSES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u8::try_from(i).ok())
}

impl RetryPolicy {
    /// What is wrong with this policy, as (field under `retry`, message) pairs.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let wants_codes = self.on.contains(&RetryOn::RetriableStatusCodes);
        if wants_codes && self.codes.is_empty() {
            out.push((
                "codes".into(),
                "required when `on` has retriable-status-codes".into(),
            ));
        }
        if !wants_codes && !self.codes.is_empty() {
            out.push((
                "on".into(),
                "add retriable-status-codes for `codes` to apply".into(),
            ));
        }
        out.extend(code_problems(&self.codes));
        if self.attempts > 10 {
            out.push(("attempts".into(), "at most 10".into()));
        }
        if self.backoff.base.get().is_zero() {
            out.push(("backoff.base".into(), "must be more than 0s".into()));
        }
        if self.backoff.max < self.backoff.base {
            out.push((
                "backoff.max".into(),
                "must not be less than backoff.base".into(),
            ));
        }
        for (i, s) in self.grpc_statuses.iter().enumerate() {
            if grpc_status_code(s).is_none_or(|c| c == 0) {
                out.push((
                    format!("grpcStatuses[{i}]"),
                    format!("{s:?} is not a gRPC error status (for example UNAVAILABLE)"),
                ));
            }
        }
        if self.max_body_bytes > 16 * 1024 * 1024 {
            out.push(("maxBodyBytes".into(), "at most 16777216 (16 MiB)".into()));
        }
        let b = &self.budget;
        if !(0.0..=10.0).contains(&b.ratio) {
            out.push(("budget.ratio".into(), "must be between 0 and 10".into()));
        }
        if b.window.get() < std::time::Duration::from_secs(1)
            || b.window.get() > std::time::Duration::from_secs(300)
        {
            out.push(("budget.window".into(), "must be between 1s and 300s".into()));
        }
        out
    }
}

impl HttpRouteRetry {
    /// What is wrong with this rule's retry, as (field under `retry`, message) pairs.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = code_problems(&self.codes);
        if self.attempts == Some(0) {
            // The Gateway API's minimum; a rule without `retry` keeps the backend's.
            out.push(("attempts".into(), "must be at least 1".into()));
        }
        if self.attempts.is_some_and(|a| a > 10) {
            out.push(("attempts".into(), "at most 10".into()));
        }
        if self.backoff.is_some_and(|b| b.get().is_zero()) {
            out.push(("backoff".into(), "must be more than 0s".into()));
        }
        out
    }
}

/// The Gateway API allows 400–599 (`HTTPRouteRetryStatusCode`).
fn code_problems(codes: &[u16]) -> Vec<(String, String)> {
    codes
        .iter()
        .enumerate()
        .filter(|(_, c)| !(400..=599).contains(*c))
        .map(|(i, c)| {
            (
                format!("codes[{i}]"),
                format!("{c} is not between 400 and 599"),
            )
        })
        .collect()
}
