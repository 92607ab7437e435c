//! `AuthorizationPolicy`: who may call what, enforced by the receiving (inbound) sidecar.
//!
//! Evaluation, per request (or per TCP connection): a matching `Deny` rule denies; otherwise,
//! when any `Allow` policy applies to the service, a matching `Allow` rule is required;
//! otherwise the namespace's (else the mesh-wide) `MeshConfig` default decides. A policy in
//! `Audit` mode never decides: what it would have denied is counted and logged.

use crate::policy::TargetRef;
use serde::{Deserialize, Serialize};

/// `spec` of an `AuthorizationPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The service whose sidecars enforce it; omitted, every service in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// `Allow` or `Deny`.
    pub action: AuthzAction,
    /// `Enforce` (default) or `Audit`.
    #[serde(default)]
    pub mode: AuthzMode,
    /// A request matches the policy when it matches any rule. At least one.
    pub rules: Vec<AuthzRule>,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthzAction {
    /// Allow matching requests.
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
}

/// Whether a policy (or a default) decides or only reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthzMode {
    /// Decide.
    #[default]
    Enforce,
    /// Count and log what would be denied; deny nothing.
    Audit,
}

/// One rule: every part present must match; within a list, any entry matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRule {
    /// Who calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzSource>,
    /// What is called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthzOperation>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<TimeWindow>,
    /// Claims of the request's verified JSON Web Token (see `RequestAuthentication`); a
    /// request without a verified token matches none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimCondition>,
}

/// A claim and its accepted values: a string claim equal to one, or an array claim
/// containing one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimCondition {
    /// Claim name, for example `role` or `iss`.
    pub name: String,
    /// Accepted values.
    pub values: Vec<String>,
}

/// The caller, by its mutual TLS identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSource {
    /// Exact SPIFFE ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Every identity of these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// The request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzOperation {
    /// Paths: exact (`/orders`), prefix (`/orders/*`), or `*`. HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Methods, for example `GET`. HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Destination ports: the application's port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Request headers that must be present with one of the values. HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderCondition>,
}

/// A header and its accepted values (exact).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderCondition {
    /// Header name (case-insensitive).
    pub name: String,
    /// Accepted values.
    pub values: Vec<String>,
}

/// A weekly time window in a time zone; `start` after `end` wraps past midnight.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeWindow {
    /// `HH:MM`, inclusive.
    pub start: String,
    /// `HH:MM`, exclusive.
    pub end: String,
    /// IANA time zone, for example `Europe/Berlin`; default `UTC`.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// Days the window is open (`Mon` … `Sun`); every day when empty. The day is the one
    /// the window starts on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
}

fn utc() -> String {
    "UTC".into()
}

/// A day of the week.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Mesh or namespace authorization defaults, in `MeshConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzDefaults {
    /// What happens when no `Allow` policy applies: `Allow` (default) or `Deny`.
    #[serde(default)]
    pub default_action: AuthzAction,
    /// `Audit` reports what the default would deny without denying it.
    #[serde(default)]
    pub mode: AuthzMode,
}

/// Parses `HH:MM` into minutes after midnight.
pub fn parse_hhmm(text: &str) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}
