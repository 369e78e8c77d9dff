//! Getting chunks from the source into spill files, checking them, and
//! knowing where each file stands.
//!
//! Each served file has one owner, its [`FetchFile`]: only it reads, writes,
//! truncates, restarts and marks chunks present, each under its lock. A
//! generation number, bumped whenever the file's bytes start over (fetched
//! again because the source changed, or truncated locally), stamps every
//! claim: fetched bytes land only if their claim's generation is still the
//! file's, so a fetch that began before a restart or a truncate never writes.
//!
//! A reader asks for the chunks it covers; chunks nobody fetches yet are
//! claimed (one fetch serves every reader of a chunk) and queued on the
//! on-demand lane, a thread with a source connection of its own. With
//! prefetch, a pool of workers streams whole files in queue order; a file
//! someone reads jumps the queue. Every chunk is checked against the manifest
//! (if there is one) before it lands, recorded in the journal once durable,
//! and a complete file is verified by the verifier thread. A panic while
//! fetching fails that file; the lanes keep going.

mod connect;
mod landing;
mod lane;
mod listing;
pub mod prefetch;
mod replay;
pub mod restore;
mod verify;

use std::collections::HashSet;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::control::proto::FileState;
use crate::manifest::FileHashes;
use crate::recording::{self, Recorder, Recording, Touch};
use crate::source::{Connection, Listings, Sink, Source, SourceError, SourceStat};
use crate::store::journal::{self, Journal, Owner, proto::JournalRecord};
use crate::store::{CHUNK_SIZE, CacheDir, Presence, SpillFile, StoreError};
use landing::Landings;
pub use prefetch::Order;

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
    fn new(message: impl Into<Arc<str>>) -> Self {
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
        hash: [u8; 32],
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

const NEVER: u64 = u64::MAX;

/// Counters harnesses read through `lazyfs status --json`.
pub struct FileStats {
    pub reads: AtomicU64,
    pub bytes_on_demand: AtomicU64,
    pub bytes_prefetched: AtomicU64,
    /// Microseconds since the mount started; `NEVER` until it happens.
    first_read_us: AtomicU64,
    completed_us: AtomicU64,
}

impl FileStats {
    fn new() -> Self {
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
    pub expected: Option<FileHashes>,
    /// Where the images first list it (files of the tree after them all).
    pub image_order: u64,
    /// Found by listing the tree (not recorded by the images), with the size
    /// and mtime the listing gave: a source file that no longer has them
    /// is refused.
    pub listed: Option<SourceStat>,
    /// A process of the checkpoint had it open for writing.
    pub written: bool,
    /// Background prefetch was asked for it.
    prefetch_wanted: AtomicBool,
    pub stats: FileStats,
    /// It was opened for reading (and, small, queued to be fetched whole).
    opened: AtomicBool,
    /// The original's size: what the chunks cover.
    size: u64,
    spill: SpillFile,
    state: Mutex<Owned>,
}

/// What a file's owner keeps under its lock.
struct Owned {
    presence: Presence,
    /// The file's length now (local writes and truncates change it).
    len: u64,
    /// Bumped whenever the bytes start over: fetched bytes of an older
    /// generation never land.
    generation: u64,
    in_flight: HashSet<u64>,
    waiters: Vec<Waiter>,
    phase: Phase,
    /// The source's size and mtime when the transfer began.
    baseline: Option<SourceStat>,
    /// Times the file was fetched again because it changed on the source.
    restarts: u32,
    /// Every byte came in one SFTP read, which also showed the size matched:
    /// no mix of versions is possible, so no second look at the source.
    read_whole: bool,
    /// Removed through the mount and closed: nobody can reach it, so nothing
    /// more of it is fetched.
    removed: bool,
    /// Requests for it the source left unanswered while answering others.
    timeouts: u32,
}

struct Waiter {
    chunks: Range<u64>,
    done: Done,
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
            expected: spec.expected,
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
                in_flight: HashSet::new(),
                waiters: Vec::new(),
                phase,
                baseline: None,
                restarts: 0,
                timeouts: 0,
                read_whole: false,
                removed: false,
            }),
        }
    }

    /// A poisoned lock means a panic elsewhere, already contained: the state
    /// itself is always left consistent, so carry on.
    fn lock(&self) -> MutexGuard<'_, Owned> {
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

    fn path_bytes(&self) -> &[u8] {
        self.path.as_os_str().as_bytes()
    }

    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    /// The bytes of the original that `chunks` cover.
    pub fn chunk_bytes(&self, chunks: Range<u64>) -> Range<u64> {
        (chunks.start * CHUNK_SIZE).min(self.size)..(chunks.end.saturating_mul(CHUNK_SIZE)).min(self.size)
    }

    fn chunk_len(&self, chunks: Range<u64>) -> u64 {
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
    fn claim(&self, chunks: Range<u64>) -> Vec<Claim> {
        Self::claim_locked(&mut self.lock(), chunks)
    }

    fn claim_locked(state: &mut Owned, chunks: Range<u64>) -> Vec<Claim> {
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
    /// an older generation was dropped with it: nothing to do.
    fn fail(&self, claim: &Claim, error: &FetchError, whole_file: bool) {
        let failed: Vec<Waiter> = {
            let mut state = self.lock();
            if state.generation != claim.generation {
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

    /// Fails the file for good (nothing was claimed).
    fn fail_file(&self, message: String) {
        log::error!("{message}");
        let generation = self.lock().generation;
        self.fail(&Claim { generation, chunks: 0..0 }, &FetchError::new(message), true);
    }

    fn mark_read_whole(&self) {
        self.lock().read_whole = true;
    }

    /// Chunks neither present nor being fetched.
    fn unclaimed_chunks(&self) -> u64 {
        let state = self.lock();
        (0..self.chunk_count()).filter(|&c| !state.presence.is_present(c) && !state.in_flight.contains(&c)).count()
            as u64
    }

    /// Whether prefetch has nothing to do for it.
    fn needs_nothing(&self) -> bool {
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
    fn present_generation(&self) -> Option<u64> {
        let state = self.lock();
        (state.phase == Phase::Present).then_some(state.generation)
    }

    /// The blake3 of the file as generation `generation` has it; `None` if
    /// the bytes started over or changed locally meanwhile. Read a window at a
    /// time, each under the lock.
    fn hash(&self, generation: u64) -> Option<Result<blake3::Hash, StoreError>> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; crate::store::HASH_WINDOW.min(self.size) as usize];
        let mut offset = 0;
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
                    return Some(Err(StoreError::Io { path: self.spill.path().into(), source: error }));
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
    /// are claimed only after the spill file is synced.
    fn snapshot(&self) -> Vec<JournalRecord> {
        let (runs, phase) = {
            let state = self.lock();
            (state.presence.runs(), state.phase.clone())
        };
        let path = self.path_bytes();
        let mut records = Vec::new();
        match self.spill.sync() {
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

/// The served files by number. Files found in the tree after the mount
/// began are added at the end: a file's number never changes.
#[derive(Default)]
pub(crate) struct FileTable {
    files: RwLock<Vec<Arc<FetchFile>>>,
}

impl FileTable {
    fn new(files: Vec<Arc<FetchFile>>) -> FileTable {
        FileTable { files: RwLock::new(files) }
    }

    pub(crate) fn get(&self, index: usize) -> Arc<FetchFile> {
        self.files.read().unwrap_or_else(PoisonError::into_inner)[index].clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.files.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn push(&self, file: Arc<FetchFile>) -> usize {
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        files.push(file);
        files.len() - 1
    }

    /// Every file now.
    pub(crate) fn all(&self) -> Vec<Arc<FetchFile>> {
        self.files.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Settings of the fetcher.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Prefetch workers (0: no prefetch).
    pub jobs: usize,
    pub order: Order,
    /// What a recording says the last restore read first, as (file, chunks)
    /// in that order: fetched as soon as the source is up (see `replay.rs`).
    pub replay: Arc<[(usize, Range<u64>)]>,
    /// How long a lane keeps reconnecting before its readers get EIO.
    pub reconnect_timeout: Duration,
}

/// How long a file that found the cache filesystem full waits before its
/// prefetch is tried again.
const NO_SPACE_RETRY: Duration = Duration::from_secs(2);

/// What the lanes share.
pub(crate) struct Shared {
    files: FileTable,
    /// Directories of the tree still to be listed: until there are none,
    /// the tree still needs the source.
    unlisted_dirs: std::sync::atomic::AtomicUsize,
    journal: Journal,
    queue: prefetch::Queue,
    verify: Mutex<Sender<usize>>,
    /// What the on-demand lanes are asked.
    requests: lane::Requests,
    /// What the listing lane is asked.
    list: Mutex<Sender<listing::ListJob>>,
    started: Instant,
    health: Arc<lane::Health>,
    /// How to name the source in messages.
    source_name: String,
    /// Background prefetch runs (from the start, or since `lazyfs prefetch`).
    prefetching: AtomicBool,
    /// ... for every file, those the tree adds later too.
    prefetch_all: AtomicBool,
    /// Told the index of a file whose bytes start over, so copies of the old
    /// ones (the kernel's page cache) are dropped.
    started_over: OnceLock<StartedOver>,
    /// The recording to replay, until the first on-demand lane takes it.
    replay: Mutex<Option<replay::Replay>>,
}

/// What is told of a file whose bytes start over.
pub type StartedOver = Box<dyn Fn(usize) + Send + Sync>;

/// Why fetched bytes did not land.
enum FetchFailure {
    Source(SourceError),
    Mismatch(u64),
    Store(StoreError),
    /// A bug met while fetching (a malformed reply the code did not expect):
    /// contained, the file fails.
    Panic(String),
}

impl FetchFailure {
    /// The same failure again, for another claim it ended.
    fn again(&self) -> FetchFailure {
        match self {
            FetchFailure::Source(e) => FetchFailure::Source(e.again()),
            FetchFailure::Mismatch(chunk) => FetchFailure::Mismatch(*chunk),
            FetchFailure::Store(e) => FetchFailure::Store(e.again()),
            FetchFailure::Panic(panic) => FetchFailure::Panic(panic.clone()),
        }
    }
}

impl Shared {
    /// Fetches the claimed chunks of file `index`, each piece checked against
    /// the manifest and landed as it arrives (a bad chunk fetched once more),
    /// and ends the claim however that went. A panic on the way fails the file.
    /// Returns the timeout if the source left the request for this file
    /// unanswered (see [`Shared::timed_out`]).
    fn fetch(&self, link: &mut lane::Link, index: usize, claim: Claim, lane: Lane) -> Option<SourceError> {
        self.fetch_claims(link, index, vec![claim], lane)
    }

    /// [`Shared::fetch`] of several claims of file `index` (of one
    /// generation), in one pipeline of ranged reads.
    fn fetch_claims(&self, link: &mut lane::Link, index: usize, claims: Vec<Claim>, lane: Lane) -> Option<SourceError> {
        if claims.is_empty() {
            return None;
        }
        let file = &self.files.get(index);
        // The first look goes with the first read (no extra round trip over
        // SSH), before its bytes: a look after could see a file replaced
        // since the bytes were read, and vouch for them.
        let look = self.needs_baseline(index);
        let mut landings = Landings::new(self, index, &claims, lane, link.is_bulk());
        let fetched = lane::contained(link, |link| link.fetch(file, &mut landings, look).map_err(FetchFailure::Source));
        let results = lane::contained(link, |link| Ok(landings.finish(link, &fetched)))
            .unwrap_or_else(|failure| claims.iter().map(|_| Err(failure.again())).collect());
        let mut stuck = None;
        for (claim, result) in claims.iter().zip(results) {
            stuck = stuck.or_else(|| lane::stuck_on(&result, &file.source_path));
            self.finish(index, claim, lane, result);
        }
        stuck
    }

    /// Lands a claim's bytes `data`, read whole already (a small file of a
    /// batch), checked as [`Shared::fetch`] checks them.
    fn land_all(
        &self,
        link: &mut lane::Link,
        index: usize,
        claim: &Claim,
        data: &[u8],
        lane: Lane,
    ) -> Result<(), FetchFailure> {
        let mut landings = Landings::new(self, index, std::slice::from_ref(claim), lane, false);
        landings.land(self.files.get(index).chunk_bytes(claim.chunks.clone()).start, data);
        landings.finish(link, &Ok(())).pop().expect("one claim")
    }

    /// Writes a claim's checked bytes into the spill file, if the claim still
    /// holds (same generation), marks them present, answers the readers
    /// waiting for them, and queues the file for verification once complete.
    /// False if the claim no longer holds.
    fn land(&self, index: usize, claim: &Claim, data: &[u8], lane: Lane) -> Result<bool, StoreError> {
        let file = &self.files.get(index);
        let (ready, complete) = {
            let mut state = file.lock();
            if state.generation != claim.generation || state.phase.is_settled() {
                // Restarted or truncated meanwhile: these bytes are of no use.
                return Ok(false);
            }
            let bytes = file.chunk_bytes(claim.chunks.clone());
            file.spill.write_at(bytes.start, data)?;
            // Sent under the lock: a Reset of a restart is always journaled after it.
            self.journal.present(index, claim.chunks.clone());
            state.presence.mark(claim.chunks.clone());
            for chunk in claim.chunks.clone() {
                state.in_flight.remove(&chunk);
            }
            let (ready, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| state.presence.all_present(w.chunks.clone()));
            state.waiters = waiting;
            let complete = state.presence.is_complete() && state.phase == Phase::Fetching;
            if complete {
                state.phase = Phase::Present;
            }
            (ready, complete)
        };
        self.health.cache_full(None);
        let counter = match lane {
            Lane::OnDemand => &file.stats.bytes_on_demand,
            Lane::Prefetch => &file.stats.bytes_prefetched,
        };
        counter.fetch_add(file.chunk_len(claim.chunks.clone()), Ordering::Relaxed);
        for waiter in ready {
            (waiter.done)(Ok(()));
        }
        if complete {
            file.stats.completed_us.store(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.send_to_verifier(index);
        }
        Ok(true)
    }

    fn send_to_verifier(&self, index: usize) {
        let _ = self.verify.lock().unwrap_or_else(PoisonError::into_inner).send(index);
    }

    /// Ends a claim however its fetch went.
    fn finish(&self, index: usize, claim: &Claim, lane: Lane, result: Result<(), FetchFailure>) {
        let file = &self.files.get(index);
        let (message, whole_file) = match result {
            Ok(()) => return,
            Err(FetchFailure::Mismatch(chunk)) => (
                format!(
                    "{}: chunk {chunk} does not match the manifest even when fetched again: not served",
                    file.path.display()
                ),
                true,
            ),
            Err(FetchFailure::Source(e @ SourceError::Unusable(_))) => {
                // Not the file's fault, and said once already (the log, status).
                file.fail(claim, &FetchError::new(e.to_string()), false);
                return;
            }
            Err(FetchFailure::Source(e)) => {
                // A lost connection may come back; a file that is missing or
                // shorter than recorded will not.
                let whole_file = !e.is_connection_lost();
                let stuck_here = matches!(&e, SourceError::TimedOut { path: Some(p), .. } if *p == file.source_path);
                if !whole_file && lane == Lane::Prefetch {
                    if stuck_here {
                        log::error!("{e}");
                        file.fail(claim, &FetchError::new(e.to_string()), false);
                    } else {
                        // Readers of these chunks are not this failure's
                        // hostages: the on-demand lanes serve them.
                        log::warn!("{e}");
                        self.release(index, claim);
                    }
                    // Queued again only once its claim is dropped: a worker
                    // taking it at once must find its chunks unclaimed.
                    return self.queue.push(index);
                }
                (e.to_string(), whole_file)
            }
            Err(FetchFailure::Store(e)) if e.is_no_space() => {
                // Not the file's fault: give the blocks back, tell the readers
                // waiting, and try again once there may be room.
                file.spill.discard(file.chunk_bytes(claim.chunks.clone()));
                let reason = format!("{}: {e}: the cache filesystem is full; waiting for space", file.path.display());
                self.health.cache_full(Some(reason.clone()));
                if self.prefetching.load(Ordering::Relaxed) {
                    self.queue.push_later(index, NO_SPACE_RETRY);
                }
                log::warn!("{reason}");
                let error = FetchError::from(e);
                file.fail(claim, &error, false);
                return;
            }
            Err(FetchFailure::Store(e)) => (e.to_string(), true),
            Err(FetchFailure::Panic(panic)) => (
                format!(
                    "{}: an internal error while fetching it ({panic}): not served; please report it",
                    file.path.display()
                ),
                true,
            ),
        };
        log::error!("{message}");
        file.fail(claim, &FetchError::new(message), whole_file);
    }

    /// A claim of file `index` was not fetched, through no fault of the
    /// file: drop it, and hand its waiting readers' chunks to the on-demand lanes.
    fn release(&self, index: usize, claim: &Claim) {
        let file = &self.files.get(index);
        let claims: Vec<Claim> = {
            let mut state = file.lock();
            if state.generation != claim.generation {
                return;
            }
            for chunk in claim.chunks.clone() {
                state.in_flight.remove(&chunk);
            }
            let wanted: Vec<Range<u64>> = state.waiters.iter().map(|w| w.chunks.clone()).collect();
            wanted.into_iter().flat_map(|chunks| FetchFile::claim_locked(&mut state, chunks)).collect()
        };
        self.ask_on_demand(index, claims, Instant::now());
    }

    /// Queues `claims` of file `index` on the on-demand lanes.
    fn ask_on_demand(&self, index: usize, claims: Vec<Claim>, asked: Instant) {
        for claim in claims {
            if let Err(lost) = self.requests.push(lane::Job::new(index, claim, asked)) {
                self.files.get(index).fail(&lost.claim, &FetchError::new("lazyfs is shutting down"), false);
            }
        }
    }

    /// A request for file `index` went unanswered (`error`). If the source
    /// answers a new connection, the file is to blame (a FIFO, a hung mount
    /// on the old host): it is tried again later, and fails the second time.
    /// If not, the source is silent: this lane probes it until it answers.
    fn timed_out(&self, link: &mut lane::Link, index: usize, error: &SourceError) {
        let waited = match error {
            SourceError::TimedOut { waited, .. } => *waited,
            _ => Duration::ZERO,
        };
        // A request sent with little time left says little about its file.
        if waited < self.health.stall() / 2 {
            return;
        }
        if !self.health.suspect(Instant::now() - waited) {
            // Another lane is finding out whether the source is silent.
            return;
        }
        if !link.source_answers() {
            log::warn!("{error}, and no new connection is answered: probing it until it is");
            link.wait_for_source();
            return;
        }
        let file = &self.files.get(index);
        let failed = {
            let mut state = file.lock();
            state.timeouts += 1;
            state.timeouts >= STUCK_TIMEOUTS
        };
        if failed {
            file.fail_file(format!(
                "{}: {error}, twice, while it answered other requests: not served (a FIFO or a hung mount on the old host?)",
                file.path.display()
            ));
        } else {
            log::warn!("{}: {error}, while it answers other requests: trying it again later", file.path.display());
        }
    }

    /// The file changed on the source while generation `generation` was
    /// fetched: forget its chunks and fetch it again (at most twice), or fail
    /// it. Nothing happens if the file is no longer complete and unchecked in
    /// that generation (a local write made it local, or it already started over).
    fn restart(&self, index: usize, generation: u64, reason: &str) {
        let file = &self.files.get(index);
        let again = {
            let mut state = file.lock();
            if state.generation != generation || state.phase != Phase::Present {
                return;
            }
            state.generation += 1;
            state.restarts += 1;
            state.baseline = None;
            state.read_whole = false;
            state.in_flight.clear();
            self.journal.reset(file.path_bytes());
            if state.restarts > 2 {
                state.phase = Phase::Failed(format!("{reason}, and again after fetching it twice more").into());
                false
            } else {
                state.presence.clear();
                state.phase = Phase::Pending;
                true
            }
        };
        log::warn!("{}: {reason}: {}", file.path.display(), if again { "fetching it again" } else { "failed" });
        self.tell_started_over(index);
        if again {
            self.queue.push(index);
        }
    }

    fn tell_started_over(&self, index: usize) {
        if let Some(tell) = self.started_over.get() {
            tell(index);
        }
    }

    /// The file is complete and checked: verified, if generation
    /// `generation` is still complete and unchecked.
    fn settle(&self, index: usize, generation: u64, hash: [u8; 32], against: &'static str) {
        let file = &self.files.get(index);
        let mut state = file.lock();
        if state.generation == generation && state.phase == Phase::Present {
            state.phase = Phase::Verified { hash, against };
            self.journal.verified(file.path_bytes(), &blake3::Hash::from_bytes(hash), against);
            log::debug!("{}: verified against the {against}", file.path.display());
            if state.restarts > 0 {
                // A reader may have cached old bytes while the restart was under way.
                drop(state);
                self.tell_started_over(index);
            }
        }
    }

    /// The first look at the source's file: its size must be what the images
    /// record. Keeps the size and mtime to compare with after the transfer.
    fn check_baseline(&self, index: usize, connection: &mut dyn Connection) -> Result<(), SourceError> {
        if !self.needs_baseline(index) {
            return Ok(());
        }
        let stat = connection.stat(&self.files.get(index).source_path)?;
        self.set_baseline(index, stat);
        Ok(())
    }

    /// Whether the file still needs its first look at the source (with a
    /// manifest, the chunk hashes say everything).
    fn needs_baseline(&self, index: usize) -> bool {
        let file = &self.files.get(index);
        file.expected.is_none() && file.lock().baseline.is_none()
    }

    /// The first look: the size must be what the images record; the size and
    /// mtime are kept to compare with after the transfer.
    fn set_baseline(&self, index: usize, stat: SourceStat) {
        let file = &self.files.get(index);
        if let Some(reason) = crate::source::changed_since_listed(file.listed, stat) {
            file.fail_file(format!("{}: {reason}: not served", file.path.display()));
            return;
        }
        if stat.size != file.size {
            file.fail_file(format!(
                "{}: changed since the checkpoint: the source has {} bytes, the images record {}",
                file.path.display(),
                stat.size,
                file.size
            ));
            return;
        }
        file.lock().baseline.get_or_insert(stat);
    }

    /// Calls `done` once every chunk of `chunks` of file `index` is present
    /// (at once if they are), fetching the missing ones nobody fetches yet.
    fn when_present(&self, index: usize, chunks: Range<u64>, done: Done) {
        let file = &self.files.get(index);
        let claims = {
            let mut state = file.lock();
            if let Phase::Failed(message) = &state.phase {
                let error = FetchError::new(message.clone());
                drop(state);
                return done(Err(error));
            }
            // Checked under the lock: a run landing now either sees this waiter or was seen here.
            if state.presence.all_present(chunks.clone()) {
                drop(state);
                return done(Ok(()));
            }
            let claims = FetchFile::claim_locked(&mut state, chunks.clone());
            state.waiters.push(Waiter { chunks, done });
            claims
        };
        // A file someone waits for jumps the prefetch queue.
        if self.prefetching.load(Ordering::Relaxed) {
            self.queue.promote(index);
        }
        self.ask_on_demand(index, claims, Instant::now());
    }
}

/// Files up to this size are fetched whole when opened for reading.
const OPENED_WHOLE: u64 = 1 << 20;

/// Unanswered requests (while the source answered others) after which a file fails.
const STUCK_TIMEOUTS: u32 = 2;
/// How long stopping waits for prefetch workers still waiting on the source.
const STOP_WAIT: Duration = Duration::from_secs(2);

pub struct Fetcher {
    shared: Arc<Shared>,
    source: Arc<dyn Source>,
    /// Started by `--prefetch`, or later by `lazyfs prefetch`.
    prefetch: OnceLock<prefetch::Workers>,
    /// The order readers first touched chunks in.
    recorder: Recorder,
}

impl Fetcher {
    /// Starts the lanes: the on-demand lanes, the verifier, and with
    /// `config.jobs > 0` the prefetch workers. The first on-demand lane serves
    /// on `connection` (made before mounting with `--wait-for-source`), or on
    /// the source's first connection, made now in the background if any file
    /// needs the source (else when one first does).
    pub fn start(
        source: Arc<dyn Source>,
        connection: Option<Box<dyn Connection>>,
        files: Vec<Arc<FetchFile>>,
        journal: Journal,
        config: FetchConfig,
    ) -> Fetcher {
        let (verify_tx, verify_rx) = std::sync::mpsc::channel();
        let (list_tx, list_rx) = std::sync::mpsc::channel();
        let order: Vec<(u64, u64)> = files.iter().map(|f| (f.size, f.image_order)).collect();
        let shared = Arc::new(Shared {
            queue: prefetch::Queue::new(&order, &config.order),
            files: FileTable::new(files),
            unlisted_dirs: 0.into(),
            journal,
            verify: Mutex::new(verify_tx),
            requests: lane::Requests::new(),
            list: Mutex::new(list_tx),
            started: Instant::now(),
            health: Arc::new(lane::Health::new(
                config.reconnect_timeout,
                Arc::new(connect::FirstConnection::new(source.clone(), connection)),
            )),
            source_name: source.describe(),
            prefetching: AtomicBool::new(false),
            prefetch_all: AtomicBool::new(false),
            started_over: OnceLock::new(),
            replay: Mutex::new((!config.replay.is_empty()).then(|| replay::Replay::new(&config.replay))),
        });
        verify::spawn(source.clone(), shared.clone(), verify_rx);
        listing::spawn(source.clone(), shared.clone(), list_rx);
        for (index, file) in shared.files.all().iter().enumerate() {
            if file.phase() == Phase::Present {
                shared.send_to_verifier(index);
            }
        }
        if shared.source_needed() {
            shared.health.first.start();
        }
        lane::spawn_on_demand(lane::Link::first(source.clone(), shared.health.clone()), &source, &shared);
        let recorder = Recorder::new(shared.files.len());
        let fetcher = Fetcher { shared, source, prefetch: OnceLock::new(), recorder };
        if config.jobs > 0 {
            fetcher.prefetch(None, config.jobs);
        }
        fetcher
    }

    /// Serves `file` too, a file of the tree found after the mount began:
    /// its number. With prefetch of every file under way, it is queued
    /// (after the checkpoint's own files).
    pub fn add_file(&self, file: FetchFile) -> usize {
        let shared = &self.shared;
        let journal_file = journal::JournalFile {
            path: file.path_bytes().to_vec(),
            size: file.size,
            spill: file.spill.path().to_path_buf(),
        };
        let (size, present) = (file.size, file.phase() == Phase::Present);
        let index = shared.files.push(Arc::new(file));
        shared.journal.add_file(index, journal_file);
        shared.queue.add(index, size);
        if present {
            shared.send_to_verifier(index);
        }
        if shared.prefetch_all.load(Ordering::Relaxed) {
            self.want(index);
        }
        index
    }

    /// Lists `dirs` on the source (paths on it), on the listing lane: for a
    /// reader (its deadline counts from now), or for a walk nobody waits on.
    /// Blocks until the source answers or the deadline passes.
    pub fn list_dirs(&self, dirs: Vec<PathBuf>, for_reader: bool) -> Result<Listings, SourceError> {
        let (done, answer) = std::sync::mpsc::channel();
        let job = listing::ListJob { dirs, asked: for_reader.then(Instant::now), done };
        let sent = self.shared.list.lock().unwrap_or_else(PoisonError::into_inner).send(job);
        let stopped = || SourceError::Session {
            host: self.shared.source_name.clone(),
            message: "lazyfs is shutting down".into(),
        };
        sent.map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }

    /// How many directories of the tree are still to be listed (the tree
    /// needs the source until none is).
    pub fn set_unlisted_dirs(&self, count: usize) {
        self.shared.unlisted_dirs.store(count, Ordering::Relaxed);
    }

    /// Whether background prefetch of every file (those the tree adds too) was asked for.
    pub fn prefetching_all(&self) -> bool {
        self.shared.prefetch_all.load(Ordering::Relaxed)
    }

    /// Streams `files` (every file when `None`, and those the tree adds
    /// later) in the background, starting `jobs` workers unless prefetch runs
    /// already. Returns how many of them still had bytes to fetch.
    pub fn prefetch(&self, files: Option<&[usize]>, jobs: usize) -> usize {
        let shared = &self.shared;
        self.prefetch.get_or_init(|| prefetch::Workers::start(self.source.clone(), shared.clone(), jobs));
        shared.prefetching.store(true, Ordering::Relaxed);
        let all: Vec<usize>;
        let files = match files {
            Some(files) => files,
            None => {
                shared.prefetch_all.store(true, Ordering::Relaxed);
                all = (0..shared.files.len()).collect();
                &all
            }
        };
        files.iter().filter(|&&index| self.want(index)).count()
    }

    /// Marks file `index` wanted by background prefetch and queues it;
    /// whether it had bytes to fetch.
    fn want(&self, index: usize) -> bool {
        let file = self.shared.files.get(index);
        file.prefetch_wanted.store(true, Ordering::Relaxed);
        let needed = !file.needs_nothing();
        if needed {
            self.shared.queue.push(index);
        }
        needed
    }

    /// Whether background prefetch was asked for file `index`.
    pub fn prefetch_wanted(&self, index: usize) -> bool {
        self.shared.files.get(index).prefetch_wanted.load(Ordering::Relaxed)
    }

    pub fn file(&self, index: usize) -> Arc<FetchFile> {
        self.shared.files.get(index)
    }

    /// Every file served now, by number.
    pub fn files(&self) -> Vec<Arc<FetchFile>> {
        self.shared.files.all()
    }

    pub fn file_count(&self) -> usize {
        self.shared.files.len()
    }

    /// Why the mount is degraded (the source not answering, the cache full).
    pub fn degraded(&self) -> Option<String> {
        self.shared.health.degraded()
    }

    /// Why the source cannot be used, if the mount's first connection to it failed.
    pub fn source_error(&self) -> Option<Arc<str>> {
        self.shared.health.first.failure()
    }

    pub fn prefetching(&self) -> bool {
        self.prefetch.get().is_some()
    }

    /// `tell` hears of every file whose bytes start over (fetched again
    /// because the source changed), to drop what was cached of the old ones.
    pub fn on_started_over(&self, tell: StartedOver) {
        let _ = self.shared.started_over.set(tell);
    }

    /// Calls `done` once every chunk of `chunks` of file `index` is present
    /// (at once if they are), fetching the missing ones nobody fetches yet.
    pub fn when_present(&self, index: usize, chunks: Range<u64>, done: Done) {
        self.shared.when_present(index, chunks, done)
    }

    /// File `index` was opened for reading: a small one is fetched whole
    /// at once, in a batch with the others opened meanwhile (a process reads
    /// what it opens; a restore opens them all at once).
    pub fn opened(&self, index: usize) {
        let file = &self.shared.files.get(index);
        if file.size <= OPENED_WHOLE && !file.needs_nothing() && !file.opened.swap(true, Ordering::Relaxed) {
            self.shared.requests.opened(index);
        }
    }

    /// Replies with bytes `offset..offset+len` of file `index` (cut at its
    /// end) once their chunks are present. Read with `pread` under the
    /// owner's lock: never torn by a write or a truncate.
    pub fn read(&self, index: usize, offset: u64, len: u32, reply: Reply<Vec<u8>>) {
        let stats = &self.shared.files.get(index).stats;
        stats.reads.fetch_add(1, Ordering::Relaxed);
        let now = self.shared.started.elapsed().as_micros() as u64;
        let _ = stats.first_read_us.compare_exchange(NEVER, now, Ordering::Relaxed, Ordering::Relaxed);
        let chunks = self.shared.files.get(index).chunks_of(offset, u64::from(len));
        self.recorder.note(index, chunks.clone(), self.shared.files.get(index).chunk_count(), now);
        let op = move |file: &FetchFile, state: &mut Owned| {
            let len = u64::from(len).min(state.len.saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; len];
            let got = file.spill.read_at(offset, &mut buf)?;
            buf.truncate(got);
            Ok(buf)
        };
        with_present(&self.shared, index, chunks, op, reply)
    }

    /// Keeps the recording in `cache_dir` as it grows (see [`crate::recording`]).
    pub fn record_in(&self, cache_dir: CacheDir) {
        let shared = self.shared.clone();
        self.recorder.grow_in(cache_dir, move |index| shared.files.get(index).path_bytes().to_vec());
    }

    /// The order readers first touched chunks in so far.
    pub fn recording(&self) -> Recording {
        let touches = self.recorder.runs().into_iter().map(|(index, chunks, at_us)| Touch {
            path: self.shared.files.get(index).path_bytes().to_vec(),
            first: chunks.start,
            end: chunks.end,
            at_us,
        });
        recording::new(touches.collect())
    }

    /// Writes `data` at `offset` of file `index`, locally, once the whole
    /// file is present: the source is never written. Answered once the
    /// journal durably says the file is local (EIO if it cannot).
    pub fn write(&self, index: usize, offset: u64, data: Vec<u8>, reply: Reply<u32>) {
        let all = 0..self.shared.files.get(index).chunk_count();
        let shared = self.shared.clone();
        let op = move |file: &FetchFile, state: &mut Owned| {
            file.spill.write_at(offset, &data)?;
            state.len = state.len.max(offset + data.len() as u64);
            Ok((data.len() as u32, shared.made_local(index, state)))
        };
        let shared = self.shared.clone();
        let done = Box::new(move |result: Result<(u32, bool), FetchError>| {
            reply(result.and_then(|(written, newly)| shared.durable(newly, written)))
        });
        with_present(&self.shared, index, all, op, done)
    }

    /// Truncates (or extends) file `index` to `size`, locally, once the bytes
    /// below `size` are present. Fetches still in flight for it are dropped.
    pub fn truncate(&self, index: usize, size: u64, reply: Reply<u64>) {
        let keep = self.shared.files.get(index).chunks_of(0, size);
        let shared = self.shared.clone();
        let op = move |file: &FetchFile, state: &mut Owned| {
            file.spill.set_len(size)?;
            state.len = size;
            // What was not fetched is gone: the file is local from here on,
            // and what was being fetched for it never lands.
            state.generation += 1;
            state.in_flight.clear();
            state.presence.mark(0..file.chunk_count());
            let newly = shared.made_local(index, state);
            Ok((size, newly, std::mem::take(&mut state.waiters)))
        };
        let shared = self.shared.clone();
        let done = Box::new(move |result: Result<(u64, bool, Vec<Waiter>), FetchError>| {
            let result = result.and_then(|(size, newly, waiters)| {
                // Every chunk is "present" now: whoever waited reads the new length.
                for waiter in waiters {
                    (waiter.done)(Ok(()));
                }
                shared.durable(newly, size)
            });
            reply(result)
        });
        with_present(&self.shared, index, keep, op, done)
    }

    /// Whether any file still needs the source: one neither verified,
    /// changed locally nor removed.
    pub fn source_needed(&self) -> bool {
        self.shared.source_needed()
    }

    /// The state journal, for the local layer's records.
    pub fn journal(&self) -> &Journal {
        &self.shared.journal
    }

    /// Stops fetching and makes everything known durable. Workers still
    /// waiting on the source after `STOP_WAIT` are left behind (their
    /// requests end at their own deadlines), so this ends whatever the source does.
    pub fn stop(&self) -> Result<(), StoreError> {
        self.shared.health.stop();
        self.shared.requests.close();
        self.shared.queue.close();
        if let Some(workers) = self.prefetch.get() {
            let left = workers.join_within(STOP_WAIT);
            if left > 0 {
                log::warn!("{left} prefetch worker(s) still wait on the source: not waiting for them");
            }
        }
        self.shared.journal.flush()
    }

    /// Everything known now, as journal records (for a compacted journal).
    /// Spill files are synced first, so no record claims bytes still in flight
    /// to the disk.
    pub fn snapshot(&self) -> Vec<JournalRecord> {
        snapshot(&self.shared.files.all())
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        if self.prefetching() {
            self.shared.queue.close();
        }
    }
}

impl Shared {
    /// The recording to replay, if there is one (taken once).
    fn take_replay(&self) -> Option<replay::Replay> {
        self.replay.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn source_needed(&self) -> bool {
        self.unlisted_dirs.load(Ordering::Relaxed) > 0
            || self.files.all().iter().any(|f| {
                let state = f.lock();
                !state.removed && !matches!(state.phase, Phase::Verified { .. } | Phase::Modified)
            })
    }

    /// The file (locked as `state`) was just changed locally: it is local from
    /// now on. Whether it was not before (its journal record is then sent).
    fn made_local(&self, index: usize, state: &mut Owned) -> bool {
        let newly = state.phase != Phase::Modified;
        state.phase = Phase::Modified;
        if newly {
            self.journal.modified(self.files.get(index).path_bytes());
        }
        newly
    }

    /// `value`, once the journal has on disk what a local change sent it.
    fn durable<T>(&self, newly: bool, value: T) -> Result<T, FetchError> {
        if newly {
            self.journal.flush().map_err(|e| FetchError::new(e.to_string()))?;
        }
        Ok(value)
    }
}

/// Runs `op` on file `index` under its lock once `chunks` are present
/// (waiting for them again if they went away before the lock was taken: the
/// file started over), and replies with what it returns.
fn with_present<T: Send + 'static>(
    shared: &Arc<Shared>,
    index: usize,
    chunks: Range<u64>,
    op: impl FnOnce(&FetchFile, &mut Owned) -> Result<T, FetchError> + Send + 'static,
    reply: Reply<T>,
) {
    let (again, shared_again) = (chunks.clone(), shared.clone());
    let done = Box::new(move |present: Result<(), FetchError>| {
        if let Err(e) = present {
            return reply(Err(e));
        }
        let file = &shared_again.files.get(index);
        let mut state = file.lock();
        if let Phase::Failed(message) = &state.phase {
            let error = FetchError::new(message.clone());
            drop(state);
            return reply(Err(error));
        }
        if !state.presence.all_present(again.clone()) {
            drop(state);
            return with_present(&shared_again, index, again, op, reply);
        }
        let result = op(file, &mut state);
        drop(state);
        reply(result)
    });
    shared.when_present(index, chunks, done);
}

/// The journal records that say what is known of `files` now.
pub fn snapshot(files: &[Arc<FetchFile>]) -> Vec<JournalRecord> {
    files.iter().flat_map(|file| file.snapshot()).collect()
}

/// Makes the journal for `files`, owned by `owner`, holding what is known now
/// (and the records `kept`).
pub fn create_journal(
    dir: &CacheDir,
    owner: &Owner,
    files: &[Arc<FetchFile>],
    kept: Vec<JournalRecord>,
) -> Result<Journal, StoreError> {
    let journal_files = files
        .iter()
        .map(|f| journal::JournalFile {
            path: f.path_bytes().to_vec(),
            size: f.size,
            spill: f.spill.path().to_path_buf(),
        })
        .collect();
    let mut records = snapshot(files);
    records.extend(kept);
    Journal::create(dir, owner, records, journal_files)
}

#[cfg(test)]
mod tests;
