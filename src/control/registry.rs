//! Live mounts of this user, one small file each in a runtime directory:
//! `/run/lazyfs` for root, `$XDG_RUNTIME_DIR/lazyfs` or `/tmp/lazyfs-UID` for
//! others. An entry whose socket no longer answers is a dead mount and is removed.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub pid: u32,
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

fn entry_path(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let hash = blake3::hash(canonical(mountpoint).as_os_str().as_bytes());
    dir().join(&hash.to_hex()[..16])
}

/// A mountpoint claimed by this process: held (a lock on a file next to the
/// entries) from before anything is prepared until the process exits, so of
/// two `lazyfs mount` of one mountpoint exactly one goes ahead.
pub struct Claim {
    _lock: nix::fcntl::Flock<File>,
}

/// Claims `mountpoint`; when another process holds it, `Err` with its pid
/// (if it said).
pub fn claim(mountpoint: &Path) -> std::io::Result<Result<Claim, Option<u32>>> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir())?;
    let path = entry_path(mountpoint).with_extension("lock");
    let file = File::options().create(true).truncate(false).read(true).write(true).open(&path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            locked.set_len(0)?;
            locked.rewind()?;
            write!(locked, "{}", std::process::id())?;
            Ok(Ok(Claim { _lock: locked }))
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            file.read_to_string(&mut pid)?;
            Ok(Err(pid.trim().parse().ok()))
        }
        Err((_, e)) => Err(e.into()),
    }
}

pub fn register(entry: &Entry) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir())?;
    let path = entry_path(&entry.mountpoint);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, path)
}

pub fn unregister(mountpoint: &Path) {
    let _ = std::fs::remove_file(entry_path(mountpoint));
}

/// The live entry for `mountpoint`, if a process answers on its socket.
pub fn find(mountpoint: &Path) -> Option<Entry> {
    let path = entry_path(mountpoint);
    let entry: Entry = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    if UnixStream::connect(&entry.socket).is_ok() {
        Some(entry)
    } else {
        let _ = std::fs::remove_file(path);
        None
    }
}

/// Every live mount; dead entries are removed on the way.
pub fn list() -> Vec<Entry> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut live: Vec<Entry> = entries
        .flatten()
        .filter_map(|e| serde_json::from_slice::<Entry>(&std::fs::read(e.path()).ok()?).ok())
        .filter_map(|entry| find(&entry.mountpoint))
        .collect();
    live.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    live
}
