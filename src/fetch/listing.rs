//! A listing lane: a thread with a source connection of its own that lists
//! directories of the tree, taking every request queued meanwhile into one
//! pipeline. There are two: one for readers (a lookup of a name the images
//! do not have, a readdir), one for the background walk, so a reader never
//! waits behind the walk's batch (the second connects when first asked).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::Shared;
use super::lane::Link;
use crate::source::{Listings, Source, SourceError};

/// Directories listed in one pipeline at most.
const BATCH_DIRS: usize = 256;

pub(super) struct ListJob {
    pub(super) dirs: Vec<PathBuf>,
    /// When a reader asked (its deadline counts from then); `None` for a
    /// walk nobody waits on.
    pub(super) asked: Option<Instant>,
    pub(super) done: Sender<Result<Listings, SourceError>>,
}

pub(super) fn spawn(source: Arc<dyn Source>, shared: Arc<Shared>, rx: Receiver<ListJob>) {
    std::thread::Builder::new()
        .name("lazyfs-list".into())
        .spawn(move || {
            let mut link = Link::new(source, shared.health.clone());
            while let Some(first) = super::lane::next_or_release(&rx, &mut link, &shared) {
                let mut jobs = vec![first];
                let mut dirs = jobs[0].dirs.len();
                while dirs < BATCH_DIRS
                    && let Ok(job) = rx.try_recv()
                {
                    dirs += job.dirs.len();
                    jobs.push(job);
                }
                serve(&mut link, &shared, jobs);
            }
        })
        .expect("spawning the listing lane");
}

fn serve(link: &mut Link, shared: &Shared, jobs: Vec<ListJob>) {
    let limits = match jobs.iter().filter_map(|j| j.asked).min() {
        Some(asked) => shared.health.reader(asked),
        None => shared.health.background(),
    };
    link.set_limits(limits);
    let paths: Vec<&Path> = jobs.iter().flat_map(|j| j.dirs.iter().map(PathBuf::as_path)).collect();
    let listed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        link.with_retry(|connection| connection.list_dirs(&paths))
    }));
    link.set_limits(shared.health.background());
    let mut listed = match listed {
        Ok(Ok(listed)) if listed.len() == paths.len() => listed.into_iter(),
        Ok(Ok(_)) => return tell(jobs, || session_error(shared, "a listing of the wrong length")),
        Ok(Err(e)) => {
            log::warn!("listing {} directories: {e}", paths.len());
            let message = e.to_string();
            return tell(jobs, || session_error(shared, &message));
        }
        Err(panic) => {
            link.reset();
            let message = format!("an internal error while listing ({})", super::lane::panic_message(panic.as_ref()));
            return tell(jobs, || session_error(shared, &message));
        }
    };
    for job in jobs {
        let own: Listings = listed.by_ref().take(job.dirs.len()).collect();
        let _ = job.done.send(Ok(own));
    }
}

fn session_error(shared: &Shared, message: &str) -> SourceError {
    SourceError::Session { host: shared.source_name.clone(), message: message.to_string() }
}

fn tell(jobs: Vec<ListJob>, error: impl Fn() -> SourceError) {
    for job in jobs {
        let _ = job.done.send(Err(error()));
    }
}
