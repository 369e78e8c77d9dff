//! Picking up a cache dir again: each file's spill file and what the journal
//! says of it, checked before anything is served from it. Verified files are
//! hashed again; with a manifest every present chunk is checked; what no
//! longer matches is fetched again.

use std::path::PathBuf;

use super::{FetchFile, Phase};
use crate::manifest::FileHashes;
use crate::store::journal::FileRecord;
use crate::store::{Store, StoreError};

/// One file to serve, as the images and the manifest describe it.
pub struct FileSpec {
    pub path: PathBuf,
    pub source_path: PathBuf,
    pub size: u64,
    pub expected: Option<FileHashes>,
    /// Where the images first list it.
    pub image_order: u64,
}

pub fn open_file(store: &Store, spec: FileSpec, record: Option<&FileRecord>) -> Result<FetchFile, StoreError> {
    let name = spec.path.display().to_string();
    if record.is_some_and(|r| r.modified) {
        // Changed locally: the spill file is the file now, whatever its length.
        let spill = store.open_spill(&spec.path, None, true)?;
        spill.mark_present(0..spill.chunk_count());
        let spec = FileSpec { expected: None, ..spec };
        return Ok(FetchFile::new(spec, spill, Phase::Modified));
    }
    let record = record.filter(|r| r.size == spec.size);
    let spill = store.open_spill(&spec.path, Some(spec.size), record.is_some())?;
    let chunks = spill.chunk_count();
    for run in record.map(|r| r.present.as_slice()).unwrap_or_default() {
        spill.mark_present(run.start.min(chunks)..run.end.min(chunks));
    }
    let mut phase = None;
    if let Some((hash, against)) = record.and_then(|r| r.verified.as_ref()) {
        let still_expected = spec.expected.as_ref().is_none_or(|e| e.whole == *hash || against != "manifest");
        if still_expected && spill.is_complete() && spill.hash().is_ok_and(|h| h.as_bytes() == hash) {
            let against = if against == "manifest" { "manifest" } else { "received" };
            phase = Some(Phase::Verified { hash: *hash, against });
        } else {
            log::warn!("{name}: the cached bytes no longer match their blake3: fetching what does not match again");
            if spec.expected.is_none() {
                spill.clear_present();
            }
        }
    }
    if let (None, Some(expected)) = (&phase, &spec.expected) {
        let mut dropped = 0;
        for chunk in (0..chunks).filter(|&c| spill.is_present(c)) {
            let bytes = spill.chunk_bytes(chunk..chunk + 1);
            if !spill.read(bytes.start, bytes.end - bytes.start, |b| expected.chunk_matches(chunk, b)).unwrap_or(false)
            {
                spill.unmark(chunk);
                dropped += 1;
            }
        }
        spill.release(0, spill.len());
        if dropped > 0 {
            log::warn!("{name}: {dropped} cached chunk(s) no longer match the manifest: fetching them again");
        }
    }
    let phase = phase.unwrap_or(if spill.is_complete() {
        Phase::Present
    } else if (0..chunks).any(|c| spill.is_present(c)) {
        Phase::Fetching
    } else {
        Phase::Pending
    });
    Ok(FetchFile::new(spec, spill, phase))
}
