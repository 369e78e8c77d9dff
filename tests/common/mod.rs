//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod mount;
pub mod sshd;

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
