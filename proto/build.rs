//! Compiles baton/v1/*.proto with tonic-prost-build, using the vendored protoc so a machine with
//! only cargo builds the crate.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "baton/v1/common.proto",
    "baton/v1/inference.proto",
    "baton/v1/worker.proto",
    "baton/v1/replica.proto",
];

fn main() -> anyhow::Result<()> {
    // PROTOC set by the caller wins, so a system protoc can stand in where the vendored binaries
    // do not run (an architecture protoc-bin-vendored does not ship).
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("baton_v1_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;

    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
