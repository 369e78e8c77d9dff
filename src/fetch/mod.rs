//! Getting chunks from the source into spill files, checking them, and
//! knowing where each file stands.
//!
//! A reader asks for the chunks it covers with [`Fetcher::when_present`];
//! chunks nobody fetches yet are claimed (one fetch serves every reader of a
//! chunk) and queued on the on-demand lane, a thread with a source connection
//! of its own. With prefetch, a pool of workers streams whole files in queue
//! order; a file someone reads jumps the queue. Every chunk that lands is
//! checked against the manifest if there is one, recorded in the journal once
//! durable, and a complete file is verified by the verifier thread.

mod lane;
pub mod prefetch;
pub mod restore;
mod verify;

use std::collections::HashSet;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use std::time::Instant;

use crate::manifest::FileHashes;
use crate::source::{Connection, Source, SourceError, SourceStat};
use crate::store::SpillFile;
use crate::store::journal::{self, Journal, proto::JournalRecord};
pub use prefetch::Order;

/// What a waiting reader is told once its chunks are present, or cannot be.
pub type Done = Box<dyn FnOnce(Result<(), FetchError>) + Send>;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub Arc<str>);

impl FetchError {
    fn new(message: impl Into<Arc<str>>) -> Self {
        FetchError(message.into())
    }
}

/// Where a file stands (`lazyfs status` shows these words).
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
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Fetching => "fetching",
            Phase::Present => "present",
            Phase::Verified { .. } => "verified",
            Phase::Modified => "modified",
            Phase::Failed(_) => "failed",
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

    fn at(ms: &AtomicU64) -> Option<f64> {
        match ms.load(Ordering::Relaxed) {
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

/// One file as the fetcher sees it.
pub struct FetchFile {
    /// The path the images record: the file's name in the journal.
    pub path: PathBuf,
    /// The path on the source (the source applies its root).
    pub source_path: PathBuf,
    pub spill: SpillFile,
    /// Its hashes from the manifest, if there is one.
    pub expected: Option<FileHashes>,
    /// Where the images first list it.
    pub image_order: u64,
    pub stats: FileStats,
    state: Mutex<FetchState>,
}

struct FetchState {
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
    /// Requests for it the source left unanswered while answering others.
    timeouts: u32,
}

struct Waiter {
    chunks: Range<u64>,
    done: Done,
}

impl FetchFile {
    pub fn new(spec: restore::FileSpec, spill: SpillFile, phase: Phase) -> Self {
        FetchFile {
            path: spec.path,
            source_path: spec.source_path,
            spill,
            expected: spec.expected,
            image_order: spec.image_order,
            stats: FileStats::new(),
            state: Mutex::new(FetchState {
                in_flight: HashSet::new(),
                waiters: Vec::new(),
                phase,
                baseline: None,
                restarts: 0,
                read_whole: false,
                timeouts: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().expect("fetch state")
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }

    pub fn failure(&self) -> Option<Arc<str>> {
        match self.phase() {
            Phase::Failed(message) => Some(message),
            _ => None,
        }
    }

    fn path_bytes(&self) -> &[u8] {
        self.path.as_os_str().as_bytes()
    }

    /// Claims the chunks of `chunks` that are neither present nor in flight,
    /// as maximal runs; each must end in `Shared::finish`.
    fn claim(&self, chunks: Range<u64>) -> Vec<Range<u64>> {
        self.claim_locked(&mut self.lock(), chunks)
    }

    fn claim_locked(&self, state: &mut FetchState, chunks: Range<u64>) -> Vec<Range<u64>> {
        if state.phase.is_settled() {
            return Vec::new();
        }
        let mut runs: Vec<Range<u64>> = Vec::new();
        for chunk in chunks {
            if self.spill.is_present(chunk) || !state.in_flight.insert(chunk) {
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
        runs
    }

    /// The claimed `chunks` could not be fetched. With `whole_file`, the file
    /// fails for good; otherwise only the readers of these chunks are told.
    fn fail(&self, chunks: Range<u64>, error: &FetchError, whole_file: bool) {
        let failed: Vec<Waiter> = {
            let mut state = self.lock();
            for chunk in chunks.clone() {
                state.in_flight.remove(&chunk);
            }
            if whole_file {
                state.phase = Phase::Failed(error.0.clone());
            }
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

    fn mark_read_whole(&self) {
        self.lock().read_whole = true;
    }

    /// Chunks neither present nor being fetched.
    fn unclaimed_chunks(&self) -> u64 {
        let state = self.lock();
        (0..self.spill.chunk_count()).filter(|&c| !self.spill.is_present(c) && !state.in_flight.contains(&c)).count()
            as u64
    }

    /// Ranges of present chunks, for the journal snapshot.
    fn present_runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for chunk in (0..self.spill.chunk_count()).filter(|&c| self.spill.is_present(c)) {
            match runs.last_mut() {
                Some(run) if run.end == chunk => run.end += 1,
                _ => runs.push(chunk..chunk + 1),
            }
        }
        runs
    }
}

/// Settings of the fetcher.
#[derive(Debug, Clone, Copy)]
pub struct FetchConfig {
    /// Prefetch workers (0: no prefetch).
    pub jobs: usize,
    pub order: Order,
    /// How long a lane keeps reconnecting before its readers get EIO.
    pub reconnect_timeout: std::time::Duration,
}

/// What the lanes share.
pub(crate) struct Shared {
    files: Vec<Arc<FetchFile>>,
    journal: Journal,
    queue: prefetch::Queue,
    verify: Mutex<Sender<usize>>,
    /// What the on-demand lanes are asked.
    requests: lane::Requests,
    started: Instant,
    health: Arc<lane::Health>,
    /// How to name the source in messages.
    source_name: String,
}

impl Shared {
    /// Claimed `chunks` of file `index` are in its spill file and checked:
    /// mark them present, answer the readers waiting for them, and queue the
    /// file for verification once it is complete.
    fn landed(&self, index: usize, chunks: Range<u64>, lane: Lane) {
        let file = &self.files[index];
        let bytes = file.spill.chunk_bytes(chunks.clone());
        let counter = match lane {
            Lane::OnDemand => &file.stats.bytes_on_demand,
            Lane::Prefetch => &file.stats.bytes_prefetched,
        };
        counter.fetch_add(bytes.end - bytes.start, Ordering::Relaxed);
        self.journal.present(index, chunks.clone());
        file.spill.mark_present(chunks.clone());
        let (ready, complete) = {
            let mut state = file.lock();
            for chunk in chunks {
                state.in_flight.remove(&chunk);
            }
            let (ready, waiting): (Vec<Waiter>, Vec<Waiter>) =
                std::mem::take(&mut state.waiters).into_iter().partition(|w| file.spill.all_present(w.chunks.clone()));
            state.waiters = waiting;
            let complete = file.spill.is_complete() && state.phase == Phase::Fetching;
            if complete {
                state.phase = Phase::Present;
            }
            (ready, complete)
        };
        for waiter in ready {
            (waiter.done)(Ok(()));
        }
        if complete {
            file.stats.completed_us.store(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
            let _ = self.verify.lock().expect("verify queue").send(index);
        }
    }

    /// The file changed on the source: forget its chunks and fetch it again
    /// (at most twice), or fail it.
    fn restart(&self, index: usize, reason: &str) {
        let file = &self.files[index];
        let again = {
            let mut state = file.lock();
            state.restarts += 1;
            state.baseline = None;
            if state.restarts > 2 {
                state.phase = Phase::Failed(format!("{reason}, and again after fetching it twice more").into());
                false
            } else {
                file.spill.clear_present();
                state.phase = Phase::Pending;
                true
            }
        };
        self.journal.reset(file.path_bytes());
        log::warn!("{}: {reason}: {}", file.path.display(), if again { "fetching it again" } else { "failed" });
        if again {
            self.queue.push(index);
        }
    }

    /// The first look at the source's file: its size must be what the images
    /// record. Keeps the size and mtime to compare with after the transfer.
    fn check_baseline(&self, index: usize, connection: &mut dyn Connection) -> Result<(), SourceError> {
        if !self.needs_baseline(index) {
            return Ok(());
        }
        let stat = connection.stat(&self.files[index].source_path)?;
        self.set_baseline(index, stat);
        Ok(())
    }

    /// Whether the file still needs its first look at the source (with a
    /// manifest, the chunk hashes say everything).
    fn needs_baseline(&self, index: usize) -> bool {
        let file = &self.files[index];
        file.expected.is_none() && file.lock().baseline.is_none()
    }

    /// The first look: the size must be what the images record; the size and
    /// mtime are kept to compare with after the transfer.
    fn set_baseline(&self, index: usize, stat: SourceStat) {
        let file = &self.files[index];
        let size = file.spill.chunk_bytes(0..file.spill.chunk_count()).end;
        if stat.size != size {
            let message = format!(
                "{}: changed since the checkpoint: the source has {} bytes, the images record {size}",
                file.path.display(),
                stat.size
            );
            log::error!("{message}");
            file.fail(0..0, &FetchError::new(message), true);
            return;
        }
        file.lock().baseline.get_or_insert(stat);
    }
}

/// Fetches claimed `chunks` of `file` into its spill file and checks them
/// against the manifest, fetching a chunk that does not match once more.
fn fetch_checked(link: &mut lane::Link, file: &FetchFile, chunks: Range<u64>) -> Result<(), FetchFailure> {
    link.fetch(file, chunks.clone()).map_err(FetchFailure::Source)?;
    check_against_manifest(link, file, chunks)
}

/// Checks fetched `chunks` against the manifest, fetching a chunk that does
/// not match once more.
fn check_against_manifest(link: &mut lane::Link, file: &FetchFile, chunks: Range<u64>) -> Result<(), FetchFailure> {
    let Some(expected) = &file.expected else {
        return Ok(());
    };
    for chunk in chunks {
        let bytes = file.spill.chunk_bytes(chunk..chunk + 1);
        // A spill file that cannot be read counts as not matching.
        let good = |file: &FetchFile| {
            file.spill.read(bytes.start, bytes.end - bytes.start, |b| expected.chunk_matches(chunk, b)).unwrap_or(false)
        };
        if good(file) {
            continue;
        }
        log::warn!("{}: chunk {chunk} does not match the manifest: fetching it again", file.path.display());
        link.fetch(file, chunk..chunk + 1).map_err(FetchFailure::Source)?;
        if !good(file) {
            return Err(FetchFailure::Mismatch(chunk));
        }
    }
    Ok(())
}

enum FetchFailure {
    Source(SourceError),
    Mismatch(u64),
}

impl Shared {
    /// Ends a claimed run however its fetch went.
    fn finish(&self, index: usize, chunks: Range<u64>, lane: Lane, result: Result<(), FetchFailure>) {
        let file = &self.files[index];
        match result {
            Ok(()) => self.landed(index, chunks, lane),
            Err(FetchFailure::Mismatch(chunk)) => {
                let message = format!(
                    "{}: chunk {chunk} does not match the manifest even when fetched again: not served",
                    file.path.display()
                );
                log::error!("{message}");
                file.fail(chunks, &FetchError::new(message), true);
            }
            Err(FetchFailure::Source(e)) => {
                // A lost connection may come back; a file that is missing or
                // shorter than recorded will not.
                let whole_file = !e.is_connection_lost();
                let stuck_here = matches!(&e, SourceError::TimedOut { path: Some(p), .. } if *p == file.source_path);
                log::error!("{e}");
                if lane == Lane::Prefetch && !whole_file && !stuck_here {
                    // Readers of these chunks are not this failure's hostages:
                    // the on-demand lanes serve them.
                    self.release(index, chunks);
                } else {
                    file.fail(chunks, &FetchError::new(e.to_string()), whole_file);
                }
                if !whole_file && lane == Lane::Prefetch {
                    self.queue.push(index);
                }
            }
        }
    }

    /// Claimed `chunks` of file `index` were not fetched, through no fault
    /// of the file: drop the claim, and hand its waiting readers' chunks to
    /// the on-demand lanes.
    fn release(&self, index: usize, chunks: Range<u64>) {
        let file = &self.files[index];
        let runs: Vec<Range<u64>> = {
            let mut state = file.lock();
            for chunk in chunks {
                state.in_flight.remove(&chunk);
            }
            let wanted: Vec<Range<u64>> = state.waiters.iter().map(|w| w.chunks.clone()).collect();
            wanted.into_iter().flat_map(|c| file.claim_locked(&mut state, c)).collect()
        };
        self.ask_on_demand(index, runs, Instant::now());
    }

    /// Queues claimed `runs` of file `index` on the on-demand lanes.
    fn ask_on_demand(&self, index: usize, runs: Vec<Range<u64>>, asked: Instant) {
        for chunks in runs {
            if !self.requests.push(lane::Job::new(index, chunks.clone(), asked)) {
                self.files[index].fail(chunks, &FetchError::new("lazyfs is shutting down"), false);
            }
        }
    }

    /// A request for file `index` went unanswered (`error`). If the source
    /// answers a new connection, the file is to blame (a FIFO, a hung mount
    /// on the old host): it is tried again later, and fails on the second time.
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
        let file = &self.files[index];
        let message = format!(
            "{}: {error}, twice, while it answered other requests: not served (a FIFO or a hung mount on the old host?)",
            file.path.display()
        );
        let failed = {
            let mut state = file.lock();
            state.timeouts += 1;
            state.timeouts >= STUCK_TIMEOUTS
        };
        if failed {
            log::error!("{message}");
            file.fail(0..0, &FetchError::new(message), true);
        } else {
            log::warn!("{}: {error}, while it answers other requests: trying it again later", file.path.display());
        }
    }
}

/// Unanswered requests (while the source answered others) after which a file fails.
const STUCK_TIMEOUTS: u32 = 2;
/// How long stopping waits for prefetch workers still waiting on the source.
const STOP_WAIT: Duration = Duration::from_secs(2);

pub struct Fetcher {
    shared: Arc<Shared>,
    source: Arc<dyn Source>,
    /// Started by `--prefetch`, or later by `lazyfs prefetch`.
    prefetch: OnceLock<prefetch::Workers>,
    /// The files background prefetch was asked for.
    prefetch_wanted: Vec<AtomicBool>,
}

impl Fetcher {
    /// Starts the lanes: the on-demand lane on `connection` (opened at mount
    /// time, so an unreachable source fails the mount), the verifier, and
    /// with `config.jobs > 0` the prefetch workers.
    pub fn start(
        source: Arc<dyn Source>,
        connection: Box<dyn Connection>,
        files: Vec<Arc<FetchFile>>,
        journal: Journal,
        config: FetchConfig,
    ) -> Fetcher {
        let (verify_tx, verify_rx) = std::sync::mpsc::channel();
        let order: Vec<(u64, u64)> = files.iter().map(|f| (f.spill.len(), f.image_order)).collect();
        let shared = Arc::new(Shared {
            queue: prefetch::Queue::new(&order, config.order),
            files,
            journal,
            verify: Mutex::new(verify_tx),
            requests: lane::Requests::new(),
            started: Instant::now(),
            health: Arc::new(lane::Health::new(config.reconnect_timeout)),
            source_name: source.describe(),
        });
        verify::spawn(source.clone(), shared.clone(), verify_rx);
        for (index, file) in shared.files.iter().enumerate() {
            if file.phase() == Phase::Present {
                let _ = shared.verify.lock().expect("verify queue").send(index);
            }
        }
        let link = lane::Link::with_connection(source.clone(), shared.health.clone(), connection);
        lane::spawn_on_demand(link, &source, &shared);
        let prefetch_wanted = shared.files.iter().map(|_| AtomicBool::new(false)).collect();
        let fetcher = Fetcher { shared, source, prefetch: OnceLock::new(), prefetch_wanted };
        if config.jobs > 0 {
            fetcher.prefetch(None, config.jobs);
        }
        fetcher
    }

    /// Streams `files` (every file when `None`) in the background, starting
    /// `jobs` workers unless prefetch runs already. Returns how many of them
    /// still had bytes to fetch.
    pub fn prefetch(&self, files: Option<&[usize]>, jobs: usize) -> usize {
        let shared = &self.shared;
        self.prefetch.get_or_init(|| prefetch::Workers::start(self.source.clone(), shared.clone(), jobs));
        let all: Vec<usize>;
        let files = match files {
            Some(files) => files,
            None => {
                all = (0..shared.files.len()).collect();
                &all
            }
        };
        let mut queued = 0;
        for &index in files {
            self.prefetch_wanted[index].store(true, Ordering::Relaxed);
            let file = &shared.files[index];
            if !file.phase().is_settled() && !file.spill.is_complete() {
                shared.queue.push(index);
                queued += 1;
            }
        }
        queued
    }

    /// Whether background prefetch was asked for file `index`.
    pub fn prefetch_wanted(&self, index: usize) -> bool {
        self.prefetch_wanted[index].load(Ordering::Relaxed)
    }

    pub fn file(&self, index: usize) -> &Arc<FetchFile> {
        &self.shared.files[index]
    }

    pub fn files(&self) -> &[Arc<FetchFile>] {
        &self.shared.files
    }

    /// Why the source is not answering, while lanes reconnect.
    pub fn degraded(&self) -> Option<String> {
        self.shared.health.degraded()
    }

    pub fn prefetching(&self) -> bool {
        self.prefetch.get().is_some()
    }

    /// Calls `done` once every chunk of `chunks` of file `index` is present
    /// (at once if they are), fetching the missing ones nobody fetches yet.
    pub fn when_present(&self, index: usize, chunks: Range<u64>, done: Done) {
        let file = &self.shared.files[index];
        if file.spill.all_present(chunks.clone()) && file.failure().is_none() {
            return done(Ok(()));
        }
        let runs = {
            let mut state = file.lock();
            if let Phase::Failed(message) = &state.phase {
                let error = FetchError(message.clone());
                drop(state);
                return done(Err(error));
            }
            // Checked under the lock: a run landing now either sees this waiter or was seen here.
            if file.spill.all_present(chunks.clone()) {
                drop(state);
                return done(Ok(()));
            }
            let runs = file.claim_locked(&mut state, chunks.clone());
            state.waiters.push(Waiter { chunks, done });
            runs
        };
        // A file someone waits for jumps the prefetch queue.
        if self.prefetching() {
            self.shared.queue.promote(index);
        }
        self.shared.ask_on_demand(index, runs, Instant::now());
    }

    /// A read through the mount (for the counters).
    pub fn note_read(&self, index: usize) {
        let stats = &self.shared.files[index].stats;
        stats.reads.fetch_add(1, Ordering::Relaxed);
        let now = self.shared.started.elapsed().as_micros() as u64;
        let _ = stats.first_read_us.compare_exchange(NEVER, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// What to call once a local write changed file `index` (complete by
    /// then): the file is local from then on, and the journal says so.
    pub fn modified_marker(&self, index: usize) -> impl FnOnce() + Send + 'static {
        let shared = self.shared.clone();
        move || {
            let file = &shared.files[index];
            let newly = {
                let mut state = file.lock();
                let newly = state.phase != Phase::Modified;
                state.phase = Phase::Modified;
                newly
            };
            if newly {
                shared.journal.modified(file.path_bytes());
                shared.journal.flush();
            }
        }
    }

    /// Stops fetching and makes everything known durable. Workers still
    /// waiting on the source after `STOP_WAIT` are left behind (their
    /// requests end at their own deadlines), so this ends whatever the source does.
    pub fn stop(&self) {
        self.shared.health.stop();
        self.shared.requests.close();
        self.shared.queue.close();
        if let Some(workers) = self.prefetch.get() {
            let left = workers.join_within(STOP_WAIT);
            if left > 0 {
                log::warn!("{left} prefetch worker(s) still wait on the source: not waiting for them");
            }
        }
        self.shared.journal.flush();
    }

    /// Everything known now, as journal records (for a compacted journal).
    pub fn snapshot(&self) -> Vec<JournalRecord> {
        snapshot(&self.shared.files)
    }
}

/// The journal records that say what is known of `files` now.
pub fn snapshot(files: &[Arc<FetchFile>]) -> Vec<JournalRecord> {
    let mut records = Vec::new();
    for file in files {
        let path = file.path_bytes();
        for run in file.present_runs() {
            records.push(journal::present_record(path, run, file.spill.len()));
        }
        match file.phase() {
            Phase::Verified { hash, against } => records.push(journal::verified_record(path, &hash, against)),
            Phase::Modified => records.push(journal::modified_record(path)),
            _ => {}
        }
    }
    records
}
