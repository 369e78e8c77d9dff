//! The on-demand lane: one thread, one source connection, serving the chunks
//! readers are blocked on, in the order asked, adjacent requests merged.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Claim, FetchFailure, FetchFile, Lane, Shared};
use crate::source::{Connection, Source, SourceError, SourceStat, WholeRead};

/// At most this many chunks per source request, so one large request (a
/// write completing a whole file) does not hold up small reads queued behind it.
const MAX_PIECE_CHUNKS: u64 = 64;

/// A request for the on-demand lane: fetch these claimed chunks of a file.
pub(super) struct Job {
    pub(super) file: usize,
    pub(super) claim: Claim,
}

pub(super) fn spawn_on_demand(link: Link, shared: Arc<Shared>) -> Sender<Job> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lazyfs-on-demand".into())
        .spawn(move || OnDemandLane { link, shared }.run(rx))
        .expect("spawning the on-demand thread");
    tx
}

/// Whether the source is reachable, as every lane sees it, and whether the
/// cache has room: `lazyfs status` says `degraded` (and why) while any lane
/// is reconnecting or the cache filesystem is full.
pub(crate) struct Health {
    reconnect_timeout: Duration,
    down: Mutex<(usize, Option<String>)>,
    cache_full: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn new(reconnect_timeout: Duration) -> Health {
        Health { reconnect_timeout, down: Mutex::new((0, None)), cache_full: Mutex::new(None) }
    }

    /// Why the mount is degraded, if it is.
    pub(crate) fn degraded(&self) -> Option<String> {
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
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
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
}

impl Link {
    pub(super) fn new(source: Arc<dyn Source>, health: Arc<Health>) -> Link {
        Link { source, connection: None, buffer: Vec::new(), health, down: false }
    }

    pub(super) fn with_connection(
        source: Arc<dyn Source>,
        health: Arc<Health>,
        connection: Box<dyn Connection>,
    ) -> Link {
        Link { source, connection: Some(connection), buffer: Vec::new(), health, down: false }
    }

    /// The connection, opened if there is none.
    fn connection(&mut self) -> Result<&mut dyn Connection, SourceError> {
        if self.connection.is_none() {
            self.connection = Some(self.source.connect()?);
        }
        Ok(self.connection.as_mut().expect("connected above").as_mut())
    }

    fn mark(&mut self, down: Option<&SourceError>) {
        let mut health = self.health.down.lock().unwrap_or_else(PoisonError::into_inner);
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

    /// Runs `op` on the connection. A lost connection is opened again with
    /// growing pauses (0.1 s doubling to 5 s) until `--reconnect-timeout`
    /// has passed; then the error is returned (readers get EIO).
    pub(super) fn with_retry<T>(
        &mut self,
        mut op: impl FnMut(&mut dyn Connection) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let mut lost_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let result = self.connection().and_then(&mut op);
            match result {
                Err(e) if e.is_connection_lost() => {
                    self.connection = None;
                    let since = *lost_since.get_or_insert_with(Instant::now);
                    if !self.down {
                        log::warn!("{e}: reconnecting");
                    }
                    self.mark(Some(&e));
                    let left = self.health.reconnect_timeout.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        return Err(e);
                    }
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => {
                    self.mark(None);
                    return other;
                }
            }
        }
    }

    /// Drops the connection (it is in an unknown state); the next use opens another.
    pub(super) fn reset(&mut self) {
        self.connection = None;
    }

    /// The lane's buffer for fetched bytes (at most a window), to give back
    /// with `put_buffer`.
    pub(super) fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    pub(super) fn put_buffer(&mut self, buffer: Vec<u8>) {
        self.buffer = buffer;
    }

    /// Fills `buf` with the source's bytes of `file` at `offset`, as the
    /// file's generation `generation` (a handle kept from an older one is not used).
    pub(super) fn read(
        &mut self,
        file: &FetchFile,
        generation: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        self.with_retry(|connection| connection.read_exact_at(&file.source_path, generation, offset, buf))
    }

    /// [`read`](Link::read), also giving the source's size and mtime as of
    /// before the read (the first look at the file, taken on the way).
    pub(super) fn read_first(
        &mut self,
        file: &FetchFile,
        generation: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<SourceStat, SourceError> {
        self.with_retry(|connection| connection.stat_and_read(&file.source_path, generation, offset, buf))
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
            reads.push(WholeRead { path: &file.source_path, buf, result: Ok(()) });
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
    fn run(mut self, rx: Receiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv() {
                    Ok(job) => queue.push_back(job),
                    Err(_) => return,
                }
            }
            queue.extend(rx.try_iter());
            let mut job = queue.pop_front().expect("queue not empty");
            absorb_adjacent(&mut job, &mut queue);
            let Claim { generation, chunks } = job.claim;
            let piece_end = chunks.end.min(chunks.start + MAX_PIECE_CHUNKS);
            if piece_end < chunks.end {
                queue.push_back(Job { file: job.file, claim: Claim { generation, chunks: piece_end..chunks.end } });
            }
            let chunks = chunks.start..piece_end;
            let started = Instant::now();
            self.shared.fetch(&mut self.link, job.file, Claim { generation, chunks: chunks.clone() }, Lane::OnDemand);
            log::debug!("on demand: chunks {chunks:?} of file {} in {:?}", job.file, started.elapsed());
        }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(file: usize, generation: u64, chunks: std::ops::Range<u64>) -> Job {
        Job { file, claim: Claim { generation, chunks } }
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
