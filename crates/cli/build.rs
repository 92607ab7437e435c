// The binary is linked again when the function order of a `dist` build changes
// (scripts/build-dist, scripts/layout/cc.sh); other builds never set the variable.
fn main() {
    println!("cargo:rerun-if-env-changed=TRELLIS_LINK_ORDER");
    // The linker wrapper and its mapping are part of the link, too.
    println!("cargo:rerun-if-changed=../../scripts/layout/cc.sh");
    println!("cargo:rerun-if-changed=../../scripts/layout/order.py");
    match std::env::var("TRELLIS_LINK_ORDER") {
        Ok(list) if !list.is_empty() => println!("cargo:rerun-if-changed={list}"),
        _ => {}
    }
}
