//! Running `lazyfs mount` for a test: an isolated HOME and mount registry,
//! data sets with their images, and a guard that unmounts.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lazyfs::images::write::{DumpFile, write_dump};
use serde_json::Value;

use super::sshd::Sshd;

/// A test's private world: its HOME (no ~/.ssh/config of the machine's),
/// its own registry of mounts, and scratch space.
pub struct TestEnv {
    pub tmp: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let tmp = tempfile::Builder::new().prefix("lazyfs-test").tempdir().unwrap();
        for dir in ["home", "runtime", "mnt", "source"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        TestEnv { tmp }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `lazyfs` with this environment.
    pub fn lazyfs(&self) -> Command {
        self.lazyfs_with(env!("CARGO_BIN_EXE_lazyfs"))
    }

    /// Another program with this environment (e.g. `script` running lazyfs).
    pub fn lazyfs_with(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("HOME", self.path("home"))
            .env("LAZYFS_RUNTIME_DIR", self.path("runtime"))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("XDG_CACHE_HOME");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.lazyfs().args(args).output().unwrap()
    }

    /// Mounts `imgdir` from `source` on `mnt/NAME`; panics if it fails.
    pub fn mount(&self, name: &str, imgdir: &Path, source: &Source, extra: &[&str]) -> Mount {
        self.mounted(name, &self.try_mount(name, imgdir, source, extra))
    }

    /// `lazyfs mount` of `imgdir` on `mnt/NAME` from SOURCE spelled `target`
    /// (another spelling of `sshd`: its key and known_hosts go with it).
    pub fn mount_spelled(&self, name: &str, imgdir: &Path, sshd: &Sshd, target: &str, extra: &[&str]) -> Output {
        let mountpoint = self.path("mnt").join(name);
        if std::fs::symlink_metadata(&mountpoint).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            std::fs::create_dir_all(&mountpoint).unwrap();
        }
        let mut command = self.lazyfs();
        command.arg("mount").arg(&mountpoint).arg(imgdir).arg(target);
        if let Some(transport) = std::env::var_os("LAZYFS_TEST_SSH") {
            command.arg("--ssh").arg(transport);
        }
        command.arg("-i").arg(sshd.user_key()).arg("--known-hosts").arg(sshd.known_hosts());
        command.arg("--cache-dir").arg(self.path("cache").join(name)).args(extra);
        command.output().unwrap()
    }

    /// The mount on `mnt/NAME` a successful `out` made.
    pub fn mounted(&self, name: &str, out: &Output) -> Mount {
        assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
        Mount {
            mountpoint: self.path("mnt").join(name),
            cache: self.path("cache").join(name),
            env_home: self.tmp.path().into(),
        }
    }

    pub fn try_mount(&self, name: &str, imgdir: &Path, source: &Source, extra: &[&str]) -> Output {
        let mountpoint = self.path("mnt").join(name);
        // A stale mount answers ENOTCONN but exists: leave it for lazyfs to clear.
        if std::fs::symlink_metadata(&mountpoint).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            std::fs::create_dir_all(&mountpoint).unwrap();
        }
        let mut command = self.lazyfs();
        command.arg("mount").arg(&mountpoint).arg(imgdir);
        source.add_args(&mut command);
        command.arg("--cache-dir").arg(self.path("cache").join(name)).args(extra);
        command.output().unwrap()
    }
}

/// Where a test mount reads from.
pub enum Source<'a> {
    Local(PathBuf),
    /// The test's sshd, reading below `root` on it.
    Ssh {
        sshd: &'a Sshd,
        root: PathBuf,
    },
    /// `s3://BUCKET/PREFIX`, reached with these `AWS_*` variables.
    S3 {
        url: String,
        env: Vec<(String, String)>,
    },
}

impl Source<'_> {
    pub fn add_args(&self, command: &mut Command) {
        match self {
            Source::Local(dir) => {
                command.arg(dir);
            }
            Source::S3 { url, env } => {
                command.arg(url).envs(env.iter().map(|(k, v)| (k, v)));
            }
            Source::Ssh { sshd, root } => {
                // CI runs the SSH tests once more with `LAZYFS_TEST_SSH=libssh2`.
                if let Some(transport) = std::env::var_os("LAZYFS_TEST_SSH") {
                    command.arg("--ssh").arg(transport);
                }
                command
                    .arg(sshd.target())
                    .arg("-i")
                    .arg(sshd.user_key())
                    .arg("--known-hosts")
                    .arg(sshd.known_hosts())
                    .arg("--source-root")
                    .arg(root);
            }
        }
    }
}

/// A live mount; unmounted when dropped.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub cache: PathBuf,
    pub env_home: PathBuf,
}

impl Mount {
    fn lazyfs(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lazyfs"));
        command.env("HOME", self.env_home.join("home")).env("LAZYFS_RUNTIME_DIR", self.env_home.join("runtime"));
        command
    }

    /// The mounted path of original file `original` in the tree layout.
    pub fn at(&self, original: &str) -> PathBuf {
        self.mountpoint.join(original.trim_start_matches('/'))
    }

    pub fn status(&self) -> Value {
        let out = self.lazyfs().arg("status").arg(&self.mountpoint).arg("--json").output().unwrap();
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `status --json`, if the mount answers.
    pub fn try_status(&self) -> Option<Value> {
        let out = self.lazyfs().arg("status").arg(&self.mountpoint).arg("--json").output().ok()?;
        serde_json::from_slice(&out.stdout).ok().filter(|_| out.status.success())
    }

    /// `status --json` once `done` holds of it (panics with `what` after 120 s).
    pub fn wait_for(&self, done: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {status}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `status --json` once every file is settled (verified, modified or failed).
    pub fn wait_complete(&self) -> Value {
        self.wait_for(|s| s["state"] == "complete", "not complete")
    }

    /// `kill -9` of the whole mount, supervisor first (killed alone, the
    /// serving process is replaced on the same mount): the mount goes stale.
    /// Returns once both are gone.
    pub fn kill_all(&self) {
        let status = self.status();
        for key in ["supervisor_pid", "pid"] {
            let pid = status[key].as_i64().unwrap() as i32;
            assert!(pid > 0, "{key}: {status}");
            // SAFETY: kill(2) of a process this test's mount started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_gone(pid);
        }
    }

    pub fn umount(&self) -> Output {
        self.lazyfs().arg("umount").arg(&self.mountpoint).output().unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let daemons = processes_naming(&self.mountpoint);
        if is_mounted(&self.mountpoint) {
            let _ = self.umount();
        }
        if is_mounted(&self.mountpoint) {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        // A daemon still serving the detached mount (a file held open, a
        // request that hangs) ends on a signal.
        end_processes(&daemons);
    }
}

impl Drop for TestEnv {
    /// Whatever the test left below its directory, however it ended: mounts
    /// detached, and the processes naming the directory or holding a file in
    /// it ended. A test that passed but left one fails: it must end what it
    /// started itself.
    fn drop(&mut self) {
        let root = self.tmp.path();
        let mounts = mounts_below(root);
        for mountpoint in mounts.iter().rev() {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        let signalled = end_processes(&processes_using(root));
        if !std::thread::panicking() && (!mounts.is_empty() || !signalled.is_empty()) {
            panic!("the test left mounts {mounts:?} and processes {signalled:?} (ended now)");
        }
    }
}

/// The mount points at or below `dir`, outermost first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let unescape = |field: &str| {
        let mut bytes = Vec::new();
        let mut rest = field.as_bytes();
        while let Some((&byte, tail)) = rest.split_first() {
            match (byte, tail.get(..3).and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok())) {
                (b'\\', Some(escaped)) => {
                    bytes.push(escaped);
                    rest = &tail[3..];
                }
                _ => {
                    bytes.push(byte);
                    rest = tail;
                }
            }
        }
        PathBuf::from(std::ffi::OsString::from_vec(bytes))
    };
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).map(unescape).filter(|m| m.starts_with(dir)).collect()
}

/// Live processes (not this one) whose command line names `path`.
pub fn processes_naming(path: &Path) -> Vec<i32> {
    live_processes(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        cmdline.split(|&b| b == 0).any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)).starts_with(path))
    })
}

/// Live processes (not this one) whose command line names `dir` or a path
/// below it, or whose working directory or an open file is below it.
pub fn processes_using(dir: &Path) -> Vec<i32> {
    let naming = processes_naming(dir);
    live_processes(|pid| {
        let links = ["cwd", "root"].map(|l| PathBuf::from(format!("/proc/{pid}/{l}")));
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten().map(|e| e.path());
        naming.contains(&pid)
            || links.into_iter().chain(fds).any(|link| std::fs::read_link(link).is_ok_and(|t| t.starts_with(dir)))
    })
}

fn live_processes(wanted: impl Fn(i32) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != me && is_alive(pid) && wanted(pid))
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn is_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

/// Ends `pids`: a moment to exit on their own, then SIGTERM, again (a lazyfs
/// daemon detaches a busy mount on the first and ends on the next), then
/// SIGKILL. Returns those that needed a signal.
pub fn end_processes(pids: &[i32]) -> Vec<i32> {
    use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
    let mut signalled = Vec::new();
    for signal in [None, Some(SIGTERM), Some(SIGTERM), Some(SIGKILL)] {
        let left: Vec<i32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
        if left.is_empty() {
            break;
        }
        for &pid in &left {
            if let Some(signal) = signal {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                if !signalled.contains(&pid) {
                    signalled.push(pid);
                }
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while left.iter().any(|&pid| is_alive(pid)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    signalled
}

/// Waits until process `pid` is gone (or a zombie).
pub fn wait_gone(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_alive(pid) {
        assert!(std::time::Instant::now() < deadline, "process {pid} still running");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether anything is mounted at `path` (from /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.to_string_lossy().replace(' ', "\\040").replace('\n', "\\012");
    mountinfo.lines().any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Deterministic bytes for a file: the same name always gives the same data.
pub fn content(seed: &str, len: usize) -> Vec<u8> {
    let mut state =
        seed.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |s, b| (s ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes files below `root` (file `/a/b` at `root/a/b`) and a dump recording
/// them into `imgdir`; returns the dump's records.
pub fn dataset(root: &Path, imgdir: &Path, files: &[(&str, usize)]) -> Vec<DumpFile> {
    let records: Vec<DumpFile> = files
        .iter()
        .map(|(path, len)| {
            let on_disk = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
            std::fs::write(&on_disk, content(path, *len)).unwrap();
            DumpFile::new(*path, *len as u64)
        })
        .collect();
    write_dump(imgdir, &records).unwrap();
    records
}

/// With `--subtree /srv/app`: the old host's `/srv/app` below `env`'s `source`: the recorded `rec` (10,000
/// bytes) and `dirs` directories `d0`... holding a file each. Returns the
/// image directory.
pub fn app_with_dirs(env: &TestEnv, dirs: usize) -> PathBuf {
    let app = env.path("source/srv/app");
    std::fs::create_dir_all(&app).unwrap();
    for i in 0..dirs {
        std::fs::create_dir_all(app.join(format!("d{i}"))).unwrap();
        std::fs::write(app.join(format!("d{i}/f")), b"a file").unwrap();
    }
    std::fs::write(app.join("rec"), content("rec", 10_000)).unwrap();
    let imgdir = env.path("images");
    write_dump(&imgdir, &[DumpFile::new("/srv/app/rec", 10_000)]).unwrap();
    imgdir
}
