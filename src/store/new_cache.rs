//! A cache dir made by a mount that then failed is removed again: a failed
//! first mount (bad usage, a source that cannot be reached) leaves nothing
//! behind. A cache an earlier mount made is kept, whatever happens.

use std::path::{Path, PathBuf};

use super::{CacheDir, StoreError};

/// Where a mount is about to make a new cache.
#[derive(Debug)]
pub struct NewCache {
    path: PathBuf,
    /// The directory did not exist: removed whole (else only what is in it).
    made_dir: bool,
}

impl NewCache {
    /// `path` before a mount: `None` if it holds a lazyfs cache already.
    pub fn before_mount(path: &Path) -> Option<NewCache> {
        if CacheDir::open_existing_cache(path).is_ok() {
            return None;
        }
        Some(NewCache { path: path.to_path_buf(), made_dir: std::fs::symlink_metadata(path).is_err() })
    }

    /// Removes what the failed mount made, if it made a cache there, unless
    /// another process holds it (its lock): a mount that uses it keeps it.
    pub fn discard(self) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let Ok(dir) = CacheDir::open_existing_cache(&self.path) else {
            return Ok(());
        };
        let lock = dir.open_rw("lock")?;
        let Ok(_held) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
            return Ok(());
        };
        if self.made_dir {
            // std's remove_dir_all never follows a symlink it meets.
            return std::fs::remove_dir_all(&self.path).map_err(io(&self.path));
        }
        for name in dir.names()? {
            let path = self.path.join(name);
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }.map_err(io(&path))?;
        }
        Ok(())
    }
}
