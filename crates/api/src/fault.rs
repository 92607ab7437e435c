//! `FaultInjection`: delays and aborts for a share of the requests of the route rules that
//! reference it (an `ExtensionRef` filter), to rehearse a dependency's outage.

use crate::Duration;
use serde::{Deserialize, Serialize};

/// The API group of Trellis's own kinds, as an `ExtensionRef` names it.
pub const GROUP: &str = "trellis.dev";

/// `spec` of a `FaultInjection`; at least one of `delay` and `abort`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultInjectionSpec {
    /// Hold a share of requests before forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer a share of requests with an error instead of forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A delay fault.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long a delayed request is held; it counts against the route's request timeout.
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0–100 (fractions allowed); default 100.
    #[serde(default = "all")]
    pub percentage: f64,
}

/// An abort fault: exactly one of `httpStatus` and `grpcStatus`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// HTTP status of the answer, 200–599 (gRPC requests get the matching gRPC status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// gRPC status code of the answer, 1–16 (plain HTTP requests get the matching HTTP
    /// status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    /// Share of requests aborted, 0–100 (fractions allowed); default 100.
    #[serde(default = "all")]
    pub percentage: f64,
}

fn all() -> f64 {
    100.0
}
