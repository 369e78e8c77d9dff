//! Fetching ahead of readers on the first on-demand lane, between their
//! requests: a recording's replay, and the small files a process opens.
//!
//! Replaying a recording: what the last restore of this checkpoint read first
//! (the cache dir's recording, or the one the manifest ships) is fetched as
//! soon as the source is up, in the recorded order, on the first on-demand
//! lane (the first connection), lazy mount or not: the restored process finds
//! its first bytes there, or on their way. In steps, with the readers who
//! came meanwhile served between them: the small files next in the plan
//! whole, many in one pipeline; a large file's next recorded runs (up to
//! `STEP_BYTES`) in one pipeline of ranged reads.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use super::lane::Link;
use super::{Lane, Shared, prefetch};

/// Bytes one step of a large file's runs asks for at most.
const STEP_BYTES: u64 = 8 << 20;

/// What is left to replay, in recorded order.
pub(super) struct Replay {
    plan: VecDeque<(usize, Range<u64>)>,
}

impl Replay {
    pub(super) fn new(plan: &Arc<[(usize, Range<u64>)]>) -> Replay {
        Replay { plan: plan.iter().cloned().collect() }
    }

    pub(super) fn is_done(&self) -> bool {
        self.plan.is_empty()
    }

    /// Fetches the next step of the plan: whole small files, or a large file's runs.
    pub(super) fn step(&mut self, link: &mut Link, shared: &Shared) {
        let Some(&(first, _)) = self.plan.front() else { return };
        if shared.files.get(first).size <= prefetch::SMALL_FILE {
            // The small files next in the plan, whole, in one pipeline.
            let mut batch: Vec<usize> = Vec::new();
            let mut bytes = 0;
            while let Some(&(index, _)) = self.plan.front() {
                let size = shared.files.get(index).size;
                if size > prefetch::SMALL_FILE || (!batch.is_empty() && bytes + size > prefetch::BATCH_BYTES) {
                    break;
                }
                self.plan.pop_front();
                if !batch.contains(&index) {
                    bytes += size;
                    batch.push(index);
                }
            }
            return fetch_whole(link, shared, batch);
        }
        // This file's runs next in the plan (and its later ones), up to a step's bytes.
        let file = &shared.files.get(first);
        let mut runs: Vec<Range<u64>> = Vec::new();
        let mut bytes = 0;
        self.plan.retain(|(index, chunks)| {
            let take = *index == first && bytes < STEP_BYTES;
            if take {
                bytes += file.chunk_len(chunks.clone());
                runs.push(chunks.clone());
            }
            !take
        });
        let claims = runs.into_iter().flat_map(|run| file.claim(run)).collect();
        shared.fetch_claims(link, first, claims, Lane::Prefetch);
    }
}

/// Fetches the small `files` whole (those that still need it), a batch of
/// up to `BATCH_BYTES` per pipeline.
pub(super) fn fetch_whole(link: &mut Link, shared: &Shared, mut files: Vec<usize>) {
    files.retain(|&index| !shared.files.get(index).needs_nothing());
    files.dedup();
    while !files.is_empty() {
        let mut bytes = 0;
        let take = files
            .iter()
            .take_while(|&&index| {
                bytes += shared.files.get(index).size;
                bytes <= prefetch::BATCH_BYTES
            })
            .count()
            .max(1);
        let batch: Vec<usize> = files.drain(..take).collect();
        prefetch::fetch_small_files(link, shared, &batch);
    }
}
