//! A local directory holding the old host's root (a snapshot, a mounted disk).
//! Every path is resolved below the root's descriptor without following a
//! symlink (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so nothing
//! resolves outside the root, and only regular files are opened for reading.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use super::{
    Connection, DirEntry, Listings, Source, SourceAttrs, SourceError, SourceStat, WholeRead, changed_since_listed,
    is_safe_name, relative,
};

pub struct LocalSource {
    root: PathBuf,
    fd: Arc<OwnedFd>,
}

impl LocalSource {
    pub fn new(root: &Path) -> Result<Self, SourceError> {
        match nix::fcntl::open(root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => Ok(LocalSource { root: root.to_path_buf(), fd: Arc::new(fd) }),
            Err(Errno::ENOTDIR) => Err(SourceError::Config(format!("{}: not a directory", root.display()))),
            // SOURCE itself was checked: what is missing is its --source-root below it.
            Err(Errno::ENOENT) => Err(SourceError::Config(format!(
                "{}: no such directory (SOURCE with --source-root below it)",
                root.display()
            ))),
            Err(e) => Err(SourceError::Io { path: root.to_path_buf(), source: e.into() }),
        }
    }
}

impl Source for LocalSource {
    fn connect_within(&self, _time: std::time::Duration) -> Result<Box<dyn Connection>, SourceError> {
        Ok(Box::new(LocalConnection { root: self.root.clone(), fd: self.fd.clone(), open: None }))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

struct LocalConnection {
    /// The root, for messages; paths are resolved below `fd`.
    root: PathBuf,
    fd: Arc<OwnedFd>,
    /// The last file read, and in which generation: consecutive reads of one
    /// file reuse its descriptor.
    open: Option<(PathBuf, u64, File)>,
}

impl LocalConnection {
    fn full(&self, path: &Path) -> PathBuf {
        self.root.join(relative(path))
    }

    /// `path` below the root, never through a symlink, with `flags`.
    fn resolve(&self, path: &Path, flags: OFlag) -> Result<File, SourceError> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let below = match relative(path) {
            p if p.as_os_str().is_empty() => Path::new("."),
            p => p,
        };
        match nix::fcntl::openat2(&*self.fd, below, how) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::ELOOP | Errno::EXDEV) => {
                Err(SourceError::Changed { path: path.to_path_buf(), reason: "reached through a symbolic link".into() })
            }
            Err(e) => Err(io_error(path, &self.full(path), e.into())),
        }
    }

    /// The regular file at `path`: looked at first without opening it (a
    /// FIFO or a device is never opened), then opened and checked to be the
    /// same file.
    fn open_regular(&self, path: &Path) -> Result<(File, std::fs::Metadata), SourceError> {
        let looked = self.resolve(path, OFlag::O_PATH)?;
        let meta = self.regular(path, &looked)?;
        let file = self.resolve(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)?;
        let opened = self.regular(path, &file)?;
        if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
            let reason = "replaced while it was being opened".into();
            return Err(SourceError::Changed { path: path.to_path_buf(), reason });
        }
        Ok((file, opened))
    }

    fn file(&mut self, path: &Path, generation: u64) -> Result<&File, SourceError> {
        if self.open.as_ref().is_none_or(|(p, g, _)| p != path || *g != generation) {
            let (file, _) = self.open_regular(path)?;
            self.open = Some((path.to_path_buf(), generation, file));
        }
        Ok(&self.open.as_ref().expect("just opened").2)
    }

    /// The metadata of `file`, a regular file.
    fn regular(&self, path: &Path, file: &File) -> Result<std::fs::Metadata, SourceError> {
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata().map_err(|e| io_error(path, &self.full(path), e))?;
        let kind = meta.file_type();
        let irregular = match () {
            _ if kind.is_file() => return Ok(meta),
            _ if kind.is_symlink() => "a symbolic link",
            _ if kind.is_dir() => "a directory",
            _ if kind.is_fifo() => "a FIFO",
            _ if kind.is_socket() => "a socket",
            _ if kind.is_char_device() || kind.is_block_device() => "a device",
            _ => "not a regular file",
        };
        Err(SourceError::Changed { path: path.to_path_buf(), reason: format!("now {irregular}") })
    }

    /// Whether the file has a byte at `offset` (it grew past a recorded size).
    fn has_byte_at(&mut self, path: &Path, offset: u64) -> Result<bool, SourceError> {
        let file = self.file(path, 0)?;
        loop {
            match file.read_at(&mut [0u8], offset) {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(path, &self.full(path), e)),
            }
        }
    }
}

impl LocalConnection {
    /// The entries of the directory at `path`: opened below the root without
    /// following a symlink, each entry looked at (`fstatat`, not following)
    /// and a symlink's target read relative to that directory's descriptor.
    fn list_dir(&self, path: &Path) -> Result<Vec<DirEntry>, SourceError> {
        use std::os::fd::AsFd;
        use std::os::unix::ffi::OsStringExt;
        let no_longer = || SourceError::Changed { path: path.to_path_buf(), reason: "no longer a directory".into() };
        let opened = match self.resolve(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NONBLOCK) {
            // A symlink (O_NOFOLLOW with O_DIRECTORY) or a file there now.
            Err(SourceError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(no_longer());
            }
            opened => opened?,
        };
        let io = |e: Errno| io_error(path, &self.full(path), e.into());
        let mut dir = nix::dir::Dir::from_fd(opened.into()).map_err(|e| match e {
            Errno::ENOTDIR => no_longer(),
            e => io(e),
        })?;
        let names: Vec<std::ffi::CString> = dir
            .iter()
            .filter_map(|entry| entry.ok().map(|e| e.file_name().to_owned()))
            .filter(|name| name.as_bytes() != b"." && name.as_bytes() != b"..")
            .collect();
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            if !is_safe_name(name.as_bytes()) {
                log::warn!("{}: an entry named {name:?} is left out", path.display());
                continue;
            }
            let stat =
                match nix::sys::stat::fstatat(dir.as_fd(), name.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(stat) => stat,
                    // Gone since the directory was read.
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(io(e)),
                };
            let attrs = local_attrs(&stat);
            let target = match attrs.kind() {
                libc::S_IFLNK => match nix::fcntl::readlinkat(dir.as_fd(), name.as_c_str()) {
                    Ok(target) => Some(target),
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(io(e)),
                },
                _ => None,
            };
            let name = std::ffi::OsString::from_vec(name.into_bytes());
            entries.push(DirEntry { name, attrs, target });
        }
        Ok(entries)
    }
}

/// What `stat` says, as the source tells it.
fn local_attrs(stat: &nix::sys::stat::FileStat) -> SourceAttrs {
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    SourceAttrs {
        mode: stat.st_mode,
        size: stat.st_size as u64,
        uid: stat.st_uid,
        gid: stat.st_gid,
        atime_ns: ns(stat.st_atime, stat.st_atime_nsec),
        mtime_ns: ns(stat.st_mtime, stat.st_mtime_nsec),
        ctime_ns: Some(ns(stat.st_ctime, stat.st_ctime_nsec)),
        dev_ino: Some((stat.st_dev, stat.st_ino)),
        nlink: u32::try_from(stat.st_nlink).ok(),
    }
}

impl Connection for LocalConnection {
    fn shows(&self) -> Option<super::Shown> {
        use std::os::fd::AsRawFd;
        // Where the root's descriptor really is, whatever path opened it.
        let root = std::fs::read_link(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).ok()?;
        Some(super::Shown { kind: "local", host_keys: Vec::new(), root })
    }

    fn attrs(&mut self, path: &Path) -> Result<SourceAttrs, SourceError> {
        use std::os::fd::AsFd;
        let looked = self.resolve(path, OFlag::O_PATH)?;
        let stat = nix::sys::stat::fstat(looked.as_fd()).map_err(|e| io_error(path, &self.full(path), e.into()))?;
        Ok(local_attrs(&stat))
    }

    fn list_dirs(&mut self, dirs: &[&Path]) -> Result<Listings, SourceError> {
        Ok(dirs.iter().map(|dir| self.list_dir(dir)).collect())
    }

    fn stat(&mut self, path: &Path) -> Result<SourceStat, SourceError> {
        let meta = self.regular(path, &self.resolve(path, OFlag::O_PATH)?)?;
        Ok(SourceStat { size: meta.len(), mtime: meta.mtime() })
    }

    fn read_exact_at(&mut self, path: &Path, generation: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let file = self.file(path, generation)?;
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(SourceError::Short {
                        path: path.to_path_buf(),
                        end: offset + done as u64,
                        wanted: offset + buf.len() as u64,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(path, &self.full(path), e)),
            }
        }
        Ok(())
    }

    /// Like SSH's pipeline, each whole read also shows a file that grew.
    fn read_files(&mut self, files: &mut [WholeRead<'_>]) -> Result<(), SourceError> {
        for file in files.iter_mut() {
            let size = file.buf.len() as u64;
            let listed = file.listed;
            file.result = self.read_exact_at(file.path, 0, 0, file.buf).and_then(|()| {
                let opened = self.file(file.path, 0)?.metadata().map_err(|e| io_error(file.path, file.path, e))?;
                let now = SourceStat { size: opened.len(), mtime: opened.mtime() };
                if let Some(reason) = changed_since_listed(listed, now) {
                    return Err(SourceError::Changed { path: file.path.to_path_buf(), reason });
                }
                match self.has_byte_at(file.path, size)? {
                    true => Err(SourceError::Longer { path: file.path.to_path_buf(), size }),
                    false => Ok(()),
                }
            });
        }
        Ok(())
    }
}

fn io_error(path: &Path, full: &Path, source: std::io::Error) -> SourceError {
    if source.kind() == std::io::ErrorKind::NotFound {
        SourceError::NotFound { path: path.to_path_buf(), looked: full.display().to_string() }
    } else {
        SourceError::Io { path: path.to_path_buf(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_below_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/b c"), b"0123456789").unwrap();
        let source = LocalSource::new(dir.path()).unwrap();
        let mut conn = source.connect().unwrap();
        assert_eq!(conn.stat(Path::new("/a/b c")).unwrap().size, 10);
        let mut buf = [0u8; 4];
        conn.read_exact_at(Path::new("/a/b c"), 0, 3, &mut buf).unwrap();
        assert_eq!(&buf, b"3456");
        let err = conn.read_exact_at(Path::new("/a/b c"), 0, 8, &mut buf).unwrap_err();
        assert!(matches!(err, SourceError::Short { end: 10, wanted: 12, .. }), "{err}");
        let err = conn.stat(Path::new("/missing")).unwrap_err();
        assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    }

    #[test]
    fn symlinks_and_irregular_files_are_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::fs::create_dir_all(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/real"), b"real").unwrap();
        // An absolute link out of the root, a relative one inside it, a link
        // on the way, and a FIFO (which would block an open for reading).
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("d/real", dir.path().join("rel")).unwrap();
        std::os::unix::fs::symlink("d", dir.path().join("via")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::S_IRWXU).unwrap();
        let source = LocalSource::new(dir.path()).unwrap();
        let mut conn = source.connect().unwrap();
        let mut buf = [0u8; 4];
        for (path, reason) in [
            ("/abs", "symbolic link"),
            ("/rel", "symbolic link"),
            ("/via/real", "symbolic link"),
            ("/fifo", "now a FIFO"),
            ("/d", "now a directory"),
        ] {
            for err in [
                conn.stat(Path::new(path)).unwrap_err(),
                conn.read_exact_at(Path::new(path), 0, 0, &mut buf).unwrap_err(),
            ] {
                assert!(matches!(err, SourceError::Changed { .. }), "{path}: {err}");
                assert!(err.to_string().contains(reason), "{path}: {err}");
            }
        }
        conn.read_exact_at(Path::new("/d/real"), 0, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"real");
    }
}
