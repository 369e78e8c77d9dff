//! Live mounts of this user, one small file each in a runtime directory:
//! `/run/lazyfs` for root, `$XDG_RUNTIME_DIR/lazyfs` or `/tmp/lazyfs-UID` for
//! others. An entry whose socket no longer answers is a dead mount and is removed.
//! The directory is private to its user ([`CacheDir::open_private`]): one
//! another user made, or others may write to, is refused.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::store::{CacheDir, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub pid: u32,
    /// The supervisor holding the mount (0: none, `mount -f`): while it
    /// lives, a socket that does not answer is a serving process restarting.
    #[serde(default)]
    pub supervisor: u32,
}

pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAZYFS_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/lazyfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) => PathBuf::from(runtime).join("lazyfs"),
        None => PathBuf::from(format!("/tmp/lazyfs-{uid}")),
    }
}

/// Mountpoints are compared as absolute, symlink-free paths.
pub fn canonical(mountpoint: &Path) -> PathBuf {
    std::fs::canonicalize(mountpoint).unwrap_or_else(|_| std::path::absolute(mountpoint).unwrap_or(mountpoint.into()))
}

fn entry_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    blake3::hash(canonical(mountpoint).as_os_str().as_bytes()).to_hex()[..16].to_string()
}

/// The registry directory, or none (with a warning) when it is not safe to use.
fn open_dir() -> Option<CacheDir> {
    CacheDir::open_private(&dir()).map_err(|e| log::warn!("{e}")).ok()
}

/// Whether the registry directory may be used (before anything is mounted).
pub fn check() -> Result<(), StoreError> {
    CacheDir::open_private(&dir()).map(drop)
}

pub fn register(entry: &Entry) -> Result<(), StoreError> {
    let json = serde_json::to_vec(entry).map_err(|e| StoreError::Io { path: dir(), source: e.into() })?;
    CacheDir::open_private(&dir())?.write_atomic(&entry_name(&entry.mountpoint), &json)
}

/// A mountpoint claimed by this process: held (a lock on a file next to the
/// entries) from before anything is prepared until the process exits, so of
/// two `lazyfs mount` of one mountpoint exactly one goes ahead. The file is
/// removed when the claim ends (a `kill -9` leaves it to the next claim).
pub struct Claim {
    dir: CacheDir,
    name: String,
    _lock: nix::fcntl::Flock<File>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Removed while still locked: a process that opened it meanwhile
        // finds it gone once it holds the lock, and claims afresh.
        let _ = self.dir.remove(&self.name);
    }
}

/// Claims `mountpoint`; when another process holds it, `Err` with its pid
/// (if it said).
pub fn claim(mountpoint: &Path) -> Result<Result<Claim, Option<u32>>, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let name = format!("{}.lock", entry_name(mountpoint));
    let dir = CacheDir::open_private(&dir())?;
    let io = |source| StoreError::Io { path: dir.join(&name), source };
    loop {
        let file = dir.open_rw(&name)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut locked) => {
                // The file this lock is on must still be the one named so.
                let held = locked.metadata().map_err(io)?;
                let named = std::fs::symlink_metadata(dir.join(&name));
                if !named.is_ok_and(|n| (n.dev(), n.ino()) == (held.dev(), held.ino())) {
                    continue;
                }
                locked.set_len(0).map_err(io)?;
                locked.rewind().map_err(io)?;
                write!(locked, "{}", std::process::id()).map_err(io)?;
                return Ok(Ok(Claim { dir, name, _lock: locked }));
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                file.read_to_string(&mut pid).map_err(io)?;
                return Ok(Err(pid.trim().parse().ok()));
            }
            Err((_, e)) => return Err(io(e.into())),
        }
    }
}

pub fn unregister(mountpoint: &Path) {
    if let Some(dir) = open_dir() {
        let _ = dir.remove(entry_name(mountpoint));
    }
}

/// The live entry for `mountpoint`, if a process answers on its socket.
pub fn find(mountpoint: &Path) -> Option<Entry> {
    find_in(&open_dir()?, entry_name(mountpoint).as_ref())
}

/// How long a restarting mount may leave its socket unanswered.
const RESTART_WAIT: Duration = Duration::from_secs(5);

fn find_in(dir: &CacheDir, name: &std::ffi::OsStr) -> Option<Entry> {
    let deadline = Instant::now() + RESTART_WAIT;
    loop {
        let entry: Entry = serde_json::from_slice(&dir.read(name).ok()?).ok()?;
        if UnixStream::connect(&entry.socket).is_ok() {
            return Some(entry);
        }
        let restarting = entry.supervisor != 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(entry.supervisor as i32), None).is_ok();
        if !restarting || Instant::now() >= deadline {
            let _ = dir.remove(name);
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every live mount; dead entries are removed on the way.
pub fn list() -> Vec<Entry> {
    let Some(dir) = open_dir() else {
        return Vec::new();
    };
    let mut live: Vec<Entry> = dir
        .names()
        .unwrap_or_default()
        .iter()
        .filter(|n| Path::new(n).extension().is_none())
        .filter_map(|name| find_in(&dir, name))
        .collect();
    live.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    live
}
