//! Files made through the mount: one data file each, `CACHE/local/<id>`,
//! opened through the cache dir's descriptor (never following a link) and
//! never by a path the mount shows.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{CacheDir, StoreError};

/// The name a data file nothing names is kept under.
const LOST: &str = "lost+found-";

pub struct LocalFiles {
    dir: CacheDir,
    open: Mutex<HashMap<u64, Arc<File>>>,
    next: AtomicU64,
}

impl LocalFiles {
    /// The local files of the cache dir `cache_dir` (none are open yet).
    pub fn open(cache_dir: &CacheDir) -> Result<LocalFiles, StoreError> {
        Ok(LocalFiles { dir: cache_dir.subdir("local")?, open: Mutex::new(HashMap::new()), next: 0.into() })
    }

    fn open_file(&self, id: u64) -> Result<(), StoreError> {
        let file = Arc::new(self.dir.open_rw(id.to_string())?);
        self.open.lock().unwrap_or_else(PoisonError::into_inner).insert(id, file);
        self.next.fetch_max(id + 1, Ordering::Relaxed);
        Ok(())
    }

    /// A new, empty data file, its name durable: its id. (Data files no
    /// journal names were swept at mount: a new id names no file yet.)
    pub fn create(&self) -> Result<u64, StoreError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open_file(id)?;
        self.dir.sync()?;
        Ok(id)
    }

    /// The data file `id` a journal names (empty if it is missing).
    pub fn reopen(&self, id: u64) -> Result<(), StoreError> {
        self.open_file(id)
    }

    pub fn get(&self, id: u64) -> Option<Arc<File>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()
    }

    /// Data file `id` is no one's any more.
    pub fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        if let Err(e) = self.dir.remove(id.to_string()) {
            log::warn!("{}: {e}", self.dir.join(id.to_string()).display());
        }
    }

    /// Deletes the empty data files nothing names (left by a crash between
    /// making one and journaling it: nobody could write to it yet). One that
    /// holds bytes (its records were lost: `--recover-journal`) is kept, as
    /// `lost+found-ID`, and said so.
    pub fn sweep(&self) -> Result<(), StoreError> {
        let keep: HashSet<String> =
            self.open.lock().unwrap_or_else(PoisonError::into_inner).keys().map(u64::to_string).collect();
        for name in self.dir.names()? {
            let name = name.to_string_lossy().into_owned();
            if keep.contains(&name) || name.starts_with(LOST) {
                continue;
            }
            let io = |source| StoreError::Io { path: self.dir.join(&name), source };
            let len = self.dir.open_read(&name).and_then(|f| f.metadata()).map_err(io)?.len();
            if len == 0 {
                self.dir.remove(&name).map_err(io)?;
            } else {
                let kept = format!("{LOST}{name}");
                self.dir.rename(&name, &kept)?;
                log::warn!(
                    "{}: {len} bytes no journal record names (lost with a damaged journal?): kept as {}",
                    self.dir.join(&name).display(),
                    self.dir.join(&kept).display()
                );
            }
        }
        Ok(())
    }

    /// Deletes every data file (the local changes are dropped); those kept
    /// aside (`lost+found-ID`) stay for a person to look at.
    pub fn clear(&self) -> Result<(), StoreError> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).clear();
        for name in self.dir.names()? {
            if !name.to_string_lossy().starts_with(LOST) {
                self.dir.remove(&name).map_err(|source| StoreError::Io { path: self.dir.join(&name), source })?;
            }
        }
        Ok(())
    }
}
