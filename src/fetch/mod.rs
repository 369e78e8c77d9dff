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
mod file;
mod landing;
mod lane;
mod listing;
mod outcome;
pub mod prefetch;
mod replay;
pub mod restore;
mod verify;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::recording::{self, Recorder, Recording, Touch};
use crate::source::{Connection, Listings, Sink, Source, SourceError, SourceStat};
use crate::store::journal::{self, Journal, Owner, proto::JournalRecord};
use crate::store::{CacheDir, StoreError};
pub(crate) use file::{Claim, FileTable};
pub use file::{Done, FetchError, FetchFile, FileStats, Lane, Phase, Progress, Reply};
use file::{NEVER, Owned, Waiter};
use landing::Landings;
pub(crate) use lane::panic_message;
use outcome::FetchFailure;
pub use prefetch::Order;

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
    /// What the listing lanes are asked: the walk's, and the readers' (a
    /// reader never waits behind a batch of the walk).
    list: Mutex<Sender<listing::ListJob>>,
    list_for_readers: Mutex<Sender<listing::ListJob>>,
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
    /// generation), in one pipeline of ranged reads. Data flows one way: the
    /// transport hands each piece to the check (`landing.rs`), which has the
    /// owner land it; chunks that did not match the manifest come back here
    /// for a second pass.
    fn fetch_claims(&self, link: &mut lane::Link, index: usize, claims: Vec<Claim>, lane: Lane) -> Option<SourceError> {
        if claims.is_empty() {
            return None;
        }
        let file = &self.files.get(index);
        let (mut results, again) = self.fetch_pass(link, index, &claims, lane, false);
        if !again.is_empty() {
            for claim in &again {
                let chunk = claim.chunks.start;
                log::warn!("{}: chunk {chunk} does not match the manifest: fetching it again", file.path.display());
            }
            let (second, _) = self.fetch_pass(link, index, &again, lane, true);
            for (bad, result) in again.iter().zip(second) {
                if let (Err(failure), Some(at)) =
                    (result, claims.iter().position(|c| c.chunks.contains(&bad.chunks.start)))
                    && results[at].is_ok()
                {
                    results[at] = Err(failure);
                }
            }
        }
        let mut stuck = None;
        for (claim, result) in claims.iter().zip(results) {
            stuck = stuck.or_else(|| lane::stuck_on(&result, &file.source_path));
            self.finish(index, claim, lane, result);
        }
        stuck
    }

    /// One pass of [`Shared::fetch_claims`]: how each claim ended, and the
    /// chunks that did not match (on a first pass).
    fn fetch_pass(
        &self,
        link: &mut lane::Link,
        index: usize,
        claims: &[Claim],
        lane: Lane,
        second_try: bool,
    ) -> (Vec<Result<(), FetchFailure>>, Vec<Claim>) {
        let file = &self.files.get(index);
        // The first look goes with the first read (no extra round trip over
        // SSH), before its bytes: a look after could see a file replaced
        // since the bytes were read, and vouch for them.
        let look = self.needs_baseline(index);
        let mut landings = Landings::new(self, index, claims, lane, link.is_bulk());
        if second_try {
            landings = landings.second_try();
        }
        let fetched = lane::contained(link, |link| link.fetch(file, &mut landings, look).map_err(FetchFailure::Source));
        landings.finish(&fetched)
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
        let (mut results, again) = landings.finish(&Ok(()));
        match again.is_empty() {
            true => results.pop().expect("one claim"),
            // A chunk that did not match: fetched once more (a mismatch then fails the file).
            false => {
                let (second, _) = self.fetch_pass(link, index, &again, lane, true);
                for (claim, result) in again.iter().zip(second) {
                    self.finish(index, claim, lane, result);
                }
                Ok(())
            }
        }
    }

    /// Lands a claim's checked bytes through the file's owner (if the claim
    /// still holds: false if not), then answers the readers they complete
    /// and queues the file for verification once it is complete.
    fn land(&self, index: usize, claim: &Claim, data: &[u8], lane: Lane) -> Result<bool, StoreError> {
        let file = &self.files.get(index);
        let Some(file::Landed { ready, complete }) = file.land(index, claim, data, &self.journal)? else {
            return Ok(false);
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
            state.in_order = None;
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
            state.phase = Phase::Verified { hash: Box::new(hash), against };
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
        let (readers_list_tx, readers_list_rx) = std::sync::mpsc::channel();
        let order: Vec<(u64, u64)> = files.iter().map(|f| (f.size, f.image_order)).collect();
        let shared = Arc::new(Shared {
            queue: prefetch::Queue::new(&order, &config.order),
            files: FileTable::new(files),
            unlisted_dirs: 0.into(),
            journal,
            verify: Mutex::new(verify_tx),
            requests: lane::Requests::new(),
            list: Mutex::new(list_tx),
            list_for_readers: Mutex::new(readers_list_tx),
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
        listing::spawn(source.clone(), shared.clone(), readers_list_rx);
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

    /// With `--prefetch-order recorded`: the recording's runs of files of the
    /// tree not found yet, which take their recorded place once found.
    pub fn expect_recorded(&self, later: crate::recording::Later) {
        self.shared.queue.expect(later);
    }

    /// Serves `file` too, a file of the tree found after the mount began:
    /// its number. With prefetch of every file under way, it is queued
    /// (after the checkpoint's own files).
    pub fn add_file(&self, file: FetchFile) -> usize {
        let shared = &self.shared;
        let journal_file =
            journal::JournalFile { path: file.path_bytes().to_vec(), size: file.size, spill: file.spill.location() };
        let (size, present) = (file.size, file.phase() == Phase::Present);
        let path = file.path_bytes().to_vec();
        let index = shared.files.push(Arc::new(file));
        shared.journal.add_file(index, journal_file);
        shared.queue.add(index, size, &path);
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
        let lane = if for_reader { &self.shared.list_for_readers } else { &self.shared.list };
        let sent = lane.lock().unwrap_or_else(PoisonError::into_inner).send(job);
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

    /// Why the mount is degraded (the source not answering or not the one
    /// the cache dir's files come from, the cache full).
    pub fn degraded(&self) -> Option<String> {
        let health = self.shared.health.degraded();
        health.or_else(|| self.source.refusal()).or_else(|| self.shared.journal.refusing())
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

    /// Records that readers first touched `chunks` of file `index` at
    /// `at_us` (before this process: see `mount.rs`).
    pub fn note_recorded(&self, index: usize, chunks: Range<u64>, at_us: u64) {
        self.recorder.note(index, chunks, self.shared.files.get(index).chunk_count(), at_us);
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
            shared.make_local(index, state)?;
            file.spill.write_at(offset, &data)?;
            state.len = state.len.max(offset + data.len() as u64);
            Ok(data.len() as u32)
        };
        with_present(&self.shared, index, all, op, reply)
    }

    /// Truncates (or extends) file `index` to `size`, locally, once the bytes
    /// below `size` are present. Fetches still in flight for it are dropped.
    pub fn truncate(&self, index: usize, size: u64, reply: Reply<u64>) {
        let keep = self.shared.files.get(index).chunks_of(0, size);
        let shared = self.shared.clone();
        let op = move |file: &FetchFile, state: &mut Owned| {
            shared.make_local(index, state)?;
            file.spill.set_len(size)?;
            state.len = size;
            // What was not fetched is gone: the file is local from here on,
            // and what was being fetched for it never lands.
            state.generation += 1;
            state.in_flight.clear();
            state.presence.mark(0..file.chunk_count());
            Ok((size, std::mem::take(&mut state.waiters)))
        };
        let done = Box::new(move |result: Result<(u64, Vec<Waiter>), FetchError>| {
            reply(result.map(|(size, waiters)| {
                // Every chunk is "present" now: whoever waited reads the new length.
                for waiter in waiters {
                    (waiter.done)(Ok(()));
                }
                size
            }))
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

    /// File `index` (locked as `state`) is about to be changed locally: it
    /// is local from then on. Returns once the journal durably says so, or
    /// why it cannot (the change must then not be made): a local change to a
    /// checkpoint's file is journaled before it is made, like any other. The
    /// fsync is paid once, under the file's lock.
    fn make_local(&self, index: usize, state: &mut Owned) -> Result<(), FetchError> {
        if state.modified_durable {
            return Ok(());
        }
        self.journal.modified(self.files.get(index).path_bytes());
        self.journal.flush()?;
        state.phase = Phase::Modified;
        state.modified_durable = true;
        Ok(())
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

/// The journal records that say what is known of `files` now. Many files
/// are made durable by one syncfs of the cache's filesystem, as the journal
/// does for a batch: an fdatasync each cost 989 of them (1.2-4.3 s) at the
/// unmount of a PostgreSQL tree, and would cost 100,000 for a 100,000-file one.
pub fn snapshot(files: &[Arc<FetchFile>]) -> Vec<JournalRecord> {
    let synced = files.len() > journal::SYNC_EACH_UP_TO
        && files.first().is_some_and(|file| match file.spill.sync_filesystem() {
            Ok(()) => true,
            Err(e) => {
                log::error!("syncing the cache's filesystem: {e}; syncing each spill file instead");
                false
            }
        });
    files.iter().flat_map(|file| file.snapshot(synced)).collect()
}

/// Makes the journal for `files`, owned by `owner`, holding what is known now
/// (and the records `kept`). Where the cache filesystem has no room for the
/// new journal and the old one's records are this mount's as they are
/// (`resumable`: where they end), it goes on appending to the old one.
pub fn create_journal(
    dir: &CacheDir,
    owner: &Owner,
    files: &[Arc<FetchFile>],
    (kept, resumable): (Vec<JournalRecord>, Option<u64>),
) -> Result<Journal, StoreError> {
    let journal_files = || {
        files
            .iter()
            .map(|f| journal::JournalFile { path: f.path_bytes().to_vec(), size: f.size, spill: f.spill.location() })
            .collect()
    };
    let mut records = snapshot(files);
    records.extend(kept);
    match (Journal::create(dir, owner, records, journal_files()), resumable) {
        (Err(e), Some(whole_len)) if e.is_no_space() => {
            log::warn!("{e}: no room to compact the journal: appending to it as it is");
            Journal::resume(dir, owner, whole_len, journal_files())
        }
        (created, _) => created,
    }
}

#[cfg(test)]
mod tests;
