//! The on-demand lane: one thread, one source connection, serving the chunks
//! readers are blocked on, in the order asked, adjacent requests merged.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{FetchFile, Lane, Shared, fetch_checked};
use crate::source::{Connection, Source, SourceError, WholeRead};

/// How long the lane waits for another reader before it takes the first looks
/// at the files it served (one pipelined STAT each): a reader that reads file
/// after file asks again well within this.
const LOOK_WHEN_IDLE: Duration = Duration::from_millis(5);

/// At most this many chunks per source request, so one large request (a
/// write completing a whole file) does not hold up small reads queued behind it.
const MAX_PIECE_CHUNKS: u64 = 64;

/// A request for the on-demand lane: fetch these claimed chunks of a file.
pub(super) struct Job {
    pub(super) file: usize,
    pub(super) chunks: Range<u64>,
}

pub(super) fn spawn_on_demand(link: Link, shared: Arc<Shared>) -> Sender<Job> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lazyfs-on-demand".into())
        .spawn(move || OnDemandLane { link, shared }.run(rx))
        .expect("spawning the on-demand thread");
    tx
}

/// Whether the source is reachable, as every lane sees it: `lazyfs status`
/// says `degraded` (and why) while any lane is reconnecting.
pub(crate) struct Health {
    reconnect_timeout: Duration,
    down: Mutex<(usize, Option<String>)>,
}

impl Health {
    pub(crate) fn new(reconnect_timeout: Duration) -> Health {
        Health { reconnect_timeout, down: Mutex::new((0, None)) }
    }

    /// Why the mount is degraded, if it is.
    pub(crate) fn degraded(&self) -> Option<String> {
        self.down.lock().expect("health").1.clone()
    }
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
        let mut health = self.health.down.lock().expect("health");
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

    /// Fills the claimed `chunks` of `file` from the source.
    pub(super) fn fetch(&mut self, file: &FetchFile, chunks: Range<u64>) -> Result<(), SourceError> {
        let bytes = file.spill.chunk_bytes(chunks.clone());
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.resize((bytes.end - bytes.start) as usize, 0);
        let fetched =
            self.with_retry(|connection| connection.read_exact_at(&file.source_path, bytes.start, &mut buffer));
        let written =
            fetched.and_then(|()| file.spill.write_fetched(chunks, &buffer).map_err(|e| spill_error(file, e)));
        self.buffer = buffer;
        written
    }

    /// Reads many whole small files into their spill files in one pipeline;
    /// each file's own result is in `results`, the error is the connection's.
    pub(super) fn fetch_whole(
        &mut self,
        files: &[&FetchFile],
        results: &mut Vec<Result<(), SourceError>>,
    ) -> Result<(), SourceError> {
        let total: usize = files.iter().map(|f| f.spill.len() as usize).sum();
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.resize(total, 0);
        let outcome = {
            let mut rest = buffer.as_mut_slice();
            let mut reads: Vec<WholeRead<'_>> = Vec::with_capacity(files.len());
            for file in files {
                let (buf, tail) = rest.split_at_mut(file.spill.len() as usize);
                rest = tail;
                reads.push(WholeRead { path: &file.source_path, buf, result: Ok(()) });
            }
            let outcome = self.with_retry(|connection| connection.read_files(&mut reads));
            results.clear();
            results.extend(reads.into_iter().map(|r| r.result));
            outcome
        };
        let mut at = 0;
        for (file, result) in files.iter().zip(results.iter_mut()) {
            let len = file.spill.len() as usize;
            if outcome.is_ok() && result.is_ok() {
                *result = file
                    .spill
                    .write_fetched(0..file.spill.chunk_count(), &buffer[at..at + len])
                    .map_err(|e| spill_error(file, e));
            }
            at += len;
        }
        self.buffer = buffer;
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
        // Files served that still need their first look at the source.
        let mut unlooked: Vec<usize> = Vec::new();
        loop {
            if queue.is_empty() {
                let next = if unlooked.is_empty() {
                    rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                } else {
                    rx.recv_timeout(LOOK_WHEN_IDLE)
                };
                match next {
                    Ok(job) => queue.push_back(job),
                    Err(RecvTimeoutError::Timeout) => {
                        let files: Vec<usize> = std::mem::take(&mut unlooked);
                        self.shared.first_looks(&mut self.link, &files);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            queue.extend(rx.try_iter());
            let mut job = queue.pop_front().expect("queue not empty");
            absorb_adjacent(&mut job, &mut queue);
            let piece_end = job.chunks.end.min(job.chunks.start + MAX_PIECE_CHUNKS);
            if piece_end < job.chunks.end {
                queue.push_back(Job { file: job.file, chunks: piece_end..job.chunks.end });
            }
            let chunks = job.chunks.start..piece_end;
            let started = Instant::now();
            let result = fetch_checked(&mut self.link, &self.shared.files[job.file], chunks.clone());
            log::debug!("on demand: chunks {chunks:?} of file {} in {:?}", job.file, started.elapsed());
            self.shared.finish(job.file, chunks, Lane::OnDemand, result);
            // After the reader has its bytes, and once no reader waits: note
            // the source's size and mtime (to tell later whether the file
            // changed during the transfer), for every file served since in one
            // pipeline, so a reader going from file to file never waits a
            // round trip for a look between two reads.
            if self.shared.needs_baseline(job.file) && !unlooked.contains(&job.file) {
                unlooked.push(job.file);
            }
        }
    }
}

/// Merges queued jobs of the same file that continue `job`'s range into it.
fn absorb_adjacent(job: &mut Job, queue: &mut VecDeque<Job>) {
    loop {
        let Some(at) = queue.iter().position(|j| j.file == job.file && j.chunks.start == job.chunks.end) else {
            return;
        };
        let next = queue.remove(at).expect("found above");
        job.chunks.end = next.chunks.end;
    }
}

/// Writing fetched bytes into `file`'s spill file failed: the error names
/// the spill file once.
fn spill_error(file: &FetchFile, e: crate::store::StoreError) -> SourceError {
    let source = match e {
        crate::store::StoreError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    };
    SourceError::Io { path: file.spill.path().to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_jobs_merge() {
        let mut queue: VecDeque<Job> =
            [Job { file: 1, chunks: 5..6 }, Job { file: 2, chunks: 3..4 }, Job { file: 1, chunks: 4..5 }].into();
        let mut job = Job { file: 1, chunks: 2..4 };
        absorb_adjacent(&mut job, &mut queue);
        assert_eq!(job.chunks, 2..6);
        assert_eq!(queue.len(), 1);
    }
}
