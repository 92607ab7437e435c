//! `RequestAuthentication`: JSON Web Tokens the receiving sidecar verifies. A request with an
//! invalid token is refused (401); one without a token is refused when a token is `required`,
//! else passes without claims. Verified claims are available to `AuthorizationPolicy` rules.

use crate::Duration;
use crate::policy::TargetRef;
use serde::{Deserialize, Serialize};

/// `spec` of a `RequestAuthentication`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// The service whose sidecars verify tokens; omitted, every service in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// Accepted issuers. At least one.
    pub jwt_rules: Vec<JwtRule>,
    /// Refuse requests without a token (401). Default false: they pass, without claims.
    #[serde(default)]
    pub required: bool,
}

/// One accepted issuer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// The `iss` the token must carry.
    pub issuer: String,
    /// Accepted `aud` values; the token must name at least one. Empty: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The issuer's keys, from a JWKS file on the proxy's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// The issuer's keys, from a JWKS URL (`http://`), refreshed every five minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Accepted signature algorithms. Default `RS256` and `ES256`; `none` is never accepted.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Tolerance for `exp` and `nbf`. Default `60s`, at most `10m`.
    #[serde(default = "default_skew")]
    pub clock_skew: Duration,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

fn default_skew() -> Duration {
    Duration::from_secs(60)
}

/// Algorithms a rule may allow.
pub const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];
