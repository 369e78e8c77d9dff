//! What a fetch that did not land means: for the file (failed for good, or
//! not its fault), for the readers waiting on it (told, or handed to the
//! on-demand lanes), for the queue (tried again now, or once there is room),
//! and for the source (silent, or stuck on this file).

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::file::{Claim, FetchError, FetchFile, Lane};
use super::{Shared, lane};
use crate::source::SourceError;
use crate::store::StoreError;

/// Unanswered requests (while the source answered others) after which a file fails.
const STUCK_TIMEOUTS: u32 = 2;
/// How long a file that found the cache filesystem full waits before its
/// prefetch is tried again.
const NO_SPACE_RETRY: Duration = Duration::from_secs(2);

/// Why fetched bytes did not land.
pub(super) enum FetchFailure {
    Source(SourceError),
    Mismatch(u64),
    Store(StoreError),
    /// A bug met while fetching (a malformed reply the code did not expect):
    /// contained, the file fails.
    Panic(String),
}

impl FetchFailure {
    /// The same failure again, for another claim it ended.
    pub(super) fn again(&self) -> FetchFailure {
        match self {
            FetchFailure::Source(e) => FetchFailure::Source(e.again()),
            FetchFailure::Mismatch(chunk) => FetchFailure::Mismatch(*chunk),
            FetchFailure::Store(e) => FetchFailure::Store(e.again()),
            FetchFailure::Panic(panic) => FetchFailure::Panic(panic.clone()),
        }
    }
}

impl Shared {
    /// Ends a claim however its fetch went.
    pub(super) fn finish(&self, index: usize, claim: &Claim, lane: Lane, result: Result<(), FetchFailure>) {
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
                file.give_back(claim);
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
    pub(super) fn release(&self, index: usize, claim: &Claim) {
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
    pub(super) fn ask_on_demand(&self, index: usize, claims: Vec<Claim>, asked: Instant) {
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
    pub(super) fn timed_out(&self, link: &mut lane::Link, index: usize, error: &SourceError) {
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
}
