//! `Telemetry`: distributed tracing and access logs for the sidecars of the mesh (namespace
//! `default`), of one namespace, or of one service (`spec.service`). The most specific
//! `Telemetry` that sets a block wins for that block: a service's `accessLog` replaces its
//! namespace's, which replaces the mesh's; blocks are never merged field by field.

use crate::Duration;
use serde::{Deserialize, Serialize};

/// `spec` of a `Telemetry`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    /// Only the sidecars of this service (in the resource's namespace). Omitted: every
    /// sidecar of the namespace (of the mesh, in namespace `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Spans, their sampling and their export. Omitted: inherited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// One JSON line per request. Omitted: inherited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLog>,
}

/// Tracing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// `false` turns tracing off here (the proxy then neither records nor propagates).
    /// Default `true`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The OTLP collector, `http://HOST:PORT` (plaintext; conventionally 4317 for gRPC and
    /// 4318 for HTTP). Required when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// `grpc` or `http/protobuf`. Default `grpc`.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded, 0-100. A caller's own decision (a sampled or unsampled
    /// parent) is always honoured. Default `1`.
    #[serde(default = "one")]
    pub sampling_percent: f64,
    /// Formats written on requests that arrive without a trace context (a request that
    /// carries one is passed on in the formats it came with). Default `[w3c]`.
    #[serde(default = "w3c")]
    pub propagation: Vec<Propagation>,
    /// Finished spans waiting for export at most; more are dropped and counted.
    /// Default `2048`.
    #[serde(default = "queue")]
    pub queue_size: u32,
    /// Spans per export request at most. Default `512`.
    #[serde(default = "batch")]
    pub batch_size: u32,
    /// Longest a span waits for its batch to fill. Default `1s`.
    #[serde(default = "flush")]
    pub flush_interval: Duration,
}

/// How spans reach the collector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// A trace-context propagation format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Propagation {
    /// W3C `traceparent` and `tracestate`.
    #[serde(rename = "w3c")]
    W3c,
    /// Zipkin B3, single `b3` header.
    #[serde(rename = "b3")]
    B3,
    /// Zipkin B3, `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-ParentSpanId`, `X-B3-Sampled`.
    #[serde(rename = "b3multi")]
    B3Multi,
}

/// Access log settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLog {
    /// `false` turns access logs off here. Default `true`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `stdout`, or an absolute file path (appended to). Default `stdout`.
    #[serde(default = "stdout")]
    pub path: String,
    /// The fields each line carries, from [`ACCESS_LOG_FIELDS`]. Empty or omitted: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// Lines waiting for the disk at most; more are dropped and counted. Default `4096`.
    #[serde(default = "log_queue")]
    pub queue_size: u32,
}

/// The access log's fields, as named in a line and in `fields`.
pub const ACCESS_LOG_FIELDS: &[&str] = &[
    "start_time",
    "trace_id",
    "span_id",
    "request_id",
    "direction",
    "client",
    "peer_identity",
    "method",
    "authority",
    "path",
    "protocol",
    "status",
    "grpc_status",
    "route",
    "backend",
    "upstream",
    "reason",
    "policy",
    "request_bytes",
    "response_bytes",
    "upstream_ms",
    "duration_ms",
];

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn w3c() -> Vec<Propagation> {
    vec![Propagation::W3c]
}
fn queue() -> u32 {
    2048
}
fn batch() -> u32 {
    512
}
fn flush() -> Duration {
    Duration::from_secs(1)
}
fn stdout() -> String {
    "stdout".into()
}
fn log_queue() -> u32 {
    4096
}

/// Whether `c` is `http://HOST:PORT` (a trailing `/` allowed), the collector form the
/// exporter speaks.
pub fn collector_ok(c: &str) -> bool {
    let Some(rest) = c.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = authority.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Largest accepted queue: bounded memory, whatever the config says.
pub const MAX_QUEUE: u32 = 1 << 20;

/// The `Telemetry` blocks that apply to a sidecar of `service` (when it serves one) in
/// `namespace`: for each block, the one of the most specific resource that sets it. `all`
/// yields `(namespace, spec)` of every `Telemetry` known.
pub fn select<'a>(
    all: impl IntoIterator<Item = (&'a str, &'a TelemetrySpec)>,
    namespace: &str,
    service: Option<&str>,
) -> (Option<&'a Tracing>, Option<&'a AccessLog>) {
    // 3: this service, 2: this namespace, 1: the mesh; 0: does not apply.
    let rank = |ns: &str, s: &TelemetrySpec| match (&s.service, service) {
        (Some(want), Some(own)) if ns == namespace && want == own => 3,
        (Some(_), _) => 0,
        (None, _) if ns == namespace => 2,
        (None, _) if ns == "default" => 1,
        _ => 0,
    };
    let mut tracing = (0, None);
    let mut log = (0, None);
    for (ns, s) in all {
        let r = rank(ns, s);
        if r == 0 {
            continue;
        }
        if let Some(t) = &s.tracing
            && r > tracing.0
        {
            tracing = (r, Some(t));
        }
        if let Some(l) = &s.access_log
            && r > log.0
        {
            log = (r, Some(l));
        }
    }
    (tracing.1, log.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(service: Option<&str>, trace: Option<f64>, log: Option<&str>) -> TelemetrySpec {
        TelemetrySpec {
            service: service.map(Into::into),
            tracing: trace.map(|p| Tracing {
                enabled: true,
                collector: Some("http://127.0.0.1:4317".into()),
                protocol: OtlpProtocol::Grpc,
                sampling_percent: p,
                propagation: w3c(),
                queue_size: queue(),
                batch_size: batch(),
                flush_interval: flush(),
            }),
            access_log: log.map(|p| AccessLog {
                enabled: true,
                path: p.into(),
                fields: vec![],
                queue_size: log_queue(),
            }),
        }
    }

    #[test]
    fn collector_addresses() {
        for ok in [
            "http://127.0.0.1:4317",
            "http://otel:4318/",
            "http://[::1]:4317",
        ] {
            assert!(collector_ok(ok), "{ok}");
        }
        for bad in [
            "https://otel:4317",
            "otel:4317",
            "http://otel",
            "http://otel:0",
            "http://otel:4318/v1/traces",
            "http://:4317",
        ] {
            assert!(!collector_ok(bad), "{bad}");
        }
    }

    #[test]
    fn the_most_specific_block_wins_block_by_block() {
        let mesh = spec(None, Some(1.0), Some("/var/log/mesh"));
        let shop = spec(None, Some(10.0), None);
        let orders = spec(Some("orders"), None, Some("/var/log/orders"));
        let other_ns = spec(None, Some(50.0), Some("/var/log/other"));
        let other_svc = spec(Some("catalog"), Some(99.0), Some("/var/log/catalog"));
        let all = [
            ("default", &mesh),
            ("shop", &shop),
            ("shop", &orders),
            ("bank", &other_ns),
            ("shop", &other_svc),
        ];
        // (namespace, service, sampling, log path)
        type Case<'a> = (&'a str, Option<&'a str>, Option<f64>, Option<&'a str>);
        let cases: &[Case] = &[
            ("shop", Some("orders"), Some(10.0), Some("/var/log/orders")),
            ("shop", Some("payment"), Some(10.0), Some("/var/log/mesh")),
            ("shop", None, Some(10.0), Some("/var/log/mesh")),
            ("bank", Some("orders"), Some(50.0), Some("/var/log/other")),
            ("web", None, Some(1.0), Some("/var/log/mesh")),
        ];
        for (ns, svc, rate, path) in cases {
            let (t, l) = select(all.iter().map(|(n, s)| (*n, *s)), ns, *svc);
            assert_eq!(t.map(|t| t.sampling_percent), *rate, "{ns} {svc:?}");
            assert_eq!(l.map(|l| l.path.as_str()), *path, "{ns} {svc:?}");
        }
        // Nothing mesh-wide: a namespace without its own gets nothing.
        let (t, l) = select([("shop", &shop)], "web", None);
        assert!(t.is_none() && l.is_none());
    }
}
