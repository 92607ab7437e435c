//! Messages and gRPC stubs of the proxy ↔ control-plane protocol (`proto/mesh.proto`),
//! generated at build time.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("trellis.mesh.v1");
