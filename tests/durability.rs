//! Issue 21, in the core (no FUSE): an acknowledged change is never lost, not
//! to a full cache disk, a crash, a damaged journal, another spelling of the
//! source, a changed subtree or layout, or the old host being gone. Each
//! finding of the issue has a test here (or next to the code it is about)
//! that failed before its fix.

mod common;

use std::path::Path;
use std::time::Duration;

use common::harness::Core;
use common::mount::content;
use common::tmpfs::Tmpfs;

/// A 200-character name that differs with `n`.
fn long_name(n: usize) -> String {
    let stem = format!("{n:06}-");
    stem.repeat(200 / stem.len() + 1)[..200].to_string()
}

/// Finding 1: a full cache disk, then a crash. Changes the journal cannot
/// hold are refused with ENOSPC and are not made; removing a file through the
/// mount still works and frees room; then changes are accepted again; after
/// `kill -9` and a remount every acknowledged change is there.
#[test]
fn finding_1_a_full_cache_disk_then_a_crash_loses_no_acknowledged_change() {
    let mut core = Core::new(&[("/app/data", content("/app/data", 10_000), true)]);
    let tmpfs = Tmpfs::mount(&core.dir.path().join("tmpfs"), "2m");
    core.cache = tmpfs.0.join("cache");
    core.mount(0).unwrap();
    core.create("/app/precious.txt").unwrap();
    assert_eq!(core.write("/app/precious.txt", 0, b"precious"), Ok(8));
    core.mkdir("/app/dir1").unwrap();
    core.create("/app/dir1/h").unwrap();

    // Fill the disk through the mount.
    core.create("/app/fill").unwrap();
    let mut at = 0;
    let full = loop {
        match core.write("/app/fill", at, &[7; 64 << 10]) {
            Ok(n) => at += u64::from(n),
            Err(e) => break e,
        }
    };
    assert_eq!(full, libc::ENOSPC);

    // Renames with long names until one is refused.
    let mut name = "/app/dir1/h".to_string();
    let mut renamed = 0;
    let refused = loop {
        let to = format!("/app/dir1/{}", long_name(renamed));
        match core.rename(&name, &to) {
            Ok(()) => name = to,
            Err(e) => break (e, to),
        }
        renamed += 1;
        assert!(renamed < 100_000, "a full disk never refused a change");
    };
    assert_eq!(refused.0, libc::ENOSPC, "a change the journal cannot hold answers ENOSPC");
    assert!(core.exists(&name) && !core.exists(&refused.1), "a refused rename is not made");
    assert_eq!(core.create("/app/refused"), Err(libc::ENOSPC));
    assert!(!core.exists("/app/refused"), "a refused create is not made");

    // Room again: removing through the mount works, and frees it.
    core.unlink("/app/fill").unwrap();
    for i in 0..10 {
        core.create(&format!("/app/new{i}")).unwrap();
    }
    core.kill();

    core.mount(0).unwrap();
    assert_eq!(core.read("/app/precious.txt", 0, 100).unwrap(), b"precious");
    assert!(core.exists(&name), "{renamed} acknowledged renames");
    assert!(!core.exists("/app/fill") && !core.exists("/app/refused") && !core.exists(&refused.1));
    for i in 0..10 {
        assert!(core.exists(&format!("/app/new{i}")), "new{i}");
    }
    core.unmount();
}

/// A journal whose record in the middle is damaged refuses the mount in
/// one line that names the file and how to go on, and changes nothing: not
/// the journal, not a data file, not a spill file.
#[test]
fn a_damaged_journal_refuses_the_mount_and_keeps_every_file() {
    let bytes = content("/f", 40_000);
    let mut core = Core::new(&[("/f", bytes.clone(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/f", 0, 40_000).unwrap(), bytes);
    core.wait_state("/f", |s| s == "verified");
    assert_eq!(core.write("/f", 0, b"local"), Ok(5));
    for name in ["/a", "/b", "/c"] {
        core.create(name).unwrap();
        assert_eq!(core.write(name, 0, name.as_bytes()), Ok(2));
    }
    core.kill();

    let journal = core.cache.join("journal");
    let mut damaged = std::fs::read(&journal).unwrap();
    // The creation of "b" (a Local record's path: field 2, one byte long), followed by more.
    let middle = damaged.windows(3).position(|w| w == [0x12, 1, b'b']).unwrap();
    damaged[middle + 2] ^= 0x55;
    std::fs::write(&journal, &damaged).unwrap();
    let before = cache_files(&core.cache);

    let err = core.mount(0).unwrap_err().to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains(&journal.display().to_string()), "names the journal: {err}");
    assert!(err.contains("--recover-journal"), "says how to go on: {err}");
    assert_eq!(cache_files(&core.cache), before, "nothing in the cache dir changed");

    // Recovering keeps the records before the damage; the bytes of the files
    // made after it stay in the cache dir, the damaged journal too.
    core.mount_with(0, |r| r.recover_journal = true).unwrap();
    assert_eq!(core.read("/a", 0, 10).unwrap(), b"/a");
    assert_eq!(core.read("/f", 0, 5).unwrap(), b"local");
    assert!(!core.exists("/b") && !core.exists("/c"));
    core.unmount();
    let after = cache_files(&core.cache);
    let kept =
        |name: &str| after.iter().filter(|(n, _)| n.starts_with(name)).map(|(_, b)| b.clone()).collect::<Vec<_>>();
    assert_eq!(kept("journal.damaged-"), [damaged]);
    let mut lost = kept("local/lost+found-");
    lost.sort();
    assert_eq!(lost, [b"/b".to_vec(), b"/c".to_vec()]);
}

/// Every file in the cache dir with its bytes, but the log and the lock.
fn cache_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(at) = dirs.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                dirs.push(path);
            } else if name != "lazyfs.log" && name != "lock" {
                out.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A record cut short by a crash, even inside its length, is a torn tail:
/// every record before it stands.
#[test]
fn a_journal_torn_inside_a_record_length_keeps_what_came_before() {
    let mut core = Core::new(&[("/f", b"f".to_vec(), true)]);
    core.mount(0).unwrap();
    core.create("/kept").unwrap();
    core.kill();
    let journal = core.cache.join("journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    // The first byte of a record longer than 127 bytes: its length goes on.
    bytes.push(0x85);
    std::fs::write(&journal, &bytes).unwrap();
    core.mount(0).unwrap();
    assert!(core.exists("/kept"));
    core.unmount();
}

/// Finding 2: another spelling of the same local source is the same source:
/// nothing starts afresh, every local change and fetched byte stays.
#[test]
fn finding_2_another_spelling_of_the_source_keeps_everything() {
    let bytes = content("/d/f", 50_000);
    let mut core = Core::new(&[("/d/f", bytes.clone(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/d/f", 0, 50_000).unwrap(), bytes);
    core.wait_state("/d/f", |s| s == "verified");
    core.create("/d/local").unwrap();
    assert_eq!(core.write("/d/local", 0, b"mine"), Ok(4));
    core.unmount();

    let source = core.source.clone();
    let parent = source.parent().unwrap().to_path_buf();
    let link = core.dir.path().join("link-to-source");
    std::os::unix::fs::symlink(&source, &link).unwrap();
    let spellings = [
        format!("{}/", source.display()),
        format!("{}/./{}", parent.display(), source.file_name().unwrap().to_string_lossy()),
        format!("file://{}", source.display()),
        link.display().to_string(),
    ];
    for spelling in spellings {
        core.mount_with(0, |r| {
            r.source_arg = spelling.clone();
            r.source = lazyfs::source::SourceSpec::parse(&spelling, &Default::default(), None).unwrap();
        })
        .unwrap();
        assert_eq!(core.state("/d/f"), "verified", "{spelling}: cached bytes kept");
        assert_eq!(core.read("/d/local", 0, 10).unwrap(), b"mine", "{spelling}: local change kept");
        core.unmount();
    }
}

/// Finding 3: once every file is here, a remount works with the source gone
/// (the cache is the source), and the local layer is kept.
#[test]
fn finding_3_a_remount_needs_no_source_once_every_file_is_here() {
    let bytes = content("/d/f", 50_000);
    let mut core = Core::new(&[("/d/f", bytes.clone(), true), ("/d/g", b"g".to_vec(), true)]);
    core.mount(2).unwrap();
    core.wait_state("/d/f", |s| s == "verified");
    core.wait_state("/d/g", |s| s == "verified");
    core.create("/d/local").unwrap();
    assert_eq!(core.write("/d/local", 0, b"mine"), Ok(4));
    core.unmount();

    std::fs::remove_dir_all(&core.source).unwrap();
    core.mount(0).expect("a remount with the old host gone");
    assert_eq!(core.read("/d/f", 0, 50_000).unwrap(), bytes);
    assert_eq!(core.read("/d/local", 0, 10).unwrap(), b"mine");
    assert!(!core.fs().fetcher().source_needed());
    core.unmount();

    // An empty directory as SOURCE is no way to lose the local layer either:
    // in the old one's place it is the same source, and not needed; another
    // one is refused.
    std::fs::create_dir_all(&core.source).unwrap();
    core.mount(0).unwrap();
    assert_eq!(core.read("/d/local", 0, 10).unwrap(), b"mine");
    assert_eq!(core.read("/d/f", 0, 50_000).unwrap(), bytes);
    core.unmount();
    let (old, empty) = (core.source.clone(), core.dir.path().join("empty"));
    std::fs::create_dir_all(&empty).unwrap();
    core.source = empty;
    let refused = core.mount(0).map(|()| core.unmount()).unwrap_err().to_string();
    assert!(refused.contains("--discard-local-changes"), "{refused}");
    core.source = old;
    core.mount(0).unwrap();
    assert_eq!(core.read("/d/local", 0, 10).unwrap(), b"mine");
    core.unmount();
}

/// Finding 4: a file written locally while the verifier looks at the source
/// again is not failed by what the verifier finds: the write stands, the next
/// one too, and both are there after a remount.
#[test]
fn finding_4_the_verifier_never_fails_a_file_written_locally() {
    let bytes = content("/v", 100_000);
    let mut core = Core::new(&[("/v", bytes.clone(), true), ("/w", b"w".to_vec(), true)]);
    core.mount(0).unwrap();
    let fs = core.fs().clone();
    let ino = core.ino("/v");
    let source_file = core.source.join("v");
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let looks = std::sync::atomic::AtomicUsize::new(0);
    // The verifier's look (the second: the first comes with the first read):
    // the file is written locally just before it, and the source's copy has
    // meanwhile changed size.
    core.plan.on_stat(move |path| {
        if path == Path::new("/v") && looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            let tx = tx.lock().unwrap().clone();
            fs.write(ino, 0, b"local".to_vec(), false, Box::new(move |r| tx.send(r.map_err(|e| e.errno)).unwrap()));
            std::fs::write(&source_file, b"grown on the old host, after the checkpoint").unwrap();
        }
    });
    assert_eq!(core.read("/v", 0, 100_000).unwrap(), bytes);
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(5));
    // The verifier takes files in order: once /w is verified, it is done with /v.
    assert_eq!(core.read("/w", 0, 1).unwrap(), b"w");
    core.wait_state("/w", |s| s == "verified");
    assert_eq!(core.state("/v"), "modified");
    assert_eq!(core.write("/v", 5, b"again"), Ok(5));
    core.unmount();
    core.mount(0).unwrap();
    assert_eq!(core.read("/v", 0, 10).unwrap(), b"localagain");
    core.unmount();
}

/// Finding 5: local changes are made against a subtree; another subtree
/// never gets them replayed onto it.
#[test]
fn finding_5_local_changes_are_not_replayed_onto_another_subtree() {
    let mut core = Core::new(&[("/srv/a/x", b"ax".to_vec(), true), ("/srv/b/y", b"by".to_vec(), true)]);
    core.mount_with(0, |r| r.subtree = Some("/srv/a".into())).unwrap();
    core.create("/made-in-a").unwrap();
    core.unmount();
    let refused = core.mount_with(0, |r| r.subtree = Some("/srv/b".into()));
    match refused {
        Ok(()) => {
            let listed = core.list("/");
            core.unmount();
            panic!("mounted /srv/b showing {listed:?}");
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("--discard-local-changes") && e.contains("/srv/a"), "{e}");
        }
    }
    core.mount_with(0, |r| r.subtree = Some("/srv/a".into())).unwrap();
    assert!(core.exists("/made-in-a"));
    core.unmount();
}

/// Finding 5: a mount of a narrower subtree keeps what the journal says of
/// the files outside it: a later whole mount still has their local writes.
#[test]
fn finding_5_a_narrower_mount_keeps_the_local_writes_outside_it() {
    let mut core = Core::new(&[("/srv/a/x", b"ax".to_vec(), true), ("/srv/b/y", b"by".to_vec(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/srv/a/x", 0, 2).unwrap(), b"ax");
    assert_eq!(core.write("/srv/a/x", 2, b"-local"), Ok(6));
    core.unmount();
    core.mount_with(0, |r| r.subtree = Some("/srv/b".into())).unwrap();
    assert_eq!(core.read("/y", 0, 10).unwrap(), b"by");
    core.unmount();
    core.mount(0).unwrap();
    assert_eq!(core.state("/srv/a/x"), "modified");
    assert_eq!(core.read("/srv/a/x", 0, 100).unwrap(), b"ax-local");
    core.unmount();
}

/// Finding 7: a file the images record no size for, complete and verified,
/// then gone from the source, keeps its bytes at the next mount.
#[test]
fn finding_7_a_verified_file_without_a_recorded_size_survives_its_source_going() {
    let bytes = content("/log", 70_000);
    let mut core = Core::new(&[("/log", bytes.clone(), false), ("/other", b"o".to_vec(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/log", 0, 70_000).unwrap(), bytes);
    core.wait_state("/log", |s| s == "verified");
    core.unmount();
    std::fs::remove_file(core.source.join("log")).unwrap();
    core.mount(0).unwrap();
    assert_eq!(core.state("/log"), "verified");
    assert_eq!(core.read("/log", 0, 70_000).unwrap(), bytes);
    core.unmount();
}

/// Finding 7: a remount does not change the times of the checkpoint's files
/// and directories.
#[test]
fn finding_7_a_remount_keeps_the_times_of_the_checkpoint_files() {
    let mut core = Core::new(&[("/d/f", b"f".to_vec(), true)]);
    core.mount(0).unwrap();
    let times = |core: &Core| {
        ["/d", "/d/f"].map(|p| core.fs().getattr(core.ino(p)).map(|a| (a.mtime, a.atime, a.ctime)).unwrap())
    };
    let first = times(&core);
    core.unmount();
    std::thread::sleep(Duration::from_millis(1100));
    core.mount(0).unwrap();
    assert_eq!(times(&core), first);
    core.kill();
    core.mount(0).unwrap();
    assert_eq!(times(&core), first);
    core.unmount();
}

/// Finding 6: spill files are synced through the cache dir's descriptor,
/// never by a path: with the cache dir's path now leading elsewhere (a link
/// to a decoy), the decoy's files are never opened, and the journal still
/// claims only chunks that were synced where they were written.
#[test]
fn finding_6_spill_files_are_synced_through_descriptors_not_paths() {
    let bytes = content("/f", 200_000);
    let mut core = Core::new(&[("/f", bytes.clone(), true)]);
    core.mount(0).unwrap();
    let real = core.dir.path().join("cache.real");
    std::fs::rename(&core.cache, &real).unwrap();
    let decoy = core.dir.path().join("decoy");
    std::fs::create_dir_all(decoy.join("spill")).unwrap();
    let name = lazyfs::store::spill_name(Path::new("/f"));
    std::fs::write(decoy.join("spill").join(&name), vec![0; 200_000]).unwrap();
    std::os::unix::fs::symlink(&decoy, &core.cache).unwrap();

    // SAFETY: plain inotify calls on a descriptor this test owns.
    let inotify = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(inotify >= 0);
    let watched = std::ffi::CString::new(decoy.join("spill").to_str().unwrap()).unwrap();
    assert!(unsafe { libc::inotify_add_watch(inotify, watched.as_ptr(), libc::IN_OPEN) } >= 0);
    assert_eq!(core.read("/f", 0, 200_000).unwrap(), bytes);
    core.fs().fetcher().journal().flush().unwrap();
    let mut events = [0u8; 4096];
    let read = unsafe { libc::read(inotify, events.as_mut_ptr().cast(), events.len()) };
    unsafe { libc::close(inotify) };
    assert!(read < 0, "the decoy spill file was opened ({read} bytes of inotify events)");
    core.unmount();
    assert!(std::fs::read(real.join("journal")).unwrap().windows(2).any(|w| w == b"/f"), "chunks were journaled");
}

/// Finding 7: a file is counted open by its creator before anyone else can
/// see it: an unlink racing the create never takes a file its creator holds
/// open (its inode answers, its data file is there).
#[test]
fn finding_7_an_unlink_racing_a_create_never_takes_the_open_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut core = Core::new(&[("/d/f", b"f".to_vec(), true)]);
    core.mount(0).unwrap();
    let fs = core.fs().clone();
    let dir = core.ino("/d");
    let name = std::ffi::OsStr::new("new");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let unlinker = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = fs.unlink(dir, name);
            }
        })
    };
    let by = lazyfs::fs::Creator { uid: 0, gid: 0 };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut created = 0;
    while std::time::Instant::now() < deadline {
        let Ok((attr, _file)) = fs.create(dir, name, 0o644, by) else { continue };
        created += 1;
        let (tx, rx) = std::sync::mpsc::channel();
        fs.write(attr.ino, 0, b"x".to_vec(), false, Box::new(move |r| tx.send(r.map_err(|e| e.errno)).unwrap()));
        let written = rx.recv().unwrap();
        fs.release(attr.ino);
        assert_eq!(written, Ok(1), "create {created}: the file its creator holds open is gone");
    }
    stop.store(true, Ordering::Relaxed);
    unlinker.join().unwrap();
    assert!(created > 10, "only {created} creates");
    core.unmount();
}

/// A cache dir an older lazyfs filled (its journal names its owner by a
/// hash of the images and SOURCE, with no identity) is taken over as it is
/// by a mount of the same images and source: its local changes stay.
#[test]
fn a_journal_an_older_lazyfs_wrote_keeps_its_local_changes() {
    use lazyfs::store::journal::proto::{Header, JournalRecord, Local, LocalOp, journal_record::Kind};
    use prost::Message;
    let mut core = Core::new(&[("/d/f", b"f".to_vec(), true)]);
    let source_arg = core.request(0).source_arg;
    let (_, legacy) = lazyfs::identity::images_hash(&core.images, &source_arg, Path::new("/")).unwrap();
    let header = Header { version: 1, chunk_size: 16 << 10, owner: legacy, ..Header::default() };
    let made = Local { op: LocalOp::File.into(), path: b"d/kept".to_vec(), id: 0, ..Local::default() };
    let mut journal = Vec::new();
    for kind in [Kind::Header(header), Kind::Local(made)] {
        let body = JournalRecord { kind: Some(kind) }.encode_to_vec();
        prost::encoding::encode_varint(body.len() as u64, &mut journal);
        journal.extend(&body);
        journal.extend(&blake3::hash(&body).as_bytes()[..4]);
    }
    lazyfs::store::CacheDir::open_cache(&core.cache).unwrap();
    std::fs::create_dir_all(core.cache.join("local")).unwrap();
    std::fs::write(core.cache.join("local/0"), b"older").unwrap();
    std::fs::write(core.cache.join("journal"), &journal).unwrap();

    // Another SOURCE than the one the older journal names: refused, nothing changed.
    let refused = core.mount_with(0, |r| r.source_arg = "/elsewhere".into()).map(|()| core.unmount());
    assert!(refused.unwrap_err().to_string().contains("--discard-local-changes"));
    assert_eq!(std::fs::read(core.cache.join("journal")).unwrap(), journal);
    core.mount(0).unwrap();
    assert_eq!(core.read("/d/kept", 0, 10).unwrap(), b"older");
    core.unmount();
}

/// A mount on a cache disk too full for a new copy of the journal goes on
/// appending to the old one (what it holds is this mount's): it mounts, its
/// changes are refused until there is room, then taken, and all of it is
/// there after `kill -9` and a remount.
#[test]
fn a_mount_on_a_full_cache_disk_appends_to_the_journal_it_cannot_copy() {
    let mut core = Core::new(&[("/d/f", b"f".to_vec(), true)]);
    let tmpfs = Tmpfs::mount(&core.dir.path().join("tmpfs"), "1m");
    core.cache = tmpfs.0.join("cache");
    core.mount(0).unwrap();
    for i in 0..300 {
        core.create(&format!("/d/{}", long_name(i))).unwrap();
    }
    core.kill();
    let journal_len = std::fs::metadata(core.cache.join("journal")).unwrap().len();
    assert!(journal_len > 60_000, "{journal_len}");
    let filler = tmpfs.fill();

    core.mount(0).expect("mounted without room for a new journal");
    assert!(core.exists(&format!("/d/{}", long_name(299))));
    // What is left of the journal's reserve takes a few changes, then they are refused.
    let mut made = 0;
    let refused = loop {
        match core.create(&format!("/d/on-full-{made}")) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 100, "a full disk took every change");
    };
    assert_eq!(refused, libc::ENOSPC);
    std::fs::remove_file(filler).unwrap();
    core.create("/d/taken").unwrap();
    core.kill();
    core.mount(0).unwrap();
    assert!(core.exists("/d/taken") && !core.exists(&format!("/d/on-full-{made}")));
    assert!((0..made).all(|i| core.exists(&format!("/d/on-full-{i}"))));
    assert!(core.exists(&format!("/d/{}", long_name(0))));
    core.unmount();
}

/// Prepares `request` with a source whose opening kills the process (a
/// panic the test catches): a crash while a mount connects, after it has
/// decided what to do with the cache dir.
fn crash_while_connecting(request: lazyfs::mount::MountRequest) {
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lazyfs::mount::prepare_with(request, || panic!("killed while connecting to the source"))
    }));
    assert!(died.is_err(), "the mount connected to its source");
}

/// Review of issue 21: a mount of other images starts the cache dir afresh
/// (nothing was changed locally); one killed while it connects, after the
/// spill files were cleared, must not leave a journal that still claims
/// their chunks: a remount of the first images reads their bytes, never
/// zeros.
#[test]
fn a_crash_while_starting_afresh_never_serves_cleared_chunks() {
    let data = content("/app/data", 8 << 20);
    let mut core = Core::new(&[("/app/data", data.clone(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.read("/app/data", 0, 4096).unwrap(), data[..4096]);
    core.unmount();

    let other = core.dir.path().join("other-images");
    Core::write_checkpoint(&other, &core.source, &[("/app/other", content("/app/other", 10), true)]);
    let mut request = core.request(0);
    request.imgdir = other;
    crash_while_connecting(request);

    core.mount(0).unwrap();
    assert!(core.read("/app/data", 0, 4096).unwrap() == data[..4096], "the first chunk, not zeros");
    core.unmount();
}

/// Review of issue 21: `--discard-local-changes` drops the local writes to a
/// checkpoint file (its spill file starts over) and the files made locally.
/// A mount killed while it connects, after that, must not leave a journal
/// that still calls the emptied spill file the file: a remount reads the
/// checkpoint's bytes, never zeros, and no local file comes back empty.
#[test]
fn a_crash_while_discarding_local_changes_never_serves_zeros() {
    let data = content("/app/data", 100_000);
    let mut core = Core::new(&[("/app/data", data.clone(), true)]);
    core.mount(0).unwrap();
    assert_eq!(core.write("/app/data", 0, b"changed"), Ok(7));
    core.create("/app/new").unwrap();
    assert_eq!(core.write("/app/new", 0, b"new bytes"), Ok(9));
    core.unmount();

    let mut request = core.request(0);
    request.discard_local_changes = true;
    crash_while_connecting(request);

    core.mount(0).unwrap();
    let read = core.read("/app/data", 0, 100_000).unwrap();
    let mut changed = data.clone();
    changed[..7].copy_from_slice(b"changed");
    assert!(read == data || read == changed, "the checkpoint's bytes or the local write, not zeros");
    if core.exists("/app/new") {
        assert_eq!(core.read("/app/new", 0, 100).unwrap(), b"new bytes", "a local file kept whole or not at all");
    }
    core.unmount();
}

/// Every path below the root of `core` with what a replay must give back:
/// kind, permissions, owner, size, bytes or link target, xattrs, links.
fn namespace_state(core: &Core) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::ffi::OsStrExt;
    let fs = core.fs();
    let mut state = std::collections::BTreeMap::new();
    let mut dirs = vec![("".to_string(), lazyfs::namespace::ROOT_INO)];
    while let Some((dir, ino)) = dirs.pop() {
        for (child, kind, name) in fs.readdir(ino).unwrap().into_iter().skip(2) {
            let path = format!("{dir}/{}", name.to_string_lossy());
            let attr = fs.getattr(child).unwrap();
            let what = match kind {
                lazyfs::fs::Kind::File => format!("{:?}", core.read(&path, 0, attr.size as u32 + 1).unwrap()),
                lazyfs::fs::Kind::Symlink => format!("-> {:?}", fs.readlink(child).unwrap()),
                lazyfs::fs::Kind::Dir => {
                    dirs.push((path.clone(), child));
                    String::new()
                }
                lazyfs::fs::Kind::Fifo => "fifo".into(),
            };
            let xattrs: Vec<String> = fs
                .listxattr(child)
                .unwrap()
                .split(|&b| b == 0)
                .filter(|n| !n.is_empty())
                .map(|n| {
                    let value = fs.getxattr(child, std::ffi::OsStr::from_bytes(n)).unwrap();
                    format!("{}={value:?}", String::from_utf8_lossy(n))
                })
                .collect();
            let line = format!(
                "{kind:?} {:o} {}:{} {} links {} {what} {xattrs:?}",
                attr.perm, attr.uid, attr.gid, attr.size, attr.nlink
            );
            state.insert(path, line);
        }
    }
    state
}

/// The local changes the journal of `cache` holds.
fn local_records(cache: &Path) -> usize {
    let dir = lazyfs::store::CacheDir::open_existing_cache(cache).unwrap();
    lazyfs::store::journal::load(&dir).unwrap().unwrap().local.len()
}

/// Review of issue 21 (known gap): the local layer's records were never
/// compacted, so a mount's replay grew with every change ever made. At
/// unmount the journal now holds what makes the local layer as it is: the
/// churn of files made and removed since (rotated logs, temporary files,
/// renames over them, directories made and removed, attributes set again)
/// is left out, and a remount shows the very same tree. A crash at each
/// step of that rewrite (a partial or whole new copy beside the old
/// journal, the copy renamed over it) shows the same tree too.
#[test]
fn a_compacted_journal_replays_to_the_same_local_layer_at_each_step_of_its_rewrite() {
    use lazyfs::fs::SetAttr;
    const BY: lazyfs::fs::Creator = lazyfs::fs::Creator { uid: 0, gid: 0 };
    let data = content("/app/data", 40_000);
    let mut core = Core::new(&[("/app/data", data, true), ("/app/conf", b"conf".to_vec(), true)]);
    core.mount(0).unwrap();
    let fs = core.fs().clone();
    let chmod = |path: &str, mode: u32| {
        let (tx, rx) = std::sync::mpsc::channel();
        let change = SetAttr { mode: Some(mode), ..SetAttr::default() };
        fs.setattr(core.ino(path), change, Box::new(move |r| tx.send(r.map(drop).map_err(|e| e.errno)).unwrap()));
        rx.recv().unwrap().unwrap();
    };
    let name = |path: &str| std::ffi::OsString::from(Path::new(path).file_name().unwrap());
    core.mkdir("/app/logs").unwrap();
    core.mkdir("/app/tmp").unwrap();
    for i in 0..300 {
        // Write a temporary file, rename it over the current one (an atomic save).
        let tmp = format!("/app/tmp/t{i} 'odd' $name;\nline");
        core.create(&tmp).unwrap();
        assert!(core.write(&tmp, 0, format!("version {i}").as_bytes()).is_ok());
        core.rename(&tmp, "/app/logs/current").unwrap();
        chmod("/app/logs/current", 0o600 + (i % 8));
        fs.setxattr(core.ino("/app/logs/current"), &name("user.v"), format!("{i}").as_bytes(), 0).unwrap();
        if i % 10 == 9 {
            // Rotate: keep the last two.
            core.rename("/app/logs/current", &format!("/app/logs/old{}", i / 10)).unwrap();
            if i / 10 >= 2 {
                core.unlink(&format!("/app/logs/old{}", i / 10 - 2)).unwrap();
            }
            core.mkdir(&format!("/app/run{i}")).unwrap();
            fs.rmdir(core.ino("/app"), &name(&format!("/app/run{i}"))).unwrap();
            fs.symlink(core.ino("/app"), &name("/app/latest"), Path::new("logs"), BY).unwrap();
            fs.unlink(core.ino("/app"), &name("/app/latest")).unwrap();
        }
        chmod("/app/conf", 0o640);
    }
    // A checkpoint file moved through a directory made and removed since,
    // a hard link that outlives its first name, a FIFO.
    core.mkdir("/app/via").unwrap();
    core.rename("/app/data", "/app/via/data").unwrap();
    core.rename("/app/via/data", "/app/data2").unwrap();
    fs.rmdir(core.ino("/app"), &name("/app/via")).unwrap();
    core.create("/app/first").unwrap();
    assert!(core.write("/app/first", 0, b"linked").is_ok());
    fs.link(core.ino("/app/first"), core.ino("/app"), &name("/app/second")).unwrap();
    core.unlink("/app/first").unwrap();
    fs.mknod(core.ino("/app"), &name("/app/pipe"), libc::S_IFIFO | 0o600, BY).unwrap();
    let expected = namespace_state(&core);
    core.kill();
    let history = local_records(&core.cache);
    let before = std::fs::read(core.cache.join("journal")).unwrap();

    let started = std::time::Instant::now();
    core.mount(0).unwrap();
    let replayed_whole = started.elapsed();
    assert_eq!(namespace_state(&core), expected, "the whole history replayed");
    core.unmount();
    let compacted = local_records(&core.cache);
    let after = std::fs::read(core.cache.join("journal")).unwrap();
    assert!(compacted * 20 < history, "{compacted} of {history} local records kept");
    let started = std::time::Instant::now();
    core.mount(0).unwrap();
    // A figure for the record (`-- --nocapture`), not a check.
    eprintln!("remount: {history} local records {replayed_whole:?}, compacted to {compacted} {:?}", started.elapsed());
    assert_eq!(namespace_state(&core), expected, "the compacted journal replayed");
    core.kill();

    // Killed while writing the new copy (partly, or whole but not renamed
    // yet): the old journal stands. Killed after the rename: the new one.
    for (journal, tmp) in [(&before, Some(&after[..after.len() / 2])), (&before, Some(&after[..])), (&after, None)] {
        std::fs::write(core.cache.join("journal"), journal).unwrap();
        if let Some(tmp) = tmp {
            std::fs::write(core.cache.join("journal.tmp"), tmp).unwrap();
        }
        core.mount(0).unwrap();
        assert_eq!(namespace_state(&core), expected, "journal of {} bytes", journal.len());
        core.kill();
    }
}

/// Review of issue 21: `--subtree /srv/a/` (or `/srv/./a`) is the subtree
/// `/srv/a`: the local changes made under one spelling are there under the
/// other, not refused with advice to drop them (`--discard-local-changes`).
#[test]
fn another_spelling_of_the_subtree_keeps_the_local_changes() {
    let mut core = Core::new(&[("/srv/a/x", b"ax".to_vec(), true), ("/srv/b/y", b"by".to_vec(), true)]);
    core.mount_with(0, |r| r.subtree = Some("/srv/a".into())).unwrap();
    core.create("/made-in-a").unwrap();
    core.unmount();
    for spelling in ["/srv/a/", "/srv/./a", "//srv/a"] {
        core.mount_with(0, |r| r.subtree = Some(spelling.into())).unwrap_or_else(|e| panic!("{spelling}: {e}"));
        assert!(core.exists("/made-in-a") && core.exists("/x"), "{spelling}");
        core.unmount();
    }
}

/// Review of issue 21: an address written another way is the same source:
/// `[::1]`, `[0:0:0:0:0:0:0:1]`, `[0::0001]` name one host, so one cache
/// dir by default, not a new one that shows none of the local changes made
/// through the first spelling; through `ssh` (whose `-G` writes addresses
/// one way) and through libssh2 alike.
#[test]
fn an_address_written_another_way_is_the_same_source_and_cache_dir() {
    use lazyfs::source::{SourceSpec, SshOverrides, Transport, spelling};
    let root = Path::new("/srv/app");
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    for transport in [Transport::Openssh, Transport::Libssh2] {
        let overrides = SshOverrides { transport, ..SshOverrides::default() };
        let spelled = |target: &str| {
            let spec = SourceSpec::parse(target, &overrides, Some(home.path())).unwrap();
            spelling(&spec, root)
        };
        same_spellings(&spelled);
    }
}

fn same_spellings(spelled: &dyn Fn(&str) -> String) {
    for (one, other) in [
        ("root@[::1]:2222", "root@[0:0:0:0:0:0:0:1]:2222"),
        ("ssh://root@[::1]:2222", "root@[0::0001]:2222"),
        ("root@[fe80::1]:22", "root@[FE80:0::1]"),
    ] {
        assert_eq!(spelled(one), spelled(other), "{one} and {other}");
        let images = Path::new("/images");
        assert_eq!(
            lazyfs::mount::default_cache_dir(images, &spelled(one)).unwrap(),
            lazyfs::mount::default_cache_dir(images, &spelled(other)).unwrap()
        );
    }
}

/// Review of issue 21: a file made through the mount keeps, after `kill -9`
/// and a remount, the modification time its last write gave it (a backup
/// or `make` comparing times must not take it for unchanged), and one set
/// explicitly after that write.
#[test]
fn a_local_file_keeps_the_time_of_its_last_write_across_a_remount() {
    use lazyfs::fs::SetAttr;
    let mut core = Core::new(&[("/app/data", b"data".to_vec(), true)]);
    core.mount(0).unwrap();
    core.create("/app/written").unwrap();
    core.create("/app/set").unwrap();
    let made = core.fs().getattr(core.ino("/app/written")).unwrap().mtime;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(core.write("/app/written", 0, b"later"), Ok(5));
    assert_eq!(core.write("/app/set", 0, b"later"), Ok(5));
    let written = core.fs().getattr(core.ino("/app/written")).unwrap().mtime;
    assert!(written > made, "a write moves the time on");
    let past = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let (tx, rx) = std::sync::mpsc::channel();
    let change = SetAttr { mtime: Some(past), ..SetAttr::default() };
    core.fs().setattr(
        core.ino("/app/set"),
        change,
        Box::new(move |r| tx.send(r.map(drop).map_err(|e| e.errno)).unwrap()),
    );
    rx.recv().unwrap().unwrap();
    core.kill();

    core.mount(0).unwrap();
    let mtime = |path: &str| core.fs().getattr(core.ino(path)).unwrap().mtime;
    let after = mtime("/app/written");
    let off = after.duration_since(written).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_millis(20), "the write's time, not the creation's: {after:?} vs {written:?}");
    assert_eq!(mtime("/app/set"), past, "a time set after the write");
    core.unmount();
}

/// Review of issue 21 (known gap): a checkpoint's file written through the
/// mount keeps, after `kill -9` and a remount, the modification time of
/// its last write, not the time every checkpoint file shows.
#[test]
fn a_checkpoint_file_written_locally_keeps_the_time_of_its_last_write() {
    let mut core = Core::new(&[("/app/data", content("/app/data", 50_000), true)]);
    core.mount(0).unwrap();
    let before = core.fs().getattr(core.ino("/app/data")).unwrap().mtime;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(core.write("/app/data", 10, b"changed"), Ok(7));
    let written = core.fs().getattr(core.ino("/app/data")).unwrap().mtime;
    assert!(written > before, "a write moves the time on");
    core.kill();

    core.mount(0).unwrap();
    let after = core.fs().getattr(core.ino("/app/data")).unwrap().mtime;
    let off = after.duration_since(written).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_millis(20), "the write's time: {after:?} vs {written:?}");
    core.unmount();
}
