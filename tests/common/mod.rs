//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod apps;
pub mod criu;
pub mod garage;
pub mod harness;
pub mod listing;
pub mod mount;
pub mod sshd;
pub mod tmpfs;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The image directories with an `expected-files.json` made by CRIU's own decoder.
pub fn expected_dirs() -> Vec<(PathBuf, PathBuf)> {
    let mut dirs = Vec::new();
    for group in ["real", "synthetic", "incomplete"] {
        for entry in std::fs::read_dir(fixtures().join(group)).unwrap() {
            let dir = entry.unwrap().path();
            let images = if dir.join("images").is_dir() { dir.join("images") } else { dir.clone() };
            dirs.push((images, dir.join("expected-files.json")));
        }
    }
    dirs.sort();
    dirs
}

pub fn lazyfs(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazyfs")).args(args).output().expect("run lazyfs")
}

/// The files of tests/criu/workload.py's data directory, by relative path:
/// what tests/criu_restore.rs dumps, and what tests/fixtures/real/workload
/// (a dump it kept) recorded.
pub fn workload_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("data.bin", mount::content("data.bin", 3_000_000)),
        ("big.bin", mount::content("big.bin", 8 << 20)),
        ("twice.txt", b"twice original\n".to_vec()),
        ("sub/mapped.bin", mount::content("mapped.bin", 100_000)),
        ("opath.txt", b"opath\n".to_vec()),
        ("app.log", b"first line, before the dump\n".to_vec()),
    ]
}

/// Writes [`workload_files`] below `dir`.
pub fn write_workload_files(dir: &Path) {
    for (rel, bytes) in workload_files() {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}
