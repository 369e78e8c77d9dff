//! Picking up a cache dir again: each file's spill file and what the journal
//! says of it, checked before anything is served from it. Verified files are
//! hashed again; with a manifest every present chunk is checked; what no
//! longer matches is fetched again.

use std::path::PathBuf;

use super::{FetchFile, Phase};
use crate::manifest::FileHashes;
use crate::store::journal::FileRecord;
use crate::store::{CHUNK_SIZE, Presence, Store, StoreError};

/// One file to serve, as the images and the manifest describe it.
pub struct FileSpec {
    pub path: PathBuf,
    pub source_path: PathBuf,
    pub size: u64,
    pub expected: Option<FileHashes>,
    /// Where the images first list it.
    pub image_order: u64,
    /// Found by listing the tree, with this size and mtime (see [`super::FetchFile::listed`]).
    pub listed: Option<crate::source::SourceStat>,
    /// A process of the checkpoint had it open for writing.
    pub written: bool,
}

pub fn open_file(store: &Store, spec: FileSpec, record: Option<&FileRecord>) -> Result<FetchFile, StoreError> {
    let name = spec.path.display().to_string();
    if record.is_some_and(|r| r.modified) {
        // Changed locally: the spill file is the file now, whatever its length.
        let (spill, len) = store.open_spill(&spec.path, None, true)?;
        let spec = FileSpec { expected: None, ..spec };
        let mut presence = Presence::new(spec.size);
        presence.mark(0..presence.chunk_count());
        return Ok(FetchFile::new(spec, spill, len, presence, Phase::Modified));
    }
    let record = record.filter(|r| r.size == spec.size);
    // A file the images record claims its room; one a listing found does not.
    let (spill, len) = match spec.listed {
        Some(_) => store.open_listed_spill(&spec.path, spec.size, record.is_some())?,
        None => store.open_spill(&spec.path, Some(spec.size), record.is_some())?,
    };
    let mut presence = Presence::new(spec.size);
    for run in record.map(|r| r.present.as_slice()).unwrap_or_default() {
        presence.mark(run.clone());
    }
    let mut phase = None;
    if let Some((hash, against)) = record.and_then(|r| r.verified.as_ref()) {
        // With a manifest, only its hash counts, whatever the bytes were checked against before.
        let still_expected = spec.expected.as_ref().is_none_or(|e| e.whole == *hash);
        // Bytes that cannot be read back do not match.
        if still_expected && presence.is_complete() && spill.hash(spec.size).is_ok_and(|h| h.as_bytes() == hash) {
            let against = if against == "manifest" { "manifest" } else { "received" };
            phase = Some(Phase::Verified { hash: Box::new(*hash), against });
        } else {
            log::warn!("{name}: the cached bytes no longer match their blake3: fetching what does not match again");
            if spec.expected.is_none() {
                presence.clear();
            }
        }
    }
    if let (None, Some(expected)) = (&phase, &spec.expected) {
        let mut dropped = 0;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for chunk in 0..presence.chunk_count() {
            if !presence.is_present(chunk) {
                continue;
            }
            let start = chunk * CHUNK_SIZE;
            let want = (spec.size - start).min(CHUNK_SIZE) as usize;
            let read = spill.read_at(start, &mut buf[..want]);
            if read.map_or(true, |got| got != want) || !expected.chunk_matches(chunk, &buf[..want]) {
                presence.unmark(chunk);
                dropped += 1;
            }
        }
        if dropped > 0 {
            log::warn!("{name}: {dropped} cached chunk(s) no longer match the manifest: fetching them again");
        }
    }
    let phase = phase.unwrap_or(if presence.is_complete() {
        Phase::Present
    } else if presence.any() {
        Phase::Fetching
    } else {
        Phase::Pending
    });
    Ok(FetchFile::new(spec, spill, len, presence, phase))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 2: bytes verified against what was received do not stand when
    /// a manifest says otherwise.
    #[test]
    fn a_received_hash_does_not_outvote_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = PathBuf::from("/f");
        let stale = b"old bytes".to_vec();
        let (spill, _) = store.open_spill(&path, Some(stale.len() as u64), false).unwrap();
        spill.write_at(0, &stale).unwrap();
        let record = FileRecord {
            size: stale.len() as u64,
            present: std::iter::once(0..1).collect(),
            verified: Some((*blake3::hash(&stale).as_bytes(), "received".into())),
            modified: false,
        };
        let good = b"new bytes".to_vec();
        let expected = crate::manifest::hash_chunks(9, |at, buf| {
            buf.copy_from_slice(&good[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        let spec = FileSpec {
            path: path.clone(),
            source_path: path,
            size: 9,
            expected: Some(expected),
            image_order: 0,
            listed: None,
            written: false,
        };
        let file = open_file(&store, spec, Some(&record)).unwrap();
        assert_eq!(file.phase(), Phase::Pending, "the stale chunk is dropped, nothing is verified");
    }
}
