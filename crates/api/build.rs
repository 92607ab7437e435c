//! Generates the control-plane protocol from `proto/mesh.proto` with protox, a pure-Rust
//! protobuf compiler, so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/mesh.proto");
    let fds = protox::compile(["mesh.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
