//! The verifier: a thread that settles each file once every byte is here.
//! With a manifest, every chunk was checked as it arrived, so the file is
//! verified against it. Without one, the source is stat'ed again: a file that
//! changed during the transfer is fetched again (never verified from a mix of
//! old and new bytes); otherwise the blake3 of the bytes received is recorded.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use super::{Shared, lane::Link};
use crate::source::{Source, SourceError, SourceStat};

/// Files settled together: their second looks at the source go in one pipeline.
const BATCH: usize = 64;

pub(super) fn spawn(source: Arc<dyn Source>, shared: Arc<Shared>, rx: Receiver<usize>) {
    std::thread::Builder::new()
        .name("lazyfs-verify".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            crate::source::background_priority(unsafe { libc::gettid() } as u32);
            let mut link = Link::new(source, shared.health.clone());
            while let Some(first) = super::lane::next_or_release(&rx, &mut link, &shared) {
                let mut batch = vec![first];
                batch.extend(rx.try_iter().take(BATCH - 1));
                let checked =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verify_batch(&mut link, &shared, &batch)));
                if let Err(panic) = checked {
                    // Contained: these files fail, the verifier goes on.
                    let what = super::lane::panic_message(panic.as_ref());
                    for &index in &batch {
                        let file = shared.files.get(index);
                        file.fail_file(format!(
                            "{}: an internal error while checking it ({what})",
                            file.path.display()
                        ));
                    }
                    link.reset();
                }
            }
        })
        .expect("spawning the verifier");
}

fn verify_batch(link: &mut Link, shared: &Shared, batch: &[usize]) {
    // Each file in the generation it is complete in: what is found applies to it only.
    let ready: Vec<(usize, u64)> =
        batch.iter().filter_map(|&i| Some((i, shared.files.get(i).present_generation()?))).collect();
    // The files whose source must be looked at again (no manifest, read in
    // more than one request).
    let looks: Vec<usize> = ready
        .iter()
        .map(|&(i, _)| i)
        .filter(|&i| {
            let file = &shared.files.get(i);
            file.expected.is_none() && !file.lock().read_whole
        })
        .collect();
    let looked: Vec<Arc<super::FetchFile>> = looks.iter().map(|&i| shared.files.get(i)).collect();
    let paths: Vec<&Path> = looked.iter().map(|f| f.source_path.as_path()).collect();
    let mut second_looks: HashMap<usize, Result<SourceStat, SourceError>> = HashMap::new();
    if !paths.is_empty() {
        match link.with_retry(|connection| connection.stat_many(&paths)) {
            Ok(stats) => second_looks.extend(looks.iter().copied().zip(stats)),
            Err(e) => log::warn!("{e}: could not re-check the source after the transfer"),
        }
    }
    for (index, generation) in ready {
        verify(shared, index, generation, second_looks.remove(&index));
    }
}

/// Settles one complete file, given the source's state after the transfer
/// (`None` when there was no need, or no way, to look).
fn verify(shared: &Shared, index: usize, generation: u64, second_look: Option<Result<SourceStat, SourceError>>) {
    let file = &shared.files.get(index);
    let (hash, against) = match &file.expected {
        Some(expected) => (expected.whole, "manifest"),
        None => {
            let size = file.size;
            let baseline = file.lock().baseline;
            let now = second_look.as_ref().and_then(|look| look.as_ref().ok());
            if let Some(reason) = now.and_then(|now| crate::source::changed_since_listed(file.listed, *now)) {
                // Shown with the attributes its listing gave: never fetched again under other ones.
                return file.fail_file(format!("{}: {reason}: not served", file.path.display()));
            }
            match second_look {
                Some(Ok(now)) if now.size != size => {
                    file.fail_in(
                        generation,
                        format!(
                            "{}: changed since the checkpoint: the source has {} bytes, the images record {size}",
                            file.path.display(),
                            now.size
                        ),
                    );
                    return;
                }
                Some(Ok(now)) if baseline.is_some_and(|b| b != now) => {
                    shared.restart(index, generation, "changed on the source during the transfer");
                    return;
                }
                // A symlink or another kind of file there now; or an empty
                // file, which brought no bytes: only this look says it exists.
                Some(Err(e))
                    if matches!(e, SourceError::Changed { .. })
                        || (matches!(e, SourceError::NotFound { .. }) && size == 0) =>
                {
                    return file.fail_in(generation, e.to_string());
                }
                // Every byte arrived and matched the recorded size: keep them.
                Some(Err(e @ SourceError::NotFound { .. })) => {
                    log::warn!("{e} any more; keeping the bytes received")
                }
                Some(Err(e)) => log::warn!("{e}: could not re-check the source after the transfer"),
                Some(Ok(_)) | None => {}
            }
            match file.hash(generation) {
                Some(Ok(hash)) => (*hash.as_bytes(), "received"),
                Some(Err(e)) => return file.fail_in(generation, format!("{}: {e}", file.path.display())),
                // Started over or changed locally meanwhile: nothing to settle.
                None => return,
            }
        }
    };
    shared.settle(index, generation, hash, against);
}
