//! The closed set of kinds, and the envelope every resource shares.

use crate::authn::RequestAuthenticationSpec;
use crate::authz::AuthorizationPolicySpec;
use crate::fault::FaultInjectionSpec;
use crate::mesh::MeshConfigSpec;
use crate::meta::{Metadata, ObjectKey};
use crate::policy::BackendPolicySpec;
use crate::proxy::ProxySpec;
use crate::ratelimit::{OverloadPolicySpec, RateLimitPolicySpec};
use crate::route::{GrpcRouteSpec, HttpRouteSpec};
use crate::service::ServiceSpec;
use crate::telemetry::TelemetrySpec;
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
    /// Mesh-wide settings (mutual TLS mode).
    MeshConfig,
    /// Who may call what, enforced by inbound sidecars.
    AuthorizationPolicy,
    /// JSON Web Tokens inbound sidecars verify.
    RequestAuthentication,
    /// Delays and aborts injected on the route rules that reference it.
    FaultInjection,
    /// Tracing and access logs for the mesh, a namespace or a service.
    Telemetry,
    /// Rate limits on requests or connections to a service or route.
    RateLimitPolicy,
    /// Adaptive concurrency and priorities for the requests a service receives.
    OverloadPolicy,
}

impl Kind {
    /// All kinds, in the order resources are listed.
    pub const ALL: [Kind; 12] = [
        Kind::Proxy,
        Kind::Service,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::BackendPolicy,
        Kind::MeshConfig,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::FaultInjection,
        Kind::Telemetry,
        Kind::RateLimitPolicy,
        Kind::OverloadPolicy,
    ];

    /// The kind as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxy => "Proxy",
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::BackendPolicy => "BackendPolicy",
            Kind::MeshConfig => "MeshConfig",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::FaultInjection => "FaultInjection",
            Kind::Telemetry => "Telemetry",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::OverloadPolicy => "OverloadPolicy",
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
// Resources are parsed once per config change and held by the snapshot; boxing the larger
// specs would buy nothing measurable and cost every match an indirection.
#[allow(clippy::large_enum_variant)]
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
    /// A `MeshConfig`.
    MeshConfig(Object<MeshConfigSpec>),
    /// An `AuthorizationPolicy`.
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    /// A `RequestAuthentication`.
    RequestAuthentication(Object<RequestAuthenticationSpec>),
    /// A `FaultInjection`.
    FaultInjection(Object<FaultInjectionSpec>),
    /// A `Telemetry`.
    Telemetry(Object<TelemetrySpec>),
    /// A `RateLimitPolicy`.
    RateLimitPolicy(Object<RateLimitPolicySpec>),
    /// An `OverloadPolicy`.
    OverloadPolicy(Object<OverloadPolicySpec>),
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
            Resource::MeshConfig(_) => Kind::MeshConfig,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
            Resource::FaultInjection(_) => Kind::FaultInjection,
            Resource::Telemetry(_) => Kind::Telemetry,
            Resource::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Resource::OverloadPolicy(_) => Kind::OverloadPolicy,
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
            Resource::MeshConfig(o) => &o.metadata,
            Resource::AuthorizationPolicy(o) => &o.metadata,
            Resource::RequestAuthentication(o) => &o.metadata,
            Resource::FaultInjection(o) => &o.metadata,
            Resource::Telemetry(o) => &o.metadata,
            Resource::RateLimitPolicy(o) => &o.metadata,
            Resource::OverloadPolicy(o) => &o.metadata,
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
            Resource::MeshConfig(o) => &mut o.metadata,
            Resource::AuthorizationPolicy(o) => &mut o.metadata,
            Resource::RequestAuthentication(o) => &mut o.metadata,
            Resource::FaultInjection(o) => &mut o.metadata,
            Resource::Telemetry(o) => &mut o.metadata,
            Resource::RateLimitPolicy(o) => &mut o.metadata,
            Resource::OverloadPolicy(o) => &mut o.metadata,
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

impl Resource {
    /// Reads one resource from JSON, the form resources take in the store and on the wire.
    pub fn from_json(text: &str) -> Result<Resource, String> {
        #[derive(serde::Deserialize)]
        struct Header {
            kind: String,
        }
        let header: Header = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == header.kind)
            .ok_or_else(|| format!("unknown kind {:?}", header.kind))?;
        fn typed<S: serde::de::DeserializeOwned>(text: &str) -> Result<Object<S>, String> {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
        Ok(match kind {
            Kind::Proxy => Resource::Proxy(typed(text)?),
            Kind::Service => Resource::Service(typed(text)?),
            Kind::HttpRoute => Resource::HttpRoute(typed(text)?),
            Kind::GrpcRoute => Resource::GrpcRoute(typed(text)?),
            Kind::BackendPolicy => Resource::BackendPolicy(typed(text)?),
            Kind::MeshConfig => Resource::MeshConfig(typed(text)?),
            Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(typed(text)?),
            Kind::RequestAuthentication => Resource::RequestAuthentication(typed(text)?),
            Kind::FaultInjection => Resource::FaultInjection(typed(text)?),
            Kind::Telemetry => Resource::Telemetry(typed(text)?),
            Kind::RateLimitPolicy => Resource::RateLimitPolicy(typed(text)?),
            Kind::OverloadPolicy => Resource::OverloadPolicy(typed(text)?),
        })
    }

    /// The resource as compact JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data structures to a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_kind() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/proxy.yaml"
        ))
        .unwrap();
        let parsed = crate::parse_documents("proxy.yaml", &text).unwrap();
        assert!(parsed.len() > 3);
        for r in parsed {
            let back = Resource::from_json(&r.value.to_json()).unwrap();
            assert_eq!(back, r.value);
        }
        assert!(
            Resource::from_json(r#"{"kind":"Nope"}"#)
                .unwrap_err()
                .contains("unknown kind")
        );
    }
}

impl Resource {
    /// The `FaultInjection`s a route's rules reference through `ExtensionRef` filters, as
    /// `(namespace, name)`: what a proxy's view must carry with the route.
    pub fn fault_refs(&self) -> Vec<(String, String)> {
        let (ns, rules): (&str, Vec<&[crate::route::HttpRouteFilter]>) = match self {
            Resource::HttpRoute(r) => (
                &r.metadata.namespace,
                r.spec.rules.iter().map(|r| &r.filters[..]).collect(),
            ),
            Resource::GrpcRoute(r) => (
                &r.metadata.namespace,
                r.spec.rules.iter().map(|r| &r.filters[..]).collect(),
            ),
            _ => return Vec::new(),
        };
        rules
            .into_iter()
            .flatten()
            .filter_map(|f| f.extension_ref.as_ref())
            .filter(|e| e.kind == Kind::FaultInjection.as_str())
            .map(|e| (ns.to_string(), e.name.clone()))
            .collect()
    }
}

/// The services a resource names, as `(namespace, name)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRefs {
    /// Services the resource attaches to: route parents, policy targets.
    pub attaches_to: Vec<(String, String)>,
    /// Services the resource sends traffic to: route backends and mirrors.
    pub sends_to: Vec<(String, String)>,
    /// Ports named in those references: `(namespace, name, port)`.
    pub ports: Vec<(String, String, u16)>,
}

impl Resource {
    /// The services this resource names; what a proxy's view must carry with it.
    pub fn service_refs(&self) -> ServiceRefs {
        use crate::route::{HttpBackendRef, HttpRouteFilter};
        struct Collect<'a> {
            ns: &'a str,
            refs: ServiceRefs,
        }
        impl Collect<'_> {
            fn key(
                &mut self,
                ns: &Option<String>,
                name: &str,
                port: Option<u16>,
            ) -> (String, String) {
                let ns = ns.clone().unwrap_or_else(|| self.ns.to_string());
                if let Some(p) = port {
                    self.refs.ports.push((ns.clone(), name.to_string(), p));
                }
                (ns, name.to_string())
            }
            fn parent(&mut self, ns: &Option<String>, name: &str, port: Option<u16>) {
                let k = self.key(ns, name, port);
                self.refs.attaches_to.push(k);
            }
            fn filters(&mut self, fs: &[HttpRouteFilter]) {
                for m in fs.iter().filter_map(|f| f.request_mirror.as_ref()) {
                    let b = &m.backend_ref;
                    let k = self.key(&b.namespace, &b.name, b.port);
                    self.refs.sends_to.push(k);
                }
            }
            fn backends(&mut self, bs: &[HttpBackendRef]) {
                for b in bs {
                    let k = self.key(&b.namespace, &b.name, b.port);
                    self.refs.sends_to.push(k);
                    self.filters(&b.filters);
                }
            }
        }
        let mut c = Collect {
            ns: &self.metadata().namespace,
            refs: ServiceRefs::default(),
        };
        match self {
            Resource::Proxy(_)
            | Resource::Service(_)
            | Resource::MeshConfig(_)
            | Resource::FaultInjection(_)
            | Resource::Telemetry(_) => {}
            Resource::HttpRoute(r) => {
                for p in &r.spec.parent_refs {
                    c.parent(&p.namespace, &p.name, p.port);
                }
                for rule in &r.spec.rules {
                    c.backends(&rule.backend_refs);
                    c.filters(&rule.filters);
                }
            }
            Resource::GrpcRoute(r) => {
                for p in &r.spec.parent_refs {
                    c.parent(&p.namespace, &p.name, p.port);
                }
                for rule in &r.spec.rules {
                    c.backends(&rule.backend_refs);
                    c.filters(&rule.filters);
                }
            }
            Resource::BackendPolicy(p) => {
                let t = &p.spec.target_ref;
                c.parent(&t.namespace, &t.name, None);
                // Its fallback takes the target's traffic, so it must be reachable too.
                if let Some(f) = &p.spec.fallback {
                    let k = c.key(&f.namespace, &f.name, f.port);
                    c.refs.sends_to.push(k);
                }
            }
            Resource::AuthorizationPolicy(p) => {
                if let Some(t) = &p.spec.target_ref {
                    c.parent(&t.namespace, &t.name, None);
                }
            }
            Resource::RequestAuthentication(p) => {
                if let Some(t) = &p.spec.target_ref {
                    c.parent(&t.namespace, &t.name, None);
                }
            }
            // A route's limit travels with the route (the control plane's view compiler).
            Resource::RateLimitPolicy(p) => {
                let t = &p.spec.target_ref;
                if t.kind == "Service" {
                    c.parent(&t.namespace, &t.name, None);
                }
            }
            Resource::OverloadPolicy(p) => {
                let t = &p.spec.target_ref;
                c.parent(&t.namespace, &t.name, None);
            }
        }
        c.refs
    }
}
