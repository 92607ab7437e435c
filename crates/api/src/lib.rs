//! The Trellis resource model: every config kind users write, with defaults and validation.
//!
//! Kinds are Kubernetes-shaped (`apiVersion`, `kind`, `metadata`, `spec`). Routes use the
//! Gateway API schema (HTTPRoute, GRPCRoute with a Service as parent, the GAMMA convention);
//! mesh-specific kinds live under `trellis.dev/v1alpha1`. This crate does no I/O: callers hand
//! it text and get back typed resources or precise, located errors.
#![forbid(unsafe_code)]

pub mod attach;
pub mod authn;
pub mod authz;
pub mod cors;
pub mod duration;
pub mod fault;
pub mod health;
mod load;
pub mod locality;
pub mod mesh;
pub mod meta;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
mod resource;
pub mod retry;
pub mod route;
pub mod service;
pub mod session;
pub mod status;
pub mod telemetry;
mod validate;
pub mod wire;

pub use duration::Duration;
pub use load::{Diagnostic, Diagnostics, Located, parse_documents};
pub use meta::{Metadata, ObjectKey};
pub use resource::{Kind, Object, Resource, ServiceRefs};
pub use validate::validate;

/// API group and version of Trellis's own kinds.
pub const TRELLIS_API_VERSION: &str = "trellis.dev/v1alpha1";
/// API group and version of the Gateway API kinds Trellis reads.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
