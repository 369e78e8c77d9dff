//! Running real CRIU: building it, giving a dumped tree pids it can have
//! again, reaping its orphans, killing it by its pids. Shared by
//! tests/criu_restore.rs and benches/restore (which includes this file).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PYTHON: &str = "/usr/bin/python3";
/// Generous: 2 cores shared with other builds.
pub const PATIENCE: Duration = Duration::from_secs(120);

pub fn criu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/criu")
}

/// The path of a working CRIU 4.2 (third_party/criu), built once per machine.
pub fn build_criu() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("third_party/criu/build");
    let out = Command::new(&script).stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {}: {e}; this test needs CRIU 4.2 built from third_party/criu", script.display())
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "CRIU 4.2 cannot be built here, so a real dump and restore cannot be tested: {} exited with {}:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}

/// CRIU restores each task with its original pid. Starting the tree high up
/// (pid_max raised to 2^22, ns_last_pid at a random point above 3 million)
/// keeps its pids clear of everything started before, and processes started
/// after the dump (sshd sessions, lazyfs) take the pids after the tree's.
pub fn start_pids_high() {
    let write = |file: &str, value: u64| {
        std::fs::write(file, value.to_string())
            .unwrap_or_else(|e| panic!("writing {value} to {file} (needs root): {e}"))
    };
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    if pid_max < 1 << 22 {
        write("/proc/sys/kernel/pid_max", 1 << 22);
    }
    let noise = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    write("/proc/sys/kernel/ns_last_pid", 3_000_000 + u64::from((noise ^ std::process::id()) % 1_000_000));
}

/// tests/criu/reaper.py running a command: its `pid N` and `exit N` lines.
pub struct Reaper {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Reaper {
    pub fn start(args: &[&OsStr]) -> Reaper {
        let mut child = Command::new(PYTHON)
            .arg(criu_dir().join("reaper.py"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/setup installs it)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Reaper { child, lines }
    }

    /// The number on the next line, which must be `WORD N`.
    pub fn expect(&self, word: &str) -> i32 {
        let line = self.lines.recv_timeout(PATIENCE).unwrap_or_else(|_| panic!("reaper.py: no `{word}` line"));
        let n = line.strip_prefix(word).and_then(|n| n.trim().parse().ok());
        n.unwrap_or_else(|| panic!("reaper.py said {line:?}, expected `{word} N`"))
    }

    /// Waits until every process of its tree is gone (the reaper then exits).
    pub fn finish(&mut self) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if !self.finish() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A workload's processes, by the pids it reported: killed when dropped,
/// however the test ends (only while their command line still names
/// `script`, so a pid taken by someone else since is left alone).
pub struct Tree {
    pub pids: Vec<i32>,
    pub script: &'static str,
}

impl Drop for Tree {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.windows(self.script.len()).any(|w| w == self.script.as_bytes()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
