//! `Service`: a named set of endpoints that routes and proxies address.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `spec` of a `Service`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// The ports clients address the service on. At least one.
    pub ports: Vec<ServicePort>,
    /// Static endpoints. The control plane's registry adds registered instances to these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Which registered instances (workloads) back this service, by label. Every instance
    /// carries `app: <the service it registered as>` and its own labels (for example
    /// `version: v2`). Omitted: the instances registered under this service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// What this service's inbound sidecars accept, overriding the `MeshConfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<crate::mesh::MtlsSettings>,
}

/// One port of a service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Optional port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port number clients use (in `backendRefs[].port` and HTTP proxy mode's `Host`).
    pub port: u16,
    /// The protocol, which skips detection when set. Omit to detect per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<AppProtocol>,
}

/// A protocol declared for a port or listener; declared protocols skip detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (requests may still be HTTP/2 with prior knowledge).
    Http,
    /// HTTP/2 cleartext with prior knowledge, to the upstream as well.
    Http2,
    /// gRPC: HTTP/2 to the upstream.
    Grpc,
    /// Opaque TCP: bytes are forwarded untouched, never parsed.
    Tcp,
}

/// One endpoint (an instance) of a service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `IP:PORT` the instance (or its inbound sidecar) listens on.
    pub address: String,
    /// Relative share of traffic, default 1. Zero keeps the endpoint known but unused.
    #[serde(default = "one")]
    pub weight: u32,
    /// Locality zone, for locality-aware routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Locality region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Locality cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Free-form labels, for example `version: v2`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE id the endpoint's sidecar must present; set, connections to it use mutual
    /// TLS. The control plane fills it in for registered instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn one() -> u32 {
    1
}
