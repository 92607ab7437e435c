//! `MeshConfig`: settings for the whole mesh (one per mesh, in namespace `default`, or one
//! per namespace to override it there).

use serde::{Deserialize, Serialize};

/// `spec` of a `MeshConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// Mutual TLS between sidecars.
    #[serde(default)]
    pub mtls: MtlsSettings,
    /// Authorization defaults.
    #[serde(default)]
    pub authorization: crate::authz::AuthzDefaults,
}

/// Mutual TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSettings {
    /// What inbound sidecars accept. Default `Permissive`.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// What an inbound sidecar accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MtlsMode {
    /// Mutual TLS from sidecars, and plaintext too (counted as such in metrics).
    #[default]
    Permissive,
    /// Mutual TLS from sidecars only; plaintext connections are closed.
    Strict,
}
