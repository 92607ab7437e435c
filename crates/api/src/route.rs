//! `HTTPRoute` and `GRPCRoute` in the Gateway API schema (v1), attached to a `Service` as
//! parent (the GAMMA convention for mesh traffic).

use crate::Duration;
use serde::{Deserialize, Serialize};

/// `spec` of an `HTTPRoute`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The services whose traffic this route governs.
    pub parent_refs: Vec<ParentRef>,
    /// Host names to match; empty matches every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules; a rule with no `matches` matches every request (prefix `/`).
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A reference to a parent (a `Service`; see `crate::attach`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// API group: `""` (core), the only one supported. Omitted, Trellis reads `""`, not the
    /// Gateway API's default `gateway.networking.k8s.io` (Trellis has no Gateways).
    #[serde(default)]
    pub group: String,
    /// Kind: `Service`, the only one supported. Omitted, Trellis reads `Service`, not the
    /// Gateway API's default `Gateway`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Name of the parent service.
    pub name: String,
    /// Namespace; the route's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Attach to this service port only; every port when omitted (and no `sectionName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Attach to the service port with this `name` only; with `port` too, both must name the
    /// same port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

pub(crate) fn service_kind() -> String {
    "Service".into()
}

/// One rule of an `HTTPRoute`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Optional rule name, shown in metrics and `explain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A request matches the rule when it matches any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// Applied in order to matching requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Where matching requests go, split by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Request timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries for this rule, overriding the backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::retry::HttpRouteRetry>,
    /// Keep each client on one endpoint (a cookie or header token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_persistence: Option<crate::session::SessionPersistence>,
}

/// Conditions on a request; all present conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path condition; `PathPrefix /` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HeaderMatch>,
    /// HTTP method condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A path condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    /// The path, prefix or regular expression; `/` by default.
    #[serde(default = "slash")]
    pub value: String,
}

fn slash() -> String {
    "/".into()
}

/// How a path is matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path equals the value.
    Exact,
    /// The path starts with the value, on a `/` boundary.
    #[default]
    PathPrefix,
    /// The whole path matches the regular expression.
    RegularExpression,
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    /// Header (case-insensitive) or query parameter (case-sensitive) name.
    pub name: String,
    /// The value or regular expression.
    pub value: String,
}

/// How a value is matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    /// Equal to the value.
    #[default]
    Exact,
    /// The whole value matches the regular expression.
    RegularExpression,
}

/// A filter: exactly the field named by `type` must be set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`,
    /// `RequestMirror`, `CORS` or `ExtensionRef`.
    #[serde(rename = "type")]
    pub kind: FilterType,
    /// Settings for `RequestHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    /// Settings for `ResponseHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    /// Settings for `RequestRedirect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    /// Settings for `URLRewrite`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "urlRewrite"
    )]
    pub url_rewrite: Option<UrlRewrite>,
    /// Settings for `RequestMirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    /// Settings for `ExtensionRef`: a Trellis resource in the route's namespace, for example
    /// a `FaultInjection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<LocalObjectReference>,
    /// Settings for `CORS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<crate::cors::HttpCorsFilter>,
}

/// A resource in the referring resource's namespace (Gateway API `LocalObjectReference`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalObjectReference {
    /// API group: `trellis.dev` for Trellis's own kinds.
    pub group: String,
    /// Kind, for example `FaultInjection`.
    pub kind: String,
    /// Name.
    pub name: String,
}

/// Filter types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FilterType {
    /// Set, add or remove request headers.
    RequestHeaderModifier,
    /// Set, add or remove response headers.
    ResponseHeaderModifier,
    /// Answer with a redirect instead of forwarding.
    RequestRedirect,
    /// Rewrite host and/or path before forwarding.
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    /// Copy a share of requests to another backend, discarding its responses.
    RequestMirror,
    /// Apply a Trellis resource, for example a `FaultInjection`.
    ExtensionRef,
    /// Cross-origin resource sharing: answer preflights, add `Access-Control-*` headers.
    #[serde(rename = "CORS")]
    Cors,
}

/// Header edits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Append these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    /// Remove headers with these names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// Redirect settings; unset fields keep the request's values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// New host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 302 (default), 301, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status_code: u16,
}

fn default_redirect_status() -> u16 {
    302
}

/// Rewrite settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// Replace the `Host`/`:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Replace the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`: replaces the prefix the rule's `PathPrefix` match matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

/// Path modifier types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    /// Replace the whole path.
    ReplaceFullPath,
    /// Replace the matched prefix.
    ReplacePrefixMatch,
}

/// Mirror settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    /// The service that receives copies.
    pub backend_ref: BackendRef,
    /// Share of requests to mirror, 0–100; all when neither this nor `fraction` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Share of requests to mirror as a fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

/// `numerator / denominator`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    /// Numerator.
    pub numerator: u32,
    /// Denominator, default 100.
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

/// A reference to a backend service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// API group; `""` for a Service.
    #[serde(default)]
    pub group: String,
    /// Kind; `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Namespace; the route's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port (required by the Gateway API for Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A weighted backend of an HTTP rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    /// API group; `""` for a Service.
    #[serde(default)]
    pub group: String,
    /// Kind; `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Namespace; the route's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port (required by the Gateway API for Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative weight, default 1; 0 sends it nothing.
    #[serde(default = "one")]
    pub weight: u32,
    /// Filters applied only when this backend is chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

fn one() -> u32 {
    1
}

impl HttpBackendRef {
    /// The backend this weighted reference points at.
    pub fn backend(&self) -> BackendRef {
        BackendRef {
            group: self.group.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

/// Timeouts of a rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// Time until the response headers arrive, end to end, retries included; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// Time until the response headers of one try; a try that runs out is retried when the
    /// rule's retries allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

/// `spec` of a `GRPCRoute`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// The services whose traffic this route governs.
    pub parent_refs: Vec<ParentRef>,
    /// Host names to match; empty matches every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules; a rule with no `matches` matches every gRPC request.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One rule of a `GRPCRoute`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    /// Optional rule name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A request matches when it matches any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// `RequestHeaderModifier`, `ResponseHeaderModifier` or `RequestMirror`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Where matching requests go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Request timeouts, as on an HTTPRoute rule: a Trellis extension (the Gateway API has no
    /// GRPCRoute timeouts). A call's own `grpc-timeout` still wins when sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Keep each client on one endpoint (a cookie or header token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_persistence: Option<crate::session::SessionPersistence>,
}

/// Conditions on a gRPC call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Service and method condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    /// Header (metadata) conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A gRPC service/method condition; at least one of the two is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    /// Fully qualified service, for example `shop.Catalog`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Method, for example `ListProducts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}
