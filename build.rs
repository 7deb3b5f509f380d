//! Compiles the protos with prost, with no system `protoc`: `protox` parses
//! them into a descriptor set that prost-build (and, for the test client,
//! tonic-build) generate code from.
//!
//! Three outputs:
//! - `$OUT_DIR/prost/`: the messages the server and its CLI use.
//! - `$OUT_DIR/descriptors.bin`: the encoded descriptor set, embedded in
//!   the binary for server reflection.
//! - `$OUT_DIR/tonic/`: a tonic client generated separately from the same
//!   protos, compiled only into the integration tests and benches, so they
//!   talk to the server the way any third-party client would.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "atomix/multiraft/v1/config.proto",
    "atomix/multiraft/v1/node.proto",
    "multiraft/admin/v1/admin.proto",
    "multiraft/kv/v1/kv.proto",
    "multiraft/peer/v1/peer.proto",
    "grpc/health/v1/health.proto",
    "grpc/reflection/v1/reflection.proto",
    "grpc/reflection/v1alpha/reflection.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    let prost_out = out.join("prost");
    std::fs::create_dir_all(&prost_out)?;
    prost_build::Config::new()
        .out_dir(&prost_out)
        .bytes(["."])
        .compile_fds(fds.clone())?;

    let tonic_out = out.join("tonic");
    std::fs::create_dir_all(&tonic_out)?;
    tonic_build::configure()
        .build_server(false)
        .build_client(true)
        .out_dir(&tonic_out)
        .compile_fds(fds)?;
    Ok(())
}
