//! `BackendPolicy` fields that decide which endpoints are usable: passive outlier detection
//! (on by default) and active health checks (off unless configured).

use crate::Duration;
use serde::{Deserialize, Serialize};

/// Ejects endpoints that fail or are much slower than their peers, for a time that grows with
/// each repeated ejection. On by default; set a trigger to `0` (or `latency` to `null`) to
/// turn it off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint; `0` disables. Default 5.
    #[serde(default = "five", rename = "consecutive5xx")]
    pub consecutive_5xx: u32,
    /// Consecutive gateway failures (connect failure, reset, timeout, 502, 503, 504) that
    /// eject an endpoint; `0` disables. Default 5.
    #[serde(default = "five")]
    pub consecutive_gateway_errors: u32,
    /// Latency outliers: an endpoint whose latency average is above `factor` times the
    /// backend's median and above `minLatency` is ejected. Off (`null`) by default.
    #[serde(default)]
    pub latency: Option<LatencyOutlier>,
    /// How often an endpoint's latency is compared with its peers, and how long an endpoint
    /// must behave before its ejection count drops by one. Default `10s`.
    #[serde(default = "ten_seconds")]
    pub interval: Duration,
    /// Ejection time for a first ejection; the nth ejection lasts n times this. Default `30s`.
    #[serde(default = "thirty_seconds")]
    pub base_ejection_time: Duration,
    /// Cap on one ejection's time. Default `300s`.
    #[serde(default = "five_minutes")]
    pub max_ejection_time: Duration,
    /// Most endpoints of the backend ejected at once, in percent (rounded down); at least one
    /// endpoint always stays. Default 50.
    #[serde(default = "fifty")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: five(),
            consecutive_gateway_errors: five(),
            latency: None,
            interval: ten_seconds(),
            base_ejection_time: thirty_seconds(),
            max_ejection_time: five_minutes(),
            max_ejection_percent: fifty(),
        }
    }
}

/// The latency-outlier rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencyOutlier {
    /// How many times the backend's median latency an endpoint must exceed. Default 3.
    #[serde(default = "three")]
    pub factor: f64,
    /// Latency below which an endpoint is never an outlier, however its peers do. Default
    /// `100ms`.
    #[serde(default = "hundred_ms")]
    pub min_latency: Duration,
}

/// Active health checks from this proxy to each endpoint of the backend. Exactly one of
/// `http`, `grpc` and `tcp`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// `GET path`; healthy when the status is listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// The gRPC health protocol (`grpc.health.v1.Health/Check`); healthy when `SERVING`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheck>,
    /// A TCP connection (mutual TLS for endpoints with an identity); healthy when it opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// Time between checks of one endpoint. Default `10s`.
    #[serde(default = "ten_seconds")]
    pub interval: Duration,
    /// Time a check may take. Default `1s`.
    #[serde(default = "one_second")]
    pub timeout: Duration,
    /// Consecutive passes that mark an unhealthy endpoint healthy. Default 2.
    #[serde(default = "two")]
    pub healthy_threshold: u32,
    /// Consecutive failures that mark a healthy endpoint unhealthy. Default 3.
    #[serde(default = "three_u32")]
    pub unhealthy_threshold: u32,
    /// Random spread of each interval, in percent of it, so that checks from many proxies do
    /// not arrive together. Default 10.
    #[serde(default = "ten")]
    pub jitter: u32,
}

/// An HTTP health check.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    /// Path (and query) to GET. Default `/`.
    #[serde(default = "slash")]
    pub path: String,
    /// Statuses that pass; empty (the default) means any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}

/// A gRPC health check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcCheck {
    /// Service name asked about; empty (the default) asks about the server as a whole.
    #[serde(default)]
    pub service: String,
}

/// A TCP health check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

/// Problems with outlier detection and health check settings, as `(field under spec, message)`.
pub fn problems(
    outlier: &OutlierDetection,
    check: Option<&HealthCheck>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if outlier.max_ejection_percent > 100 {
        out.push((
            "spec.outlierDetection.maxEjectionPercent",
            format!("{} is above 100", outlier.max_ejection_percent),
        ));
    }
    if outlier.base_ejection_time.get().is_zero() {
        out.push((
            "spec.outlierDetection.baseEjectionTime",
            "must be above 0s".into(),
        ));
    }
    if outlier.max_ejection_time < outlier.base_ejection_time {
        out.push((
            "spec.outlierDetection.maxEjectionTime",
            "must be at least baseEjectionTime".into(),
        ));
    }
    if outlier.interval.get().is_zero() {
        out.push(("spec.outlierDetection.interval", "must be above 0s".into()));
    }
    if let Some(l) = &outlier.latency
        && !(l.factor > 1.0 && l.factor.is_finite())
    {
        out.push((
            "spec.outlierDetection.latency.factor",
            format!("{} must be above 1", l.factor),
        ));
    }
    let Some(c) = check else {
        return out;
    };
    let kinds = [c.http.is_some(), c.grpc.is_some(), c.tcp.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds != 1 {
        out.push((
            "spec.healthCheck",
            "set exactly one of http, grpc, tcp".into(),
        ));
    }
    if let Some(h) = &c.http {
        if !h.path.starts_with('/') || h.path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            out.push((
                "spec.healthCheck.http.path",
                format!("{:?} is not an absolute path", h.path),
            ));
        }
        if let Some(s) = h
            .expected_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            out.push((
                "spec.healthCheck.http.expectedStatuses",
                format!("{s} is not an HTTP status"),
            ));
        }
    }
    if c.interval.get().is_zero() {
        out.push(("spec.healthCheck.interval", "must be above 0s".into()));
    }
    if c.timeout.get().is_zero() {
        out.push(("spec.healthCheck.timeout", "must be above 0s".into()));
    }
    if c.healthy_threshold == 0 {
        out.push((
            "spec.healthCheck.healthyThreshold",
            "must be at least 1".into(),
        ));
    }
    if c.unhealthy_threshold == 0 {
        out.push((
            "spec.healthCheck.unhealthyThreshold",
            "must be at least 1".into(),
        ));
    }
    if c.jitter > 100 {
        out.push((
            "spec.healthCheck.jitter",
            format!("{}% is above 100%", c.jitter),
        ));
    }
    out
}

fn five() -> u32 {
    5
}
fn fifty() -> u32 {
    50
}
fn two() -> u32 {
    2
}
fn three_u32() -> u32 {
    3
}
fn ten() -> u32 {
    10
}
fn three() -> f64 {
    3.0
}
fn slash() -> String {
    "/".into()
}
fn hundred_ms() -> Duration {
    Duration::from_millis(100)
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
