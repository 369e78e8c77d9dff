//! Prefetch: a rayon pool of workers, each with a source connection of its
//! own, streaming whole files into their spill files in queue order.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Claim, FetchFailure, FetchFile, Lane, Shared, lane::Link};
use crate::source::{Source, SourceError};

/// Files up to this size are fetched many at a time, whole: below a few MiB,
/// the round trips per file (open, read, close) cost more than the bytes.
pub(super) const SMALL_FILE: u64 = 4 << 20;
/// Files in one pipeline, and their bytes at most (they pass through one buffer).
const BATCH_FILES: usize = 256;
pub(super) const BATCH_BYTES: u64 = 4 << 20;

/// Chunks a worker claims and fetches at once (4 MiB): one window is one full
/// SFTP pipeline, so the link stays busy; a reader waiting for a chunk in a
/// window being fetched waits at most for that window.
const WINDOW_CHUNKS: u64 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Most files complete soonest.
    SmallestFirst,
    LargestFirst,
    /// The order the images list the files in.
    Image,
    /// What a recording says readers touched first, in that order, as
    /// (file, chunks) (see [`crate::recording::plan`]); then the rest
    /// smallest-first. A small file comes whole at its first run; a large
    /// one's runs come one by one, its other chunks with the rest.
    Recorded(Arc<[(usize, Range<u64>)]>),
}

/// Keys of files no recording names: after every recorded run.
const AFTER_RECORDED: u64 = 1 << 62;
/// Keys of the files of the tree the images do not record: after all of theirs.
const TREE_FILES: u64 = 1 << 63;

/// What a worker is given: a whole file, or a recorded run of a large one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Job {
    File(usize),
    Run(usize, Range<u64>),
}

/// Files waiting to be prefetched. Promoted files (someone reads them) come
/// first, most recent promotion first; then the rest in the chosen order.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

struct QueueState {
    /// (band, key, file): band 0 promoted, 1 ordinary.
    queued: BTreeSet<(u8, u64, usize)>,
    keys: Vec<Option<(u8, u64)>>,
    order_keys: Vec<u64>,
    /// Files to queue again once their time comes (the cache was full).
    later: Vec<(Instant, usize)>,
    /// Recorded runs of large files, (key, file, first, end): queued with
    /// band 1 and ordered among its files by key.
    runs: BTreeSet<(u64, usize, u64, u64)>,
    /// Each file's recorded runs, until the file is first queued (empty
    /// unless the order is a recording).
    pending_runs: Vec<Vec<(u64, Range<u64>)>>,
    /// Recorded runs taken by a worker and not yet done: what no recording
    /// names waits for them, so bulk transfers do not hold them up.
    runs_active: usize,
    /// Recorded runs of files not found yet (files of the tree), by path.
    recorded_later: crate::recording::Later,
    promotions: u64,
    closed: bool,
}

impl QueueState {
    /// The job at the front, without taking it.
    fn front(&self) -> Option<Job> {
        match (self.queued.first(), self.runs.first()) {
            (Some(&(band, key, f)), run) if band == 0 || run.is_none_or(|r| key < r.0) => {
                let unrecorded = band == 1 && key >= AFTER_RECORDED && !self.pending_runs.is_empty();
                (!unrecorded || self.runs_active == 0).then_some(Job::File(f))
            }
            (_, Some(&(_, f, first, end))) => Some(Job::Run(f, first..end)),
            _ => None,
        }
    }

    fn take_front(&mut self) -> Option<Job> {
        let job = self.front()?;
        match &job {
            Job::File(_) => {
                let (_, _, file) = self.queued.pop_first().expect("front");
                self.keys[file] = None;
            }
            Job::Run(..) => {
                self.runs.pop_first();
                self.runs_active += 1;
            }
        }
        Some(job)
    }
}

impl Queue {
    /// `files` are (size, place in the images) of each file.
    pub(super) fn new(files: &[(u64, u64)], order: &Order) -> Queue {
        let mut order_keys: Vec<u64> = files
            .iter()
            .map(|&(size, image_order)| match order {
                Order::SmallestFirst => size,
                Order::LargestFirst => (TREE_FILES - 1).saturating_sub(size),
                Order::Image => image_order,
                Order::Recorded(_) => AFTER_RECORDED.saturating_add(size),
            })
            .collect();
        let mut pending_runs = Vec::new();
        if let Order::Recorded(plan) = order {
            pending_runs = vec![Vec::new(); files.len()];
            for (rank, (file, chunks)) in plan.iter().enumerate() {
                // Odd: a run of a file found later comes before its successor here (see `add`).
                let rank = 2 * rank as u64 + 1;
                if files[*file].0 > SMALL_FILE {
                    pending_runs[*file].push((rank, chunks.clone()));
                } else {
                    order_keys[*file] = order_keys[*file].min(rank);
                }
            }
        }
        Queue {
            state: Mutex::new(QueueState {
                queued: BTreeSet::new(),
                keys: vec![None; files.len()],
                order_keys,
                later: Vec::new(),
                runs: BTreeSet::new(),
                pending_runs,
                runs_active: 0,
                recorded_later: Default::default(),
                promotions: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Recorded runs of files the mount will find later (by path, see
    /// [`crate::recording::later`]): each such file takes its recorded place.
    pub(super) fn expect(&self, later: crate::recording::Later) {
        let mut state = self.lock();
        if !later.is_empty() && state.pending_runs.is_empty() {
            state.pending_runs = vec![Vec::new(); state.order_keys.len()];
        }
        state.recorded_later = later;
    }

    /// A file of the tree found after the mount began, `size` bytes at
    /// `path`: its place is the recording's for that path, else after the
    /// checkpoint's own files, smallest first.
    pub(super) fn add(&self, file: usize, size: u64, path: &[u8]) {
        let mut state = self.lock();
        if state.order_keys.len() <= file {
            state.order_keys.resize(file + 1, TREE_FILES);
            state.keys.resize(file + 1, None);
            if !state.pending_runs.is_empty() {
                state.pending_runs.resize(file + 1, Vec::new());
            }
        }
        state.order_keys[file] = TREE_FILES.saturating_add(size);
        let chunks = size.div_ceil(crate::store::CHUNK_SIZE);
        for (rank, run) in state.recorded_later.remove(path).unwrap_or_default() {
            // Before the planned run of that rank (keyed 2 rank + 1 by `new`).
            let rank = 2 * rank;
            let run = run.start.min(chunks)..run.end.min(chunks);
            if run.is_empty() {
                continue;
            }
            if size > SMALL_FILE {
                // (A mount whose images record no file has none yet.)
                if state.pending_runs.len() <= file {
                    state.pending_runs.resize(file + 1, Vec::new());
                }
                state.pending_runs[file].push((rank, run));
            } else {
                state.order_keys[file] = state.order_keys[file].min(rank);
            }
        }
    }

    pub(super) fn push(&self, file: usize) {
        let mut state = self.lock();
        let runs = state.pending_runs.get_mut(file).map(std::mem::take).unwrap_or_default();
        for (key, chunks) in runs {
            state.runs.insert((key, file, chunks.start, chunks.end));
            self.ready.notify_one();
        }
        if state.keys[file].is_none() {
            let key = (1, state.order_keys[file]);
            state.keys[file] = Some(key);
            state.queued.insert((key.0, key.1, file));
            self.ready.notify_one();
        }
    }

    /// A recorded run a worker took is done (fetched, or given up).
    fn run_done(&self) {
        let mut state = self.lock();
        state.runs_active -= 1;
        if state.runs_active == 0 {
            self.ready.notify_all();
        }
    }

    /// Queues `file` again after `delay`.
    pub(super) fn push_later(&self, file: usize, delay: Duration) {
        self.lock().later.push((Instant::now() + delay, file));
        self.ready.notify_all();
    }

    /// Moves `file` to the front.
    pub(super) fn promote(&self, file: usize) {
        let mut state = self.lock();
        if let Some((band, key)) = state.keys[file] {
            if band == 0 {
                return;
            }
            state.queued.remove(&(band, key, file));
        }
        state.promotions += 1;
        let key = (0, u64::MAX - state.promotions);
        state.keys[file] = Some(key);
        state.queued.insert((key.0, key.1, file));
        self.ready.notify_one();
    }

    /// Up to `max` more whole files from the front, as long as `wanted` says
    /// so, without waiting.
    fn pop_while(&self, max: usize, mut wanted: impl FnMut(usize) -> bool) -> Vec<usize> {
        let mut state = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            match state.front() {
                Some(Job::File(file)) if wanted(file) => {
                    state.take_front();
                    out.push(file);
                }
                _ => break,
            }
        }
        out
    }

    /// Nothing is queued, now or for later.
    fn is_idle(&self) -> bool {
        let state = self.lock();
        state.queued.is_empty() && state.later.is_empty() && state.runs.is_empty()
    }

    /// The next job, waiting for one; `None` once closed.
    fn pop(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = state.later.drain(..).partition(|&(at, _)| at <= now);
            state.later = later;
            for (_, file) in due {
                if state.keys[file].is_none() {
                    let key = (1, state.order_keys[file]);
                    state.keys[file] = Some(key);
                    state.queued.insert((key.0, key.1, file));
                }
            }
            if let Some(job) = state.take_front() {
                return Some(job);
            }
            state = match state.later.iter().map(|&(at, _)| at).min() {
                Some(next) => {
                    let wait = next.saturating_duration_since(now);
                    self.ready.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner).0
                }
                None => self.ready.wait(state).unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Jobs not yet taken by a worker.
    #[cfg(test)]
    fn drain(&self) -> Vec<Job> {
        let mut state = self.lock();
        std::iter::from_fn(|| state.take_front()).collect()
    }
}

pub(super) struct Workers {
    pool: rayon::ThreadPool,
    done: Arc<(Mutex<usize>, Condvar)>,
}

impl Workers {
    /// Starts `jobs` workers on the queue (the caller queues the files).
    pub(super) fn start(source: Arc<dyn Source>, shared: Arc<Shared>, jobs: usize) -> Workers {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(jobs)
            .thread_name(|i| format!("lazyfs-prefetch-{i}"))
            .build()
            .expect("building the prefetch pool");
        let done = Arc::new((Mutex::new(0), Condvar::new()));
        for _ in 0..jobs {
            let (source, shared, done) = (source.clone(), shared.clone(), done.clone());
            pool.spawn(move || {
                // SAFETY: gettid has no preconditions.
                crate::source::background_priority(unsafe { libc::gettid() } as u32);
                worker(Link::bulk(source, shared.health.clone()), &shared);
                *done.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                done.1.notify_all();
            });
        }
        Workers { pool, done }
    }

    /// Waits up to `time` for every worker to stop (after the queue is
    /// closed); returns how many still run.
    pub(super) fn join_within(&self, time: std::time::Duration) -> usize {
        let jobs = self.pool.current_num_threads();
        let stopped = self.done.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) = self
            .done
            .1
            .wait_timeout_while(stopped, time, |stopped| *stopped < jobs)
            .unwrap_or_else(PoisonError::into_inner);
        jobs - *stopped
    }
}

fn worker(mut link: Link, shared: &Shared) {
    loop {
        if shared.queue.is_idle() {
            // Nothing more to prefetch: no connection kept open for it.
            link.reset();
        }
        let Some(job) = shared.queue.pop() else { break };
        let first = match job {
            Job::File(first) => first,
            Job::Run(index, chunks) => {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fetch_run(&mut link, shared, index, chunks);
                }));
                shared.queue.run_done();
                if outcome.is_err() {
                    link.reset();
                }
                continue;
            }
        };
        let small = |index: usize| shared.files.get(index).size <= SMALL_FILE;
        let mut batch = vec![first];
        if small(first) {
            let mut bytes = shared.files.get(first).size;
            // Bounded by count and bytes: the batch passes through one buffer.
            batch.extend(shared.queue.pop_while(BATCH_FILES - 1, |index| {
                bytes += shared.files.get(index).size;
                small(index) && bytes <= BATCH_BYTES
            }));
        }
        // Fetches contain their own panics; one anywhere else fails the files
        // at hand and the worker goes on (a panic must not abort the daemon).
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match small(first) {
            true => fetch_small_files(&mut link, shared, &batch),
            false => stream(&mut link, shared, first),
        }));
        if let Err(panic) = outcome {
            let what = super::lane::panic_message(panic.as_ref());
            for &index in &batch {
                let file = shared.files.get(index);
                file.fail_file(format!(
                    "{}: an internal error while fetching it ({what}): not served",
                    file.path.display()
                ));
            }
            link.reset();
        }
    }
}

/// Streams one file, window after window, over one SFTP handle.
fn stream(link: &mut Link, shared: &Shared, index: usize) {
    let file = &shared.files.get(index);
    if file.needs_nothing() || !first_look(link, shared, index) {
        return;
    }
    let chunk_count = file.chunk_count();
    let mut window = 0;
    let mut shared_out = false;
    while window < chunk_count && !file.phase().is_settled() {
        let end = (window + WINDOW_CHUNKS).min(chunk_count);
        for claim in file.claim(window..end) {
            // A large file is worked on by every idle worker: each claims the
            // next window nobody has, on its own session.
            if !shared_out && file.unclaimed_chunks() > 2 * WINDOW_CHUNKS {
                shared.queue.push(index);
                shared_out = true;
            }
            if let Some(error) = shared.fetch(link, index, claim, Lane::Prefetch) {
                return shared.timed_out(link, index, &error);
            }
        }
        window = end;
    }
}

/// Fetches a recorded run of a large file.
fn fetch_run(link: &mut Link, shared: &Shared, index: usize, chunks: Range<u64>) {
    let file = &shared.files.get(index);
    if file.needs_nothing() || !first_look(link, shared, index) {
        return;
    }
    for claim in file.claim(chunks) {
        shared.fetch(link, index, claim, Lane::Prefetch);
    }
}

/// The look at the source before the first bytes of a large file (see
/// `Shared::check_baseline`); false when the connection is lost, with the file
/// queued again.
fn first_look(link: &mut Link, shared: &Shared, index: usize) -> bool {
    match link.with_retry(|connection| shared.check_baseline(index, connection)) {
        // Said once already: nothing is fetched.
        Err(SourceError::Unusable(_)) => false,
        Err(e) if e.is_connection_lost() => {
            log::warn!("{e}");
            shared.queue.push(index);
            false
        }
        Err(e) => {
            log::warn!("{e}");
            true
        }
        Ok(()) => true,
    }
}

/// Fetches whole small files in one pipeline.
pub(super) fn fetch_small_files(link: &mut Link, shared: &Shared, batch: &[usize]) {
    // A file read in more than one request could mix versions if it changes
    // meanwhile: note the sizes and mtimes of those first (one pipeline), for
    // the verifier to compare with after.
    let first_looks: Vec<usize> = batch
        .iter()
        .copied()
        .filter(|&i| shared.files.get(i).size > crate::source::ONE_READ && shared.needs_baseline(i))
        .collect();
    if !first_looks.is_empty() {
        let looked: Vec<Arc<FetchFile>> = first_looks.iter().map(|&i| shared.files.get(i)).collect();
        let paths: Vec<&std::path::Path> = looked.iter().map(|f| f.source_path.as_path()).collect();
        match link.with_retry(|connection| connection.stat_many(&paths)) {
            Ok(stats) => {
                for (&index, stat) in first_looks.iter().zip(stats) {
                    match stat {
                        Ok(stat) => shared.set_baseline(index, stat),
                        Err(e) => log::warn!("{e}"),
                    }
                }
            }
            Err(e) => log::warn!("{e}"),
        }
    }
    let mut whole: Vec<(usize, Claim)> = Vec::new();
    for &index in batch {
        let file = &shared.files.get(index);
        if file.needs_nothing() {
            continue;
        }
        let all = 0..file.chunk_count();
        let mut claims = file.claim(all.clone());
        if claims.len() == 1 && claims[0].chunks == all {
            whole.push((index, claims.remove(0)));
        } else {
            // Partly here already (read on demand): fetch only what is missing.
            for claim in claims {
                if let Some(error) = shared.fetch(link, index, claim, Lane::Prefetch) {
                    shared.timed_out(link, index, &error);
                }
            }
        }
    }
    let owned: Vec<Arc<FetchFile>> = whole.iter().map(|(i, _)| shared.files.get(*i)).collect();
    let files: Vec<&FetchFile> = owned.iter().map(|f| &**f).collect();
    let mut buffer = link.take_buffer();
    let mut results = Vec::new();
    let outcome = super::lane::contained(link, |link| {
        link.read_whole(&files, &mut buffer, &mut results).map_err(FetchFailure::Source)
    })
    .map_err(|failure| match failure {
        FetchFailure::Panic(panic) => (true, panic),
        FetchFailure::Source(e) => (false, e.to_string()),
        FetchFailure::Mismatch(_) | FetchFailure::Store(_) => (false, "no bytes read".to_string()),
    });
    if matches!(outcome, Err((true, _))) && whole.len() > 1 {
        // Which file the panic came from is unknown: fetch each alone, so
        // only that one fails.
        link.put_buffer(buffer);
        for (index, claim) in whole {
            shared.fetch(link, index, claim, Lane::Prefetch);
        }
        return;
    }
    let mut at = 0;
    let mut stuck = None;
    for (i, (index, claim)) in whole.iter().enumerate() {
        let file = &shared.files.get(*index);
        let data = &mut buffer[at..at + file.size as usize];
        at += file.size as usize;
        let own = results.get_mut(i).map(|r| std::mem::replace(r, Ok(())));
        let result = match (&outcome, own) {
            (Err((true, panic)), _) => Err(FetchFailure::Panic(panic.clone())),
            // The pipeline stalled on this file: the others in it are released.
            (Err(_), Some(Err(e))) if e.is_timeout() => Err(FetchFailure::Source(e)),
            (Err((false, lost)), _) => Err(FetchFailure::Source(SourceError::Session {
                host: shared.source_name.clone(),
                message: lost.clone(),
            })),
            (Ok(()), Some(Err(e))) => Err(FetchFailure::Source(e)),
            (Ok(()), _) => {
                if file.size <= crate::source::ONE_READ {
                    file.mark_read_whole();
                }
                super::lane::contained(link, |link| shared.land_all(link, *index, claim, data, Lane::Prefetch))
            }
        };
        stuck = stuck.or_else(|| super::lane::stuck_on(&result, &file.source_path).map(|e| (*index, e)));
        shared.finish(*index, claim, Lane::Prefetch, result);
    }
    link.put_buffer(buffer);
    if let Some((index, error)) = stuck {
        shared.timed_out(link, index, &error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_promotion() {
        let sizes = [(30, 3), (10, 2), (20, 1), (5, 0)];
        let files = |jobs: &[usize]| jobs.iter().map(|&f| Job::File(f)).collect::<Vec<_>>();
        let queue = Queue::new(&sizes, &Order::SmallestFirst);
        (0..4).for_each(|i| queue.push(i));
        assert_eq!(queue.drain(), files(&[3, 1, 2, 0]));

        let queue = Queue::new(&sizes, &Order::LargestFirst);
        (0..4).for_each(|i| queue.push(i));
        queue.promote(3);
        queue.promote(1);
        assert_eq!(queue.drain(), files(&[1, 3, 0, 2]));

        let queue = Queue::new(&sizes, &Order::Image);
        (0..4).for_each(|i| queue.push(i));
        queue.push(2);
        assert_eq!(queue.drain(), files(&[3, 2, 1, 0]));
    }

    #[test]
    fn recorded_runs_first_then_smallest_first() {
        let big = SMALL_FILE + 1;
        // 0: small, unrecorded; 1: large, two runs recorded; 2, 3: small, recorded.
        let sizes = [(5, 0), (big, 1), (20, 2), (30, 3)];
        let plan: Arc<[(usize, Range<u64>)]> = vec![(3, 0..1), (1, 0..4), (2, 0..1), (3, 1..2), (1, 9..10)].into();
        let queue = Queue::new(&sizes, &Order::Recorded(plan));
        (0..4).for_each(|i| queue.push(i));
        queue.push(1); // queued again (a lost connection): its runs are not repeated
        let expected = [Job::File(3), Job::Run(1, 0..4), Job::File(2), Job::Run(1, 9..10)];
        assert_eq!(queue.drain(), expected);
        // The rest waits until the recorded runs are done.
        queue.run_done();
        assert_eq!(queue.drain(), []);
        queue.run_done();
        assert_eq!(queue.drain(), [Job::File(0), Job::File(1)]);

        // A file someone reads still goes first.
        let plan: Arc<[(usize, Range<u64>)]> = vec![(1, 0..4)].into();
        let queue = Queue::new(&sizes, &Order::Recorded(plan));
        (0..4).for_each(|i| queue.push(i));
        queue.promote(3);
        assert_eq!(queue.drain()[..2], [Job::File(3), Job::Run(1, 0..4)]);
    }

    #[test]
    fn files_of_the_tree_found_later_take_their_recorded_place() {
        let big = SMALL_FILE + 1;
        // 0: the images' file, recorded second; the tree's: 1 unrecorded, 2 small (first), 3 large (third).
        let plan: Arc<[(usize, Range<u64>)]> = vec![(0, 0..1)].into();
        let queue = Queue::new(&[(10, 0)], &Order::Recorded(plan));
        let mut later = crate::recording::Later::new();
        later.insert(b"/small".to_vec(), vec![(0, 0..1)]);
        later.insert(b"/large".to_vec(), vec![(1, 2..3), (1, 400..500)]);
        queue.expect(later);
        queue.add(1, 20, b"/other");
        queue.add(2, 30, b"/small");
        queue.add(3, big, b"/large");
        (0..4).for_each(|i| queue.push(i));
        // The large file's run past its end is dropped.
        assert_eq!(queue.drain(), [Job::File(2), Job::File(0), Job::Run(3, 2..3)]);
        queue.run_done();
        assert_eq!(queue.drain(), [Job::File(1), Job::File(3)]);

        // A mount whose images record no file (a --subtree holding none).
        let queue = Queue::new(&[], &Order::Recorded(Vec::new().into()));
        let mut later = crate::recording::Later::new();
        later.insert(b"/large".to_vec(), vec![(0, 2..3)]);
        queue.expect(later);
        queue.add(0, big, b"/large");
        queue.push(0);
        assert_eq!(queue.drain(), [Job::Run(0, 2..3)]);
    }
}
