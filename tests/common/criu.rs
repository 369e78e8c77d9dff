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
    /// Kills the tree's processes and whatever they started since (a
    /// database's new backends), all still naming `script`.
    fn drop(&mut self) {
        let names_script = |pid: i32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.windows(self.script.len()).any(|w| w == self.script.as_bytes())
        };
        let mut pids = self.pids.clone();
        pids.extend(self.pids.iter().flat_map(|&pid| descendants(pid)));
        for pid in pids {
            if names_script(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// The processes below `pid`, children first (from /proc/PID/task/*/children).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { continue };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// One real CRIU test at a time in a test binary: CRIU gives a restored tree
/// its original pids, and two trees started near each other could want the
/// same ones. Holding this for the whole test keeps them apart.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `criu dump -t PID -D IMGDIR OPTIONS` (log `dump.log` in IMGDIR); panics with the
/// log's tail if it fails. With `user`, the dump runs as that user in CRIU's
/// unprivileged mode, with every capability of the bounding set: root on these
/// machines lacks `CAP_SYS_RESOURCE`, and CRIU as root cannot read the rlimits
/// of another user's process without it (`Can't get rlimit 0: Operation not
/// permitted`), while the owner itself can. IMGDIR is then made that user's.
pub fn dump(criu: &Path, pid: i32, imgdir: &Path, user: Option<&str>, options: &[&str]) {
    std::fs::create_dir_all(imgdir).unwrap();
    let mut command = match user {
        None => Command::new(criu),
        Some(user) => {
            let chown = Command::new("chown").arg(format!("{user}:")).arg(imgdir).status().unwrap();
            assert!(chown.success(), "chown {user}: {}", imgdir.display());
            let caps = bounding_capabilities().iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",");
            let mut command = Command::new("setpriv");
            command.args([&format!("--reuid={user}"), &format!("--regid={user}"), "--init-groups"]);
            command.args([format!("--inh-caps={caps}"), format!("--ambient-caps={caps}")]);
            command.arg("--").arg(criu);
            command
        }
    };
    command.args(["dump", "-t", &pid.to_string(), "-D"]).arg(imgdir).args(["-o", "dump.log", "-v4"]).args(options);
    if user.is_some() {
        command.arg("--unprivileged");
    }
    let started = Instant::now();
    let out = command.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "criu dump failed ({}):\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&imgdir.join("dump.log"))
    );
    eprintln!("criu dump: {:.2} s", started.elapsed().as_secs_f64());
}

/// Stock `criu restore -D IMGDIR -d OPTIONS` (log `LOG` in IMGDIR) under a
/// reaper of its own, which then reaps the restored tree; panics with the
/// log's tail if the restore fails.
pub fn restore(criu: &Path, imgdir: &Path, log: &str, options: &[&str]) -> Reaper {
    let started = Instant::now();
    let mut args: Vec<&OsStr> = vec![criu.as_os_str(), "restore".as_ref(), "-D".as_ref(), imgdir.as_os_str()];
    args.extend(["-d", "-o", log, "-v4"].map(OsStr::new));
    args.extend(options.iter().map(OsStr::new));
    let restore = Reaper::start(&args);
    let _criu_pid = restore.expect("pid");
    let code = restore.expect("exit");
    assert_eq!(code, 0, "criu restore failed:\n{}", log_tail(&imgdir.join(log)));
    eprintln!("criu restore: {:.2} s", started.elapsed().as_secs_f64());
    restore
}

/// The names (for setpriv) of the capabilities in this process's bounding set.
fn bounding_capabilities() -> Vec<&'static str> {
    // capabilities(7), by number.
    const NAMES: [&str; 41] = [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "kill",
        "setgid",
        "setuid",
        "setpcap",
        "linux_immutable",
        "net_bind_service",
        "net_broadcast",
        "net_admin",
        "net_raw",
        "ipc_lock",
        "ipc_owner",
        "sys_module",
        "sys_rawio",
        "sys_chroot",
        "sys_ptrace",
        "sys_pacct",
        "sys_admin",
        "sys_boot",
        "sys_nice",
        "sys_resource",
        "sys_time",
        "sys_tty_config",
        "mknod",
        "lease",
        "audit_write",
        "audit_control",
        "setfcap",
        "mac_override",
        "mac_admin",
        "syslog",
        "wake_alarm",
        "block_suspend",
        "audit_read",
        "perfmon",
        "bpf",
        "checkpoint_restore",
    ];
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).expect("CapBnd in /proc/self/status");
    let mask = u64::from_str_radix(hex.trim(), 16).unwrap();
    NAMES.iter().enumerate().filter(|(bit, _)| mask & (1 << bit) != 0).map(|(_, name)| *name).collect()
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
