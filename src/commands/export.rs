//! `lazyfs export MOUNTPOINT DIR`: the mount's tree as it is now (checkpoint
//! files with their local changes, and the local files) copied into a plain
//! directory, so the next start of the application needs no lazyfs. Read
//! through the mount like any reader (missing bytes are fetched); holes stay
//! holes (SEEK_DATA/SEEK_HOLE where the filesystem tells them, and 1 MiB
//! blocks of zeros otherwise), data moves with `copy_file_range` where the
//! kernel allows it between the two filesystems, `pread`/`pwrite` otherwise.
//! Every entry keeps the numeric owner, mode and times the mount shows, as
//! `rsync -a --numeric-ids` keeps them (a PostgreSQL data directory exported
//! by root is still its user's); owners only where the exporting user may
//! give them (root), otherwise the export is that user's.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ExportError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError { path: path.to_path_buf(), source }
}

/// What was copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub files: u64,
    pub bytes: u64,
    /// Entries that could not be given their owner (not root): the exporting user's.
    pub owners_not_kept: u64,
}

/// Copies the tree below `from` into `to`, which must not exist yet.
pub fn export(from: &Path, to: &Path) -> Result<Exported, ExportError> {
    std::fs::create_dir(to).map_err(at(to))?;
    let mut done = Exported::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    copy_dir(from, to, &mut links, &mut done)?;
    let meta = std::fs::metadata(from).map_err(at(from))?;
    keep_attrs(to, &meta, &mut done)?;
    Ok(done)
}

fn copy_dir(
    from: &Path,
    to: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
    done: &mut Exported,
) -> Result<(), ExportError> {
    for entry in std::fs::read_dir(from).map_err(at(from))? {
        let entry = entry.map_err(at(from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&source).map_err(at(&source))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&target).map_err(at(&target))?;
            copy_dir(&source, &target, links, done)?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(&source).map_err(at(&source))?;
            std::os::unix::fs::symlink(link, &target).map_err(at(&target))?;
        } else if let Some(first) = links.get(&(meta.dev(), meta.ino())).filter(|_| meta.nlink() > 1) {
            std::fs::hard_link(first, &target).map_err(at(&target))?;
            continue;
        } else if kind.is_file() {
            done.bytes += copy_file(&source, &target, meta.len())?;
            done.files += 1;
            links.insert((meta.dev(), meta.ino()), target.clone());
        } else {
            use std::os::unix::fs::FileTypeExt;
            if !kind.is_fifo() {
                continue;
            }
            nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| at(&target)(e.into()))?;
        }
        keep_attrs(&target, &meta, done)?;
    }
    Ok(())
}

/// Gives `target` (made, and filled if a directory) the owner, mode and
/// times of `meta`: owner first, as a chown clears setuid and setgid bits;
/// times last, as filling a directory changes its mtime. A symlink keeps its
/// owner and times (it has no mode of its own).
fn keep_attrs(target: &Path, meta: &std::fs::Metadata, done: &mut Exported) -> Result<(), ExportError> {
    match std::os::unix::fs::lchown(target, Some(meta.uid()), Some(meta.gid())) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => done.owners_not_kept += 1,
        Err(e) => return Err(at(target)(e)),
    }
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(at(target))?;
    }
    let time = |secs: i64, nanos: i64| nix::sys::time::TimeSpec::new(secs, nanos);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        target,
        &time(meta.atime(), meta.atime_nsec()),
        &time(meta.mtime(), meta.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| at(target)(e.into()))
}

/// Copies the data of `source` (`len` bytes) into a new `target`, leaving
/// its holes as holes; returns the bytes copied.
fn copy_file(source: &Path, target: &Path, len: u64) -> Result<u64, ExportError> {
    let input = File::open(source).map_err(at(source))?;
    let output = File::options().write(true).create_new(true).mode(0o600).open(target).map_err(at(target))?;
    output.set_len(len).map_err(at(target))?;
    let mut copied = 0;
    let mut offset = 0;
    while offset < len {
        let Some(data) = seek(&input, offset, libc::SEEK_DATA).map_err(at(source))? else { break };
        let end = seek(&input, data, libc::SEEK_HOLE).map_err(at(source))?.unwrap_or(len).min(len);
        copy_range(&input, &output, data, end).map_err(at(target))?;
        copied += end - data;
        offset = end;
    }
    output.sync_all().map_err(at(target))?;
    Ok(copied)
}

/// `lseek` with SEEK_DATA / SEEK_HOLE; `None` past the last data.
fn seek(file: &File, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    match at {
        -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Ok(None),
        -1 => Err(std::io::Error::last_os_error()),
        at => Ok(Some(at as u64)),
    }
}

fn copy_range(input: &File, output: &File, start: u64, end: u64) -> std::io::Result<()> {
    let mut at = start;
    while at < end {
        let (mut from, mut to) = (at as libc::loff_t, at as libc::loff_t);
        let want = (end - at).min(1 << 30) as usize;
        // SAFETY: copy_file_range between descriptors we own, offsets passed by pointer.
        let n = unsafe { libc::copy_file_range(input.as_raw_fd(), &mut from, output.as_raw_fd(), &mut to, want, 0) };
        match n {
            0 => return Err(std::io::Error::other("the file ended early")),
            n if n > 0 => at += n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Between filesystems the kernel will not: copy by hand.
                    Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
                        return copy_by_hand(input, output, at, end);
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn copy_by_hand(input: &File, output: &File, mut at: u64, end: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let take = (end - at).min(buf.len() as u64) as usize;
        input.read_exact_at(&mut buf[..take], at)?;
        // All zeros: left a hole (the mount does not tell holes from data).
        if buf[..take].iter().any(|&b| b != 0) {
            output.write_all_at(&buf[..take], at)?;
        }
        at += take as u64;
    }
    Ok(())
}
