//! Getting chunks from the source into spill files. A reader asks for the
//! chunks it covers with [`Fetcher::when_present`]; chunks nobody has asked for
//! yet are claimed (so one fetch serves every reader of a chunk) and queued
//! on the on-demand lane, a thread with a source connection of its own.

mod lane;

use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::source::{Connection, Source};
use crate::store::SpillFile;

/// What a waiting reader is told once its chunks are present, or cannot be.
pub type Done = Box<dyn FnOnce(Result<(), FetchError>) + Send>;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub Arc<str>);

/// One file as the fetcher sees it: where its bytes are, where they go, and
/// who waits for which of them.
pub struct FetchFile {
    /// The path on the source (the source applies its root).
    pub source_path: PathBuf,
    pub spill: SpillFile,
    state: Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// Chunks claimed by a fetch that has not finished.
    in_flight: HashSet<u64>,
    waiters: Vec<Waiter>,
    /// Set once the file cannot be fetched (missing on the source, changed size):
    /// every read of it fails with this message.
    failed: Option<Arc<str>>,
}

struct Waiter {
    chunks: Range<u64>,
    done: Done,
}

impl FetchFile {
    pub fn new(source_path: PathBuf, spill: SpillFile) -> Self {
        FetchFile {
            source_path,
            spill,
            state: Mutex::new(FetchState::default()),
        }
    }

    pub fn failure(&self) -> Option<Arc<str>> {
        self.state.lock().expect("fetch state").failed.clone()
    }

    /// Claims the chunks of `chunks` that are neither present nor in flight,
    /// as maximal runs. The caller must fetch each run and then call
    /// [`FetchFile::complete`] or [`FetchFile::fail`] on it.
    fn claim(state: &mut FetchState, spill: &SpillFile, chunks: Range<u64>) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for chunk in chunks {
            if spill.is_present(chunk) || !state.in_flight.insert(chunk) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end == chunk => run.end += 1,
                _ => runs.push(chunk..chunk + 1),
            }
        }
        runs
    }

    /// The claimed `chunks` have arrived: mark them present and answer every
    /// reader who now has all it waited for.
    pub fn complete(&self, chunks: Range<u64>) {
        self.spill.mark_present(chunks.clone());
        let ready: Vec<Waiter> = {
            let mut state = self.state.lock().expect("fetch state");
            for chunk in chunks {
                state.in_flight.remove(&chunk);
            }
            let (ready, waiting) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| self.spill.all_present(w.chunks.clone()));
            state.waiters = waiting;
            ready
        };
        for waiter in ready {
            (waiter.done)(Ok(()));
        }
    }

    /// The claimed `chunks` could not be fetched. With `whole_file`, the file
    /// is failed for good (every later read fails too); otherwise only the
    /// readers waiting on these chunks are told, and a later read retries.
    pub fn fail(&self, chunks: Range<u64>, error: &FetchError, whole_file: bool) {
        let failed: Vec<Waiter> = {
            let mut state = self.state.lock().expect("fetch state");
            for chunk in chunks.clone() {
                state.in_flight.remove(&chunk);
            }
            if whole_file {
                state.failed = Some(error.0.clone());
            }
            let (failed, waiting) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| {
                    whole_file || (w.chunks.start < chunks.end && chunks.start < w.chunks.end)
                });
            state.waiters = waiting;
            failed
        };
        for waiter in failed {
            (waiter.done)(Err(error.clone()));
        }
    }
}

/// A request for the on-demand lane: fetch these claimed chunks of a file.
struct Job {
    file: usize,
    chunks: Range<u64>,
}

pub struct Fetcher {
    files: Arc<Vec<Arc<FetchFile>>>,
    on_demand: Sender<Job>,
}

impl Fetcher {
    /// Starts the on-demand lane on `connection` (opened at mount time, so a
    /// source that cannot be reached fails the mount, not the first read).
    pub fn start(
        source: Arc<dyn Source>,
        connection: Box<dyn Connection>,
        files: Vec<Arc<FetchFile>>,
    ) -> Fetcher {
        let files = Arc::new(files);
        let on_demand = lane::spawn_on_demand(source, connection, files.clone());
        Fetcher { files, on_demand }
    }

    pub fn file(&self, index: usize) -> &Arc<FetchFile> {
        &self.files[index]
    }

    pub fn files(&self) -> &[Arc<FetchFile>] {
        &self.files
    }

    /// Calls `done` once every chunk of `chunks` of file `index` is present
    /// (at once if they are), fetching the missing ones nobody fetches yet.
    pub fn when_present(&self, index: usize, chunks: Range<u64>, done: Done) {
        let file = &self.files[index];
        let runs = {
            let mut state = file.state.lock().expect("fetch state");
            if let Some(message) = &state.failed {
                let error = FetchError(message.clone());
                drop(state);
                return done(Err(error));
            }
            if file.spill.all_present(chunks.clone()) {
                drop(state);
                return done(Ok(()));
            }
            let runs = FetchFile::claim(&mut state, &file.spill, chunks.clone());
            state.waiters.push(Waiter { chunks, done });
            runs
        };
        for chunks in runs {
            if let Err(lost) = self.on_demand.send(Job {
                file: index,
                chunks,
            }) {
                let error = FetchError("lazyfs is shutting down".into());
                file.fail(lost.0.chunks, &error, false);
            }
        }
    }
}
