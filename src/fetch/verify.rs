//! The verifier: a thread that settles each file once every byte is here.
//! With a manifest, every chunk was checked as it arrived, so the file is
//! verified against it. Without one, the source is stat'ed again: a file that
//! changed during the transfer is fetched again (never verified from a mix of
//! old and new bytes); otherwise the blake3 of the bytes received is recorded.

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use super::{Phase, Shared, lane::Link};
use crate::source::{Source, SourceError, SourceStat};

pub(super) fn spawn(source: Arc<dyn Source>, shared: Arc<Shared>, rx: Receiver<usize>) {
    std::thread::Builder::new()
        .name("lazyfs-verify".into())
        .spawn(move || {
            let mut link = Link::new(source, shared.health.clone());
            for index in rx {
                verify(&mut link, &shared, index);
            }
        })
        .expect("spawning the verifier");
}

fn verify(link: &mut Link, shared: &Shared, index: usize) {
    let file = &shared.files[index];
    if file.phase() != Phase::Present {
        return;
    }
    let (hash, against) = match &file.expected {
        Some(expected) => (expected.whole, "manifest"),
        None => {
            let size = file.spill.len();
            let (baseline, read_whole) = {
                let state = file.lock();
                (state.baseline, state.read_whole)
            };
            let second_look = if read_whole {
                Ok(SourceStat { size, mtime: baseline.map_or(0, |b| b.mtime) })
            } else {
                link.with_retry(|connection| connection.stat(&file.source_path))
            };
            match second_look {
                Ok(now) if now.size != size => {
                    let message = format!(
                        "{}: changed since the checkpoint: the source has {} bytes, the images record {size}",
                        file.path.display(),
                        now.size
                    );
                    log::error!("{message}");
                    file.fail(0..0, &super::FetchError::new(message), true);
                    return;
                }
                Ok(now) if baseline.is_some_and(|b| b != now) => {
                    shared.restart(index, "changed on the source during the transfer");
                    return;
                }
                Ok(_) => {}
                // Every byte arrived and matched the recorded size: keep them.
                Err(e @ SourceError::NotFound { .. }) => {
                    log::warn!("{e} any more; keeping the bytes received")
                }
                Err(e) => log::warn!("{e}: could not re-check the source after the transfer"),
            }
            (*file.spill.hash().as_bytes(), "received")
        }
    };
    let settled = {
        let mut state = file.lock();
        let present = state.phase == Phase::Present;
        if present {
            state.phase = Phase::Verified { hash, against };
        }
        present
    };
    if settled {
        shared.journal.verified(file.path_bytes(), &blake3::Hash::from_bytes(hash), against);
        log::debug!("{}: verified against the {against}", file.path.display());
    }
}
