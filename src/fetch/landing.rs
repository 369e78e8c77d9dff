//! Fetched bytes on their way into a file, one way: the transport hands each
//! piece as it arrives (a READ's worth, whole chunks) to this sink, which
//! checks it (the manifest's chunk hashes; before any byte, the first look)
//! and has the file's owner land it at once. A reader waiting for a chunk waits for its piece, not for the whole
//! claim (a 4 MiB prefetch window); a connection lost midway costs only the
//! pieces that had not arrived.

use std::ops::Range;

use super::{Claim, FetchFailure, Lane, Shared};
use crate::source::{Sink, SourceStat};
use crate::store::CHUNK_SIZE;

struct Landing<'a> {
    shared: &'a Shared,
    index: usize,
    claim: &'a Claim,
    lane: Lane,
    /// Per chunk of the claim: landed (or to be fetched once more, `bad`).
    done: Vec<bool>,
    /// Chunks that did not match the manifest: fetched once more.
    bad: Vec<u64>,
    /// This is that second try: a mismatch now fails the file.
    second_try: bool,
    /// The first look was handed over.
    looked: bool,
    /// A background transfer: it waits while readers wait on the on-demand lanes.
    yields: bool,
    failed: Option<FetchFailure>,
}

impl<'a> Landing<'a> {
    fn new(shared: &'a Shared, index: usize, claim: &'a Claim, lane: Lane) -> Landing<'a> {
        let done = vec![false; (claim.chunks.end - claim.chunks.start) as usize];
        Landing {
            shared,
            index,
            claim,
            lane,
            done,
            bad: Vec::new(),
            second_try: false,
            looked: false,
            yields: false,
            failed: None,
        }
    }

    /// The bytes of the claim still to fetch (all of them at first; after a
    /// lost connection, what had not arrived).
    fn remaining(&self) -> Vec<Range<u64>> {
        let file = &self.shared.files.get(self.index);
        let mut runs: Vec<Range<u64>> = Vec::new();
        for (i, _) in self.done.iter().enumerate().filter(|(_, done)| !**done) {
            let chunk = self.claim.chunks.start + i as u64;
            match runs.last_mut() {
                Some(run) if run.end == chunk => run.end += 1,
                _ => runs.push(chunk..chunk + 1),
            }
        }
        runs.into_iter().map(|run| file.chunk_bytes(run)).collect()
    }

    /// Lands `chunks` (bytes `data`); false once the claim no longer holds.
    fn land_run(&mut self, chunks: Range<u64>, data: &[u8]) -> bool {
        let claim = Claim { generation: self.claim.generation, chunks: chunks.clone() };
        match self.shared.land(self.index, &claim, data, self.lane) {
            Ok(true) => {
                for chunk in chunks {
                    self.done[(chunk - self.claim.chunks.start) as usize] = true;
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.failed = Some(FetchFailure::Store(e));
                false
            }
        }
    }

    /// Whether every chunk of the claim arrived (landed, or to be tried again).
    fn arrived(&self) -> bool {
        self.done.iter().all(|&done| done)
    }
}

/// The landings of claims of one file fetched in one pipeline: each piece
/// goes to the claim it belongs to (a piece never spans two).
pub(super) struct Landings<'a> {
    landings: Vec<Landing<'a>>,
}

impl<'a> Landings<'a> {
    /// `claims` are of one generation; `yields`: a background transfer.
    pub(super) fn new(shared: &'a Shared, index: usize, claims: &'a [Claim], lane: Lane, yields: bool) -> Landings<'a> {
        let landings =
            claims.iter().map(|claim| Landing { yields, ..Landing::new(shared, index, claim, lane) }).collect();
        Landings { landings }
    }

    pub(super) fn generation(&self) -> u64 {
        self.landings.first().map_or(0, |l| l.claim.generation)
    }

    /// Whether the first look is still to come (it was asked for, and not given yet).
    pub(super) fn wants_look(&self, look: bool) -> bool {
        look && !self.landings.iter().any(|l| l.looked)
    }

    /// The bytes still to fetch: all of them at first; after a lost
    /// connection, what had not arrived.
    pub(super) fn remaining(&self) -> Vec<Range<u64>> {
        self.landings.iter().flat_map(Landing::remaining).collect()
    }

    /// How each claim ended, given how the fetch itself did (`fetched`): its
    /// own failure (a store error, a second mismatch), else the fetch's if
    /// not every chunk of it arrived; and the chunks that did not match the
    /// manifest, for a second try (as claims of their own).
    pub(super) fn finish(self, fetched: &Result<(), FetchFailure>) -> (Vec<Result<(), FetchFailure>>, Vec<Claim>) {
        let mut again = Vec::new();
        let results = self
            .landings
            .into_iter()
            .map(|mut landing| {
                let generation = landing.claim.generation;
                again.extend(landing.bad.drain(..).map(|chunk| Claim { generation, chunks: chunk..chunk + 1 }));
                match (landing.failed.take(), fetched) {
                    (Some(failure), _) => Err(failure),
                    (None, Err(failure)) if !landing.arrived() => Err(failure.again()),
                    (None, _) => Ok(()),
                }
            })
            .collect();
        (results, again)
    }

    /// A second try of chunks that did not match: a mismatch now fails the file.
    pub(super) fn second_try(mut self) -> Self {
        for landing in &mut self.landings {
            landing.second_try = true;
        }
        self
    }

    fn covering(&mut self, offset: u64) -> Option<&mut Landing<'a>> {
        self.landings.iter_mut().find(|l| {
            let bytes = l.shared.files.get(l.index).chunk_bytes(l.claim.chunks.clone());
            bytes.start <= offset && offset < bytes.end
        })
    }
}

impl Sink for Landings<'_> {
    fn looked(&mut self, stat: SourceStat) -> bool {
        self.landings.first_mut().is_none_or(|first| first.looked(stat))
    }

    fn land(&mut self, offset: u64, bytes: &[u8]) -> bool {
        self.covering(offset).is_some_and(|landing| landing.land(offset, bytes))
    }

    fn may_request(&mut self, idle: bool) -> bool {
        self.landings.first_mut().is_none_or(|first| first.may_request(idle))
    }
}

/// Longest a background transfer waits for readers at a time before asking for more.
const YIELD_AT_MOST: std::time::Duration = std::time::Duration::from_millis(50);

impl Sink for Landing<'_> {
    /// Prefetch sends no new request while a reader waits on the on-demand
    /// lanes (what it has in flight still arrives).
    fn may_request(&mut self, idle: bool) -> bool {
        if !self.yields || !self.shared.requests.readers_waiting() {
            return true;
        }
        if idle {
            self.shared.requests.wait_quiet(YIELD_AT_MOST);
        }
        idle
    }

    fn looked(&mut self, stat: SourceStat) -> bool {
        self.looked = true;
        self.shared.set_baseline(self.index, stat);
        !self.shared.files.get(self.index).phase().is_settled()
    }

    fn land(&mut self, offset: u64, bytes: &[u8]) -> bool {
        let file = &self.shared.files.get(self.index);
        let first = offset / CHUNK_SIZE;
        let mut run = first..first;
        for (i, piece) in bytes.chunks(CHUNK_SIZE as usize).enumerate() {
            let chunk = first + i as u64;
            if file.expected.as_ref().is_none_or(|expected| expected.chunk_matches(chunk, piece)) {
                run.end = chunk + 1;
                continue;
            }
            if self.second_try {
                self.failed = Some(FetchFailure::Mismatch(chunk));
                return false;
            }
            // Landed before it, the good chunks; this one is tried again at the end.
            let at = ((run.start - first) * CHUNK_SIZE) as usize;
            if !run.is_empty() && !self.land_run(run.clone(), &bytes[at..i * CHUNK_SIZE as usize]) {
                return false;
            }
            self.bad.push(chunk);
            self.done[(chunk - self.claim.chunks.start) as usize] = true;
            run = chunk + 1..chunk + 1;
        }
        let at = ((run.start - first) * CHUNK_SIZE) as usize;
        run.is_empty() || self.land_run(run, &bytes[at..])
    }
}
