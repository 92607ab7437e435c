//! `BackendPolicy`: how a proxy balances and connects to a service's endpoints.

use crate::Duration;
use serde::{Deserialize, Serialize};

/// `spec` of a `BackendPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendPolicySpec {
    /// The service this policy applies to.
    pub target_ref: TargetRef,
    /// Load balancing across the service's endpoints.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Connection and request timeouts towards this service; unset fields use the proxy's.
    #[serde(default)]
    pub timeouts: BackendTimeouts,
    /// Retries towards this service (the defaults apply when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::retry::RetryPolicy>,
    /// Locality-aware balancing: prefer endpoints near the caller, spill over by priority.
    #[serde(default)]
    pub locality: crate::locality::LocalityPolicy,
    /// The service used while this one has no usable endpoint at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<crate::locality::Fallback>,
    /// Passive outlier detection; on by default.
    #[serde(default)]
    pub outlier_detection: crate::health::OutlierDetection,
    /// Active health checks from the proxy; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::health::HealthCheck>,
    /// Limits on what this proxy sends to the service at once; excess fails fast with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// Per-backend limits, shared by every route to the service. A limit left out is not
/// enforced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Upstream connections open to all the service's endpoints together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection because `maxConnections` is reached; `0` fails
    /// them at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the service (from the request being sent until its response
    /// ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// Points a policy at a resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group; empty for core kinds.
    #[serde(default)]
    pub group: String,
    /// Kind; only `Service` is supported.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace; the policy's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

fn service_kind() -> String {
    "Service".into()
}

/// Load balancing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// The algorithm; `PeakEwma` (power of two choices over latency) by default.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Required when `algorithm` is `ConsistentHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    /// How quickly peak-EWMA forgets a slow response; default `10s`.
    #[serde(default = "default_decay")]
    pub ewma_decay: Duration,
}

impl Default for LoadBalancer {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            consistent_hash: None,
            ewma_decay: default_decay(),
        }
    }
}

fn default_decay() -> Duration {
    Duration::from_secs(10)
}

/// A load balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// Power of two random choices, comparing peak-EWMA latency times outstanding requests.
    #[default]
    PeakEwma,
    /// Weighted round robin.
    RoundRobin,
    /// The endpoint with the fewest outstanding requests (per weight).
    LeastRequest,
    /// Consistent hashing on a request key, with bounded load.
    ConsistentHash,
}

/// What to hash on, and how far one endpoint may exceed the average load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    /// Hash this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Hash this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// Hash the client's source IP address.
    #[serde(
        default,
        rename = "sourceIP",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub source_ip: bool,
    /// No endpoint takes more than this factor of the average outstanding requests; default 1.25.
    #[serde(default = "default_bound")]
    pub bounded_load: f64,
}

fn default_bound() -> f64 {
    1.25
}

/// Timeouts towards a backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTimeouts {
    /// Time allowed to establish a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<Duration>,
    /// Time until the response headers arrive; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// How long a pooled connection may sit idle before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
}
