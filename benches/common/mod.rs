//! What the benchmarks share: a table row, its median, the machine's load
//! and the lazyfs binary measured.
#![allow(dead_code)]

use std::path::PathBuf;

/// The middle value (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sorted[sorted.len() / 2]
}

/// A row of a benchmark's table: one thing measured, its runs.
pub struct Row {
    pub group: &'static str,
    pub what: String,
    pub unit: &'static str,
    pub runs: Vec<f64>,
    /// The row this one is compared with (its median), if any.
    pub against: Option<String>,
}

impl Row {
    pub fn median(&self) -> f64 {
        median(&self.runs)
    }
}

/// The load average now (the machine is shared: every figure says it).
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The lazyfs measured: this build's, or `LAZYFS_BENCH_BIN` (another
/// build, to compare two versions with the same harness).
pub fn lazyfs_binary() -> PathBuf {
    std::env::var_os("LAZYFS_BENCH_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lazyfs")), PathBuf::from)
}
