//! The closed set of kinds, and the envelope every resource shares.

use crate::meta::{Metadata, ObjectKey};
use crate::policy::BackendPolicySpec;
use crate::proxy::ProxySpec;
use crate::route::{GrpcRouteSpec, HttpRouteSpec};
use crate::service::ServiceSpec;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Every kind Trellis reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A sidecar's own settings.
    Proxy,
    /// A service and its endpoints.
    Service,
    /// Gateway API HTTP routing.
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    /// Gateway API gRPC routing.
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    /// Load balancing and connection settings for a service.
    BackendPolicy,
}

impl Kind {
    /// All kinds, in the order resources are listed.
    pub const ALL: [Kind; 5] = [
        Kind::Proxy,
        Kind::Service,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::BackendPolicy,
    ];

    /// The kind as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxy => "Proxy",
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::BackendPolicy => "BackendPolicy",
        }
    }

    /// The `apiVersion` this kind is written with.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::HttpRoute | Kind::GrpcRoute => crate::GATEWAY_API_VERSION,
            _ => crate::TRELLIS_API_VERSION,
        }
    }

    /// Looks a kind up by its YAML name (case-insensitive, plural accepted, as a CLI would).
    pub fn parse(text: &str) -> Option<Kind> {
        let t = text.to_ascii_lowercase();
        let t = t.strip_suffix('s').unwrap_or(&t);
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().to_ascii_lowercase() == t)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One resource of a given spec type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S> {
    /// `trellis.dev/v1alpha1`, or `gateway.networking.k8s.io/v1` for routes.
    pub api_version: String,
    /// The kind.
    pub kind: String,
    /// Name, namespace, labels.
    pub metadata: Metadata,
    /// The kind's settings.
    pub spec: S,
    /// Ignored on input; accepted so `kubectl get -o yaml` output can be applied.
    #[serde(default, skip_serializing)]
    pub status: Option<serde::de::IgnoredAny>,
}

impl<S: PartialEq> PartialEq for Object<S> {
    fn eq(&self, other: &Self) -> bool {
        self.api_version == other.api_version
            && self.kind == other.kind
            && self.metadata == other.metadata
            && self.spec == other.spec
    }
}

/// A resource of any kind.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    /// A `Proxy`.
    Proxy(Object<ProxySpec>),
    /// A `Service`.
    Service(Object<ServiceSpec>),
    /// An `HTTPRoute`.
    HttpRoute(Object<HttpRouteSpec>),
    /// A `GRPCRoute`.
    GrpcRoute(Object<GrpcRouteSpec>),
    /// A `BackendPolicy`.
    BackendPolicy(Object<BackendPolicySpec>),
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Proxy(_) => Kind::Proxy,
            Resource::Service(_) => Kind::Service,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::BackendPolicy(_) => Kind::BackendPolicy,
        }
    }

    /// The resource's metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Proxy(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::HttpRoute(o) => &o.metadata,
            Resource::GrpcRoute(o) => &o.metadata,
            Resource::BackendPolicy(o) => &o.metadata,
        }
    }

    /// Mutable metadata, for the control plane to stamp versions.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::Proxy(o) => &mut o.metadata,
            Resource::Service(o) => &mut o.metadata,
            Resource::HttpRoute(o) => &mut o.metadata,
            Resource::GrpcRoute(o) => &mut o.metadata,
            Resource::BackendPolicy(o) => &mut o.metadata,
        }
    }

    /// Kind, namespace and name.
    pub fn key(&self) -> ObjectKey {
        let m = self.metadata();
        ObjectKey {
            kind: self.kind().as_str().into(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
        }
    }
}
