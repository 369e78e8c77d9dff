//! Each served file's owner ([`FetchFile`]): its spill file, which chunks are
//! present or being fetched, its phase and generation, its waiting readers,
//! all behind one lock. Only the owner writes, truncates, restarts and marks
//! chunks present; fetched bytes reach it one way, from a transport through a
//! check (`landing.rs`), and land only in the generation they were claimed in.

use std::collections::BTreeSet;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use super::restore;
use crate::control::proto::FileState;
use crate::manifest::FileHashes;
use crate::source::SourceStat;
use crate::store::journal::{self, Journal, proto::JournalRecord};
use crate::store::{CHUNK_SIZE, Presence, SpillFile, StoreError};

/// What a waiting reader is told once its chunks are present, or cannot be.
pub type Done = Box<dyn FnOnce(Result<(), FetchError>) + Send>;
/// What an operation on a file's bytes answers.
pub type Reply<T> = Box<dyn FnOnce(Result<T, FetchError>) + Send>;

/// Why bytes cannot be had, and the errno that says so to a writer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub message: Arc<str>,
    pub errno: i32,
}

impl FetchError {
    pub(super) fn new(message: impl Into<Arc<str>>) -> Self {
        FetchError { message: message.into(), errno: libc::EIO }
    }
}

impl From<StoreError> for FetchError {
    fn from(e: StoreError) -> Self {
        FetchError { errno: e.errno(), message: e.to_string().into() }
    }
}

/// Where a file stands, with what is known of it (`lazyfs status` shows its [`FileState`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing of it is here.
    Pending,
    /// Some of it is here.
    Fetching,
    /// Every byte is here; the check is under way.
    Present,
    /// Every byte is here and its blake3 matched.
    Verified {
        /// Boxed: a file's state stays small (most files of a large mount are settled).
        hash: Box<[u8; 32]>,
        against: &'static str,
    },
    /// Changed by a local write after it was complete: local from now on.
    Modified,
    Failed(Arc<str>),
}

impl Phase {
    /// The state the control protocol and `lazyfs status` report.
    pub fn state(&self) -> FileState {
        match self {
            Phase::Pending => FileState::Pending,
            Phase::Fetching => FileState::Fetching,
            Phase::Present => FileState::Present,
            Phase::Verified { .. } => FileState::Verified,
            Phase::Modified => FileState::Modified,
            Phase::Failed(_) => FileState::Failed,
        }
    }

    /// No more bytes will be fetched for it.
    pub fn is_settled(&self) -> bool {
        matches!(self, Phase::Verified { .. } | Phase::Modified | Phase::Failed(_))
    }
}

/// Which lane brought bytes in (for the per-file counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    OnDemand,
    Prefetch,
}

pub(super) const NEVER: u64 = u64::MAX;

/// Counters harnesses read through `lazyfs status --json`.
pub struct FileStats {
    pub reads: AtomicU64,
    pub bytes_on_demand: AtomicU64,
    pub bytes_prefetched: AtomicU64,
    /// Microseconds since the mount started; `NEVER` until it happens.
    pub(super) first_read_us: AtomicU64,
    pub(super) completed_us: AtomicU64,
}

impl FileStats {
    pub(super) fn new() -> Self {
        FileStats {
            reads: AtomicU64::new(0),
            bytes_on_demand: AtomicU64::new(0),
            bytes_prefetched: AtomicU64::new(0),
            first_read_us: AtomicU64::new(NEVER),
            completed_us: AtomicU64::new(NEVER),
        }
    }

    fn at(us: &AtomicU64) -> Option<f64> {
        match us.load(Ordering::Relaxed) {
            NEVER => None,
            us => Some(us as f64 / 1e6),
        }
    }

    pub fn first_read_s(&self) -> Option<f64> {
        Self::at(&self.first_read_us)
    }

    pub fn completed_s(&self) -> Option<f64> {
        Self::at(&self.completed_us)
    }
}

/// One served file and the only way to its bytes: its owner.
pub struct FetchFile {
    /// The path the images record: the file's name in the journal.
    pub path: PathBuf,
    /// The path on the source (the source applies its root).
    pub source_path: PathBuf,
    /// Its hashes from the manifest, if there is one.
    pub expected: Option<Box<FileHashes>>,
    /// Where the images first list it (files of the tree after them all).
    pub image_order: u64,
    /// Found by listing the tree (not recorded by the images), with the size
    /// and mtime the listing gave: a source file that no longer has them
    /// is refused.
    pub listed: Option<SourceStat>,
    /// A process of the checkpoint had it open for writing.
    pub written: bool,
    /// Background prefetch was asked for it.
    pub(super) prefetch_wanted: AtomicBool,
    pub stats: FileStats,
    /// It was opened for reading (and, small, queued to be fetched whole).
    pub(super) opened: AtomicBool,
    /// The original's size: what the chunks cover.
    pub(super) size: u64,
    pub(super) spill: SpillFile,
    state: Mutex<Owned>,
}

/// What a file's owner keeps under its lock.
pub(super) struct Owned {
    pub(super) presence: Presence,
    /// The file's length now (local writes and truncates change it).
    pub(super) len: u64,
    /// Bumped whenever the bytes start over: fetched bytes of an older
    /// generation never land.
    pub(super) generation: u64,
    /// Chunks being fetched (a B-tree: small when empty, as most are).
    pub(super) in_flight: BTreeSet<u64>,
    pub(super) waiters: Vec<Waiter>,
    pub(super) phase: Phase,
    /// The source's size and mtime when the transfer began.
    pub(super) baseline: Option<SourceStat>,
    /// Times the file was fetched again because it changed on the source.
    pub(super) restarts: u32,
    /// Every byte came in one SFTP read, which also showed the size matched:
    /// no mix of versions is possible, so no second look at the source.
    pub(super) read_whole: bool,
    /// Removed through the mount and closed: nobody can reach it, so nothing
    /// more of it is fetched.
    pub(super) removed: bool,
    /// Requests for it the source left unanswered while answering others.
    pub(super) timeouts: u32,
    /// Its `Modified` record is known to be durable (a write is answered only then).
    pub(super) modified_durable: bool,
    /// The blake3 of the bytes that landed in order from the start, taken as
    /// they landed (without a manifest, the verifier needs the whole file's):
    /// the bytes are hashed once, in hand, not read back.
    pub(super) in_order: Option<Box<InOrder>>,
}

/// A file's bytes hashed as they landed, from the start on.
pub(super) enum InOrder {
    /// Up to this byte (what landed after a gap is read back by the verifier).
    Hashing(Box<blake3::Hasher>, u64),
    /// Every byte.
    Done(blake3::Hash),
}

pub(super) struct Waiter {
    pub(super) chunks: Range<u64>,
    pub(super) done: Done,
}

/// Chunks claimed for fetching, in the generation they were claimed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) generation: u64,
    pub(crate) chunks: Range<u64>,
}

/// Where a file stands, all read at one moment.
pub struct Progress {
    pub len: u64,
    pub present_bytes: u64,
    pub complete: bool,
    pub phase: Phase,
}

impl FetchFile {
    /// The owner of `spill` (`len` bytes long now), with `presence` saying
    /// which chunks of the original are in it.
    pub fn new(spec: restore::FileSpec, spill: SpillFile, len: u64, presence: Presence, phase: Phase) -> Self {
        FetchFile {
            path: spec.path,
            source_path: spec.source_path,
            expected: spec.expected.map(Box::new),
            image_order: spec.image_order,
            listed: spec.listed,
            written: spec.written,
            prefetch_wanted: AtomicBool::new(false),
            stats: FileStats::new(),
            opened: AtomicBool::new(false),
            size: spec.size,
            spill,
            state: Mutex::new(Owned {
                presence,
                len,
                generation: 0,
                in_flight: BTreeSet::new(),
                waiters: Vec::new(),
                baseline: None,
                restarts: 0,
                timeouts: 0,
                read_whole: false,
                removed: false,
                modified_durable: phase == Phase::Modified,
                phase,
                in_order: None,
            }),
        }
    }

    /// A poisoned lock means a panic elsewhere, already contained: the state
    /// itself is always left consistent, so carry on.
    pub(super) fn lock(&self) -> MutexGuard<'_, Owned> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }

    pub fn progress(&self) -> Progress {
        let state = self.lock();
        let present_bytes = match state.presence.is_complete() {
            true => self.size,
            false => state.presence.runs().into_iter().map(|r| self.chunk_len(r)).sum(),
        };
        Progress {
            len: state.len,
            present_bytes: present_bytes.min(state.len),
            complete: state.presence.is_complete(),
            phase: state.phase.clone(),
        }
    }

    /// The file's length now.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The spill file's descriptor once the file is verified (its bytes no
    /// longer change but by a writable open, which passthrough never gets).
    pub fn verified_file(&self) -> Result<Option<std::fs::File>, StoreError> {
        match self.lock().phase {
            Phase::Verified { .. } => self.spill.open_file().map(Some),
            _ => Ok(None),
        }
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        self.spill.sync()
    }

    /// Once changed locally, the time its bytes last changed (its spill
    /// file's: every write moves it, and it outlives the process).
    pub fn local_mtime(&self) -> Option<std::time::SystemTime> {
        (self.phase() == Phase::Modified).then(|| self.spill.modified().ok()).flatten()
    }

    /// Sets the time [`FetchFile::local_mtime`] gives, if it is changed locally.
    pub fn set_local_mtime(&self, time: std::time::SystemTime) -> Result<(), StoreError> {
        match self.phase() {
            Phase::Modified => self.spill.set_modified(time),
            _ => Ok(()),
        }
    }

    pub(super) fn path_bytes(&self) -> &[u8] {
        self.path.as_os_str().as_bytes()
    }

    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    /// The bytes of the original that `chunks` cover.
    pub fn chunk_bytes(&self, chunks: Range<u64>) -> Range<u64> {
        (chunks.start * CHUNK_SIZE).min(self.size)..(chunks.end.saturating_mul(CHUNK_SIZE)).min(self.size)
    }

    pub(super) fn chunk_len(&self, chunks: Range<u64>) -> u64 {
        let bytes = self.chunk_bytes(chunks);
        bytes.end - bytes.start
    }

    /// The chunks holding bytes `offset..offset+len` of the original.
    pub fn chunks_of(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return 0..0;
        }
        offset / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE)
    }

    /// Claims the chunks of `chunks` that are neither present nor in flight,
    /// as maximal runs; each must end in `Shared::finish`.
    pub(super) fn claim(&self, chunks: Range<u64>) -> Vec<Claim> {
        Self::claim_locked(&mut self.lock(), chunks)
    }

    pub(super) fn claim_locked(state: &mut Owned, chunks: Range<u64>) -> Vec<Claim> {
        if state.phase.is_settled() || state.removed {
            return Vec::new();
        }
        let mut runs: Vec<Range<u64>> = Vec::new();
        for chunk in chunks {
            if state.presence.is_present(chunk) || !state.in_flight.insert(chunk) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end == chunk => run.end += 1,
                _ => runs.push(chunk..chunk + 1),
            }
        }
        if !runs.is_empty() && state.phase == Phase::Pending {
            state.phase = Phase::Fetching;
        }
        runs.into_iter().map(|chunks| Claim { generation: state.generation, chunks }).collect()
    }

    /// The claim could not be fetched. With `whole_file`, the file fails for
    /// good; otherwise only the readers of these chunks are told. A claim of
    /// an older generation was dropped with it, and a file changed locally no
    /// longer depends on the source: nothing to do.
    pub(super) fn fail(&self, claim: &Claim, error: &FetchError, whole_file: bool) {
        let failed: Vec<Waiter> = {
            let mut state = self.lock();
            if state.generation != claim.generation || state.phase == Phase::Modified {
                return;
            }
            for chunk in claim.chunks.clone() {
                state.in_flight.remove(&chunk);
            }
            if whole_file {
                state.phase = Phase::Failed(error.message.clone());
            }
            let chunks = &claim.chunks;
            let (failed, waiting) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| whole_file || (w.chunks.start < chunks.end && chunks.start < w.chunks.end));
            state.waiters = waiting;
            failed
        };
        for waiter in failed {
            (waiter.done)(Err(error.clone()));
        }
    }

    /// Fails the file for good (nothing was claimed), unless it was changed
    /// locally (see [`FetchFile::fail`]).
    pub(super) fn fail_file(&self, message: String) {
        let generation = self.lock().generation;
        self.fail_in(generation, message);
    }

    /// [`FetchFile::fail_file`] if it is still in generation `generation`.
    pub(super) fn fail_in(&self, generation: u64, message: String) {
        log::error!("{message}");
        self.fail(&Claim { generation, chunks: 0..0 }, &FetchError::new(message), true);
    }

    /// Gives back the disk blocks of a claim that could not land (the cache
    /// filesystem is full), if the claim still holds: under the lock, so
    /// never bytes a restart or a local write put there since.
    pub(super) fn give_back(&self, claim: &Claim) {
        let state = self.lock();
        if state.generation == claim.generation && !state.phase.is_settled() {
            self.spill.discard(self.chunk_bytes(claim.chunks.clone()));
        }
    }

    pub(super) fn mark_read_whole(&self) {
        self.lock().read_whole = true;
    }

    /// Chunks neither present nor being fetched.
    pub(super) fn unclaimed_chunks(&self) -> u64 {
        let state = self.lock();
        (0..self.chunk_count()).filter(|&c| !state.presence.is_present(c) && !state.in_flight.contains(&c)).count()
            as u64
    }

    /// Whether prefetch has nothing to do for it.
    pub(super) fn needs_nothing(&self) -> bool {
        let state = self.lock();
        state.phase.is_settled() || state.presence.is_complete() || state.removed
    }

    /// Nobody can reach the file any more (removed through the mount, and
    /// closed): stop fetching it.
    pub fn forget(&self) {
        self.lock().removed = true;
    }

    pub fn is_removed(&self) -> bool {
        self.lock().removed
    }

    /// The file's generation while it is complete and waiting for its check.
    pub(super) fn present_generation(&self) -> Option<u64> {
        let state = self.lock();
        (state.phase == Phase::Present).then_some(state.generation)
    }

    /// The blake3 of the file as generation `generation` has it; `None` if
    /// the bytes started over or changed locally meanwhile. Read a window at a
    /// time, each under the lock.
    pub(super) fn hash(&self, generation: u64) -> Option<Result<blake3::Hash, StoreError>> {
        // What landed in order was hashed as it landed: only the rest is read back.
        let (mut hasher, mut offset) = {
            let mut state = self.lock();
            if state.generation != generation || state.phase != Phase::Present {
                return None;
            }
            match state.in_order.take().map(|in_order| *in_order) {
                Some(InOrder::Done(hash)) => return Some(Ok(hash)),
                Some(InOrder::Hashing(hasher, up_to)) => (hasher, up_to),
                None => (Box::default(), 0),
            }
        };
        let mut buf = vec![0u8; crate::store::HASH_WINDOW.min(self.size - offset) as usize];
        while offset < self.size {
            let take = (self.size - offset).min(buf.len() as u64) as usize;
            let state = self.lock();
            if state.generation != generation || state.phase != Phase::Present {
                return None;
            }
            match self.spill.read_at(offset, &mut buf[..take]) {
                Ok(got) if got == take => {}
                Ok(got) => {
                    let message = format!("ends at byte {} while {} were fetched", offset + got as u64, self.size);
                    let error = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, message);
                    return Some(Err(StoreError::Io { path: self.spill.path(), source: error }));
                }
                Err(e) => return Some(Err(e)),
            }
            drop(state);
            hasher.update(&buf[..take]);
            offset += take as u64;
        }
        Some(Ok(hasher.finalize()))
    }

    /// Journal records saying what is known of the file now. Present chunks
    /// are claimed only after the spill file is synced (`synced`: the whole
    /// cache filesystem was, after they were written).
    pub(super) fn snapshot(&self, synced: bool) -> Vec<JournalRecord> {
        let (runs, phase) = {
            let state = self.lock();
            (state.presence.runs(), state.phase.clone())
        };
        let path = self.path_bytes();
        let mut records = Vec::new();
        match if synced || runs.is_empty() { Ok(()) } else { self.spill.sync() } {
            Ok(()) => records.extend(runs.into_iter().map(|run| journal::present_record(path, run, self.size))),
            Err(e) => log::error!("{e}: its chunks will be fetched again"),
        }
        match phase {
            Phase::Verified { hash, against } if !records.is_empty() || self.size == 0 => {
                records.push(journal::verified_record(path, &hash, against))
            }
            Phase::Modified => records.push(journal::modified_record(path)),
            _ => {}
        }
        records
    }
}

/// What landed bytes did: the readers they served, and whether the file is
/// complete with them.
pub(super) struct Landed {
    pub(super) ready: Vec<Waiter>,
    pub(super) complete: bool,
}

impl FetchFile {
    /// Lands a claim's checked bytes `data` (file `index`'s): written to the
    /// spill file, the chunks marked present and told to `journal`, all under
    /// the lock, if the claim still holds (same generation, not settled);
    /// `None` if it does not.
    pub(super) fn land(
        &self,
        index: usize,
        claim: &Claim,
        data: &[u8],
        journal: &Journal,
    ) -> Result<Option<Landed>, StoreError> {
        let mut state = self.lock();
        if state.generation != claim.generation || state.phase.is_settled() {
            // Restarted or truncated meanwhile: these bytes are of no use.
            return Ok(None);
        }
        let bytes = self.chunk_bytes(claim.chunks.clone());
        self.spill.write_at(bytes.start, data)?;
        if self.expected.is_none() {
            if state.in_order.is_none() && bytes.start == 0 {
                state.in_order = Some(Box::new(InOrder::Hashing(Box::default(), 0)));
            }
            if let Some(InOrder::Hashing(hasher, up_to)) = state.in_order.as_deref_mut()
                && *up_to == bytes.start
            {
                hasher.update(data);
                *up_to = bytes.end;
                if *up_to == self.size {
                    state.in_order = Some(Box::new(InOrder::Done(hasher.finalize())));
                }
            }
        }
        // Sent under the lock: a Reset of a restart is always journaled after it.
        journal.present(index, claim.chunks.clone());
        state.presence.mark(claim.chunks.clone());
        for chunk in claim.chunks.clone() {
            state.in_flight.remove(&chunk);
        }
        let (ready, waiting): (Vec<Waiter>, Vec<Waiter>) =
            std::mem::take(&mut state.waiters).into_iter().partition(|w| state.presence.all_present(w.chunks.clone()));
        state.waiters = waiting;
        let complete = state.presence.is_complete() && state.phase == Phase::Fetching;
        if complete {
            state.phase = Phase::Present;
        }
        Ok(Some(Landed { ready, complete }))
    }
}

/// The served files by number. Files found in the tree after the mount
/// began are added at the end: a file's number never changes.
#[derive(Default)]
pub(crate) struct FileTable {
    files: RwLock<Vec<Arc<FetchFile>>>,
}

impl FileTable {
    pub(super) fn new(files: Vec<Arc<FetchFile>>) -> FileTable {
        FileTable { files: RwLock::new(files) }
    }

    pub(crate) fn get(&self, index: usize) -> Arc<FetchFile> {
        self.files.read().unwrap_or_else(PoisonError::into_inner)[index].clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.files.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub(super) fn push(&self, file: Arc<FetchFile>) -> usize {
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        files.push(file);
        files.len() - 1
    }

    /// Every file now.
    pub(crate) fn all(&self) -> Vec<Arc<FetchFile>> {
        self.files.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
