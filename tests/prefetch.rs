//! Prefetch, verification, the journal and passthrough, against a real sshd.

mod common;

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

use common::mount::{Source, TestEnv, content, dataset};
use common::sshd::Sshd;
use lazyfs::images::write::{DumpFile, write_dump};
use serde_json::Value;

fn file<'a>(status: &'a Value, path: &str) -> &'a Value {
    status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap_or_else(|| panic!("{path}"))
}

fn ssh<'a>(sshd: &'a Sshd, env: &TestEnv) -> Source<'a> {
    Source::Ssh { sshd, root: env.path("source") }
}

#[test]
fn every_file_arrives_and_verifies_with_and_without_a_manifest() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files = [("/p/a", 0), ("/p/b", 1), ("/p/c", 65_536), ("/p/d", 3_000_001), ("/p/odd name $(x)", 777)];
    dataset(&env.path("source"), &env.path("images"), &files);

    let plain = env.mount("plain", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = plain.wait_complete();
    for (path, len) in files {
        let f = file(&status, path);
        assert_eq!(f["state"], "verified", "{f}");
        assert_eq!(f["verified_against"], "received");
        assert_eq!(f["blake3"], blake3::hash(&content(path, len)).to_hex().as_str());
        assert_eq!(std::fs::read(plain.at(path)).unwrap(), content(path, len));
    }
    assert_eq!(status["bytes_present"], status["bytes_total"]);
    drop(plain);

    let out =
        env.run(&["manifest", env.path("images").to_str().unwrap(), "--root", env.path("source").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.path("images/lazyfs.manifest").exists());
    let checked = env.mount("manifest", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = checked.wait_complete();
    for (path, len) in files {
        let f = file(&status, path);
        assert_eq!(f["verified_against"], "manifest", "{f}");
        assert_eq!(f["blake3"], blake3::hash(&content(path, len)).to_hex().as_str());
    }
}

#[test]
fn completion_follows_the_prefetch_order() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files = [("/o/m", 300_000), ("/o/s", 1_000), ("/o/l", 2_000_000), ("/o/xs", 10)];
    dataset(&env.path("source"), &env.path("images"), &files);
    for (order, expected) in [
        ("smallest-first", ["/o/xs", "/o/s", "/o/m", "/o/l"]),
        ("largest-first", ["/o/l", "/o/m", "/o/s", "/o/xs"]),
        ("image", ["/o/m", "/o/s", "/o/l", "/o/xs"]),
    ] {
        let mount = env.mount(
            order,
            &env.path("images"),
            &ssh(&sshd, &env),
            &["--prefetch", "-j", "1", "--prefetch-order", order],
        );
        let status = mount.wait_complete();
        let mut done: Vec<(f64, String)> = status["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["completed_s"].as_f64().unwrap(), f["path"].as_str().unwrap().to_string()))
            .collect();
        done.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let got: Vec<&str> = done.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(got, expected, "{order}");
    }
}

#[test]
fn a_file_being_read_jumps_the_prefetch_queue() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let mut files: Vec<(String, usize)> = (0..60).map(|i| (format!("/q/small{i:02}"), 1 << 20)).collect();
    files.push(("/q/zbig".into(), 32 << 20));
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "1"]);

    // Smallest first: the big file is last in the queue. A reader of it gets
    // its bytes at once, and the file moves to the front.
    let mut buf = vec![0u8; 4096];
    File::open(mount.at("/q/zbig")).unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(buf, content("/q/zbig", 4096));
    let status = mount.status();
    let small_done = status["files"].as_array().unwrap().iter().filter(|f| f["state"] == "verified").count();
    assert!(small_done < 60, "the prefetcher had already finished the small files: {small_done}");

    let status = mount.wait_complete();
    let big_done = file(&status, "/q/zbig")["completed_s"].as_f64().unwrap();
    let last_small = (0..60).map(|i| file(&status, &format!("/q/small{i:02}"))["completed_s"].as_f64().unwrap());
    assert!(last_small.clone().any(|t| t > big_done), "the big file was not moved ahead");
    assert!(file(&status, "/q/zbig")["bytes_on_demand"].as_u64().unwrap() >= 4096);
}

#[test]
fn verified_files_are_served_with_the_source_gone() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    let files = [("/v/a", 5_000_000), ("/v/b", 123_456)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    mount.wait_complete();
    sshd.stop();

    for (path, len) in files {
        assert_eq!(std::fs::read(mount.at(path)).unwrap(), content(path, len), "{path}");
    }
    // Read-only opens of verified files go to the spill file (FUSE
    // passthrough): lazyfs itself sees no reads of them.
    let status = mount.status();
    let reads: u64 = status["files"].as_array().unwrap().iter().map(|f| f["reads"].as_u64().unwrap()).sum();
    assert_eq!(reads, 0, "reads went through lazyfs: {status}");
}

/// `criu restore` opens a file the checkpoint had open read-write both
/// read-only and read-write: once it is verified, the second open must not
/// meet a passthrough open (the kernel answers ETXTBSY to a cached open beside
/// one).
#[test]
fn a_verified_file_the_checkpoint_had_open_for_writing_opens_both_ways() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let path = "/w/state.db";
    let on_disk = env.path("source/w/state.db");
    std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
    std::fs::write(&on_disk, content(path, 70_000)).unwrap();
    let record = DumpFile { flags: libc::O_RDWR as u32, ..DumpFile::new(path, 70_000) };
    write_dump(&env.path("images"), &[record]).unwrap();
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    mount.wait_complete();

    let mut read_only = File::open(mount.at(path)).unwrap();
    let read_write = std::fs::OpenOptions::new().read(true).write(true).open(mount.at(path));
    assert!(read_write.is_ok(), "{read_write:?}");
    let mut bytes = Vec::new();
    read_only.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, content(path, 70_000));
}

#[test]
fn a_killed_mount_resumes_fetching_only_the_missing_chunks() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files = [("/r/big", 160 << 20), ("/r/other", 5 << 20)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let total: u64 = files.iter().map(|(_, l)| *l as u64).sum();
    let out =
        env.run(&["manifest", env.path("images").to_str().unwrap(), "--root", env.path("source").to_str().unwrap()]);
    assert!(out.status.success());

    // What the journal says is durable, in bytes.
    let journaled = |cache: &std::path::Path| -> u64 {
        let records = lazyfs::store::journal::read(&lazyfs::store::CacheDir::open_existing_cache(cache).unwrap())
            .unwrap()
            .unwrap_or_default();
        records
            .values()
            .flat_map(|r| r.present.iter().map(move |run| (run.clone(), r.size)))
            .map(|(run, size)| (run.end * lazyfs::store::CHUNK_SIZE).min(size) - run.start * lazyfs::store::CHUNK_SIZE)
            .sum()
    };
    let first = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journaled(&first.cache) < total / 4 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill_all();
    std::thread::sleep(Duration::from_millis(200));
    let restored = journaled(&first.cache);
    assert!(restored > 0 && restored < total, "restored {restored} of {total}");

    let second = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = second.wait_complete();
    let fetched = status["bytes_prefetched"].as_u64().unwrap() + status["bytes_on_demand"].as_u64().unwrap();
    assert_eq!(fetched, total - restored, "fetched again more than what was missing");
    for (path, len) in files {
        assert_eq!(file(&status, path)["state"], "verified");
        assert!(std::fs::read(second.at(path)).unwrap() == content(path, len));
    }
    drop(first);
}

#[test]
fn a_source_file_changed_after_the_manifest_is_never_served() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/c/changed", 200_000), ("/c/same", 1000)]);
    let out =
        env.run(&["manifest", env.path("images").to_str().unwrap(), "--root", env.path("source").to_str().unwrap()]);
    assert!(out.status.success());
    // Same size, one byte different.
    let mut bytes = std::fs::read(env.path("source/c/changed")).unwrap();
    bytes[150_000] ^= 1;
    std::fs::write(env.path("source/c/changed"), &bytes).unwrap();

    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = mount.wait_complete();
    let changed = file(&status, "/c/changed");
    assert_eq!(changed["state"], "failed", "{changed}");
    assert!(changed["error"].as_str().unwrap().contains("manifest"));
    let err = std::fs::read(mount.at("/c/changed")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(file(&status, "/c/same")["state"], "verified");
}

#[test]
fn without_a_manifest_a_size_change_fails_the_file() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/s/grew", 10_000)]);
    std::fs::write(env.path("source/s/grew"), content("/s/grew", 12_000)).unwrap();
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = mount.wait_complete();
    let grew = file(&status, "/s/grew");
    assert_eq!(grew["state"], "failed");
    assert!(grew["error"].as_str().unwrap().contains("changed since the checkpoint"), "{grew}");
}

#[test]
fn a_write_completes_the_file_first_and_prefetch_never_overwrites_it() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/w/big", 20 << 20), ("/w/other", 8 << 20)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "2"]);
    let mut f = File::options().write(true).open(mount.at("/w/big")).unwrap();
    std::io::Write::write_all(&mut f, b"LOCAL").unwrap();
    drop(f);
    let status = mount.wait_complete();
    assert_eq!(file(&status, "/w/big")["state"], "modified");
    let mut expected = content("/w/big", 20 << 20);
    expected[..5].copy_from_slice(b"LOCAL");
    assert!(std::fs::read(mount.at("/w/big")).unwrap() == expected);
    assert!(std::fs::read(env.path("source/w/big")).unwrap() == content("/w/big", 20 << 20));
}

#[test]
fn verify_finds_a_damaged_cache_and_a_remount_fetches_it_again() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files = [("/d/one", 300_000), ("/d/two", 70_000)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    mount.wait_complete();
    let out = env.run(&["verify", mount.mountpoint.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(mount.umount().status.success());

    // Flip a byte of one cached file.
    let spill = lazyfs::store::spill_path(&mount.cache, std::path::Path::new("/d/one"));
    let mut bytes = std::fs::read(&spill).unwrap();
    bytes[12_345] ^= 0x40;
    std::fs::write(&spill, &bytes).unwrap();
    let out = env.run(&["verify", "--cache-dir", mount.cache.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(stdout.contains("MISMATCH /d/one"), "{stdout}");

    let again = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = again.wait_complete();
    assert_eq!(file(&status, "/d/one")["bytes_prefetched"], 300_000);
    assert_eq!(file(&status, "/d/two")["bytes_prefetched"], 0);
    assert!(std::fs::read(again.at("/d/one")).unwrap() == content("/d/one", 300_000));
}
