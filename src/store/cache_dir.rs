//! A private directory held by a descriptor: the cache dir, its `spill/`, and
//! the registry of live mounts. lazyfs runs as root, so a directory someone
//! else controls must never make it write through a planted symlink, and a
//! shared directory (`/tmp`) must never be taken over or chmodded.
//!
//! The rules: a missing directory is created 0700 by the caller; an existing
//! one is accepted only if the caller owns it, nobody else may write to it,
//! and (for a cache) it is empty or already a lazyfs cache (its
//! `CACHEDIR.TAG` says so). Every file in it is opened relative to the
//! directory's descriptor with `O_NOFOLLOW` and must be a regular file; files
//! written whole are created exclusively (`O_EXCL`) under a temporary name and
//! renamed into place.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};

use super::{StoreError, io_err};

/// The cache marker, in the format of <https://bford.info/cachedir/> so backup
/// tools skip the directory too.
const MARKER: &str = "CACHEDIR.TAG";
const MARKER_TEXT: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This directory is a lazyfs cache: `lazyfs mount --cache-dir` may use it again.\n";

/// A directory only its owner (the caller) can change, and its descriptor.
#[derive(Debug)]
pub struct CacheDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl CacheDir {
    /// The cache dir at `path`: created 0700 if missing; an existing one must
    /// be the caller's, writable by nobody else, and empty or a lazyfs cache.
    pub fn open_cache(path: &Path) -> Result<CacheDir, StoreError> {
        let dir = CacheDir::open_private(path)?;
        if !dir.is_cache()? {
            if !dir.names()?.is_empty() {
                return Err(dir.refuse(
                    "not empty and not a lazyfs cache (no CACHEDIR.TAG from lazyfs): give a new or empty directory",
                ));
            }
            dir.write_atomic(MARKER, MARKER_TEXT)?;
        }
        Ok(dir)
    }

    /// An existing lazyfs cache dir (to read it), under the same rules.
    pub fn open_existing_cache(path: &Path) -> Result<CacheDir, StoreError> {
        let dir = CacheDir::open_dir(path, false)?;
        if !dir.is_cache()? {
            return Err(dir.refuse("not a lazyfs cache (no CACHEDIR.TAG from lazyfs)"));
        }
        Ok(dir)
    }

    /// A directory private to the caller at `path` (missing parents are
    /// created 0700): created 0700, or an existing one the caller owns and
    /// nobody else may write to. Such a directory is then made 0700.
    pub fn open_private(path: &Path) -> Result<CacheDir, StoreError> {
        CacheDir::open_dir(path, true)
    }

    fn open_dir(path: &Path, create: bool) -> Result<CacheDir, StoreError> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(StoreError::Unsafe { path: path.into(), reason: "not a directory lazyfs can use".into() });
        };
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let parent_fd = walk(parent, create)?;
        CacheDir::open_in(&parent_fd, name, path, create)
    }

    /// The directory `name` in the directory `parent_fd` (`path` for
    /// messages), under the rules of [`CacheDir::open_private`].
    fn open_in(parent_fd: &OwnedFd, name: &OsStr, path: &Path, create: bool) -> Result<CacheDir, StoreError> {
        if create {
            match nix::sys::stat::mkdirat(parent_fd, name, Mode::S_IRWXU) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io_err(path)(e.into())),
            }
        }
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let fd = match nix::fcntl::openat(parent_fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let link = nix::sys::stat::fstatat(parent_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK);
                let reason = if link { "a symbolic link" } else { "not a directory" };
                return Err(StoreError::Unsafe { path: path.into(), reason: reason.into() });
            }
            Err(e) => return Err(io_err(path)(e.into())),
        };
        let dir = CacheDir { path: path.to_path_buf(), fd };
        let stat = nix::sys::stat::fstat(&dir.fd).map_err(|e| io_err(path)(e.into()))?;
        let me = nix::unistd::geteuid().as_raw();
        if stat.st_uid != me {
            return Err(dir.refuse(&format!("owned by uid {}, not by this user (uid {me})", stat.st_uid)));
        }
        if stat.st_mode & 0o022 != 0 {
            return Err(dir.refuse(&format!(
                "others may write to it (mode {:o}): a shared directory is never used or changed",
                stat.st_mode & 0o7777
            )));
        }
        if create && stat.st_mode & 0o077 != 0 {
            nix::sys::stat::fchmod(&dir.fd, Mode::S_IRWXU).map_err(|e| io_err(path)(e.into()))?;
        }
        Ok(dir)
    }

    fn refuse(&self, reason: &str) -> StoreError {
        StoreError::Unsafe { path: self.path.clone(), reason: reason.into() }
    }

    fn is_cache(&self) -> Result<bool, StoreError> {
        match self.read(MARKER) {
            Ok(bytes) => Ok(bytes == MARKER_TEXT),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&self.join(MARKER))(e)),
        }
    }

    /// Another handle on the same directory.
    pub fn try_clone(&self) -> std::io::Result<CacheDir> {
        Ok(CacheDir { path: self.path.clone(), fd: self.fd.try_clone()? })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// `name` below this directory's descriptor: the path of this very
    /// directory even if its own path now leads elsewhere (to bind a socket).
    pub fn pinned(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    /// The subdirectory `name`, under the same rules.
    pub fn subdir(&self, name: &str) -> Result<CacheDir, StoreError> {
        CacheDir::open_in(&self.fd, name.as_ref(), &self.join(name), true)
    }

    /// Bytes the filesystem holding this directory holds.
    pub fn capacity(&self) -> Result<u64, StoreError> {
        let stat = nix::sys::statvfs::fstatvfs(&self.fd).map_err(|e| io_err(&self.path)(e.into()))?;
        Ok(stat.blocks().saturating_mul(stat.fragment_size()))
    }

    /// Opens `name` never following a symlink; it must be a regular file.
    /// `O_NONBLOCK` so a FIFO put there cannot hang the open.
    fn open_with(&self, name: &OsStr, flags: OFlag) -> std::io::Result<File> {
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        let fd = nix::fcntl::openat(&self.fd, name, flags, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| match e {
            Errno::ELOOP => std::io::Error::other("a symbolic link: refused"),
            e => e.into(),
        })?;
        let stat = nix::sys::stat::fstat(&fd)?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(std::io::Error::other("not a regular file: refused"));
        }
        Ok(File::from(fd))
    }

    /// `name` for reading and writing, created (0600) if missing.
    pub fn open_rw(&self, name: impl AsRef<OsStr>) -> Result<File, StoreError> {
        let name = name.as_ref();
        self.open_with(name, OFlag::O_RDWR | OFlag::O_CREAT).map_err(io_err(&self.join(name)))
    }

    /// `name` for appending, created (0600) if missing.
    pub fn open_append(&self, name: &str) -> Result<File, StoreError> {
        self.open_with(name.as_ref(), OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT)
            .map_err(io_err(&self.join(name)))
    }

    /// `name` for reading.
    pub fn open_read(&self, name: impl AsRef<OsStr>) -> std::io::Result<File> {
        self.open_with(name.as_ref(), OFlag::O_RDONLY)
    }

    /// The whole of `name`.
    pub fn read(&self, name: impl AsRef<OsStr>) -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut self.open_read(name)?, &mut bytes)?;
        Ok(bytes)
    }

    /// Replaces `name` with `bytes` all at once: written to a new file
    /// (`O_EXCL`; a leftover of a crash is removed first), synced, renamed
    /// into place, and the directory synced.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = format!("{name}.tmp");
        let tmp_path = self.join(&tmp);
        self.remove(&tmp).map_err(io_err(&tmp_path))?;
        let mut out = self
            .open_with(tmp.as_ref(), OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL)
            .map_err(io_err(&tmp_path))?;
        if let Err(e) = out.write_all(bytes).and_then(|()| out.sync_all()) {
            // A full disk: what was written of it gives its room back.
            let _ = self.remove(&tmp);
            return Err(io_err(&tmp_path)(e));
        }
        self.rename(&tmp, name)?;
        self.sync()
    }

    /// fsyncs the data of `name` here, opened through this directory's
    /// descriptor (never a path that could lead elsewhere); a missing one
    /// holds nothing to sync.
    pub fn sync_file(&self, name: &str) -> Result<(), StoreError> {
        match self.open_read(name) {
            Ok(file) => file.sync_data().map_err(io_err(&self.join(name))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&self.join(name))(e)),
        }
    }

    /// Makes everything written to the filesystem this directory is on
    /// durable at once (syncfs).
    pub fn sync_filesystem(&self) -> Result<(), StoreError> {
        // SAFETY: syncfs on the directory's own descriptor.
        match unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&self.fd)) } {
            0 => Ok(()),
            _ => Err(io_err(&self.path)(std::io::Error::last_os_error())),
        }
    }

    /// Renames `from` to `to`, both in this directory.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        nix::fcntl::renameat(&self.fd, from, &self.fd, to).map_err(|e| io_err(&self.join(to))(e.into()))
    }

    /// Removes `name` (the name only, whatever it is); a missing one is fine.
    pub fn remove(&self, name: impl AsRef<OsStr>) -> std::io::Result<()> {
        match nix::unistd::unlinkat(&self.fd, name.as_ref(), nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `name` exists here (not following a symlink).
    pub fn exists(&self, name: impl AsRef<OsStr>) -> bool {
        nix::sys::stat::fstatat(&self.fd, name.as_ref(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(|e| io_err(&self.path)(e.into()))
    }

    /// The names in this directory.
    pub fn names(&self) -> Result<Vec<OsString>, StoreError> {
        let entries = std::fs::read_dir(self.pinned("")).map_err(io_err(&self.path))?;
        entries.map(|e| e.map(|e| e.file_name()).map_err(io_err(&self.path))).collect()
    }
}

/// How many symbolic links a path may go through (as the kernel's MAXSYMLINKS).
const MAX_LINKS: usize = 40;

/// The directory `path`, reached from `/` one name at a time, never through
/// a symbolic link someone else could have put there: a link is followed
/// only if root or the caller owns it, and the directory it is in, and
/// nobody else may change that directory (but a sticky one, where nobody
/// else may replace a link they do not own). Missing directories are
/// created 0700 (with `create`).
fn walk(path: &Path, create: bool) -> Result<OwnedFd, StoreError> {
    use std::collections::VecDeque;
    use std::os::unix::ffi::OsStrExt;
    let absolute = std::path::absolute(path).map_err(io_err(path))?;
    let names = |path: &Path| -> Vec<OsString> { path.iter().skip(1).map(OsStr::to_os_string).collect() };
    let mut pending: VecDeque<OsString> = names(&absolute).into();
    let open = |dir: &OwnedFd, name: &OsStr| {
        nix::fcntl::openat(
            dir,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    };
    let root = || nix::fcntl::open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty());
    let fail = |e: Errno| io_err(path)(e.into());
    // The directories walked so far, `/` first (`..` goes back one).
    let mut dirs = vec![root().map_err(fail)?];
    let mut links = 0;
    let me = nix::unistd::geteuid().as_raw();
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        if name == "." {
            continue;
        }
        let dir = dirs.last().expect("the root at least");
        let stat = match nix::sys::stat::fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) if create => {
                match nix::sys::stat::mkdirat(dir, name.as_os_str(), Mode::S_IRWXU) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(fail(e)),
                }
                pending.push_front(name);
                continue;
            }
            other => other.map_err(fail)?,
        };
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => dirs.push(open(dir, &name).map_err(fail)?),
            SFlag::S_IFLNK => {
                let holder = nix::sys::stat::fstat(dir).map_err(fail)?;
                let trusted = |uid: u32| uid == 0 || uid == me;
                let others_may_replace = holder.st_mode & 0o022 != 0 && holder.st_mode & libc::S_ISVTX == 0;
                if !trusted(stat.st_uid) || !trusted(holder.st_uid) || others_may_replace {
                    return Err(StoreError::Unsafe {
                        path: path.into(),
                        reason: format!(
                            "goes through the symbolic link {:?} (owned by uid {}, in a directory of uid {} with mode                              {:o}), which another user could have put there: refused",
                            name,
                            stat.st_uid,
                            holder.st_uid,
                            holder.st_mode & 0o7777
                        ),
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(fail(Errno::ELOOP));
                }
                let target = nix::fcntl::readlinkat(dir, name.as_os_str()).map_err(fail)?;
                let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    dirs.truncate(1);
                }
                let rest: Vec<OsString> = target.iter().filter(|n| *n != "/").map(OsStr::to_os_string).collect();
                for name in rest.into_iter().rev() {
                    pending.push_front(name);
                }
            }
            _ => return Err(StoreError::Unsafe { path: path.into(), reason: format!("{name:?} is not a directory") }),
        }
    }
    Ok(dirs.pop().expect("the root at least"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_private_and_marks_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/cache");
        let dir = CacheDir::open_cache(&path).unwrap();
        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert!(dir.exists(MARKER));
        dir.write_atomic("x", b"1").unwrap();
        drop(dir);
        // Marked: used again with what it holds.
        let dir = CacheDir::open_cache(&path).unwrap();
        assert_eq!(dir.read("x").unwrap(), b"1");
        assert!(!dir.exists("x.tmp"));
    }

    #[test]
    fn refuses_shared_foreign_and_unmarked_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = CacheDir::open_cache(&shared).unwrap_err().to_string();
        assert!(err.contains("others may write"), "{err}");
        assert_eq!(mode(&shared), 0o1777, "never chmodded");

        let full = tmp.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("precious"), b"x").unwrap();
        let err = CacheDir::open_cache(&full).unwrap_err().to_string();
        assert!(err.contains("not empty and not a lazyfs cache"), "{err}");
        assert!(!full.join(MARKER).exists());

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&full, &link).unwrap();
        let err = CacheDir::open_cache(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let err = CacheDir::open_existing_cache(&full).unwrap_err().to_string();
        assert!(err.contains("not a lazyfs cache"), "{err}");
    }

    /// Finding 6 of issue 21: root never creates its cache dir through a
    /// link another user could have put on the way (the directory of uid
    /// 65534 here), and follows only links nobody else controls.
    #[test]
    fn never_goes_through_a_link_another_user_controls() {
        use nix::unistd::{Gid, Uid, chown};
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chown(&theirs, Some(Uid::from_raw(65534)), Some(Gid::from_raw(65534))).unwrap();
        std::os::unix::fs::symlink(&target, theirs.join("link")).unwrap();
        let err = CacheDir::open_cache(&theirs.join("link/sub/cache")).unwrap_err().to_string();
        assert!(err.contains("symbolic link") && err.contains("65534"), "{err}");
        assert!(std::fs::read_dir(&target).unwrap().next().is_none(), "nothing made where the link points");

        // A link they own in a directory of root's: refused too.
        let mine = tmp.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::os::unix::fs::symlink(&target, mine.join("link")).unwrap();
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &mine.join("link"),
            Some(Uid::from_raw(65534)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(CacheDir::open_cache(&mine.join("link/cache")).is_err());
        assert!(std::fs::read_dir(&target).unwrap().next().is_none());

        // Links only root and the caller control are followed, relative and
        // absolute, in a sticky directory too.
        std::os::unix::fs::symlink("target", tmp.path().join("relative")).unwrap();
        let sticky = tmp.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::symlink(&target, sticky.join("absolute")).unwrap();
        CacheDir::open_cache(&tmp.path().join("relative/a/../b/cache")).unwrap();
        CacheDir::open_cache(&sticky.join("absolute/c/cache")).unwrap();
        assert!(target.join("b/cache").is_dir() && target.join("c/cache").is_dir() && !target.join("a/cache").exists());
    }

    #[test]
    fn never_follows_a_symlink_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let dir = CacheDir::open_cache(&tmp.path().join("c")).unwrap();
        for name in ["f", "f.tmp"] {
            std::os::unix::fs::symlink(&target, dir.join(name)).unwrap();
        }
        assert!(dir.open_rw("f").unwrap_err().to_string().contains("symbolic link"));
        assert!(dir.open_append("f").is_err());
        assert!(dir.read("f").is_err());
        // The temporary name is removed (the link itself), then created afresh.
        dir.write_atomic("f", b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(dir.read("f").unwrap(), b"new");
        nix::unistd::mkfifo(&dir.join("fifo"), Mode::S_IRWXU).unwrap();
        assert!(dir.read("fifo").unwrap_err().to_string().contains("not a regular file"));
    }
}
