//! Compiles the tutorial's `helloworld.proto` (the Greeter service served by the demo app and used
//! by the tests). The health protocol comes precompiled with `tonic-health`. `protoc` is taken from
//! the `protoc-bin-vendored` crate so that a fresh machine needs no system package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/helloworld.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/helloworld.proto"], &["proto"])?;
    Ok(())
}
