//! The on-demand lane: one thread, one source connection, serving the chunks
//! readers are blocked on, in the order asked, adjacent requests merged.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use super::{FetchFile, Lane, Shared, fetch_checked};
use crate::source::{Connection, Source, SourceError};

/// At most this many chunks per source request, so one large request (a
/// write completing a whole file) does not hold up small reads queued behind it.
const MAX_PIECE_CHUNKS: u64 = 16;

/// A request for the on-demand lane: fetch these claimed chunks of a file.
pub(super) struct Job {
    pub(super) file: usize,
    pub(super) chunks: Range<u64>,
}

pub(super) fn spawn_on_demand(
    source: Arc<dyn Source>,
    connection: Box<dyn Connection>,
    shared: Arc<Shared>,
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
                shared,
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
    pub(super) fn new(source: Arc<dyn Source>) -> Link {
        Link {
            source,
            connection: None,
        }
    }

    /// The connection, opened if there is none.
    pub(super) fn connection(&mut self) -> Result<&mut dyn Connection, SourceError> {
        if self.connection.is_none() {
            self.connection = Some(self.source.connect()?);
        }
        Ok(self.connection.as_mut().expect("connected above").as_mut())
    }

    /// Runs `op` on the connection, reconnecting once if the connection was lost.
    pub(super) fn with_retry<T>(
        &mut self,
        mut op: impl FnMut(&mut dyn Connection) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match op(self.connection()?) {
                Err(e) if e.is_connection_lost() && attempts < 2 => {
                    log::warn!("{e}: reconnecting");
                    self.connection = None;
                }
                other => return other,
            }
        }
    }

    /// Fills the claimed `chunks` of `file` from the source.
    pub(super) fn fetch(
        &mut self,
        file: &FetchFile,
        chunks: Range<u64>,
    ) -> Result<(), SourceError> {
        let offset = file.spill.chunk_bytes(chunks.clone()).start;
        self.with_retry(|connection| {
            file.spill.fill(chunks.clone(), |buf| {
                connection.read_exact_at(&file.source_path, offset, buf)
            })
        })
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
            let piece_end = job.chunks.end.min(job.chunks.start + MAX_PIECE_CHUNKS);
            if piece_end < job.chunks.end {
                queue.push_back(Job {
                    file: job.file,
                    chunks: piece_end..job.chunks.end,
                });
            }
            let chunks = job.chunks.start..piece_end;
            let result =
                fetch_checked(&mut self.link, &self.shared.files[job.file], chunks.clone());
            self.shared.finish(job.file, chunks, Lane::OnDemand, result);
            // After the reader has its bytes: note the source's size and mtime,
            // to tell later whether the file changed during the transfer.
            queue.extend(rx.try_iter());
            if queue.is_empty() {
                let shared = self.shared.clone();
                if let Err(e) = self
                    .link
                    .with_retry(|connection| shared.check_baseline(job.file, connection))
                {
                    log::warn!("{e}");
                }
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
