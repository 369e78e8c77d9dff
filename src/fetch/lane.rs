//! The on-demand lanes: threads with a source connection each, serving the
//! chunks readers are blocked on, in the order asked, adjacent requests
//! merged. The first lane serves every request; a request that waits longer
//! than [`RELIEF_AFTER`] (the first lane is busy, or stuck on a file the
//! source cannot answer for) is taken by a relief lane on a session of its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::connect::FirstConnection;
use super::landing::Landings;
use super::{Claim, FetchFailure, FetchFile, Lane, Shared};
use crate::source::{Connection, Limits, Source, SourceError, WholeRead};

/// At most this many chunks per source request, so one large request (a
/// write completing a whole file) does not hold up small reads queued behind it.
const MAX_PIECE_CHUNKS: u64 = 64;
/// A request queued this long is taken by a relief lane.
const RELIEF_AFTER: Duration = Duration::from_millis(200);
/// Lanes besides the first; each connects when it is first needed.
const RELIEF_LANES: usize = 3;
/// The longest the source may say nothing to a prefetch or verifier request
/// (and the time a probe has to connect) when `--reconnect-timeout` is longer.
const MAX_STALL: Duration = Duration::from_secs(5);
/// After a request timed out: the time a new connection has to show that
/// the source still answers (the request was stuck on its file).
const PROBE_TIME: Duration = Duration::from_secs(2);
/// Pause between probes of a source that does not answer.
const PROBE_PAUSE: Duration = Duration::from_secs(1);

/// How often an idle holder of a connection looks whether the source is still needed.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The next item on `rx` (`None` once it is closed). While none comes, the
/// link's connection is closed once no file needs the source any more: the
/// old host can go.
pub(super) fn next_or_release<T>(rx: &Receiver<T>, link: &mut Link, shared: &Shared) -> Option<T> {
    loop {
        match rx.recv_timeout(IDLE_CHECK) {
            Ok(item) => return Some(item),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) if !shared.source_needed() => link.release(),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// A request for the on-demand lanes: fetch these claimed chunks of a file.
pub(super) struct Job {
    pub(super) file: usize,
    pub(super) claim: Claim,
    /// When the reader asked: its answer is due `--reconnect-timeout` later.
    pub(super) asked: Instant,
    /// When it was queued (a relief lane takes it after `RELIEF_AFTER`).
    queued: Instant,
}

impl Job {
    pub(super) fn new(file: usize, claim: Claim, asked: Instant) -> Job {
        Job { file, claim, asked, queued: Instant::now() }
    }
}

/// The on-demand lanes' queue.
pub(super) struct Requests {
    state: Mutex<Queued>,
    ready: Condvar,
    /// Told when no reader waits on the lanes any more.
    quiet: Condvar,
}

struct Queued {
    jobs: VecDeque<Job>,
    /// Small files a process opened, to fetch whole before they are read
    /// (by the first lane, between readers' requests).
    opened: VecDeque<usize>,
    closed: bool,
    /// Jobs a lane took and has not done yet.
    serving: usize,
}

/// What a lane is given.
enum Work {
    Read(Job),
    /// Small files opened, to fetch whole.
    Opened(Vec<usize>),
}

impl Requests {
    pub(super) fn new() -> Requests {
        let state = Queued { jobs: VecDeque::new(), opened: VecDeque::new(), closed: false, serving: 0 };
        Requests { state: Mutex::new(state), ready: Condvar::new(), quiet: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`; gives it back once the lanes are stopped.
    pub(super) fn push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed {
            return Err(job);
        }
        state.jobs.push_back(job);
        self.ready.notify_all();
        Ok(())
    }

    /// Queues small file `index`, just opened, to be fetched whole.
    pub(super) fn opened(&self, index: usize) {
        let mut state = self.lock();
        if !state.closed {
            state.opened.push_back(index);
            self.ready.notify_all();
        }
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// The next job with the queued jobs that continue it merged in, if one
    /// is queued (taken as by the first lane).
    fn try_take(&self) -> Option<Job> {
        let mut state = self.lock();
        let mut job = state.jobs.pop_front()?;
        absorb_adjacent(&mut job, &mut state.jobs);
        state.serving += 1;
        Some(job)
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// A job a lane took is done.
    fn done(&self) {
        let mut state = self.lock();
        state.serving -= 1;
        if state.serving == 0 && state.jobs.is_empty() {
            self.quiet.notify_all();
        }
    }

    /// Whether a reader waits on the on-demand lanes (queued, or being served).
    pub(super) fn readers_waiting(&self) -> bool {
        let state = self.lock();
        state.serving > 0 || !state.jobs.is_empty()
    }

    /// Waits (at most `max`) until no reader waits on the on-demand lanes.
    pub(super) fn wait_quiet(&self, max: Duration) {
        let state = self.lock();
        let _ = self
            .quiet
            .wait_timeout_while(state, max, |s| s.serving > 0 || !s.jobs.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// The next job with the queued jobs that continue it merged in, waiting
    /// for one; a relief lane takes only jobs queued `RELIEF_AFTER` ago, the
    /// first lane also opened files when no job waits. `None` once closed.
    /// While there is none, `idle` is called every `IDLE_CHECK`.
    fn take(&self, relief: bool, idle: &mut dyn FnMut()) -> Option<Work> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            let wait = match state.jobs.front() {
                Some(_) if !relief => Duration::ZERO,
                Some(front) => RELIEF_AFTER.saturating_sub(front.queued.elapsed()),
                None if !relief && !state.opened.is_empty() => {
                    return Some(Work::Opened(state.opened.drain(..).collect()));
                }
                None => Duration::MAX,
            };
            if wait.is_zero() {
                let mut job = state.jobs.pop_front().expect("a job");
                absorb_adjacent(&mut job, &mut state.jobs);
                state.serving += 1;
                return Some(Work::Read(job));
            }
            state = match wait {
                Duration::MAX => {
                    let (state, waited) =
                        self.ready.wait_timeout(state, IDLE_CHECK).unwrap_or_else(PoisonError::into_inner);
                    if !waited.timed_out() || !state.jobs.is_empty() {
                        state
                    } else {
                        drop(state);
                        idle();
                        self.lock()
                    }
                }
                wait => self.ready.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner).0,
            };
        }
    }
}

/// Starts the first on-demand lane on `link` and the relief lanes.
pub(super) fn spawn_on_demand(link: Link, source: &Arc<dyn Source>, shared: &Arc<Shared>) {
    let mut links = vec![link];
    links.extend((0..RELIEF_LANES).map(|_| Link::new(source.clone(), shared.health.clone())));
    for (number, link) in links.into_iter().enumerate() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("lazyfs-on-demand-{number}"))
            .spawn(move || OnDemandLane { link, shared }.run(number > 0))
            .expect("spawning an on-demand thread");
    }
}

/// Whether the source is reachable, as every lane sees it, and whether the
/// cache has room: `lazyfs status` says `degraded` (and why) while any lane
/// is reconnecting or the cache filesystem is full.
pub(crate) struct Health {
    reconnect_timeout: Duration,
    /// Lanes down, why, and since when the source may be silent (a request
    /// went unanswered, and nothing answered since).
    down: Mutex<(usize, Option<String>, Option<Instant>)>,
    /// Since when requests have gone unanswered (the earliest unanswered
    /// one was sent), until one is answered: bounds readers as `down.2` does,
    /// without taking over [`Health::suspect`]'s finding out.
    unanswered: Mutex<Option<Instant>>,
    cache_full: Mutex<Option<String>>,
    /// The fetcher is stopping: lanes give up at once instead of reconnecting.
    stopping: AtomicBool,
    /// The source's first connection, which every lane waits for.
    pub(crate) first: Arc<FirstConnection>,
}

impl Health {
    pub(crate) fn new(reconnect_timeout: Duration, first: Arc<FirstConnection>) -> Health {
        Health {
            reconnect_timeout,
            down: Mutex::new((0, None, None)),
            unanswered: Mutex::new(None),
            cache_full: Mutex::new(None),
            stopping: AtomicBool::new(false),
            first,
        }
    }

    /// How long the source may say nothing before a request without a
    /// reader waiting on it (prefetch, verifier) is given up.
    pub(crate) fn stall(&self) -> Duration {
        self.reconnect_timeout.min(MAX_STALL)
    }

    /// The limits of a request no reader waits on.
    pub(super) fn background(&self) -> Limits {
        Limits { deadline: None, stall: self.stall() }
    }

    /// The limits of a request a reader has waited on since `asked`. While
    /// the source may be silent, the time it has been is counted too: a
    /// silent source costs a reader about `--reconnect-timeout`, however
    /// many requests its read takes.
    pub(super) fn reader(&self, asked: Instant) -> Limits {
        let mut deadline = asked + self.reconnect_timeout;
        if let Some(since) = self.down.lock().unwrap_or_else(PoisonError::into_inner).2 {
            deadline = deadline.min(since + self.reconnect_timeout + PROBE_TIME);
        }
        // Each reader still tries for a probe's time: its answer is what
        // ends the silence (no lane probes for it).
        if let Some(since) = *self.unanswered.lock().unwrap_or_else(PoisonError::into_inner) {
            deadline = deadline.min((since + self.reconnect_timeout + PROBE_TIME).max(asked + PROBE_TIME));
        }
        Limits { deadline: Some(deadline), stall: self.reconnect_timeout }
    }

    /// A request sent at `since` went unanswered: the source may be silent.
    /// True if it was not suspected already (the caller finds out).
    pub(super) fn suspect(&self, since: Instant) -> bool {
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        let first = down.2.is_none();
        down.2.get_or_insert(since);
        first
    }

    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.first.stop();
    }

    /// Why the mount is degraded, if it is.
    pub(crate) fn degraded(&self) -> Option<String> {
        if let Some(failure) = self.first.failure() {
            return Some(SourceError::Unusable(failure).to_string());
        }
        if let Some(retrying) = self.first.retrying() {
            return Some(retrying);
        }
        let down = self.down.lock().unwrap_or_else(PoisonError::into_inner).1.clone();
        down.or_else(|| self.cache_full.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// The cache filesystem is full (and why), or bytes land again.
    pub(crate) fn cache_full(&self, reason: Option<String>) {
        let mut full = self.cache_full.lock().unwrap_or_else(PoisonError::into_inner);
        if full.is_some() && reason.is_none() {
            log::info!("the cache has room again");
        }
        *full = reason;
    }
}

/// Runs `op` (a fetch) so that a panic in it becomes a failure of what it
/// fetched, not a dead lane with chunks claimed forever; the connection,
/// left in an unknown state, is dropped.
pub(super) fn contained<T>(
    link: &mut Link,
    op: impl FnOnce(&mut Link) -> Result<T, FetchFailure>,
) -> Result<T, FetchFailure> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(&mut *link))) {
        Ok(result) => result,
        Err(panic) => {
            link.reset();
            Err(FetchFailure::Panic(panic_message(panic.as_ref())))
        }
    }
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// A connection that is opened again, with bounded backoff, when it is lost.
pub(super) struct Link {
    source: Arc<dyn Source>,
    connection: Option<Box<dyn Connection>>,
    /// Where fetched bytes land on their way to the spill file (at most a
    /// prefetch window: a few MiB per lane, reused).
    buffer: Vec<u8>,
    health: Arc<Health>,
    /// This link counts among the lanes that are down.
    down: bool,
    /// The bounds of the requests made now.
    limits: Limits,
    /// This link takes the source's first connection (the first on-demand lane).
    takes_first: bool,
    /// It carries bulk transfers: through the source's transport for them.
    bulk: bool,
}

impl Link {
    pub(super) fn new(source: Arc<dyn Source>, health: Arc<Health>) -> Link {
        let limits = health.background();
        Link {
            source,
            connection: None,
            buffer: Vec::new(),
            health,
            down: false,
            limits,
            takes_first: false,
            bulk: false,
        }
    }

    /// A link for bulk transfers (a prefetch worker's).
    pub(super) fn bulk(source: Arc<dyn Source>, health: Arc<Health>) -> Link {
        Link { bulk: true, ..Link::new(source, health) }
    }

    /// Whether it carries bulk transfers (which yield to readers).
    pub(super) fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// A new connection of this link's kind, ready within `time`.
    fn connect(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        match self.bulk {
            true => self.source.connect_bulk_within(time),
            false => self.source.connect_within(time),
        }
    }

    /// The link that serves readers first: on the source's first connection.
    pub(super) fn first(source: Arc<dyn Source>, health: Arc<Health>) -> Link {
        Link { takes_first: true, ..Link::new(source, health) }
    }

    /// Bounds the requests from now on.
    pub(super) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The connection, opened (within `time`) if there is none.
    fn connection(&mut self, time: Duration) -> Result<&mut dyn Connection, SourceError> {
        if self.connection.is_none() {
            if time.is_zero() {
                return Err(SourceError::TimedOut { host: self.source.describe(), waited: time, path: None });
            }
            // Once the source is up (its first connection, made at mount).
            let first = self.health.first.wait(Instant::now() + time, self.takes_first)?;
            self.takes_first = false;
            self.connection = Some(match first {
                Some(connection) => connection,
                None => self.connect(time)?,
            });
        }
        let connection = self.connection.as_mut().expect("connected above").as_mut();
        connection.set_limits(self.limits);
        Ok(connection)
    }

    /// After a request timed out: whether the source answers a new
    /// connection, so the request was stuck on its file (a FIFO, a hung
    /// mount on the old host), not on a silent source.
    pub(super) fn source_answers(&mut self) -> bool {
        self.answers_within(PROBE_TIME)
    }

    /// Probes the source until it answers (or the fetcher stops).
    pub(super) fn wait_for_source(&mut self) {
        while !self.health.stopping.load(Ordering::Relaxed) && !self.answers_within(self.health.stall()) {
            std::thread::sleep(PROBE_PAUSE);
        }
    }

    fn answers_within(&mut self, time: Duration) -> bool {
        self.connection = None;
        match self.connect(time) {
            Ok(connection) => {
                self.connection = Some(connection);
                self.mark(None);
                true
            }
            Err(e) => {
                if e.is_connection_lost() {
                    self.mark(Some(&e));
                }
                false
            }
        }
    }

    fn mark(&mut self, down: Option<&SourceError>) {
        let mut health = self.health.down.lock().unwrap_or_else(PoisonError::into_inner);
        if down.is_none() {
            health.2 = None;
            *self.health.unanswered.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        match down {
            Some(error) => {
                if !self.down {
                    health.0 += 1;
                    self.down = true;
                }
                health.1 = Some(format!("{error}; reconnecting"));
            }
            None if self.down => {
                health.0 -= 1;
                self.down = false;
                if health.0 == 0 {
                    health.1 = None;
                    log::info!("the source answers again");
                }
            }
            None => {}
        }
    }

    /// Runs `op` on the connection, within the link's limits. A lost
    /// connection is opened again with growing pauses (0.1 s doubling to 5 s)
    /// until the deadline, or without one until `--reconnect-timeout` has
    /// passed; then the error is returned (readers get EIO). A request the
    /// source did not answer in time is not tried again here: it may be
    /// stuck on its file (see [`Link::source_answers`]).
    pub(super) fn with_retry<T>(
        &mut self,
        mut op: impl FnMut(&mut dyn Connection) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let mut lost_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            // Past its deadline before it is sent (it waited in the queue):
            // no request, and no blame on the connection or the file.
            if self.limits.deadline.is_some_and(|deadline| deadline <= Instant::now()) {
                let waited = Duration::ZERO;
                return Err(SourceError::TimedOut { host: self.source.describe(), waited, path: None });
            }
            let give_up = self
                .limits
                .deadline
                .unwrap_or_else(|| lost_since.unwrap_or_else(Instant::now) + self.health.reconnect_timeout);
            let error = match self.connection(give_up.saturating_duration_since(Instant::now())) {
                Ok(connection) => match op(connection) {
                    Err(e) if e.is_timeout() => {
                        self.connection = None;
                        if let SourceError::TimedOut { waited, .. } = &e
                            && !waited.is_zero()
                        {
                            let sent = Instant::now() - *waited;
                            self.health.unanswered.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(sent);
                        }
                        return Err(e);
                    }
                    Err(e) if e.is_connection_lost() => e,
                    other => {
                        self.mark(None);
                        return other;
                    }
                },
                Err(e) if e.is_connection_lost() => e,
                Err(e) => return Err(e),
            };
            self.connection = None;
            let since = *lost_since.get_or_insert_with(Instant::now);
            if !self.down {
                log::warn!("{error}: reconnecting");
            }
            self.mark(Some(&error));
            let give_up = self.limits.deadline.unwrap_or(since + self.health.reconnect_timeout);
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() || self.health.stopping.load(Ordering::Relaxed) {
                return Err(error);
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Drops the connection (in an unknown state, or not needed); the next use opens another.
    pub(super) fn reset(&mut self) {
        self.connection = None;
    }

    /// No file needs the source: the connection closes, and so does what the
    /// source keeps open for further ones.
    pub(super) fn release(&mut self) {
        self.connection = None;
        self.health.first.release();
        self.source.idle();
    }

    /// The lane's buffer for fetched bytes (at most a window), to give back
    /// with `put_buffer`.
    pub(super) fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    pub(super) fn put_buffer(&mut self, buffer: Vec<u8>) {
        self.buffer = buffer;
    }

    /// Fetches what `landing` still wants of `file` (its claim's chunks,
    /// in its generation: a handle kept from an older one is not used),
    /// handing it each piece as it arrives; with `look`, the first look before
    /// any byte. After a lost connection, only what had not arrived.
    pub(super) fn fetch(
        &mut self,
        file: &FetchFile,
        landing: &mut Landings<'_>,
        look: bool,
    ) -> Result<(), SourceError> {
        self.with_retry(|connection| {
            let ranges = landing.remaining();
            if ranges.is_empty() {
                return Ok(());
            }
            let look = landing.wants_look(look);
            connection.fetch(&file.source_path, landing.generation(), &ranges, look, landing)
        })
    }

    /// Reads many whole small files into `buffer` in one pipeline, one after
    /// the other; each file's own result is in `results`, the error is the
    /// connection's.
    pub(super) fn read_whole(
        &mut self,
        files: &[&FetchFile],
        buffer: &mut Vec<u8>,
        results: &mut Vec<Result<(), SourceError>>,
    ) -> Result<(), SourceError> {
        let total: usize = files.iter().map(|f| f.size as usize).sum();
        buffer.resize(total, 0);
        let mut rest = buffer.as_mut_slice();
        let mut reads: Vec<WholeRead<'_>> = Vec::with_capacity(files.len());
        for file in files {
            let (buf, tail) = rest.split_at_mut(file.size as usize);
            rest = tail;
            reads.push(WholeRead { path: &file.source_path, buf, listed: file.listed, result: Ok(()) });
        }
        let outcome = self.with_retry(|connection| connection.read_files(&mut reads));
        results.clear();
        results.extend(reads.into_iter().map(|r| r.result));
        outcome
    }
}

struct OnDemandLane {
    link: Link,
    shared: Arc<Shared>,
}

impl OnDemandLane {
    fn run(mut self, relief: bool) {
        let shared = self.shared.clone();
        let requests = &shared.requests;
        // The first lane replays the recording, serving the readers who come
        // meanwhile between its steps.
        let mut replay = if relief { None } else { shared.take_replay() };
        loop {
            let work = match replay.as_mut().filter(|r| !r.is_done()) {
                Some(replay) => match requests.try_take() {
                    Some(job) => Work::Read(job),
                    None if requests.is_closed() => return,
                    None => {
                        replay.step(&mut self.link, &shared);
                        continue;
                    }
                },
                // Idle, a lane closes its connection once no file needs the source.
                None => match requests.take(relief, &mut || {
                    if !shared.source_needed() {
                        self.link.release();
                    }
                }) {
                    Some(work) => work,
                    None => return,
                },
            };
            match work {
                Work::Read(job) => {
                    self.serve(job);
                    requests.done();
                }
                // A process opened them to read them: a silent source costs it
                // what it costs a reader, not a prefetch's longer patience.
                Work::Opened(files) => {
                    self.link.set_limits(shared.health.reader(Instant::now()));
                    super::replay::fetch_whole(&mut self.link, &shared, files);
                    self.link.set_limits(shared.health.background());
                }
            }
        }
    }

    fn serve(&mut self, job: Job) {
        let Claim { generation, chunks } = job.claim;
        let piece_end = chunks.end.min(chunks.start + MAX_PIECE_CHUNKS);
        if piece_end < chunks.end {
            let rest = Job::new(job.file, Claim { generation, chunks: piece_end..chunks.end }, job.asked);
            if let Err(rest) = self.shared.requests.push(rest) {
                self.shared.files.get(job.file).fail(
                    &rest.claim,
                    &super::FetchError::new("lazyfs is shutting down"),
                    false,
                );
            }
        }
        let chunks = chunks.start..piece_end;
        let started = Instant::now();
        self.link.set_limits(self.shared.health.reader(job.asked));
        let claim = Claim { generation, chunks: chunks.clone() };
        let stuck = self.shared.fetch(&mut self.link, job.file, claim, Lane::OnDemand);
        self.link.set_limits(self.shared.health.background());
        log::debug!("on demand: chunks {chunks:?} of file {} in {:?}", job.file, started.elapsed());
        if let Some(error) = stuck {
            self.shared.timed_out(&mut self.link, job.file, &error);
        }
    }
}

/// The timeout in `result`, if it names the file at `source_path`: the
/// request for that file went unanswered.
pub(super) fn stuck_on<T>(result: &Result<T, FetchFailure>, source_path: &std::path::Path) -> Option<SourceError> {
    match result {
        Err(FetchFailure::Source(SourceError::TimedOut { host, waited, path: Some(path) })) if path == source_path => {
            Some(SourceError::TimedOut { host: host.clone(), waited: *waited, path: Some(path.clone()) })
        }
        _ => None,
    }
}

/// Merges queued jobs of the same file that continue `job`'s range into it.
fn absorb_adjacent(job: &mut Job, queue: &mut VecDeque<Job>) {
    loop {
        let Some(at) = queue.iter().position(|j| {
            j.file == job.file
                && j.claim.generation == job.claim.generation
                && j.claim.chunks.start == job.claim.chunks.end
        }) else {
            return;
        };
        let next = queue.remove(at).expect("found above");
        job.claim.chunks.end = next.claim.chunks.end;
        job.asked = job.asked.min(next.asked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(file: usize, generation: u64, chunks: std::ops::Range<u64>) -> Job {
        Job::new(file, Claim { generation, chunks }, Instant::now())
    }

    /// The file of a reader's job a lane was given.
    fn read_file(work: Option<Work>) -> usize {
        match work {
            Some(Work::Read(job)) => job.file,
            _ => panic!("not a reader's job"),
        }
    }

    #[test]
    fn relief_lanes_take_only_requests_that_waited() {
        let requests = Requests::new();
        assert!(requests.push(job(1, 0, 0..1)).is_ok());
        let started = Instant::now();
        assert_eq!(read_file(requests.take(true, &mut || {})), 1);
        assert!(started.elapsed() >= RELIEF_AFTER - Duration::from_millis(20), "{:?}", started.elapsed());
        assert!(requests.push(job(2, 0, 0..1)).is_ok());
        let started = Instant::now();
        assert_eq!(read_file(requests.take(false, &mut || {})), 2);
        assert!(started.elapsed() < RELIEF_AFTER);
        requests.close();
        assert!(requests.take(false, &mut || {}).is_none());
        assert!(requests.push(job(3, 0, 0..1)).is_err());
    }

    /// Opened files go to the first lane, after readers' jobs.
    #[test]
    fn opened_files_come_after_readers_and_to_the_first_lane_only() {
        let requests = Requests::new();
        requests.opened(7);
        requests.opened(8);
        assert!(requests.push(job(1, 0, 0..1)).is_ok());
        assert_eq!(read_file(requests.take(false, &mut || {})), 1);
        requests.done();
        assert!(matches!(requests.take(false, &mut || {}), Some(Work::Opened(files)) if files == [7, 8]));
        requests.opened(9);
        let taken = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            scope.spawn(|| *taken.lock().unwrap() = Some(requests.take(true, &mut || {}).is_none()));
            std::thread::sleep(RELIEF_AFTER * 2);
            requests.close();
        });
        assert_eq!(*taken.lock().unwrap(), Some(true), "a relief lane took opened files");
    }

    #[test]
    fn adjacent_jobs_of_one_generation_merge() {
        let mut queue: VecDeque<Job> = [job(1, 0, 5..6), job(2, 0, 3..4), job(1, 0, 4..5), job(1, 1, 6..7)].into();
        let mut first = job(1, 0, 2..4);
        absorb_adjacent(&mut first, &mut queue);
        assert_eq!(first.claim.chunks, 2..6);
        assert_eq!(queue.len(), 2);
    }
}
