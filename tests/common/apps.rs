//! Moving a real application to a "new host" on one machine: its directory
//! goes under the tests' sshd (the old host), an empty directory takes its
//! place, and `lazyfs mount --subtree DIR` there serves the old host's whole
//! directory to the application `criu restore` brings back. Also the ways the
//! tests talk to the restored applications (tests/criu/channel.py, HTTP).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::criu::{PATIENCE, Reaper, Tree, restore};
use super::mount::{Mount, Source, TestEnv, is_mounted};
use super::sshd::Sshd;

/// How the new host gets the directory's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Only what is read (`lazyfs prefetch` later, if the test asks).
    Lazy,
    /// `--prefetch`: everything, in the background, from the start.
    Prefetch,
}

/// The old host: the tests' sshd, serving the original root below `root`.
pub struct OldHost {
    pub sshd: Sshd,
    pub root: PathBuf,
}

impl OldHost {
    /// Moves each of `dirs` (absolute) to the old host, keeping its inode
    /// numbers, owners, modes and times (a rename on one filesystem), and leaves
    /// an empty directory in its place: the new host's mountpoint.
    pub fn take(env: &TestEnv, dirs: &[&Path]) -> OldHost {
        let old = OldHost { sshd: Sshd::start(), root: env.path("old-host") };
        for dir in dirs {
            let there = old.path_of(dir);
            std::fs::create_dir_all(there.parent().unwrap()).unwrap();
            std::fs::rename(dir, &there).unwrap();
            std::fs::create_dir(dir).unwrap();
        }
        old
    }

    /// Where the old host keeps `original`.
    pub fn path_of(&self, original: &Path) -> PathBuf {
        self.root.join(original.strip_prefix("/").expect("an absolute path"))
    }

    /// `lazyfs mount [--prefetch] DIR IMGDIR OLD-HOST --subtree DIR`, with its
    /// cache in the test's `cache-NAME`.
    pub fn mount(&self, env: &TestEnv, dir: &Path, imgdir: &Path, fetch: Fetch, name: &str) -> Mount {
        let cache = env.path(&format!("cache-{name}"));
        let mut command = env.lazyfs();
        command.arg("mount").arg(dir).arg(imgdir);
        Source::Ssh { sshd: &self.sshd, root: self.root.clone() }.add_args(&mut command);
        command.arg("--subtree").arg(dir).arg("--cache-dir").arg(&cache);
        if fetch == Fetch::Prefetch {
            command.arg("--prefetch");
        }
        let out = command.output().unwrap();
        let mount = Mount { mountpoint: dir.to_path_buf(), cache, env_home: env.path("") };
        assert!(
            out.status.success(),
            "lazyfs mount --subtree {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        mount
    }
}

/// An application CRIU dumped: what to restore and what comes back.
pub struct Dumped {
    pub criu: PathBuf,
    /// Its directory, moved to the old host.
    pub dir: PathBuf,
    pub imgdir: PathBuf,
    /// Its processes, and a word their command lines hold (see [`Tree`]).
    pub pids: Vec<i32>,
    pub script: &'static str,
    /// What `criu restore` needs besides the images (`--file-locks`, ...).
    pub options: &'static [&'static str],
}

impl Dumped {
    /// Mounts the directory from the old host as `fetch` says (cache
    /// `cache-NAME`) and restores the application on it with stock `criu
    /// restore -d` (log `restore-NAME.log` in the images).
    pub fn restore(&self, old: &OldHost, env: &TestEnv, fetch: Fetch, name: &str) -> Restored {
        eprintln!("--- {name}: {fetch:?}");
        let mount = old.mount(env, &self.dir, &self.imgdir, fetch, name);
        let reaper = restore(&self.criu, &self.imgdir, &format!("restore-{name}.log"), self.options);
        Restored { tree: Tree { pids: self.pids.clone(), script: self.script }, reaper, mount }
    }
}

/// An application `criu restore` brought back on a mount of its directory.
/// Dropped (a failed test), its processes are killed by their pids, then its
/// reaper waits for them, then the mount goes: the fields' order.
pub struct Restored {
    tree: Tree,
    reaper: Reaper,
    pub mount: Mount,
}

impl Restored {
    /// Kills the application, waits until it is gone, unmounts.
    pub fn end(self) {
        let Restored { tree, mut reaper, mount } = self;
        drop(tree);
        assert!(reaper.finish(), "the restored application did not end");
        let umount = mount.umount();
        assert!(umount.status.success(), "lazyfs umount: {}", String::from_utf8_lossy(&umount.stderr));
        assert!(!is_mounted(&mount.mountpoint));
    }
}

/// The bytes of the old host's file at `path`, read without changing its
/// access time: the test's own reads must not make the old host's files look
/// read (a file read since its last write keeps its atime under relatime),
/// which would hide what lazyfs meets on a real old host.
pub fn read_untouched(path: &Path) -> Vec<u8> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Every regular file below `dir`, by path relative to it, with its bytes
/// (symlinks are not followed; atimes are left as they are).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let path = entry.path();
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), read_untouched(&path));
            }
        }
    }
    files
}

/// `lazyfs wait MOUNTPOINT --timeout SECS`.
pub fn wait(env: &TestEnv, mount: &Mount, timeout_s: u32) -> Output {
    env.run(&["wait", mount.mountpoint.to_str().unwrap(), "--timeout", &timeout_s.to_string()])
}

/// `lazyfs prefetch MOUNTPOINT`; panics if it fails.
pub fn prefetch(env: &TestEnv, mount: &Mount) {
    let out = env.run(&["prefetch", mount.mountpoint.to_str().unwrap()]);
    assert!(out.status.success(), "lazyfs prefetch: {}", String::from_utf8_lossy(&out.stderr));
}

/// While files of the directory are only on the old host, status says the
/// old host is needed and the mount is not complete, and `wait` times out
/// (however many files the mount has seen so far: directories are listed
/// lazily).
pub fn assert_still_needs_the_old_host(env: &TestEnv, mount: &Mount, files_on_old_host: usize) {
    let wait = wait(env, mount, 1);
    let status = mount.status();
    let summary = summary(&status);
    let stderr = String::from_utf8_lossy(&wait.stderr);
    assert_eq!(wait.status.code(), Some(3), "lazyfs wait with files missing: {stderr}\nstatus: {summary}");
    assert_eq!(status["source_needed"], true, "files are still only on the old host: {summary}");
    assert_ne!(status["state"], "complete", "files are still only on the old host: {summary}");
    let total = status["files_total"].as_u64().unwrap() as usize;
    assert!(total <= files_on_old_host, "status counts {total} files, the old host has {files_on_old_host}");
}

/// `lazyfs wait` returns 0, and status then says the old host is no longer
/// needed, with every file present.
pub fn assert_all_here(env: &TestEnv, mount: &Mount) {
    let wait = wait(env, mount, 300);
    assert_eq!(wait.status.code(), Some(0), "lazyfs wait: {}", String::from_utf8_lossy(&wait.stderr));
    let status = mount.status();
    let summary = summary(&status);
    assert_eq!(status["files_present"], status["files_total"], "{summary}");
    assert_eq!(status["files_failed"], 0, "{summary}");
    assert_eq!(status["source_needed"], false, "{summary}");
}

/// `status --json` without its per-file and recording arrays (for messages),
/// but the files that are not settled.
pub fn summary(status: &Value) -> Value {
    let mut summary = status.clone();
    let unsettled: Vec<&Value> = status["files"]
        .as_array()
        .map(|files| {
            files.iter().filter(|f| !["verified", "modified"].contains(&f["state"].as_str().unwrap_or(""))).collect()
        })
        .unwrap_or_default();
    summary["files"] = Value::from(unsettled.into_iter().take(10).cloned().collect::<Vec<_>>());
    summary["recording"] = Value::Null;
    summary
}

pub fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test's side of tests/criu/channel.py.
pub struct Channel {
    pub run: PathBuf,
    asked: std::cell::Cell<u32>,
}

impl Channel {
    /// The channel of the application working with `run`, once it is ready.
    pub fn open(run: &Path) -> Channel {
        wait_for_file(&run.join("ready"));
        Channel { run: run.to_path_buf(), asked: 0.into() }
    }

    /// Sends `WORD [ARG]` and returns the reply: `{"result": ...}` or
    /// `{"error": "..."}`.
    pub fn ask(&self, command: &str) -> Value {
        let n = self.asked.get() + 1;
        self.asked.set(n);
        let mut fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(self.run.join("commands"))
            .unwrap_or_else(|e| panic!("nobody reads the application's FIFO ({e}): it is not running"));
        fifo.write_all(format!("{n} {command}\n").as_bytes()).unwrap();
        let reply = self.run.join(format!("reply-{n}.json"));
        wait_for_file(&reply);
        serde_json::from_slice(&std::fs::read(&reply).unwrap()).unwrap()
    }

    /// The result of `command`; panics with the application's error.
    pub fn result(&self, command: &str) -> Value {
        let reply = self.ask(command);
        assert!(reply.get("error").is_none(), "{command}: {}", reply["error"]);
        reply["result"].clone()
    }
}

/// A port nobody listens on now, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET PATH` over HTTP/1.0 from 127.0.0.1:`port`: the status code and body.
pub fn http_get(port: u16, path: &str) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET {} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", url_quote(path)).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("GET {path}: no header"));
    let head = String::from_utf8_lossy(&response[..end]);
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    (code.unwrap_or_else(|| panic!("GET {path}: {head}")), response[end + 4..].to_vec())
}

/// `path` %-encoded as Python's `urllib.parse.quote` does (what http.server's
/// directory listings link to).
pub fn url_quote(path: &str) -> String {
    let mut out = String::new();
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"_.-~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
