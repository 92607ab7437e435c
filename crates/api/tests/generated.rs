//! The protocol code in `src/generated` is what protox and tonic-prost-build make of
//! `proto/mesh.proto` today. After changing the proto, run this test with
//! `TRELLIS_REGENERATE=1` to rewrite the file, and commit both.

use std::path::Path;

#[test]
fn checked_in_protocol_code_matches_the_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked_in = root.join("src/generated/trellis.mesh.v1.rs");
    let out = std::env::temp_dir().join(format!("trellis-api-generated-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let fds =
        protox::compile(["mesh.proto"], [root.join("proto")]).expect("proto/mesh.proto compiles");
    tonic_prost_build::configure()
        .out_dir(&out)
        .compile_fds(fds)
        .expect("code generation");
    let fresh = std::fs::read_to_string(out.join("trellis.mesh.v1.rs")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    if std::env::var_os("TRELLIS_REGENERATE").is_some() {
        std::fs::write(&checked_in, &fresh).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        old == fresh,
        "{} is stale: proto/mesh.proto changed; regenerate it with \
         `TRELLIS_REGENERATE=1 cargo test -p trellis-api --test generated` and commit it",
        checked_in.display()
    );
}
