//! Compiles proto/ward/v1/*.proto with protox (no protoc binary needed) and tonic-prost-build,
//! and writes the file descriptor sets that the server's reflection service publishes: Ward's
//! own, and that of Envoy's ext_authz API (`envoy.service.auth.v3`), which Ward serves too.
//! The Envoy code comes from the envoy-types crate; only its descriptors are built here, from
//! the protos vendored in proto/third_party (see the README there).

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos: Vec<PathBuf> = fs::read_dir("proto/ward/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(&protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("ward_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    // Envoy's ext_authz, for reflection only (no code: the server uses envoy-types).
    let envoy = PathBuf::from("proto/third_party");
    println!("cargo:rerun-if-changed={}", envoy.display());
    let authz = protox::compile(
        [envoy.join("envoy/service/auth/v3/external_auth.proto")],
        [&envoy],
    )?;
    fs::write(
        out.join("envoy_authz_descriptor.bin"),
        prost::Message::encode_to_vec(&authz),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
