//! The fault suite: dropped connections, changing sources, killed daemons,
//! damaged caches, hostile images, access control, and load. Every test
//! stops by itself; none asserts a speed, only bounds that mean "no hang".

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::mount::{Mount, Source, TestEnv, content, dataset};
use common::sshd::Sshd;
use serde_json::Value;

fn wait_state(mount: &Mount, done: impl Fn(&Value) -> bool, what: &str) -> Value {
    mount.wait_for(done, what)
}

fn complete(mount: &Mount) -> Value {
    wait_state(mount, |s| s["state"] == "complete", "not complete")
}

fn ssh<'a>(sshd: &'a Sshd, env: &TestEnv) -> Source<'a> {
    Source::Ssh { sshd, root: env.path("source") }
}

fn daemon_rss_kib(pid: i64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_dropped_connection_mid_prefetch_is_reconnected_and_resumed() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    let files = [("/n/big", 64 << 20), ("/n/small", 10_000)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "2"]);
    wait_state(&mount, |s| s["bytes_present"].as_u64().unwrap() > 8 << 20, "no progress");

    sshd.stop();
    let degraded = wait_state(&mount, |s| s["state"] == "degraded", "never degraded");
    assert!(degraded["degraded_reason"].as_str().unwrap().contains("reconnecting"), "{degraded}");
    std::thread::sleep(Duration::from_millis(500));
    sshd.restart();

    let status = complete(&mount);
    assert_eq!(status["degraded_reason"], Value::Null);
    for (path, len) in files {
        let f = status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap();
        assert_eq!(f["state"], "verified", "{f}");
        assert!(std::fs::read(mount.at(path)).unwrap() == content(path, len));
    }
    // Resumed, not restarted: nothing was fetched twice.
    assert_eq!(
        status["bytes_prefetched"].as_u64().unwrap() + status["bytes_on_demand"].as_u64().unwrap(),
        status["bytes_total"].as_u64().unwrap()
    );
}

#[test]
fn a_reader_blocked_on_a_lost_source_gets_its_bytes_when_it_returns() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/b/file", 4 << 20)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &[]);
    sshd.stop();
    let path = mount.at("/b/file");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 100_000];
        File::open(path).unwrap().read_exact_at(&mut buf, 1_000_000).map(|()| buf)
    });
    std::thread::sleep(Duration::from_millis(800));
    assert!(!reader.is_finished(), "the read did not wait for the source");
    sshd.restart();
    let buf = reader.join().unwrap().unwrap();
    assert!(buf == content("/b/file", 1_100_000)[1_000_000..]);
}

#[test]
fn a_reader_gets_eio_once_the_reconnect_timeout_passes() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/t/file", 1 << 20)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--reconnect-timeout", "2"]);
    sshd.stop();
    let started = Instant::now();
    let err = std::fs::read(mount.at("/t/file")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(started.elapsed() < Duration::from_secs(30), "no bound on the wait: {:?}", started.elapsed());
    // The file is not failed for good: once the source is back, it reads.
    sshd.restart();
    assert!(std::fs::read(mount.at("/t/file")).unwrap() == content("/t/file", 1 << 20));
}

#[test]
fn a_file_changing_during_its_transfer_is_never_verified_from_a_mix() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let len = 48 << 20;
    dataset(&env.path("source"), &env.path("images"), &[("/x/live", len)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "4"]);
    // A reader fills the kernel's page cache with the first bytes.
    let mut head = vec![0u8; 1 << 20];
    File::open(mount.at("/x/live")).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head == content("/x/live", 1 << 20));
    wait_state(&mount, |s| s["bytes_present"].as_u64().unwrap() > 8 << 20, "no progress");
    // Same size, new bytes, a new mtime: swapped in atomically.
    let new = content("/x/live-v2", len);
    let tmp = env.path("source/x/.live.tmp");
    std::fs::write(&tmp, &new).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    File::options().write(true).open(&tmp).unwrap().set_modified(later).unwrap();
    std::fs::rename(&tmp, env.path("source/x/live")).unwrap();

    let status = complete(&mount);
    let file = &status["files"][0];
    assert_eq!(file["state"], "verified", "{file}");
    let served = std::fs::read(mount.at("/x/live")).unwrap();
    let old = content("/x/live", len);
    assert!(served == new || served == old, "a mix of old and new bytes was verified");
    assert_eq!(file["blake3"], blake3::hash(&served).to_hex().as_str());
}

#[test]
fn kill_9_at_random_moments_then_the_next_mount_resumes_and_verifies() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files: Vec<(String, usize)> = (0..12).map(|i| (format!("/k/f{i:02}"), (i + 1) * 1_500_000)).collect();
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let out =
        env.run(&["manifest", env.path("images").to_str().unwrap(), "--root", env.path("source").to_str().unwrap()]);
    assert!(out.status.success());
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..6 {
        let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "2"]);
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::thread::sleep(Duration::from_millis(20 + state % 300));
        mount.kill_all();
        std::mem::forget(mount); // Its mount is stale now: the next mount must clear it.
    }
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let status = complete(&mount);
    for (path, len) in &files {
        let f = status["files"].as_array().unwrap().iter().find(|f| f["path"] == path.as_str()).unwrap();
        assert_eq!(f["state"], "verified");
        assert_eq!(f["verified_against"], "manifest");
        assert!(std::fs::read(mount.at(path)).unwrap() == content(path, *len), "{path}");
    }
}

#[test]
fn a_damaged_journal_refuses_the_mount_until_recovered() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/j/a", 500_000)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    complete(&mount);
    assert!(mount.umount().status.success());
    let journal = mount.cache.join("journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&journal, &bytes).unwrap();

    let refused = env.try_mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch"]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{message}");
    assert!(message.contains(&journal.display().to_string()) && message.contains("--recover-journal"), "{message}");
    assert_eq!(std::fs::read(&journal).unwrap(), bytes, "nothing changed");

    let again = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "--recover-journal"]);
    complete(&again);
    assert!(std::fs::read(again.at("/j/a")).unwrap() == content("/j/a", 500_000));
    let kept = std::fs::read_dir(&again.cache).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name());
    assert!(kept.into_iter().any(|n| n.to_string_lossy().starts_with("journal.damaged-")), "the damaged journal kept");
}

#[test]
fn hostile_images_escape_nothing_and_run_nothing() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let marker = std::path::Path::new("/tmp/lazyfs-pwned");
    let _ = std::fs::remove_file(marker);
    // The old host's files for the servable names of the `edge` fixture.
    let source = env.path("source");
    for (name, len) in [
        ("/data/with space.txt", 10),
        ("/data/quote's \"dq\".txt", 11),
        ("/data/$HOME;rm -rf ~;`id`", 12),
        ("/data/new\nline.txt", 13),
        ("/tmp/$(touch /tmp/lazyfs-pwned)", 14),
        ("/data/ünïcødé.txt", 15),
    ] {
        let on_disk = source.join(name.trim_start_matches('/'));
        std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
        std::fs::write(on_disk, content(name, len)).unwrap();
    }
    let images = common::fixtures().join("synthetic/edge");
    let mount = env.mount("m", &images, &Source::Ssh { sshd: &sshd, root: source.clone() }, &["--prefetch"]);
    wait_state(&mount, |s| s["state"] == "complete", "not complete");
    for (name, len) in
        [("/tmp/$(touch /tmp/lazyfs-pwned)", 14), ("/data/$HOME;rm -rf ~;`id`", 12), ("/data/new\nline.txt", 13)]
    {
        assert_eq!(std::fs::read(mount.at(name)).unwrap(), content(name, len), "{name:?}");
    }
    assert!(!marker.exists(), "a name was run as a command");
    // Refused names are not in the mount; nothing lands outside it.
    let top: Vec<String> =
        std::fs::read_dir(&mount.mountpoint).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!top.iter().any(|n| n == "relative" || n == "etc"), "{top:?}");
    assert!(!env.path("mnt/etc").exists() && !mount.mountpoint.join("data/..").join("etc/passwd").exists());
    // The cache holds hashes, never names.
    for entry in std::fs::read_dir(mount.cache.join("spill")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(name.len() == 32 && name.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
    }
}

#[test]
fn a_huge_recorded_size_is_refused_without_allocating() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.path("source/h")).unwrap();
    std::fs::write(env.path("source/h/ok"), b"fine").unwrap();
    let records = vec![
        lazyfs::images::write::DumpFile::new("/h/huge", 1 << 62),
        lazyfs::images::write::DumpFile::new("/h/ok", 4),
    ];
    lazyfs::images::write::write_dump(&env.path("images"), &records).unwrap();
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let status = mount.status();
    let huge = status["files"].as_array().unwrap().iter().find(|f| f["path"] == "/h/huge").unwrap();
    assert_eq!(huge["state"], "failed");
    assert!(huge["error"].as_str().unwrap().contains("more than the cache filesystem holds"), "{huge}");
    assert_eq!(std::fs::read(mount.at("/h/ok")).unwrap(), b"fine");
    assert!(daemon_rss_kib(status["pid"].as_i64().unwrap()) < 100 * 1024);
}

#[test]
fn access_control() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/a/secret", 100)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&mount.cache), 0o700);
    assert_eq!(mode(&mount.cache.join("control.sock")), 0o600);
    assert_eq!(mode(&mount.at("/a/secret")), 0o644);
    // Without --allow-other, another user cannot even look into the mount.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(mount.at("/a/secret"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "user nobody read the mount");
}

#[test]
fn thirty_two_readers_during_prefetch_read_exact_bytes_and_never_hang() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files: Vec<(String, usize)> = (0..200).map(|i| (format!("/l/f{i:03}"), 64_000 + i * 9_973)).collect();
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "2"]);
    let pid = mount.status()["pid"].as_i64().unwrap();
    let rss_before = daemon_rss_kib(pid);
    let seconds: u64 = std::env::var("LAZYFS_LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let until = Instant::now() + Duration::from_secs(seconds);
    let expected: Vec<Vec<u8>> = files.iter().map(|(p, l)| content(p, *l)).collect();
    let (reads, slowest) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32u64)
            .map(|reader| {
                let (mount, files, expected) = (&mount, &files, &expected);
                scope.spawn(move || {
                    let mut state = reader.wrapping_mul(0x9E3779B97F4A7C15) | 1;
                    let (mut reads, mut slowest) = (0u64, Duration::ZERO);
                    while Instant::now() < until {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let index = (state % 200) as usize;
                        let len = expected[index].len();
                        let offset = (state >> 8) as usize % len;
                        let size = 1 + (state >> 32) as usize % 100_000;
                        let mut buf = vec![0u8; size];
                        let started = Instant::now();
                        let file = File::open(mount.at(&files[index].0)).unwrap();
                        let n = file.read_at(&mut buf, offset as u64).unwrap();
                        slowest = slowest.max(started.elapsed());
                        assert!(buf[..n] == expected[index][offset..offset + n], "wrong bytes in {}", files[index].0);
                        assert_eq!(n, size.min(len - offset));
                        reads += 1;
                    }
                    (reads, slowest)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).fold((0, Duration::ZERO), |a, b| (a.0 + b.0, a.1.max(b.1)))
    });
    assert!(reads > 1000, "only {reads} reads");
    assert!(slowest < Duration::from_secs(20), "a read took {slowest:?}");
    let rss_after = daemon_rss_kib(pid);
    assert!(rss_after < rss_before + 64 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    complete(&mount);
}
