//! The local side of every file: a sparse spill file per served file under the
//! cache directory, read and written with pread/pwrite, and which of its
//! chunks are present.
//! Spill files are named by a hash of the original path, never by the path.

mod cache_dir;
pub mod inodes;
pub mod journal;
pub mod local;
mod new_cache;
mod open;
mod spill;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cache_dir::CacheDir;
pub use new_cache::NewCache;
pub use open::OpenSpills;
pub use spill::{HASH_WINDOW, Presence, SpillFile, read_full};

/// The unit of presence: a read waits for the chunks it covers and no more.
/// 16 KiB: a small read costs one request barely dearer than the read itself
/// (measured here: a fresh 4 KiB read through the mount 0.3-0.5 ms with 16 KiB
/// chunks, 0.75 ms with 64 KiB ones), while a 1 GiB file's presence bitmap is
/// 8 KiB and its manifest chunk hashes 0.2% of its size. Whole files still
/// stream as large multi-chunk requests.
pub const CHUNK_SIZE: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: refused as a cache or runtime directory: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: String },
    #[error("{}: another lazyfs process uses this cache dir; unmount it first, or give another --cache-dir", .0.display())]
    Busy(PathBuf),
    #[error("{}: the images record {size} bytes for it, {before} for the files before: more than the cache filesystem holds ({capacity} bytes): not served", original.display())]
    TooLarge { original: PathBuf, size: u64, before: u64, capacity: u64 },
    #[error("{}: the source lists {size} bytes for it, more than the cache filesystem holds ({capacity} bytes): not served", original.display())]
    ListedTooLarge { original: PathBuf, size: u64, capacity: u64 },
}

impl StoreError {
    /// The errno a caller should see: ENOSPC and EDQUOT as they are (a
    /// database treats a full disk differently from a failing one), EIO otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Io { source, .. } => match source.raw_os_error() {
                Some(e @ (libc::ENOSPC | libc::EDQUOT)) => e,
                _ => libc::EIO,
            },
            _ => libc::EIO,
        }
    }

    /// The cache filesystem is full: the same write may succeed later.
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), libc::ENOSPC | libc::EDQUOT)
    }

    /// The same error again (for another request it ended).
    pub fn again(&self) -> StoreError {
        match self {
            StoreError::Io { path, source } => StoreError::Io { path: path.clone(), source: io_again(source) },
            StoreError::Unsafe { path, reason } => StoreError::Unsafe { path: path.clone(), reason: reason.clone() },
            StoreError::Busy(path) => StoreError::Busy(path.clone()),
            StoreError::TooLarge { original, size, before, capacity } => {
                StoreError::TooLarge { original: original.clone(), size: *size, before: *before, capacity: *capacity }
            }
            StoreError::ListedTooLarge { original, size, capacity } => {
                StoreError::ListedTooLarge { original: original.clone(), size: *size, capacity: *capacity }
            }
        }
    }
}

/// An I/O error again: the same errno, or the same kind and message.
pub fn io_again(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(errno) => std::io::Error::from_raw_os_error(errno),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A cache directory, locked for one lazyfs process at a time.
pub struct Store {
    dir: CacheDir,
    spill: Arc<CacheDir>,
    /// Bytes the cache dir's filesystem holds: the spill files' sizes cannot
    /// add up to more.
    capacity: u64,
    /// What the spill files opened so far add up to.
    claimed: std::sync::atomic::AtomicU64,
    /// Held (flock) for as long as the store is open.
    _lock: nix::fcntl::Flock<File>,
    /// The spill files open at one time: as many as the descriptor limit allows.
    spills: Arc<OpenSpills>,
}

impl Store {
    /// Opens the cache dir `dir` (see [`CacheDir::open_cache`]) and locks it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let dir = CacheDir::open_cache(dir)?;
        let spill = dir.subdir("spill")?;
        let lock = dir.open_rw("lock")?;
        let flock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock);
        let lock = match flock {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StoreError::Busy(dir.path().to_path_buf()));
            }
            Err((_, e)) => return Err(io_err(&dir.join("lock"))(e.into())),
        };
        let capacity = dir.capacity()?;
        let spills = Arc::new(OpenSpills::new(open::capacity_for(open::raise_fd_limit())));
        Ok(Store { dir, spill: Arc::new(spill), capacity, claimed: 0.into(), _lock: lock, spills })
    }

    pub fn dir(&self) -> &CacheDir {
        &self.dir
    }

    /// Opens the spill file for `original`, `size` bytes long (see [`SpillFile::open`]).
    pub fn open_spill(&self, original: &Path, size: Option<u64>, keep: bool) -> Result<(SpillFile, u64), StoreError> {
        // Recorded sizes are untrusted: refuse what, with the files before,
        // no disk here could hold, before anything (a presence bitmap) is sized by it.
        if let Some(size) = size {
            use std::sync::atomic::Ordering;
            let before = self.claimed.load(Ordering::Relaxed);
            if before.saturating_add(size) > self.capacity {
                let original = original.to_path_buf();
                return Err(StoreError::TooLarge { original, size, before, capacity: self.capacity });
            }
            self.claimed.fetch_add(size, Ordering::Relaxed);
        }
        SpillFile::open(&self.spill, spill_name(original), size, keep, &self.spills)
    }

    /// Opens the spill file of a file a listing of the tree found, `size`
    /// bytes long: it must fit the cache filesystem by itself, but claims
    /// nothing (it may never be read; a tree larger than the cache disk is
    /// served as it is read, and a full disk then fails the reads that do
    /// not fit).
    pub fn open_listed_spill(&self, original: &Path, size: u64, keep: bool) -> Result<(SpillFile, u64), StoreError> {
        if size > self.capacity {
            return Err(StoreError::ListedTooLarge { original: original.to_path_buf(), size, capacity: self.capacity });
        }
        SpillFile::open(&self.spill, spill_name(original), Some(size), keep, &self.spills)
    }

    /// The spill file of a file that is not served: never made (the cache
    /// filesystem may have no room left for even an empty file).
    pub fn unmade_spill(&self, original: &Path) -> SpillFile {
        SpillFile::unmade(&self.spill, spill_name(original), &self.spills)
    }

    /// Removes every spill file (the cache held another checkpoint's files).
    pub fn clear_spills(&self) -> Result<(), StoreError> {
        for name in self.spill.names()? {
            self.spill.remove(&name).map_err(io_err(&self.spill.join(&name)))?;
        }
        Ok(())
    }
}

/// The name of the spill file of the file recorded at `original`: a hash of
/// the path, never the path.
pub fn spill_name(original: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    blake3::hash(original.as_os_str().as_bytes()).to_hex()[..32].to_string()
}

/// Where the spill file of the file recorded at `original` is in `cache_dir`.
pub fn spill_path(cache_dir: &Path, original: &Path) -> PathBuf {
    cache_dir.join("spill").join(spill_name(original))
}
