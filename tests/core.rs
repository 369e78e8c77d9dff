//! The core without FUSE or sshd: each file's owner against a local source
//! seen through a fault-injecting one (lost connections, short replies,
//! garbage, stalls, panics, a file replaced mid-read), remounts, kills, and a
//! cache filesystem that fills up. Each numbered finding of issue 11 has a
//! test here (or next to the code it is about) that failed before its fix.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::harness::{Core, Fault, Gate, replace_atomically};
use common::mount::content;
use common::tmpfs::Tmpfs;
use lazyfs::namespace::ROOT_INO;

const CHUNK: u64 = 16 << 10;

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finding 1: a file CRIU recorded without a size (O_APPEND), changed locally
/// and since gone from the source, keeps its local bytes across remounts,
/// clean or not.
#[test]
fn a_remount_keeps_local_writes_to_a_file_gone_from_the_source() {
    let mut core = Core::new(&[("/d/log", b"first line\n".to_vec(), false)]);
    core.mount(0).unwrap();
    assert_eq!(core.write("/d/log", 11, b"local line\n"), Ok(11));
    core.unmount();
    std::fs::remove_file(core.source.join("d/log")).unwrap();

    core.mount(0).unwrap();
    assert_eq!(core.state("/d/log"), "modified");
    assert_eq!(core.read("/d/log", 0, 100).unwrap(), b"first line\nlocal line\n");
    assert_eq!(core.write("/d/log", 22, b"third\n"), Ok(6));
    core.kill();

    core.mount(0).unwrap();
    assert_eq!(core.read("/d/log", 0, 100).unwrap(), b"first line\nlocal line\nthird\n");
}

/// Finding 3: `lazyfs verify` on a live mount does not call a file verified
/// and then written locally a mismatch.
#[test]
fn verify_does_not_call_a_locally_modified_file_a_mismatch() {
    let bytes = content("/v", 100_000);
    let mut core = Core::new(&[("/v", bytes.clone(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/v", 0, 100_000).unwrap(), bytes);
    core.wait_state("/v", |s| s == "verified");
    assert_eq!(core.write("/v", 5, b"changed"), Ok(7));
    let report = lazyfs::commands::verify::verify_cache(&core.cache).unwrap();
    assert!(report.mismatched.is_empty(), "{:?}", report.mismatched);
    core.unmount();
}

/// Finding 5: a truncate does not wait for fetches above the new end, and
/// those never write: the file does not grow back with source bytes.
#[test]
fn a_truncate_drops_a_fetch_in_flight_above_the_new_end() {
    let bytes = content("/t", 4 * CHUNK as usize);
    let mut core = Core::new(&[("/t", bytes.clone(), true), ("/other", b"other".to_vec(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/t", 0, 10).unwrap(), bytes[..10]);

    let gate = Arc::new(Gate::default());
    let stall = gate.clone();
    core.plan.on_read(move |path, offset, _| match path == Path::new("/t") && offset >= 2 * CHUNK {
        true => Fault::Stall(stall.clone()),
        false => Fault::Pass,
    });
    let reads = core.plan.reads.load(Ordering::SeqCst);
    let pending = core.read_later("/t", 3 * CHUNK, 100);
    wait_until("the fetch never started", || core.plan.reads.load(Ordering::SeqCst) > reads);

    assert_eq!(core.truncate("/t", 1000), Ok(1000));
    // The reader waiting above the new end is answered at once: nothing is there.
    assert_eq!(pending.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(Vec::new()));
    gate.open();
    // The on-demand lane serves in order: once this is read, the stalled fetch is over.
    assert_eq!(core.read("/other", 0, 5).unwrap(), b"other");
    assert_eq!(core.len("/t"), 1000);
    assert_eq!(core.truncate("/t", 4 * CHUNK), Ok(4 * CHUNK));
    assert_eq!(core.read("/t", 3 * CHUNK, 100).unwrap(), vec![0; 100], "source bytes past a truncate");
    assert_eq!(core.read("/t", 0, 1000).unwrap(), bytes[..1000]);
}

/// Finding 6: a file replaced on the source in the middle of its transfer
/// ends verified as the new file, never as the old one or a mix: handles
/// opened for the first try are not reused for the second. With one worker
/// (its handle is the old file's) and with four (each has its own).
#[test]
fn a_file_replaced_mid_transfer_is_verified_as_the_new_file_only() {
    for jobs in [1, 4] {
        let len = 12 << 20;
        let mut core = Core::new(&[("/x/live", content("/x/live", len), true)]);
        let new = content("/x/live-v2", len);
        let (source, replaced) = (core.source.join("x/live"), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let (new_bytes, once) = (new.clone(), replaced.clone());
        core.plan.on_read(move |_, offset, _| {
            if offset >= 4 << 20 && !once.swap(true, Ordering::SeqCst) {
                replace_atomically(&source, &new_bytes);
            }
            Fault::Pass
        });
        core.mount(jobs).unwrap();
        let state = core.wait_state("/x/live", |s| s == "verified" || s == "failed");
        assert!(replaced.load(Ordering::SeqCst));
        assert_eq!(state, "verified", "-j {jobs}");
        assert!(core.read("/x/live", 0, len as u32).unwrap() == new, "-j {jobs}: verified bytes not of the new file");
    }
}

/// Finding 6: the first look at a file read on demand (no manifest) is taken
/// before its first bytes are read, not after: a look after could see a file
/// replaced since and vouch for the old bytes.
#[test]
fn the_first_look_at_a_file_read_on_demand_comes_before_its_bytes() {
    let len = 200_000;
    let mut core = Core::new(&[("/o/file", content("/o/file", len), true)]);
    let new = content("/o/file-v2", len);
    let (source, new_bytes) = (core.source.join("o/file"), new.clone());
    let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = swapped.clone();
    // The first look at the source finds the file just replaced.
    core.plan.on_stat(move |_| {
        if !once.swap(true, Ordering::SeqCst) {
            replace_atomically(&source, &new_bytes);
        }
    });
    core.mount(0).unwrap();
    core.read("/o/file", 0, len as u32).unwrap();
    assert_eq!(core.wait_state("/o/file", |s| s == "verified" || s == "failed"), "verified");
    assert!(swapped.load(Ordering::SeqCst));
    assert!(core.read("/o/file", 0, len as u32).unwrap() == new, "verified bytes older than the looks");
}

/// Finding 7: a panic while fetching (a reply the code did not expect) fails
/// that file; the lanes, the prefetch pool and the other files go on, and no
/// reader hangs on a chunk claimed forever.
#[test]
fn a_panic_while_fetching_fails_that_file_and_the_rest_goes_on() {
    let files: Vec<(&str, Vec<u8>, bool)> = ["/p/small", "/p/ok", "/p/big"]
        .into_iter()
        .zip([30_000, 40_000, 6 << 20])
        .map(|(path, len)| (path, content(path, len), true))
        .collect();
    let mut core = Core::new(&files);
    core.plan.on_read(|path, _, _| match path == Path::new("/p/small") || path == Path::new("/p/big") {
        true => Fault::Panic,
        false => Fault::Pass,
    });
    core.mount(4).unwrap();
    assert_eq!(core.read("/p/small", 0, 10), Err(libc::EIO));
    assert_eq!(core.read("/p/big", 5 << 20, 10), Err(libc::EIO));
    assert_eq!(core.read("/p/ok", 0, 40_000).unwrap(), files[1].1);
    core.wait_state("/p/ok", |s| s == "verified");
    for path in ["/p/small", "/p/big"] {
        core.wait_state(path, |s| s == "failed");
    }
    core.plan.clear();
    core.unmount();
    // A panic is not the file's fault: the next mount fetches it.
    core.mount(0).unwrap();
    assert_eq!(core.read("/p/small", 0, 30_000).unwrap(), files[0].1);
}

/// Lost connections, short replies and garbage: readers get EIO or the right
/// bytes, never garbage; a manifest catches what the source lies about.
#[test]
fn faults_from_the_source_reach_readers_as_errors_never_as_bytes() {
    let bytes = content("/s", 5 * CHUNK as usize);
    let mut core = Core::new(&[("/s", bytes.clone(), true)]);
    core.write_manifest();
    core.mount(0).unwrap();
    core.plan.on_read(|_, _, _| Fault::Lost);
    assert_eq!(core.read("/s", 0, 10), Err(libc::EIO), "after the reconnect timeout");
    core.plan.on_read(|_, offset, _| if offset == 0 { Fault::Short } else { Fault::Pass });
    assert_eq!(core.read("/s", 0, 10), Err(libc::EIO));
    assert_eq!(core.state("/s"), "failed", "short on the source is final");
    core.unmount();

    std::fs::remove_dir_all(&core.cache).unwrap();
    let mut garbage = 0;
    core.plan.on_read(move |_, _, _| {
        garbage += 1;
        if garbage <= 2 { Fault::Garbage } else { Fault::Pass }
    });
    core.mount(0).unwrap();
    // The first garbage is fetched again and is garbage again: not served.
    assert_eq!(core.read("/s", 0, 10), Err(libc::EIO));
    core.plan.clear();
    core.unmount();
    std::fs::remove_dir_all(&core.cache).unwrap();
    core.plan.on_read(|_, offset, _| if offset == CHUNK { Fault::Garbage } else { Fault::Pass });
    core.mount(0).unwrap();
    // Only the chunk that came wrong once is fetched again, alone.
    assert_eq!(core.read("/s", 0, 5 * CHUNK as u32).unwrap(), bytes);
}

/// Finding 9: the images cannot claim, in total, more than the cache
/// filesystem holds (each claim costs a presence bitmap).
#[test]
fn the_images_cannot_claim_more_than_the_cache_holds_in_total() {
    let mut core = Core::new(&[("/a", b"a".to_vec(), true), ("/b", b"b".to_vec(), true)]);
    std::fs::create_dir_all(&core.cache).unwrap();
    let stat = nix::sys::statvfs::statvfs(&core.cache).unwrap();
    let capacity = stat.blocks() * stat.fragment_size();
    let claim = capacity / 5 * 3;
    let files: Vec<_> = ["/a", "/b"].into_iter().map(|p| lazyfs::images::write::DumpFile::new(p, claim)).collect();
    std::fs::remove_dir_all(&core.images).unwrap();
    lazyfs::images::write::write_dump(&core.images, &files).unwrap();
    core.mount(0).unwrap();
    let states = [core.state("/a"), core.state("/b")];
    assert_eq!(states.iter().filter(|s| *s == "failed").count(), 1, "{states:?}");
}

/// Finding 10: bytes are read with pread: a spill file truncated from
/// outside reads short, it does not kill the daemon with SIGBUS.
#[test]
fn a_spill_file_truncated_from_outside_reads_short_not_sigbus() {
    let bytes = content("/m", 200_000);
    let mut core = Core::new(&[("/m", bytes.clone(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/m", 0, 200_000).unwrap(), bytes);
    // Settled first: a verifier hashing it while it is cut would fail it.
    core.wait_state("/m", |s| s == "verified");
    let spill = std::fs::read_dir(core.cache.join("spill")).unwrap().next().unwrap().unwrap().path();
    std::fs::File::options().write(true).open(spill).unwrap().set_len(1000).unwrap();
    assert_eq!(core.read("/m", 0, 200_000).unwrap(), bytes[..1000]);
    assert!(core.read("/m", 100_000, 10).unwrap().is_empty());
}

/// Finding 11: a cache dir filled for one checkpoint and source is not
/// served as verified for another: it starts afresh.
#[test]
fn a_cache_dir_of_another_source_starts_afresh() {
    let mut core = Core::new(&[("/f", content("/f", 50_000), true)]);
    core.mount(0).unwrap();
    core.read("/f", 0, 50_000).unwrap();
    core.wait_state("/f", |s| s == "verified");
    core.unmount();

    let other = core.dir.path().join("other-source");
    let new = content("/f-other", 50_000);
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("f"), &new).unwrap();
    core.source = other;
    core.mount(0).unwrap();
    assert_eq!(core.state("/f"), "pending");
    assert!(core.read("/f", 0, 50_000).unwrap() == new, "served the other source's bytes");
}

/// Finding 12: with the cache filesystem full, a local write answers ENOSPC
/// (not EIO), and reading a hole made by a local extension reads zeros.
#[test]
fn a_full_cache_answers_writers_enospc_and_holes_still_read() {
    let bytes = content("/w", 64 << 10);
    let mut core = Core::new(&[("/w", bytes.clone(), true)]);
    let tmpfs = Tmpfs::mount(&core.dir.path().join("tmpfs"), "1m");
    core.cache = tmpfs.0.join("cache");
    core.mount(0).unwrap();
    assert_eq!(core.read("/w", 0, 64 << 10).unwrap(), bytes);
    tmpfs.fill();
    assert_eq!(core.write("/w", 64 << 10, &[5; 8192]), Err(libc::ENOSPC));
    assert_eq!(core.truncate("/w", 1 << 20), Ok(1 << 20));
    assert_eq!(core.read("/w", 512 << 10, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(core.read("/w", 0, 64 << 10).unwrap(), bytes);
    core.unmount();
}

/// Finding 12: a prefetch that finds the cache full leaves the file waiting
/// (not failed; status says why) and finishes once there is room again.
#[test]
fn a_prefetch_that_found_the_cache_full_finishes_once_there_is_room() {
    let bytes = content("/big", 1 << 20);
    let mut core = Core::new(&[("/big", bytes.clone(), true)]);
    let tmpfs = Tmpfs::mount(&core.dir.path().join("tmpfs"), "2m");
    core.cache = tmpfs.0.join("cache");
    std::fs::create_dir_all(&core.cache).unwrap();
    let filler = tmpfs.fill();
    // Room for the journal and the lock, not for the file.
    std::fs::File::options().write(true).open(&filler).unwrap().set_len((2 << 20) - (256 << 10)).unwrap();
    core.mount(2).unwrap();
    wait_until("never saw the cache full", || core.degraded().is_some_and(|r| r.contains("full")));
    assert_ne!(core.state("/big"), "failed");
    std::fs::remove_file(filler).unwrap();
    core.wait_state("/big", |s| s == "verified");
    assert_eq!(core.degraded(), None);
    assert!(core.read("/big", 0, 1 << 20).unwrap() == bytes);
    core.unmount();
}

/// With `--subtree`, the names the images record answer at once; any other
/// name waits for its directory's listing, made once (a remount takes it from
/// the cache dir's `tree`, not the source).
#[test]
fn a_subtree_lists_a_directory_once_when_a_name_the_images_lack_is_needed() {
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    std::fs::create_dir_all(core.source.join("srv/app/a/deeper")).unwrap();
    std::fs::write(core.source.join("srv/app/a/b.txt"), b"listed").unwrap();
    std::os::unix::fs::symlink("a/b.txt", core.source.join("srv/app/link")).unwrap();
    core.subtree = Some(PathBuf::from("/srv/app"));
    core.mount(0).unwrap();
    let listed = || core.plan.listed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(core.read("/rec", 0, 100).unwrap(), b"recorded");
    assert_eq!(listed(), 0, "a recorded name needs no listing");
    assert_eq!(core.read("/a/b.txt", 0, 100).unwrap(), b"listed");
    assert_eq!(listed(), 2, "the root, then a/");
    let names: Vec<_> = core.fs().readdir(ROOT_INO).unwrap().into_iter().map(|(_, _, n)| n).collect();
    assert_eq!(names, [".", "..", "a", "link", "rec"]);
    assert_eq!(core.fs().readlink(core.ino("/link")).unwrap(), b"a/b.txt");
    assert_eq!(listed(), 2, "listed once each");
    assert!(core.fs().fetcher().source_needed(), "a/deeper is not listed yet");
    core.unmount();
    std::fs::remove_file(core.source.join("srv/app/a/b.txt")).unwrap();
    core.mount(0).unwrap();
    assert_eq!(core.read("/a/b.txt", 0, 100).unwrap(), b"listed", "kept in the cache: no source needed");
    assert_eq!(
        core.plan.listed.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the remount lists nothing it listed before"
    );
}
