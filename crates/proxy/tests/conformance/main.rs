//! The Gateway API's mesh conformance cases, restated as our own table.
//!
//! Each suite follows one upstream case (`kubernetes-sigs/gateway-api`, `conformance/tests/mesh/`,
//! plus the HTTPRoute and GRPCRoute cases of `conformance/tests/` that apply to mesh traffic)
//! and names it. A suite is a route set and a list of requests; for each request it says
//! which backend answers, the status, the path, host and headers the backend receives, the
//! response headers and, for redirects, the `Location`. Every request goes through a real
//! proxy on loopback to real echo servers, one per Service of namespace `mesh`: `echo`,
//! `echo-v1`, `echo-v2` and `echo-v3` (ports 80 `http`, 8080 `http-alt`, 7070 `grpc`). A
//! client proxy runs in the namespace a case sends `from`; requests reach it through its
//! HTTP proxy listener (routed by `Host`, as an app with `HTTP_PROXY` sends them) or through
//! an explicit upstream listener (the mesh's stand-in for a Service's cluster IP).
//!
//! Suites whose spec behaviour depends on work on another branch are in `#[ignore]`d tests
//! that name the branch. docs/config.md ("Gateway API conformance") maps every case.
//!
//! `harness.rs` sends the requests and compares; `mesh.rs` holds the cases of
//! `conformance/tests/mesh`, `routes.rs` the route cases written for a Gateway, and
//! `divergences.rs` the divergences from the spec that issue 13 fixed.

#[path = "../support/mod.rs"]
mod support;

mod divergences;
mod harness;
mod mesh;
mod routes;
