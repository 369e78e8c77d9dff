//! One spill file: a sparse local file as long as the original, mapped while
//! open (see `open.rs`: only a bounded set is), with a bit per chunk saying
//! whether those bytes have arrived.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLockReadGuard};

use super::open::{Handle, OpenSpills, Slot};

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

use super::{CHUNK_SIZE, StoreError, io_err};

pub struct SpillFile {
    path: PathBuf,
    /// Its descriptor and map while open.
    slot: Arc<Slot>,
    spills: Arc<OpenSpills>,
    /// Its length now (local writes may change it).
    len: AtomicU64,
    /// The size the chunks cover: the original's size.
    fetched_size: u64,
    present: Box<[AtomicU64]>,
    present_chunks: AtomicU64,
}

impl SpillFile {
    /// Creates the spill file empty and sparse, `size` bytes long.
    #[cfg(test)]
    pub fn create(path: &Path, size: u64) -> Result<SpillFile, StoreError> {
        Self::open(path, Some(size), false, &Arc::new(OpenSpills::new(16)))
    }

    /// The spill file for a file of `size` bytes; it is created (if need
    /// be) and opened when first used, as one of `spills`: a mount of many
    /// files creates none up front. With `keep`, an existing spill file of
    /// that size keeps its bytes (a journal says which are present);
    /// otherwise it starts empty. `size` `None` keeps the existing file's
    /// length (a file changed locally).
    pub fn open(path: &Path, size: Option<u64>, keep: bool, spills: &Arc<OpenSpills>) -> Result<SpillFile, StoreError> {
        let existing = match std::fs::metadata(path) {
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(path)(e)),
        };
        let size = size.or(existing).unwrap_or(0);
        // An empty file is complete at once: its (empty) spill file must exist.
        if existing.is_some_and(|existing| !keep || existing != size) || (existing.is_none() && size == 0) {
            let file = File::options().write(true).create(true).truncate(true).open(path).map_err(io_err(path))?;
            file.set_len(size).map_err(io_err(path))?;
        }
        let chunks = size.div_ceil(CHUNK_SIZE);
        let words = usize::try_from(chunks.div_ceil(64)).expect("bitmap fits in memory");
        Ok(SpillFile {
            path: path.to_path_buf(),
            slot: Arc::new(Slot::default()),
            spills: spills.clone(),
            len: AtomicU64::new(size),
            fetched_size: size,
            present: (0..words).map(|_| AtomicU64::new(0)).collect(),
            present_chunks: AtomicU64::new(0),
        })
    }

    /// The open handle (opened, and mapped, if it is not), read-locked:
    /// it stays open and its length stays put while the guard lives.
    fn handle(&self) -> Result<RwLockReadGuard<'_, Option<Handle>>, StoreError> {
        loop {
            let handle = self.slot.handle.read().expect("spill handle");
            if handle.is_some() {
                self.slot.touch();
                return Ok(handle);
            }
            drop(handle);
            let mut handle = self.slot.handle.write().expect("spill handle");
            if handle.is_none() {
                *handle = Some(Handle::open(&self.path, self.len())?);
                drop(handle);
                self.spills.opened(&self.slot);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A descriptor of its own for the spill file (FUSE passthrough).
    pub fn open_file(&self) -> Result<File, StoreError> {
        let handle = self.handle()?;
        handle.as_ref().expect("open").file.try_clone().map_err(io_err(&self.path))
    }

    pub fn chunk_count(&self) -> u64 {
        self.fetched_size.div_ceil(CHUNK_SIZE)
    }

    /// The byte range chunk `chunk` covers in the original.
    pub fn chunk_bytes(&self, chunks: Range<u64>) -> Range<u64> {
        chunks.start * CHUNK_SIZE..(chunks.end * CHUNK_SIZE).min(self.fetched_size)
    }

    /// The chunks holding bytes `offset..offset+len` of the original.
    pub fn chunks_of(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.fetched_size);
        if offset >= end {
            return 0..0;
        }
        offset / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE)
    }

    pub fn is_present(&self, chunk: u64) -> bool {
        let word = &self.present[(chunk / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    pub fn all_present(&self, chunks: Range<u64>) -> bool {
        self.is_complete() || chunks.into_iter().all(|c| self.is_present(c))
    }

    pub fn is_complete(&self) -> bool {
        self.present_chunks.load(Ordering::Acquire) == self.chunk_count()
    }

    pub fn present_bytes(&self) -> u64 {
        if self.is_complete() {
            return self.fetched_size;
        }
        (0..self.chunk_count())
            .filter(|&c| self.is_present(c))
            .map(|c| {
                let r = self.chunk_bytes(c..c + 1);
                r.end - r.start
            })
            .sum()
    }

    /// Forgets one chunk (its bytes failed a check).
    pub fn unmark(&self, chunk: u64) {
        let bit = 1 << (chunk % 64);
        let before = self.present[(chunk / 64) as usize].fetch_and(!bit, Ordering::AcqRel);
        if before & bit != 0 {
            self.present_chunks.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Forgets every chunk (the file is fetched again from scratch).
    pub fn clear_present(&self) {
        for word in self.present.iter() {
            word.store(0, Ordering::Release);
        }
        self.present_chunks.store(0, Ordering::Release);
    }

    /// The blake3 of the whole file as it is now. Hashes the mapped bytes a
    /// window at a time and lets go of each window's pages after: spill data
    /// is never held in this process's memory.
    pub fn hash(&self) -> Result<blake3::Hash, StoreError> {
        const WINDOW: u64 = 8 << 20;
        let mut hasher = blake3::Hasher::new();
        let len = self.len();
        let mut offset = 0;
        while offset < len {
            let take = WINDOW.min(len - offset);
            self.read(offset, take, |bytes| {
                hasher.update_rayon(bytes);
            })?;
            self.release(offset, take);
            offset += take;
        }
        Ok(hasher.finalize())
    }

    /// Drops this process's mapping of `offset..offset+len` (the bytes stay
    /// in the file and the page cache), so what was written or read through
    /// the map does not count against this process's memory.
    pub fn release(&self, offset: u64, len: u64) {
        // Not open: nothing of it is mapped.
        let handle = self.slot.handle.read().expect("spill handle");
        let Some(map) = handle.as_ref().and_then(|h| h.map.as_ref()) else { return };
        let page = page_size();
        let start = offset / page * page;
        let end = offset.saturating_add(len).min(map.len() as u64);
        if start >= end {
            return;
        }
        // SAFETY: MADV_DONTNEED on a shared file mapping only unmaps the
        // pages; the next access maps them again from the page cache, so no
        // data is lost and concurrent readers see the same bytes.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start as usize, (end - start) as usize)
        };
    }

    /// Marks chunks present once their bytes are fully written.
    pub fn mark_present(&self, chunks: Range<u64>) {
        for chunk in chunks {
            let bit = 1 << (chunk % 64);
            let before = self.present[(chunk / 64) as usize].fetch_or(bit, Ordering::AcqRel);
            if before & bit == 0 {
                self.present_chunks.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Writes the fetched bytes of claimed `chunks` (`data` is exactly
    /// their bytes). Written with pwrite, not through the map: a fresh sparse
    /// mapping takes a page fault with a block allocation per 4 KiB, which
    /// cost about 3 ms per 64 KiB here against 0.4 ms for fetching them.
    ///
    /// The caller must own these chunks (the fetcher's in-flight claim): no
    /// one else writes them, and no one reads them until they are marked present.
    pub fn write_fetched(&self, chunks: Range<u64>, data: &[u8]) -> Result<(), StoreError> {
        let bytes = self.chunk_bytes(chunks);
        assert_eq!(data.len() as u64, bytes.end - bytes.start, "fetched bytes cover the chunks");
        let handle = self.handle()?;
        handle.as_ref().expect("open").file.write_all_at(data, bytes.start).map_err(io_err(&self.path))
    }

    /// Gives `read` the bytes `offset..offset+len`, cut at the end of the file.
    pub fn read<R>(&self, offset: u64, len: u64, read: impl FnOnce(&[u8]) -> R) -> Result<R, StoreError> {
        if self.is_empty() {
            return Ok(read(&[]));
        }
        let handle = self.handle()?;
        let Some(map) = handle.as_ref().and_then(|h| h.map.as_ref()) else {
            return Ok(read(&[]));
        };
        let start = (offset as usize).min(map.len());
        let end = (offset.saturating_add(len) as usize).min(map.len());
        // SAFETY: inside the live mapping (the read lock keeps it in place).
        // Bytes read are present: written once and no longer changed by the
        // fetcher; a local write may change them concurrently, as any file's
        // bytes may change under a reader.
        let slice = unsafe { std::slice::from_raw_parts(map.as_ptr().add(start), end - start) };
        Ok(read(slice))
    }

    /// The current length of the spill file (local writes may change it).
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A local write to a complete file.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.len() {
            self.set_len(end)?;
        }
        let handle = self.handle()?;
        handle.as_ref().expect("open").file.write_all_at(data, offset).map_err(io_err(&self.path))
    }

    /// A local truncate (or extension) of a complete file. No reader holds
    /// the map meanwhile (the write lock), so none reads past a new end.
    pub fn set_len(&self, size: u64) -> Result<(), StoreError> {
        drop(self.handle()?);
        let mut handle = self.slot.handle.write().expect("spill handle");
        match handle.as_mut() {
            Some(open) => {
                open.map = None;
                open.file.set_len(size).map_err(io_err(&self.path))?;
                self.len.store(size, Ordering::Release);
                open.remap(&self.path, size)
            }
            // Closed in between: the next use maps the new length.
            None => {
                let file = File::options().write(true).open(&self.path).map_err(io_err(&self.path))?;
                file.set_len(size).map_err(io_err(&self.path))?;
                self.len.store(size, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Makes what was written durable (a closed spill file is opened for
    /// it: fsync covers every write to the file, through any descriptor).
    pub fn sync(&self) -> Result<(), StoreError> {
        sync_path(&self.path)
    }
}

/// fsyncs the data of the file at `path`.
pub fn sync_path(path: &Path) -> Result<(), StoreError> {
    match File::open(path) {
        Ok(file) => file.sync_data().map_err(io_err(path)),
        // Never written, never created: nothing to make durable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_presence_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * CHUNK_SIZE + 100;
        let spill = SpillFile::create(&dir.path().join("s"), size).unwrap();
        assert_eq!(spill.chunk_count(), 4);
        assert_eq!(spill.chunks_of(0, 1), 0..1);
        assert_eq!(spill.chunks_of(CHUNK_SIZE - 1, 2), 0..2);
        assert_eq!(spill.chunks_of(size - 1, 4096), 3..4);
        assert_eq!(spill.chunks_of(size, 10), 0..0);
        assert_eq!(spill.chunk_bytes(3..4), 3 * CHUNK_SIZE..size);
        assert!(!spill.all_present(0..1));

        spill.write_fetched(3..4, &[7; 100]).unwrap();
        spill.mark_present(3..4);
        spill.mark_present(3..4);
        assert!(spill.is_present(3) && !spill.is_complete());
        assert_eq!(spill.present_bytes(), 100);
        spill.read(size - 10, 100, |b| assert_eq!(b, &[7; 10])).unwrap();
        spill.mark_present(0..3);
        assert!(spill.is_complete());
        assert_eq!(spill.present_bytes(), size);
        // Sparse: only the written chunk took space.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(spill.path()).unwrap().blocks() * 512 <= 8192);
    }

    #[test]
    fn local_writes_grow_and_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::create(&dir.path().join("s"), 10).unwrap();
        spill.mark_present(0..1);
        spill.write_at(8, b"abcdef").unwrap();
        assert_eq!(spill.len(), 14);
        spill.read(8, 100, |b| assert_eq!(b, b"abcdef")).unwrap();
        spill.set_len(2).unwrap();
        assert_eq!(spill.len(), 2);
        spill.set_len(0).unwrap();
        spill.read(0, 10, |b| assert!(b.is_empty())).unwrap();
    }
}
