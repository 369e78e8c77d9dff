//! The on-demand lane: one thread, one source connection, serving the chunks
//! readers are blocked on, in the order asked, adjacent requests merged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use super::{FetchError, FetchFile, Job};
use crate::source::{Connection, Source, SourceError};

/// At most this many chunks per source request, so one large request (a
/// write completing a whole file) does not hold up small reads queued behind it.
const MAX_PIECE_CHUNKS: u64 = 16;

pub(super) fn spawn_on_demand(
    source: Arc<dyn Source>,
    connection: Box<dyn Connection>,
    files: Arc<Vec<Arc<FetchFile>>>,
) -> Sender<Job> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lazyfs-on-demand".into())
        .spawn(move || {
            OnDemandLane {
                link: Link {
                    source,
                    connection: Some(connection),
                },
                files,
            }
            .run(rx)
        })
        .expect("spawning the on-demand thread");
    tx
}

/// A connection that is opened again when it is lost.
pub(super) struct Link {
    pub(super) source: Arc<dyn Source>,
    pub(super) connection: Option<Box<dyn Connection>>,
}

impl Link {
    /// Fills the claimed `chunks` of `file` from the source, reconnecting once
    /// if the connection was lost.
    pub(super) fn fetch(
        &mut self,
        file: &FetchFile,
        chunks: std::ops::Range<u64>,
    ) -> Result<(), SourceError> {
        let offset = file.spill.chunk_bytes(chunks.clone()).start;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let connection = match &mut self.connection {
                Some(c) => c,
                None => self.connection.insert(self.source.connect()?),
            };
            let result = file.spill.fill(chunks.clone(), |buf| {
                connection.read_exact_at(&file.source_path, offset, buf)
            });
            match result {
                Err(e) if e.is_connection_lost() && attempts < 2 => {
                    log::warn!("{e}: reconnecting");
                    self.connection = None;
                }
                other => return other,
            }
        }
    }
}

struct OnDemandLane {
    link: Link,
    files: Arc<Vec<Arc<FetchFile>>>,
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
            let piece_end = job.chunks.end.min(job.chunks.start + MAX_PIECE_CHUNKS);
            if piece_end < job.chunks.end {
                queue.push_back(Job {
                    file: job.file,
                    chunks: piece_end..job.chunks.end,
                });
            }
            self.fetch(job.file, job.chunks.start..piece_end);
        }
    }

    fn fetch(&mut self, index: usize, chunks: std::ops::Range<u64>) {
        let file = &self.files[index];
        match self.link.fetch(file, chunks.clone()) {
            Ok(()) => file.complete(chunks),
            Err(e) => {
                // A lost connection may come back; a file that is missing or
                // shorter than recorded will not.
                let whole_file = !e.is_connection_lost();
                log::error!("{e}");
                file.fail(chunks, &FetchError(e.to_string().into()), whole_file);
            }
        }
    }
}

/// Merges queued jobs of the same file that continue `job`'s range into it.
fn absorb_adjacent(job: &mut Job, queue: &mut VecDeque<Job>) {
    loop {
        let Some(at) = queue
            .iter()
            .position(|j| j.file == job.file && j.chunks.start == job.chunks.end)
        else {
            return;
        };
        let next = queue.remove(at).expect("found above");
        job.chunks.end = next.chunks.end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_jobs_merge() {
        let mut queue: VecDeque<Job> = [
            Job {
                file: 1,
                chunks: 5..6,
            },
            Job {
                file: 2,
                chunks: 3..4,
            },
            Job {
                file: 1,
                chunks: 4..5,
            },
        ]
        .into();
        let mut job = Job {
            file: 1,
            chunks: 2..4,
        };
        absorb_adjacent(&mut job, &mut queue);
        assert_eq!(job.chunks, 2..6);
        assert_eq!(queue.len(), 1);
    }
}
