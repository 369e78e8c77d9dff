//! The verifier: a thread that settles each file once every byte is here.
//! With a manifest, every chunk was checked as it arrived, so the file is
//! verified against it. Without one, the source is stat'ed again: a file that
//! changed during the transfer is fetched again (never verified from a mix of
//! old and new bytes); otherwise the blake3 of the bytes received is recorded.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use super::{Phase, Shared, lane::Link};
use crate::source::{Source, SourceError, SourceStat};

/// Files settled together: their second looks at the source go in one pipeline.
const BATCH: usize = 64;

pub(super) fn spawn(source: Arc<dyn Source>, shared: Arc<Shared>, rx: Receiver<usize>) {
    std::thread::Builder::new()
        .name("lazyfs-verify".into())
        .spawn(move || {
            let mut link = Link::new(source, shared.health.clone());
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter().take(BATCH - 1));
                verify_batch(&mut link, &shared, &batch);
            }
        })
        .expect("spawning the verifier");
}

fn verify_batch(link: &mut Link, shared: &Shared, batch: &[usize]) {
    let ready: Vec<usize> = batch.iter().copied().filter(|&i| shared.files[i].phase() == Phase::Present).collect();
    // The files whose source must be looked at again (no manifest, read in
    // more than one request).
    let looks: Vec<usize> = ready
        .iter()
        .copied()
        .filter(|&i| {
            let file = &shared.files[i];
            file.expected.is_none() && !file.lock().read_whole
        })
        .collect();
    let paths: Vec<&Path> = looks.iter().map(|&i| shared.files[i].source_path.as_path()).collect();
    let mut second_looks: HashMap<usize, Result<SourceStat, SourceError>> = HashMap::new();
    if !paths.is_empty() {
        match link.with_retry(|connection| connection.stat_many(&paths)) {
            Ok(stats) => second_looks.extend(looks.iter().copied().zip(stats)),
            Err(e) => log::warn!("{e}: could not re-check the source after the transfer"),
        }
    }
    for index in ready {
        verify(shared, index, second_looks.remove(&index));
    }
}

/// Settles one complete file, given the source's state after the transfer
/// (`None` when there was no need, or no way, to look).
fn verify(shared: &Shared, index: usize, second_look: Option<Result<SourceStat, SourceError>>) {
    let file = &shared.files[index];
    let (hash, against) = match &file.expected {
        Some(expected) => (expected.whole, "manifest"),
        None => {
            let size = file.spill.len();
            let baseline = file.lock().baseline;
            match second_look {
                Some(Ok(now)) if now.size != size => {
                    let message = format!(
                        "{}: changed since the checkpoint: the source has {} bytes, the images record {size}",
                        file.path.display(),
                        now.size
                    );
                    log::error!("{message}");
                    file.fail(0..0, &super::FetchError::new(message), true);
                    return;
                }
                Some(Ok(now)) if baseline.is_some_and(|b| b != now) => {
                    shared.restart(index, "changed on the source during the transfer");
                    return;
                }
                // An empty file brought no bytes: only this look says it exists.
                Some(Err(e @ SourceError::NotFound { .. })) if size == 0 => {
                    log::error!("{e}");
                    file.fail(0..0, &super::FetchError::new(e.to_string()), true);
                    return;
                }
                // Every byte arrived and matched the recorded size: keep them.
                Some(Err(e @ SourceError::NotFound { .. })) => {
                    log::warn!("{e} any more; keeping the bytes received")
                }
                Some(Err(e)) => log::warn!("{e}: could not re-check the source after the transfer"),
                Some(Ok(_)) | None => {}
            }
            match file.spill.hash() {
                Ok(hash) => (*hash.as_bytes(), "received"),
                Err(e) => {
                    log::error!("{e}");
                    file.fail(0..0, &super::FetchError::new(e.to_string()), true);
                    return;
                }
            }
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
