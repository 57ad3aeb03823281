//! Compiles every `.proto` file in this folder. protoc comes from
//! `protoc-bin-vendored`, so a fresh machine needs nothing installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut protos: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    if protos.is_empty() {
        return Ok(());
    }
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &[dir])?;
    Ok(())
}
