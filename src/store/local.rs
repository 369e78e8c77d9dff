//! Files made through the mount: one data file each, `CACHE/local/<id>`,
//! opened without following links and never by a path the mount shows.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use super::{StoreError, create_private_dir, io_err};

pub struct LocalFiles {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
    next: std::sync::atomic::AtomicU64,
}

impl LocalFiles {
    /// The local files of the cache dir `cache_dir` (none are open yet).
    pub fn open(cache_dir: &std::path::Path) -> Result<LocalFiles, StoreError> {
        let dir = cache_dir.join("local");
        create_private_dir(&dir)?;
        Ok(LocalFiles { dir, open: Mutex::new(HashMap::new()), next: 0.into() })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn open_file(&self, id: u64, create_new: bool) -> Result<Arc<File>, StoreError> {
        let path = self.path(id);
        let file = File::options()
            .read(true)
            .write(true)
            .create(!create_new)
            .create_new(create_new)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(&path))?;
        let file = Arc::new(file);
        self.open.lock().unwrap_or_else(PoisonError::into_inner).insert(id, file.clone());
        self.next.fetch_max(id + 1, std::sync::atomic::Ordering::Relaxed);
        Ok(file)
    }

    /// A new, empty data file, its name durable: its id.
    pub fn create(&self) -> Result<u64, StoreError> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open_file(id, true)?;
        self.sync_dir()?;
        Ok(id)
    }

    /// The data file `id` a journal names (empty if it is missing: it was
    /// made but never written before a crash).
    pub fn reopen(&self, id: u64) -> Result<(), StoreError> {
        self.open_file(id, false).map(drop)
    }

    pub fn get(&self, id: u64) -> Option<Arc<File>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()
    }

    /// Data file `id` is no one's any more.
    pub fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        let path = self.path(id);
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("{}: {e}", path.display());
        }
    }

    /// Deletes the data files nothing names (left by a crash between making
    /// one and journaling it, or between unlinking and deleting it).
    pub fn sweep(&self) -> Result<(), StoreError> {
        let keep: HashSet<String> =
            self.open.lock().unwrap_or_else(PoisonError::into_inner).keys().map(u64::to_string).collect();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if !keep.contains(entry.file_name().to_string_lossy().as_ref()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))
    }
}
