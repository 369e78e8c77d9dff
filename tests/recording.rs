//! The recorded access order: a mount records what its readers touched first,
//! a later mount (or one given the manifest that ships it) prefetches in that
//! order. Against a real sshd, with real FUSE mounts.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use common::mount::{Mount, Source, TestEnv, content, dataset};
use common::sshd::Sshd;
use serde_json::Value;

/// Two small files read in the opposite of smallest-first, a large one
/// (above the 4 MiB a small-file batch takes) read in the middle, and two
/// files nobody reads.
const FILES: [(&str, usize); 5] =
    [("/r/s1", 1_000), ("/r/s2", 2_000), ("/r/u1", 50_000), ("/r/u2", 300_000), ("/r/big", 6 << 20)];
const BIG_OFFSET: u64 = 5 << 20;

fn ssh<'a>(sshd: &'a Sshd, env: &TestEnv) -> Source<'a> {
    Source::Ssh { sshd, root: env.path("source") }
}

/// The files in the order they completed (ties by path).
fn completion_order(status: &Value) -> Vec<String> {
    let mut done: Vec<(f64, String)> = status["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["completed_s"].as_f64().unwrap(), f["path"].as_str().unwrap().to_string()))
        .collect();
    done.sort_by(|a, b| a.partial_cmp(b).unwrap());
    done.into_iter().map(|(_, p)| p).collect()
}

/// Mounts lazily, reads s2, then 4 KiB in the middle of big, then s1; checks
/// what `status --json` recorded; unmounts (which leaves CACHE/recording).
fn record(env: &TestEnv, sshd: &Sshd, name: &str) -> Mount {
    let (mount, paths) = record_reads(env, sshd, name);
    let out = mount.umount();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved_paths: Vec<String> = saved_runs(&mount.cache).into_iter().map(|(path, ..)| path).collect();
    assert_eq!(saved_paths, paths, "CACHE/recording differs from what status showed");
    mount
}

/// The recorded runs `status --json` shows, as (path, first chunk, end chunk).
fn recorded_runs(status: &Value) -> Vec<(String, u64, u64)> {
    let runs = status["recording"].as_array().unwrap().iter();
    runs.map(|r| {
        (r["path"].as_str().unwrap().into(), r["first_chunk"].as_u64().unwrap(), r["end_chunk"].as_u64().unwrap())
    })
    .collect()
}

/// The runs of the recording saved in `cache`: (path, first chunk, end chunk).
fn saved_runs(cache: &Path) -> Vec<(String, u64, u64)> {
    let saved = lazyfs::recording::load(cache).unwrap();
    saved.touches.iter().map(|t| (String::from_utf8_lossy(&t.path).into(), t.first, t.end)).collect()
}

/// The reads of [`record`] on a new lazy mount, checked in status; the mount
/// and the recorded paths.
fn record_reads(env: &TestEnv, sshd: &Sshd, name: &str) -> (Mount, Vec<String>) {
    let mount = env.mount(name, &env.path("images"), &ssh(sshd, env), &[]);
    assert_eq!(std::fs::read(mount.at("/r/s2")).unwrap(), content("/r/s2", 2_000));
    let mut big = File::open(mount.at("/r/big")).unwrap();
    big.seek(SeekFrom::Start(BIG_OFFSET)).unwrap();
    let mut buf = vec![0u8; 4096];
    big.read_exact(&mut buf).unwrap();
    assert_eq!(buf, content("/r/big", 6 << 20)[BIG_OFFSET as usize..][..4096]);
    drop(big);
    assert_eq!(std::fs::read(mount.at("/r/s1")).unwrap(), content("/r/s1", 1_000));

    let status = mount.status();
    assert_eq!(status["chunk_size"], 16384);
    let recording = status["recording"].as_array().unwrap();
    let paths: Vec<&str> = recording.iter().map(|r| r["path"].as_str().unwrap()).collect();
    // The kernel may read ahead around the middle of big: one run or a few, all after s2, before s1.
    assert_eq!(paths.first(), Some(&"/r/s2"), "{recording:?}");
    assert_eq!(paths.last(), Some(&"/r/s1"), "{recording:?}");
    assert!(paths[1..paths.len() - 1].iter().all(|p| *p == "/r/big"), "{recording:?}");
    let big_first = recording[1]["first_chunk"].as_u64().unwrap();
    assert!(big_first <= BIG_OFFSET / 16384 && recording[1]["end_chunk"].as_u64().unwrap() > BIG_OFFSET / 16384);
    assert_eq!((recording[0]["first_chunk"].as_u64(), recording[0]["end_chunk"].as_u64()), (Some(0), Some(1)));
    let times: Vec<f64> = recording.iter().map(|r| r["at_s"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let paths = paths.into_iter().map(String::from).collect();
    (mount, paths)
}

/// What the recording puts first comes first: s2 (read first), then s1, then
/// the files nobody read smallest-first, big (whose recorded run came between
/// s2 and s1) last.
const RECORDED_ORDER: [&str; 5] = ["/r/s2", "/r/s1", "/r/u1", "/r/u2", "/r/big"];
const SMALLEST_FIRST: [&str; 5] = ["/r/s1", "/r/s2", "/r/u1", "/r/u2", "/r/big"];

fn prefetch(env: &TestEnv, sshd: &Sshd, name: &str, order: &str) -> (Vec<String>, Value, String) {
    // The prefetch queue's order alone: a replay would fetch the recorded
    // small files in one batch, finishing them in any order.
    let args = ["--prefetch", "-j", "1", "--no-replay", "--prefetch-order", order];
    let out = env.try_mount(name, &env.path("images"), &ssh(sshd, env), &args);
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    let mount = Mount {
        mountpoint: env.path("mnt").join(name),
        cache: env.path("cache").join(name),
        env_home: env.tmp.path().into(),
    };
    let status = mount.wait_complete();
    for (path, len) in FILES {
        assert_eq!(std::fs::read(mount.at(path)).unwrap(), content(path, len), "{path}");
    }
    (completion_order(&status), status, String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn a_mount_records_reads_in_order_and_the_next_one_prefetches_in_that_order() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let first = record(&env, &sshd, "first");

    let file = format!("recorded:{}", first.cache.join("recording").display());
    let (order, status, _) = prefetch(&env, &sshd, "second", &file);
    assert_eq!(order, RECORDED_ORDER);
    // Nothing was read on the second mount: its recording is empty.
    assert_eq!(status["recording"].as_array().unwrap().len(), 0);

    // A cache dir is a recording too; and without one, smallest-first.
    let (order, ..) = prefetch(&env, &sshd, "third", &format!("recorded:{}", first.cache.display()));
    assert_eq!(order, RECORDED_ORDER);
    let (order, ..) = prefetch(&env, &sshd, "plain", "smallest-first");
    assert_eq!(order, SMALLEST_FIRST);

    // `recorded` alone takes the cache dir's own recording: remount the first cache dir.
    std::fs::remove_dir_all(first.cache.join("spill")).unwrap();
    std::fs::remove_file(first.cache.join("journal")).unwrap();
    let (order, ..) = prefetch(&env, &sshd, "first", "recorded");
    assert_eq!(order, RECORDED_ORDER);
}

/// The recording is written as it grows: a mount killed with `kill -9`
/// leaves every run it recorded, and the next mount of its cache dir follows it.
#[test]
fn a_killed_mount_keeps_its_recording() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let (mount, _) = record_reads(&env, &sshd, "killed");
    let before = recorded_runs(&mount.status());
    // The whole mount: killed alone, the serving process is replaced on the same mount.
    mount.kill_all();
    assert!(!mount.cache.join("recording").exists(), "written at unmount only, yet there was none");
    // Fetched again from nothing, so the order of completion is prefetch's own.
    std::fs::remove_dir_all(mount.cache.join("spill")).unwrap();
    std::fs::remove_file(mount.cache.join("journal")).unwrap();
    let (order, ..) = prefetch(&env, &sshd, "killed", "recorded");
    assert_eq!(order, RECORDED_ORDER);
    let kept = saved_runs(&mount.cache);
    assert_eq!(kept, before);
}

/// A failover keeps the recording whole: the successor of a killed serving
/// process goes on with what its predecessor recorded (the restore's first
/// reads stay first), and the unmount saves both.
#[test]
fn a_successor_goes_on_with_the_recording_of_the_process_it_replaced() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let (mount, _) = record_reads(&env, &sshd, "failover");
    let before = recorded_runs(&mount.status());
    let pid = mount.status()["pid"].as_i64().unwrap();
    // SAFETY: kill(2) of the serving process this test's mount started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let successor =
        mount.wait_for(|s| s["pid"].as_i64().is_some_and(|p| p != pid) && s["restarts"] == 1, "no successor");
    assert_eq!(recorded_runs(&successor), before, "taken over: {successor}");
    assert_eq!(std::fs::read(mount.at("/r/u1")).unwrap(), content("/r/u1", 50_000));
    assert!(mount.umount().status.success());
    let kept = saved_runs(&mount.cache);
    assert_eq!(kept[..before.len()], before[..]);
    assert_eq!(kept[before.len()..], [("/r/u1".to_string(), 0, 4)]);
}

/// A lazy mount replays the cache dir's recording once the source answers:
/// what the last restore read first arrives with nobody reading it (the small
/// files whole, the large one's recorded runs only), and nothing else;
/// `--no-replay` fetches nothing.
#[test]
fn a_lazy_mount_replays_the_recording_and_no_replay_does_not() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let first = record(&env, &sshd, "replay");
    let recorded = saved_runs(&first.cache);
    let big_chunks: u64 = recorded.iter().filter(|(p, ..)| p == "/r/big").map(|(_, a, b)| b - a).sum();
    let afresh = || {
        std::fs::remove_dir_all(first.cache.join("spill")).unwrap();
        std::fs::remove_file(first.cache.join("journal")).unwrap();
    };
    afresh();
    let out = env.try_mount("replay", &env.path("images"), &ssh(&sshd, &env), &["--no-replay"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(first.status()["bytes_present"], 0, "fetched with --no-replay");
    assert!(first.umount().status.success());

    afresh();
    let out = env.try_mount("replay", &env.path("images"), &ssh(&sshd, &env), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file_of = |status: &Value, path: &str| {
        status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).cloned().unwrap()
    };
    let status = first.wait_for(
        |s| ["/r/s1", "/r/s2"].iter().all(|p| file_of(s, p)["state"] == "verified"),
        "the recorded small files never arrived",
    );
    let big = first.wait_for(
        |s| file_of(s, "/r/big")["bytes_present"].as_u64().unwrap() >= big_chunks * 16384,
        "the recorded runs of big never arrived",
    );
    assert_eq!(file_of(&big, "/r/big")["bytes_present"], big_chunks * 16384, "more of big than recorded");
    for unread in ["/r/u1", "/r/u2"] {
        assert_eq!(file_of(&status, unread)["bytes_present"], 0, "{unread} was not recorded");
    }
    // Nobody read: replayed bytes are prefetched ones, and the new recording is empty.
    assert_eq!(big["bytes_on_demand"], 0);
    assert_eq!(big["recording"].as_array().unwrap().len(), 0);
}

#[test]
fn a_manifest_ships_the_recording_and_a_mount_uses_it() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let (images, root) = (env.path("images"), env.path("source"));
    let manifest = |extra: &[&str]| {
        let mut args = vec!["manifest", images.to_str().unwrap(), "--root", root.to_str().unwrap()];
        args.extend(extra);
        let out = env.run(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };

    // A manifest without a recording (as every older one): `recorded` says so and goes smallest-first.
    manifest(&[]);
    let (order, status, stderr) = prefetch(&env, &sshd, "none", "recorded");
    assert_eq!(order, SMALLEST_FIRST);
    assert!(stderr.contains("neither the cache dir nor the manifest holds a recording"), "{stderr}");
    assert!(status["files"].as_array().unwrap().iter().all(|f| f["verified_against"] == "manifest"));

    let first = record(&env, &sshd, "first");
    manifest(&["--recording", first.cache.to_str().unwrap()]);
    let (order, status, stderr) = prefetch(&env, &sshd, "shipped", "recorded");
    assert_eq!(order, RECORDED_ORDER);
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(status["files"].as_array().unwrap().iter().all(|f| f["verified_against"] == "manifest"));
}

#[test]
fn a_garbage_recording_is_refused_in_one_line_with_exit_2() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let garbage = env.path("garbage");
    std::fs::write(&garbage, b"\x00\x01 not a recording at all\n").unwrap();
    let one_line_exit_2 = |out: std::process::Output, what: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr}");
        assert!(stderr.contains("not a lazyfs recording") && stderr.contains("garbage"), "{what}: {stderr}");
    };

    let order = format!("recorded:{}", garbage.display());
    let out = env.try_mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "--prefetch-order", &order]);
    one_line_exit_2(out, "mount");
    assert!(!common::mount::is_mounted(&env.path("mnt/m")));

    let images = env.path("images");
    let args = ["manifest", images.to_str().unwrap(), "--recording", garbage.to_str().unwrap()];
    one_line_exit_2(env.run(&args), "manifest");
    assert!(!Path::new(&images.join("lazyfs.manifest")).exists());
}
