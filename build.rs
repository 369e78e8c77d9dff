//! Compiles the protobuf schemas in `proto/` with `protox` (pure Rust), so a
//! build needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let criu = [
        "proto/criu/fdinfo.proto",
        "proto/criu/mm.proto",
        "proto/criu/fs.proto",
        "proto/criu/pstree.proto",
        "proto/criu/core.proto",
        "proto/criu/inventory.proto",
        "proto/criu/remap.proto",
        "proto/criu/mnt.proto",
    ];
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let criu = protox::compile(criu, ["proto/criu"])?;
    prost_build::Config::new().out_dir(&out).compile_fds(criu)?;
    let control = protox::compile(
        ["proto/lazyfs/control.proto", "proto/lazyfs/cache.proto", "proto/lazyfs/index.proto"],
        ["proto/lazyfs"],
    )?;
    prost_build::Config::new().out_dir(&out).compile_fds(control)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
