//! Compiles `proto/broker.proto` (client and service trait) with a vendored `protoc`, so a build needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/broker.proto");
    tonic_prost_build::configure().compile_protos(&["proto/broker.proto"], &["proto"])?;
    Ok(())
}
