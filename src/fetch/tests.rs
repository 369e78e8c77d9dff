//! The file owner's rules, tested on the fetcher itself over a local source.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::source::SourceSpec;
use crate::store::{CHUNK_SIZE, Presence, SpillFile};
use file::InOrder;

const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    _dir: tempfile::TempDir,
    fetcher: Fetcher,
}

/// A fetcher serving one file `/f` holding `bytes`, without prefetch, with
/// `journal` (made in the given dir) as its journal.
fn setup(bytes: &[u8], journal: impl FnOnce(&Path) -> Journal) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("root")).unwrap();
    std::fs::write(dir.path().join("root/f"), bytes).unwrap();
    let source: Arc<dyn Source> =
        crate::source::open(&SourceSpec::Local(dir.path().join("root")), Path::new("/")).unwrap().into();
    let size = bytes.len() as u64;
    let (spill, len) = SpillFile::open_path(&dir.path().join("spill"), Some(size), false).unwrap();
    let spec = restore::FileSpec {
        path: PathBuf::from("/f"),
        source_path: PathBuf::from("/f"),
        size,
        expected: None,
        image_order: 0,
        listed: None,
        written: false,
    };
    let file = Arc::new(FetchFile::new(spec, spill, len, Presence::new(size), Phase::Pending));
    let journal = journal(dir.path());
    let config =
        FetchConfig { jobs: 0, order: Order::Image, replay: Arc::new([]), reconnect_timeout: Duration::from_secs(1) };
    let connection = source.connect().unwrap();
    let fetcher = Fetcher::start(source, Some(connection), vec![file], journal, config);
    Setup { _dir: dir, fetcher }
}

fn plain_journal(dir: &Path) -> Journal {
    let cache = crate::store::CacheDir::open_cache(&dir.join("cache")).unwrap();
    Journal::create(&cache, &Owner::default(), Vec::new(), Vec::new()).unwrap()
}

fn wait<T: Send + 'static>(op: impl FnOnce(Reply<T>)) -> Result<T, FetchError> {
    let (tx, rx) = mpsc::channel();
    op(Box::new(move |result| {
        let _ = tx.send(result);
    }));
    rx.recv_timeout(WAIT).expect("an answer")
}

fn settled(fetcher: &Fetcher) -> Phase {
    let deadline = Instant::now() + WAIT;
    loop {
        let phase = fetcher.file(0).phase();
        if phase.is_settled() || Instant::now() > deadline {
            return phase;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finding 4: the verifier decided to fetch a file again (the source changed)
/// while a local write made it local: the restart must not clear it.
#[test]
fn a_restart_decided_before_a_local_write_leaves_the_write_alone() {
    let setup = setup(&[1; 40_000], plain_journal);
    let fetcher = &setup.fetcher;
    wait(|reply| fetcher.read(0, 0, 40_000, reply)).unwrap();
    // The verifier takes the generation the file was complete in...
    let generation = {
        let file = fetcher.file(0);
        let state = file.lock();
        assert!(state.presence.is_complete());
        state.generation
    };
    // ...a write finishes meanwhile...
    wait(|reply| fetcher.write(0, 10, b"local".to_vec(), reply)).unwrap();
    // ...and then the verifier asks to start over.
    fetcher.shared.restart(0, generation, "changed on the source during the transfer");
    assert_eq!(fetcher.file(0).phase(), Phase::Modified);
    let bytes = wait(|reply| fetcher.read(0, 0, 20, reply)).unwrap();
    assert_eq!(&bytes[8..17], b"\x01\x01local\x01\x01");
}

/// A restart of the generation the verifier saw bumps it: a fetch claimed
/// before never lands, and the bytes come again.
#[test]
fn bytes_of_an_older_generation_never_land() {
    let setup = setup(&[2; 3 * CHUNK_SIZE as usize], plain_journal);
    let fetcher = &setup.fetcher;
    let shared = &fetcher.shared;
    let file = fetcher.file(0);
    let claim = file.claim(1..2).remove(0);
    assert_eq!(claim.generation, 0);
    // Complete the rest, then pretend the verifier found the source changed.
    file.lock().in_flight.clear();
    file.lock().phase = Phase::Present;
    file.lock().presence.mark(0..3);
    shared.restart(0, 0, "changed");
    assert_eq!(file.lock().generation, 1);
    shared.land(0, &claim, &[9; CHUNK_SIZE as usize], Lane::OnDemand).unwrap();
    assert!(!file.lock().presence.is_present(1), "a claim of generation 0 landed in generation 1");
    let bytes = wait(|reply| fetcher.read(0, CHUNK_SIZE, 8, reply)).unwrap();
    assert_eq!(bytes, [2; 8]);
}

/// Finding 8: a write whose Modified record did not reach the disk is not
/// acknowledged.
#[test]
fn a_write_the_journal_cannot_record_answers_eio() {
    let setup = setup(&[3; 1000], Journal::failing);
    let fetcher = &setup.fetcher;
    let err = wait(|reply| fetcher.write(0, 0, b"x".to_vec(), reply)).unwrap_err();
    assert_eq!(err.errno, libc::EIO);
    assert!(err.message.contains("journal"), "{err}");
}

/// A file complete without a manifest is verified from the bytes received,
/// read under the owner's lock.
#[test]
fn a_complete_file_is_verified_from_what_arrived() {
    let bytes: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    let setup = setup(&bytes, plain_journal);
    wait(|reply| setup.fetcher.read(0, 0, 1, reply)).unwrap();
    wait(|reply| setup.fetcher.read(0, 0, 70_000, reply)).unwrap();
    match settled(&setup.fetcher) {
        Phase::Verified { hash, against } => {
            assert_eq!(against, "received");
            assert_eq!(*hash, *blake3::hash(&bytes).as_bytes());
        }
        other => panic!("{other:?}"),
    }
}

/// Bytes are hashed as they land in order, so the verifier reads back only
/// what landed after a gap; in order or not, the hash is the file's.
#[test]
fn the_hash_taken_while_landing_is_the_files_in_any_order() {
    let bytes: Vec<u8> = (0..5 * CHUNK_SIZE as u32 + 1234).map(|i| (i * 7) as u8).collect();
    for order in [[0, 1, 2, 3, 4, 5], [0, 2, 1, 3, 5, 4], [5, 4, 3, 2, 1, 0]] {
        let setup = setup(&bytes, plain_journal);
        let (shared, file) = (&setup.fetcher.shared, setup.fetcher.file(0));
        for chunk in order {
            let claim = file.claim(chunk..chunk + 1).remove(0);
            let at = file.chunk_bytes(chunk..chunk + 1);
            assert!(shared.land(0, &claim, &bytes[at.start as usize..at.end as usize], Lane::Prefetch).unwrap());
            if order == [0, 1, 2, 3, 4, 5] && chunk < 5 {
                assert!(
                    matches!(file.lock().in_order.as_deref(), Some(InOrder::Hashing(_, up_to)) if *up_to == at.end)
                );
            }
        }
        if order == [0, 1, 2, 3, 4, 5] {
            // Done, unless the verifier (woken by the last chunk) already took it.
            let in_order = file.lock().in_order.as_deref().map(|i| matches!(i, InOrder::Done(_)));
            assert_ne!(in_order, Some(false), "hashed whole as it landed");
        }
        match settled(&setup.fetcher) {
            Phase::Verified { hash, .. } => assert_eq!(*hash, *blake3::hash(&bytes).as_bytes(), "{order:?}"),
            other => panic!("{order:?}: {other:?}"),
        }
    }
}

/// Issue 21, finding 7: a fetch that found the cache full gives its claim's
/// blocks back only if the claim still holds: never bytes a local truncate
/// and write put there meanwhile.
#[test]
fn a_claim_that_found_the_cache_full_gives_back_only_its_own_blocks() {
    let setup = setup(&[4; 2 * CHUNK_SIZE as usize], plain_journal);
    let fetcher = &setup.fetcher;
    // A fetch claims chunk 0 (and will find the cache full)...
    let claim = fetcher.file(0).claim(0..1).remove(0);
    // ...meanwhile the file is truncated and written locally...
    wait(|reply| fetcher.truncate(0, 0, reply)).unwrap();
    wait(|reply| fetcher.write(0, 0, b"local".to_vec(), reply)).unwrap();
    // ...then the fetch's failure is handled.
    let full = StoreError::Io { path: "spill".into(), source: std::io::Error::from_raw_os_error(libc::ENOSPC) };
    fetcher.shared.finish(0, &claim, Lane::OnDemand, Err(FetchFailure::Store(full)));
    assert_eq!(wait(|reply| fetcher.read(0, 0, 5, reply)).unwrap(), b"local");
}

/// Issue 21: a write is journaled before it is made: one whose `Modified`
/// record cannot be written changes nothing, and neither does the next.
#[test]
fn a_write_the_journal_cannot_record_changes_nothing() {
    let setup = setup(&[5; 1000], Journal::failing);
    let fetcher = &setup.fetcher;
    assert!(wait(|reply| fetcher.write(0, 0, b"x".to_vec(), reply)).is_err());
    assert!(wait(|reply| fetcher.write(0, 1, b"y".to_vec(), reply)).is_err(), "acknowledged, not durable");
    assert!(wait(|reply| fetcher.truncate(0, 10, reply)).is_err());
    assert_eq!(wait(|reply| fetcher.read(0, 0, 1000, reply)).unwrap(), [5; 1000]);
    assert_ne!(fetcher.file(0).phase(), Phase::Modified);
}
