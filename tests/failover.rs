//! Failover through real mounts over the tests' sshd: the process serving a
//! mount is killed (`kill -9`) while an application keeps its files open,
//! reading, appending with fsync and writing a new file; a new process takes
//! the mount over and the application notices nothing. Also: the crash limit,
//! `lazyfs upgrade` between two builds, umount and SIGTERM ending everything.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::mount::{Mount, Source, TestEnv, content, dataset};
use common::sshd::Sshd;
use serde_json::Value;

fn ssh<'a>(sshd: &'a Sshd, env: &TestEnv) -> Source<'a> {
    Source::Ssh { sshd, root: env.path("source") }
}

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}

fn wait_gone(pid: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the serving process and waits for its successor to answer; its status.
fn kill_serving(mount: &Mount) -> Value {
    let before = mount.status();
    let pid = before["pid"].as_i64().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid);
    mount.wait_for(
        |s| s["pid"].as_i64() != Some(pid) && s["restarts"].as_u64() > before["restarts"].as_u64(),
        "no successor",
    )
}

/// What the application did and saw.
#[derive(Default)]
struct App {
    stop: AtomicBool,
    errors: std::sync::Mutex<Vec<String>>,
    /// Lines appended and fsynced.
    appended: AtomicU64,
    /// Bytes of the new file written and fsynced.
    written: AtomicU64,
    /// Renames answered (the storm's last state: `storm/k{i}` for i < renamed).
    renamed: AtomicU64,
    reads: AtomicU64,
    /// The longest any one operation waited, in µs.
    longest_us: AtomicU64,
}

impl App {
    fn error(&self, what: String) {
        self.errors.lock().unwrap().push(what);
    }

    fn timed<T>(&self, op: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let started = Instant::now();
        let result = op();
        self.longest_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        result
    }

    fn progress(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
            + self.written.load(Ordering::Relaxed)
            + self.renamed.load(Ordering::Relaxed)
            + self.reads.load(Ordering::Relaxed)
    }
}

const MODEL: usize = 48 << 20;
const BLOCK: usize = 64 << 10;

/// The application: descriptors opened once, before any crash, used for the
/// whole run: random reads of the model, appends with fsync, a new file
/// written block by block, and a storm of renames.
fn run_app(app: &Arc<App>, root: &Path) -> Vec<std::thread::JoinHandle<()>> {
    let model = std::fs::File::open(root.join("app/model.bin")).unwrap();
    let log = std::fs::OpenOptions::new().append(true).open(root.join("app/app.log")).unwrap();
    let new =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(root.join("app/new.dat")).unwrap();
    std::fs::create_dir(root.join("app/storm")).unwrap();
    let expected = content("/app/model.bin", MODEL);
    let mut threads = Vec::new();
    let a = app.clone();
    threads.push(std::thread::spawn(move || {
        let mut state = 0x9E37_79B9u64;
        let mut buf = vec![0u8; BLOCK];
        while !a.stop.load(Ordering::Relaxed) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state as usize % (MODEL - BLOCK)) & !4095;
            match a.timed(|| model.read_exact_at(&mut buf, at as u64)) {
                Ok(()) if buf == expected[at..at + BLOCK] => a.reads.fetch_add(1, Ordering::Relaxed),
                Ok(()) => return a.error(format!("model.bin at {at}: wrong bytes")),
                Err(e) => return a.error(format!("reading model.bin at {at}: {e}")),
            };
        }
    }));
    let a = app.clone();
    threads.push(std::thread::spawn(move || {
        let mut log = log;
        let mut n = 0u64;
        while !a.stop.load(Ordering::Relaxed) {
            let line = format!("line {n}\n");
            if let Err(e) = a.timed(|| log.write_all(line.as_bytes()).and_then(|()| log.sync_data())) {
                return a.error(format!("appending line {n}: {e}"));
            }
            n += 1;
            a.appended.store(n, Ordering::Relaxed);
        }
    }));
    let a = app.clone();
    threads.push(std::thread::spawn(move || {
        let mut at = 0u64;
        while !a.stop.load(Ordering::Relaxed) && at < 32 << 20 {
            let block = content(&format!("new {at}"), 16 << 10);
            if let Err(e) = a.timed(|| new.write_all_at(&block, at).and_then(|()| new.sync_data())) {
                return a.error(format!("writing new.dat at {at}: {e}"));
            }
            at += block.len() as u64;
            a.written.store(at, Ordering::Relaxed);
        }
    }));
    let a = app.clone();
    let storm = root.join("app/storm");
    threads.push(std::thread::spawn(move || {
        let mut i = 0u64;
        while !a.stop.load(Ordering::Relaxed) {
            // A file saved atomically: written, then renamed over its name.
            let (tmp, name) = (storm.join(format!(".k{i}.tmp")), storm.join(format!("k{}", i % 16)));
            if let Err(e) = a.timed(|| std::fs::write(&tmp, i.to_string())) {
                return a.error(format!("writing {}: {e}", tmp.display()));
            }
            if let Err(e) = a.timed(|| std::fs::rename(&tmp, &name)) {
                return a.error(format!("renaming {} to {}: {e}", tmp.display(), name.display()));
            }
            i += 1;
            a.renamed.store(i, Ordering::Relaxed);
        }
    }));
    threads
}

fn file<'a>(status: &'a Value, path: &str) -> &'a Value {
    status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap()
}

/// Waits until the application made `more` operations of progress.
fn progressed(app: &App, more: u64) {
    let from = app.progress();
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.progress() < from + more && app.errors.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the application is stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_application_keeps_running_across_kill_9_of_the_serving_process() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/app/model.bin", MODEL), ("/app/app.log", 1000)]);
    let before = std::fs::read(env.path("source/app/app.log")).unwrap();
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "1"]);
    let app = Arc::new(App::default());
    // The log is written locally once whole: wait for it first.
    mount.wait_for(|s| file(s, "/app/app.log")["state"] == "verified", "app.log not verified");
    let threads = run_app(&app, &mount.mountpoint);
    progressed(&app, 50);

    // During prefetch of the model (mid-transfer).
    let status = kill_serving(&mount);
    assert_eq!(status["restarts"], 1, "{status}");
    assert!(status["last_restart_reason"].as_str().unwrap().contains("SIGKILL"), "{status}");
    progressed(&app, 50);
    let moment = mount.status();
    let model = file(&moment, "/app/model.bin");
    let prefetching = model["state"] != "verified";
    // During verification: as soon as the model is all here, before its check is done.
    mount
        .wait_for(|s| file(s, "/app/model.bin")["bytes_present"].as_u64() == Some(MODEL as u64), "model never arrives");
    kill_serving(&mount);
    progressed(&app, 50);
    // During the rename storm (it never stops), three more times.
    for _ in 0..3 {
        kill_serving(&mount);
        progressed(&app, 50);
    }
    app.stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let errors = app.errors.lock().unwrap().clone();
    if std::env::var_os("LAZYFS_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", std::fs::read_to_string(mount.cache.join("lazyfs.log")).unwrap());
    }
    assert!(errors.is_empty(), "the application saw errors: {errors:?}");
    let status = mount.wait_complete();
    assert_eq!(status["restarts"], 5);
    eprintln!(
        "5 crashes, {} ops, longest wait {} ms, kill during prefetch: {prefetching}",
        app.progress(),
        app.longest_us.load(Ordering::Relaxed) / 1000
    );

    // Every acknowledged write is there after a remount.
    umount(&mount);
    let again = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &[]);
    let log = std::fs::read(again.at("/app/app.log")).unwrap();
    let mut expected = before.clone();
    for n in 0..app.appended.load(Ordering::Relaxed) {
        expected.extend(format!("line {n}\n").bytes());
    }
    assert!(log.starts_with(&expected), "acknowledged lines lost from app.log");
    let new = std::fs::read(again.at("/app/new.dat")).unwrap();
    let written = app.written.load(Ordering::Relaxed);
    assert!(new.len() as u64 >= written);
    for at in (0..written).step_by(16 << 10) {
        assert!(
            new[at as usize..at as usize + (16 << 10)] == content(&format!("new {at}"), 16 << 10),
            "new.dat at {at}"
        );
    }
    let renamed = app.renamed.load(Ordering::Relaxed);
    for k in 0..16.min(renamed) {
        let last = (0..renamed).rev().find(|i| i % 16 == k).unwrap();
        let saved = std::fs::read_to_string(again.at(&format!("/app/storm/k{k}"))).unwrap();
        assert_eq!(saved, last.to_string(), "storm/k{k}");
    }
    assert!(std::fs::read(again.at("/app/model.bin")).unwrap() == content("/app/model.bin", MODEL));
    // The source is never written.
    assert_eq!(std::fs::read(env.path("source/app/app.log")).unwrap(), before);
}

fn umount(mount: &Mount) {
    let out = mount.umount();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
}

fn supervisor_of(mount: &Mount) -> i64 {
    mount.status()["supervisor_pid"].as_i64().unwrap()
}

#[test]
fn past_the_crash_limit_the_mount_fails_cleanly_and_umount_ends_it() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/c/file", 100_000)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--max-restarts", "2"]);
    let file = std::fs::File::open(mount.at("/c/file")).unwrap();
    let supervisor = supervisor_of(&mount);
    kill_serving(&mount);
    kill_serving(&mount);
    let pid = mount.status()["pid"].as_i64().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid);
    let status = mount.wait_for(|s| s["state"] == "failed", "never failed");
    let failure = status["failure"].as_str().unwrap();
    assert!(failure.contains("crashed 3 times in a row") && failure.contains("SIGKILL"), "{failure}");
    assert_eq!(status["pid"].as_i64(), Some(supervisor), "the supervisor answers for the failed mount");
    let plain = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("failed: the serving process crashed 3 times"));
    let log = std::fs::read_to_string(mount.cache.join("lazyfs.log")).unwrap();
    assert!(log.contains("lazyfs gave up"), "{log}");
    // Nothing serves it: the application gets an error, not a hang.
    let err = file.read_at(&mut [0u8; 10], 0).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)), "{err}");
    drop(file);
    umount(&mount);
    wait_gone(supervisor);
    assert!(!common::mount::is_mounted(&mount.mountpoint));
    // Mounting again resumes from the cache.
    let again = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &[]);
    assert!(std::fs::read(again.at("/c/file")).unwrap() == content("/c/file", 100_000));
}

#[test]
fn umount_and_sigterm_end_the_supervisor_too() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/u/file", 1000)]);
    for by_signal in [false, true] {
        let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
        let status = kill_serving(&mount);
        let (supervisor, pid) = (status["supervisor_pid"].as_i64().unwrap(), status["pid"].as_i64().unwrap());
        if by_signal {
            unsafe { libc::kill(supervisor as i32, libc::SIGTERM) };
        } else {
            umount(&mount);
        }
        wait_gone(pid);
        wait_gone(supervisor);
        assert!(!common::mount::is_mounted(&mount.mountpoint), "signal: {by_signal}");
        assert!(env.run(&["status"]).stdout.starts_with(b"no lazyfs mounts"));
    }
}

/// A copy of this lazyfs, as a second build would be installed next to the first.
fn second_build(env: &TestEnv) -> std::path::PathBuf {
    let copy = env.path("lazyfs-new");
    std::fs::copy(env!("CARGO_BIN_EXE_lazyfs"), &copy).unwrap();
    copy
}

#[test]
fn upgrade_hands_a_live_mount_to_another_build_and_a_broken_one_is_refused_or_rolled_back() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/g/model", 8 << 20), ("/g/log", 10)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "1"]);
    mount.wait_for(|s| file(s, "/g/log")["state"] == "verified", "log not verified");
    let app = Arc::new(App::default());
    let model = std::fs::File::open(mount.at("/g/model")).unwrap();
    let mut log = std::fs::OpenOptions::new().append(true).open(mount.at("/g/log")).unwrap();
    let a = app.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let expected = content("/g/model", 8 << 20);
        let mut at = 0usize;
        while !a.stop.load(Ordering::Relaxed) {
            match model.read_exact_at(&mut buf, at as u64) {
                Ok(()) if buf == expected[at..at + 4096] => a.reads.fetch_add(1, Ordering::Relaxed),
                other => return a.error(format!("model at {at}: {other:?}")),
            };
            at = (at + 1_052_672) % ((8 << 20) - 4096);
        }
    });
    let new = second_build(&env);
    let before = mount.status();
    let out = env.run(&["upgrade", mount.mountpoint.to_str().unwrap(), "--binary", new.to_str().unwrap()]);
    assert!(out.status.success(), "upgrade: {}", String::from_utf8_lossy(&out.stderr));
    let after = mount.status();
    assert_ne!(after["pid"], before["pid"]);
    assert_eq!(after["binary"], new.to_str().unwrap());
    assert_eq!(after["supervisor_pid"], before["supervisor_pid"]);
    assert!(after["last_restart_reason"].as_str().unwrap().starts_with("upgrade to "), "{after}");
    writeln!(log, "after the upgrade").unwrap();
    log.sync_data().unwrap();

    // Not a lazyfs: refused before anything is stopped.
    let out = env.run(&["upgrade", mount.mountpoint.to_str().unwrap(), "--binary", "/bin/true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a lazyfs binary"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mount.status()["pid"], after["pid"]);

    // A build that answers --version but cannot serve: the previous one serves again.
    let broken = env.path("lazyfs-broken");
    std::fs::write(&broken, "#!/bin/sh\n[ \"$1\" = --version ] && echo 'lazyfs 9.9.9' && exit 0\nexit 70\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = env.run(&["upgrade", mount.mountpoint.to_str().unwrap(), "--binary", broken.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("the upgrade to") && stderr.contains("failed"), "{stderr}");
    let rolled = mount.wait_for(|s| s["binary"] == new.to_str().unwrap() && s["pid"] != after["pid"], "no rollback");
    assert!(rolled["restarts"].as_u64().unwrap() >= 3);
    writeln!(log, "after the rollback").unwrap();
    log.sync_data().unwrap();

    app.stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let errors = app.errors.lock().unwrap().clone();
    assert!(errors.is_empty() && app.reads.load(Ordering::Relaxed) > 0, "{errors:?}");
    let text = std::fs::read(mount.at("/g/log")).unwrap();
    assert!(text.ends_with(b"after the upgrade\nafter the rollback\n"), "{}", String::from_utf8_lossy(&text));
}

#[test]
fn a_successor_gives_a_lazily_listed_tree_the_numbers_the_kernel_holds() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let top = env.path("source/srv/app");
    let dirs = ["a", "b", "c", "d", "e"];
    for dir in dirs {
        std::fs::create_dir_all(top.join(dir)).unwrap();
        for f in 0..3 {
            std::fs::write(top.join(format!("{dir}/f{f}")), content(&format!("{dir}/f{f}"), 5000 + f)).unwrap();
        }
    }
    std::fs::write(top.join("rec.db"), content("rec.db", 9000)).unwrap();
    lazyfs::images::write::write_dump(
        &env.path("images"),
        &[lazyfs::images::write::DumpFile::new("/srv/app/rec.db", 9000)],
    )
    .unwrap();
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--subtree", "/srv/app"]);
    // Listed in an order a successor has no reason to follow.
    let mut opened = Vec::new();
    for dir in dirs.iter().rev() {
        let listed: Vec<_> = std::fs::read_dir(mount.mountpoint.join(dir)).unwrap().collect();
        assert_eq!(listed.len(), 3);
        let path = mount.mountpoint.join(format!("{dir}/f1"));
        let file = std::fs::File::open(&path).unwrap();
        let ino = file.metadata().unwrap().ino();
        let dir_fd = std::fs::File::open(mount.mountpoint.join(dir)).unwrap();
        opened.push((dir.to_string(), file, ino, dir_fd));
    }
    kill_serving(&mount);
    // The kernel asks by the numbers it holds: each must still mean its node.
    for (dir, file, ino, dir_fd) in opened.iter().rev() {
        assert_eq!(file.metadata().unwrap().ino(), *ino);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &*file, &mut bytes).unwrap();
        assert!(bytes == content(&format!("{dir}/f1"), 5001), "{dir}/f1 read through its old descriptor");
        let through_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir_fd));
        let mut names: Vec<String> =
            std::fs::read_dir(through_fd).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["f0", "f1", "f2"], "{dir} listed through its old descriptor");
        let again = std::fs::File::open(mount.mountpoint.join(format!("{dir}/f2"))).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &again, &mut bytes).unwrap();
        assert!(bytes == content(&format!("{dir}/f2"), 5002), "{dir}/f2");
    }
    drop(opened);
    umount(&mount);
}
