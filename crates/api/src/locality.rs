//! Locality: where a proxy and its endpoints run, how a backend prefers near endpoints, and
//! which service takes over when a backend has nothing usable.

use serde::{Deserialize, Serialize};

/// Where something runs. Every field is optional; a field either side leaves unset is not
/// compared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    /// Region, for example `eu-west-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Cluster (a failure and administration domain inside a region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Zone, for example `eu-west-1a`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl Locality {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self.region.is_none() && self.cluster.is_none() && self.zone.is_none()
    }
}

/// `BackendPolicy.spec.locality`: locality-aware balancing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityPolicy {
    /// Prefer endpoints near the calling proxy. Default `true`; it has no effect when the
    /// proxy or the endpoints have no locality.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How much a priority's healthy share is scaled before traffic spills to the next one:
    /// with the default `1.4`, a priority keeps all its traffic while at least 1/1.4 ≈ 72% of
    /// its weight is healthy. At least `1.0`.
    #[serde(default = "default_overprovisioning")]
    pub overprovisioning_factor: f64,
}

impl Default for LocalityPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            overprovisioning_factor: default_overprovisioning(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_overprovisioning() -> f64 {
    1.4
}

/// `BackendPolicy.spec.fallback`: the service that takes the traffic while the target has no
/// usable endpoint at all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fallback {
    /// Service name.
    pub name: String,
    /// Namespace; the policy's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Port of the fallback service. Omitted: the port with the same number as the
    /// target's port when it has one, else its first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}
