//! `RateLimitPolicy`: token-bucket limits on requests or connections, enforced by the
//! target's own sidecars (`Inbound`: protect me) or by its callers' sidecars (`Outbound`: be
//! a good client); and `OverloadPolicy`: adaptive concurrency with priorities, enforced by a
//! service's own sidecars.

use crate::Duration;
use crate::authz::AuthzSource;
use serde::{Deserialize, Serialize};

/// `spec` of a `RateLimitPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    /// What is limited: a `Service`, or an `HTTPRoute`/`GRPCRoute` (optionally one rule of it,
    /// by `sectionName`).
    pub target_ref: LimitTarget,
    /// Who enforces: `Inbound` (the target Service's own sidecars, on requests they receive;
    /// the default for a Service) or `Outbound` (every caller's sidecar, on requests it
    /// sends; the only choice for a route, as routes are applied by callers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<LimitDirection>,
    /// The limits; a request (or connection) must pass every one that applies to it. At
    /// least one.
    pub limits: Vec<RateLimit>,
}

impl RateLimitPolicySpec {
    /// The enforcing side, with the default applied.
    pub fn direction(&self) -> LimitDirection {
        self.direction
            .unwrap_or(if self.target_ref.kind == "Service" {
                LimitDirection::Inbound
            } else {
                LimitDirection::Outbound
            })
    }
}

/// The target of a rate limit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitTarget {
    /// API group: empty for `Service`, `gateway.networking.k8s.io` for routes (may be left
    /// out).
    #[serde(default)]
    pub group: String,
    /// `Service` (default), `HTTPRoute` or `GRPCRoute`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace; the policy's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// For a route: only the rule with this `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

fn service_kind() -> String {
    "Service".into()
}

/// Which sidecars enforce a limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LimitDirection {
    /// The target service's own sidecars, on what they receive.
    #[default]
    Inbound,
    /// The callers' sidecars, on what they send to the target.
    Outbound,
}

/// One limit: `rate` per `per`, with bursts up to `burst`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Unique within the policy; metrics, logs, errors and the `RateLimit-Policy` header
    /// name the limit by it.
    pub name: String,
    /// Requests (or connections) per `per`, in the steady state. At least 1.
    pub rate: u32,
    /// The period `rate` is counted over. Default `1s`.
    #[serde(default = "one_second")]
    pub per: Duration,
    /// Most requests admitted at once after a quiet spell (the bucket's size). Default:
    /// `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `Requests` (HTTP and gRPC requests; default) or `Connections` (new TCP connections,
    /// whatever their protocol; a refused one is closed at once).
    #[serde(default)]
    pub unit: LimitUnit,
    /// `Local` (each enforcing sidecar has its own bucket; default) or `Global` (one budget
    /// shared by every sidecar that enforces this policy, coordinated by the control plane).
    #[serde(default)]
    pub scope: LimitScope,
    /// Each caller (its mutual TLS identity, else its IP address) gets its own bucket.
    /// Inbound only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
    /// Only requests from these callers count against this limit. Inbound only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzSource>,
    /// Named callers with their own numbers (and always their own bucket). Inbound only,
    /// with `perSource`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

impl RateLimit {
    /// The bucket size, with the default applied.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rate)
    }
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LimitUnit {
    /// HTTP and gRPC requests.
    #[default]
    Requests,
    /// New TCP connections.
    Connections,
}

/// Whether a limit's budget is per sidecar or shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LimitScope {
    /// Each enforcing sidecar has the whole limit.
    #[default]
    Local,
    /// The enforcing sidecars share the limit; the control plane leases each a share.
    Global,
}

/// A named caller's own numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitOverride {
    /// The callers this applies to (each still has its own bucket).
    pub from: AuthzSource,
    /// Their rate per the limit's `per`.
    pub rate: u32,
    /// Their bucket size. Default: `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// `spec` of an `OverloadPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OverloadPolicySpec {
    /// The service whose own sidecars admit or shed the requests it receives (a Service in
    /// the policy's namespace); one OverloadPolicy per Service.
    pub target_ref: crate::policy::TargetRef,
    /// How many requests are let in at once; found from the service's latency, no numbers
    /// needed.
    #[serde(default)]
    pub adaptive_concurrency: AdaptiveConcurrency,
    /// Requests that are shed last (`High`) or first (`Low`); the first class a request
    /// matches decides, and an unmatched request is `Normal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priorities: Vec<PriorityClass>,
}

/// Adaptive concurrency bounds. Every field is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdaptiveConcurrency {
    /// The limit never goes below this. Default `4`.
    #[serde(default = "min_limit")]
    pub min_limit: u32,
    /// The limit never goes above this. Default `1000`.
    #[serde(default = "max_limit")]
    pub max_limit: u32,
    /// The `Retry-After` a shed request gets. Default `1s`.
    #[serde(default = "one_second")]
    pub retry_after: Duration,
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency {
            min_limit: min_limit(),
            max_limit: max_limit(),
            retry_after: one_second(),
        }
    }
}

fn min_limit() -> u32 {
    4
}

fn max_limit() -> u32 {
    1000
}

/// A class of requests and its priority.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorityClass {
    /// Unique within the policy; metrics name the class by it.
    pub name: String,
    /// `High` or `Low` (`Normal` is what an unmatched request gets).
    pub priority: Priority,
    /// Requests matching any of these (HTTPRoute match syntax); every request when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<crate::route::HttpRouteMatch>,
    /// Only requests from these callers; every caller when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzSource>,
}

/// How important a request is under overload.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Priority {
    /// Shed first.
    Low,
    /// Unmatched requests.
    #[default]
    Normal,
    /// Shed last.
    High,
}
