//! One spill file: a sparse local file holding a served file's bytes, read
//! and written with `pread`/`pwrite` only. Nothing maps it: a mapping would
//! hand out slices of memory another writer changes underneath, and turn a
//! spill file truncated from outside, or a failing disk, into SIGBUS.
//!
//! A spill file knows nothing of chunks or of who may write where: the file's
//! owner (`fetch::FetchFile`) decides, under its lock.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::open::{OpenSpills, Slot};
use super::{CHUNK_SIZE, CacheDir, StoreError, io_err};

/// Only a bounded set of spill files is open at a time (`open.rs`): a spill
/// file is created and opened when first used, through its directory's
/// descriptor, and may be closed again between uses.
pub struct SpillFile {
    /// The spill directory, and the file's name in it.
    dir: Arc<CacheDir>,
    name: String,
    /// Its length when it is created (on first use).
    initial_len: u64,
    /// It exists (with its initial length) on disk.
    created: AtomicBool,
    /// Its descriptor while open.
    slot: Arc<Slot>,
    spills: Arc<OpenSpills>,
}

impl SpillFile {
    /// The spill file `name` in `dir` for a file of `size` bytes, and its
    /// length; created (if need be) and opened when first used, as one of
    /// `spills`: a mount of many files creates none up front. With `keep`, an
    /// existing spill file of that size keeps its bytes (a journal says which
    /// are present); otherwise it starts empty. `size` `None` keeps the
    /// existing file's length (a file changed locally).
    pub fn open(
        dir: &Arc<CacheDir>,
        name: String,
        size: Option<u64>,
        keep: bool,
        spills: &Arc<OpenSpills>,
    ) -> Result<(SpillFile, u64), StoreError> {
        let path = dir.join(&name);
        let existing = match dir.open_read(&name) {
            Ok(file) => Some(file.metadata().map_err(io_err(&path))?.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let size = size.or(existing).unwrap_or(0);
        if existing.is_some_and(|existing| !keep || existing != size) {
            let file = dir.open_rw(&name)?;
            file.set_len(0).map_err(io_err(&path))?;
            file.set_len(size).map_err(io_err(&path))?;
        }
        let spill = SpillFile {
            dir: dir.clone(),
            name,
            initial_len: size,
            created: AtomicBool::new(existing.is_some()),
            slot: Arc::new(Slot::default()),
            spills: spills.clone(),
        };
        // An empty file is complete at once: its (empty) spill file must exist.
        if size == 0 {
            spill.with_file(|_| Ok(()))?;
        }
        Ok((spill, size))
    }

    /// A spill file of no bytes that is not made until something writes it.
    pub fn unmade(dir: &Arc<CacheDir>, name: String, spills: &Arc<OpenSpills>) -> SpillFile {
        SpillFile {
            dir: dir.clone(),
            name,
            initial_len: 0,
            created: AtomicBool::new(false),
            slot: Arc::new(Slot::default()),
            spills: spills.clone(),
        }
    }

    /// [`SpillFile::open`] of the file at `path`, outside any cache dir (tests).
    #[cfg(test)]
    pub fn open_path(path: &std::path::Path, size: Option<u64>, keep: bool) -> Result<(SpillFile, u64), StoreError> {
        let dir = Arc::new(CacheDir::open_private(path.parent().expect("a parent"))?);
        let name = path.file_name().expect("a name").to_string_lossy().into_owned();
        Self::open(&dir, name, size, keep, &Arc::new(OpenSpills::new(16)))
    }

    /// Runs `op` on the open descriptor (opening it, and creating the file
    /// sparse, if need be); it stays open while `op` runs.
    fn with_file<T>(&self, op: impl FnOnce(&File) -> Result<T, StoreError>) -> Result<T, StoreError> {
        loop {
            let handle = self.slot.file.read().expect("spill slot");
            if let Some(file) = handle.as_ref() {
                self.slot.touch();
                return op(file);
            }
            drop(handle);
            let mut handle = self.slot.file.write().expect("spill slot");
            if handle.is_none() {
                let file = self.dir.open_rw(&self.name)?;
                if !self.created.swap(true, Ordering::Relaxed) {
                    let io = self.io_err();
                    if file.metadata().map_err(io)?.len() < self.initial_len {
                        file.set_len(self.initial_len).map_err(self.io_err())?;
                    }
                }
                *handle = Some(file);
                drop(handle);
                self.spills.opened(&self.slot);
            }
        }
    }

    /// Its path (made when asked: a mount of many files keeps only names).
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// An I/O error of this file (its path made only then).
    fn io_err(&self) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io { path: self.path(), source }
    }

    /// A descriptor of its own (FUSE passthrough).
    pub fn open_file(&self) -> Result<File, StoreError> {
        self.with_file(|file| file.try_clone().map_err(self.io_err()))
    }

    /// Fills as much of `buf` as the file holds from `offset`; returns how
    /// many bytes that is (fewer only at the end of the file).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        self.with_file(|file| read_full(file, offset, buf).map_err(self.io_err()))
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.with_file(|file| file.write_all_at(data, offset).map_err(self.io_err()))
    }

    pub fn set_len(&self, size: u64) -> Result<(), StoreError> {
        self.with_file(|file| file.set_len(size).map_err(self.io_err()))
    }

    /// When its bytes last changed.
    pub fn modified(&self) -> Result<std::time::SystemTime, StoreError> {
        self.with_file(|file| file.metadata().and_then(|m| m.modified()).map_err(self.io_err()))
    }

    pub fn set_modified(&self, time: std::time::SystemTime) -> Result<(), StoreError> {
        self.with_file(|file| file.set_modified(time).map_err(self.io_err()))
    }

    /// Gives back the disk blocks of `bytes`, which hold nothing anyone may
    /// read (a fetch that failed part way): they read as zeros after.
    pub fn discard(&self, bytes: Range<u64>) {
        use std::os::fd::AsRawFd;
        let len = bytes.end.saturating_sub(bytes.start);
        if len == 0 {
            return;
        }
        let (Ok(start), Ok(len)) = (libc::off_t::try_from(bytes.start), libc::off_t::try_from(len)) else {
            return;
        };
        let punched = self.with_file(|file| {
            // SAFETY: fallocate on a descriptor we own; punching a hole only frees blocks.
            let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            Ok(unsafe { libc::fallocate(file.as_raw_fd(), flags, start, len) })
        });
        if punched.is_ok_and(|punched| punched != 0) {
            log::debug!("{}: freeing bytes {bytes:?}: {}", self.path().display(), std::io::Error::last_os_error());
        }
    }

    /// Makes what was written durable (a closed spill file is opened for
    /// it through its directory's descriptor: fsync covers every write to
    /// the file, through any descriptor).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.dir.sync_file(&self.name)
    }

    /// Its directory and name, for syncing it without holding it open.
    pub fn location(&self) -> (Arc<CacheDir>, String) {
        (self.dir.clone(), self.name.clone())
    }

    /// Makes everything written to the cache's filesystem durable at once
    /// (syncfs): cheaper than an fsync per file for many files.
    pub fn sync_filesystem(&self) -> Result<(), StoreError> {
        self.dir.sync_filesystem()
    }

    /// The blake3 of the first `len` bytes, read a window at a time.
    pub fn hash(&self, len: u64) -> Result<blake3::Hash, StoreError> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; HASH_WINDOW.min(len) as usize];
        let mut offset = 0;
        while offset < len {
            let take = HASH_WINDOW.min(len - offset) as usize;
            let got = self.read_at(offset, &mut buf[..take])?;
            hasher.update(&buf[..got]);
            if got < take {
                break;
            }
            offset += take as u64;
        }
        Ok(hasher.finalize())
    }
}

/// Bytes hashed per read.
pub const HASH_WINDOW: u64 = 1 << 20;

/// Which chunks of a file are here: a bit per chunk.
pub struct Presence {
    words: Vec<u64>,
    chunks: u64,
    present: u64,
}

impl Presence {
    /// Nothing present of a file of `size` bytes.
    pub fn new(size: u64) -> Presence {
        let chunks = size.div_ceil(CHUNK_SIZE);
        let words = usize::try_from(chunks.div_ceil(64)).expect("bitmap fits in memory");
        Presence { words: vec![0; words], chunks, present: 0 }
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks
    }

    pub fn is_present(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    pub fn all_present(&self, chunks: Range<u64>) -> bool {
        self.is_complete() || chunks.into_iter().all(|c| self.is_present(c))
    }

    pub fn is_complete(&self) -> bool {
        self.present == self.chunks
    }

    pub fn any(&self) -> bool {
        self.present > 0
    }

    pub fn mark(&mut self, chunks: Range<u64>) {
        for chunk in chunks.start..chunks.end.min(self.chunks) {
            let (word, bit) = ((chunk / 64) as usize, 1 << (chunk % 64));
            if self.words[word] & bit == 0 {
                self.words[word] |= bit;
                self.present += 1;
            }
        }
    }

    pub fn unmark(&mut self, chunk: u64) {
        if self.is_present(chunk) {
            self.words[(chunk / 64) as usize] &= !(1 << (chunk % 64));
            self.present -= 1;
        }
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
        self.present = 0;
    }

    /// The present chunks as maximal runs.
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for chunk in (0..self.chunks).filter(|&c| self.is_present(c)) {
            match runs.last_mut() {
                Some(run) if run.end == chunk => run.end += 1,
                _ => runs.push(chunk..chunk + 1),
            }
        }
        runs
    }
}

/// Fills as much of `buf` as `file` holds from `offset` (pread, retried on
/// EINTR); returns how many bytes that is (fewer only at the end of the file).
pub fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_counts_and_runs() {
        let mut presence = Presence::new(3 * CHUNK_SIZE + 100);
        assert_eq!(presence.chunk_count(), 4);
        assert!(!presence.all_present(0..1) && !presence.any());
        presence.mark(3..4);
        presence.mark(3..4);
        presence.mark(0..1);
        assert_eq!(presence.runs(), [0..1, 3..4]);
        presence.mark(1..9);
        assert!(presence.is_complete());
        presence.unmark(2);
        assert_eq!(presence.runs(), [0..2, 3..4]);
        presence.clear();
        assert!(!presence.any() && !presence.is_present(99));
    }

    #[test]
    fn reads_stop_at_the_end_and_discarded_bytes_free_their_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (spill, len) = SpillFile::open_path(&dir.path().join("s"), Some(3 * 4096), false).unwrap();
        assert_eq!(len, 3 * 4096);
        spill.write_at(4096, &[7; 4096]).unwrap();
        let mut buf = vec![9u8; 5 * 4096];
        assert_eq!(spill.read_at(4090, &mut buf).unwrap(), 3 * 4096 - 4090);
        assert_eq!(&buf[..8], &[0, 0, 0, 0, 0, 0, 7, 7]);
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(spill.path()).unwrap().blocks() > 0);
        spill.discard(4096..8192);
        assert_eq!(std::fs::metadata(spill.path()).unwrap().blocks(), 0, "nothing is left on disk");
        assert_eq!(spill.hash(3 * 4096).unwrap(), blake3::hash(&[0; 3 * 4096]));
    }
}
