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
    kill_serving_as_of(mount, &mount.status())
}

/// Kills the serving process `before` (a status taken earlier: a process
/// held at a syscall may not answer `status`) and waits for its successor.
fn kill_serving_as_of(mount: &Mount, before: &Value) -> Value {
    let pid = before["pid"].as_i64().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = mount.try_status()
            && status["pid"].as_i64() != Some(pid)
            && status["restarts"].as_u64() > before["restarts"].as_u64()
        {
            return status;
        }
        assert!(Instant::now() < deadline, "no successor; the log ends:\n{}", log_tail(mount));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The mount "m" of the images, from the local source.
fn local_mount(env: &TestEnv, extra: &[&str]) -> Mount {
    env.mount("m", &env.path("images"), &Source::Local(env.path("source")), extra)
}

/// An executable shell script named `name` in the test's directory: a
/// stand-in for another lazyfs build.
fn script(env: &TestEnv, name: &str, text: &str) -> std::path::PathBuf {
    let path = env.path(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
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
        let mount = local_mount(&env, &[]);
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
    let broken =
        script(&env, "lazyfs-broken", "#!/bin/sh\n[ \"$1\" = --version ] && echo 'lazyfs 9.9.9' && exit 0\nexit 70\n");
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

/// A successor takes the mount over even when its source can no longer be
/// opened (a local SOURCE gone since the mount): what is cached is served,
/// and a read that needs the source fails (EIO), not the takeover.
#[test]
fn a_successor_takes_over_when_the_source_can_no_longer_be_opened() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/s/read", 40_000), ("/s/unread", 40_000)]);
    let expected = std::fs::read(env.path("source/s/read")).unwrap();
    let source = Source::Local(env.path("source"));
    let mount = env.mount("m", &env.path("images"), &source, &["--reconnect-timeout", "2"]);
    let held = std::fs::File::open(mount.at("/s/read")).unwrap();
    assert_eq!(std::fs::read(mount.at("/s/read")).unwrap(), expected);
    std::fs::rename(env.path("source"), env.path("gone")).unwrap();

    let status = kill_serving(&mount);
    assert_eq!(status["restarts"], 1, "{status}");
    let mut again = vec![0u8; expected.len()];
    held.read_exact_at(&mut again, 0).unwrap();
    assert_eq!(again, expected, "the cached file through a descriptor opened before the crash");
    let err = std::fs::read(mount.at("/s/unread")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(held);
    // The kernel's readahead of that file may still wait out the reconnect
    // timeout, keeping the mount busy a moment longer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mount.umount().status.success() {
        assert!(Instant::now() < deadline, "still busy");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// Killed at chosen points, not at random ones: `strace` holds the serving
// process at a syscall (its reply to the kernel, the journal's fdatasync) or
// makes one fail, so a request is taken and made but not answered when the
// `kill -9` lands; its successor gets it again (`FUSE_NOTIFY_RESEND`).

const FDATASYNC: u64 = 75;
const WRITEV: u64 = 20;

/// `strace` attached to every thread of a process, injecting what its filter says.
struct Strace {
    child: std::process::Child,
    pid: i64,
}

impl Strace {
    fn attach(pid: i64, filter: &[&str]) -> Strace {
        let child = std::process::Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()])
            .args(filter)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("strace is needed (scripts/setup installs it)");
        let strace = Strace { pid, child };
        let tracer = strace.child.id().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let traced = tasks(pid).iter().all(|task| {
                std::fs::read_to_string(task.join("status"))
                    .is_ok_and(|s| s.lines().any(|l| l.split_whitespace().eq(["TracerPid:", tracer.as_str()])))
            });
            if traced {
                return strace;
            }
            assert!(Instant::now() < deadline, "strace never attached to {pid}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Holds every reply the process writes to the kernel (`writev` on /dev/fuse).
    fn hold_replies(pid: i64) -> Strace {
        Strace::attach(pid, &["-e", "trace=writev", "-e", "inject=writev:delay_enter=20000000"])
    }

    /// Holds every `fdatasync` (the journal's, after its records are written).
    fn hold_fdatasync(pid: i64) -> Strace {
        Strace::attach(pid, &["-e", "trace=fdatasync", "-e", "inject=fdatasync:delay_enter=20000000"])
    }

    /// Threads of the traced process stopped at syscall `nr` (on /dev/fuse for writev).
    fn stopped_at(&self, nr: u64) -> usize {
        let fuse_fds: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|fds| {
                fds.flatten()
                    .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
                    .filter_map(|fd| fd.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        tasks(self.pid)
            .iter()
            .filter(|task| {
                let line = std::fs::read_to_string(task.join("syscall")).unwrap_or_default();
                let mut words = line.split_whitespace();
                let this = words.next().and_then(|w| w.parse::<u64>().ok());
                let fd = words.next().and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok());
                this == Some(nr) && (nr != WRITEV || fd.is_some_and(|fd| fuse_fds.contains(&fd)))
            })
            .count()
    }

    fn wait_stopped_at(&self, nr: u64, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.stopped_at(nr) < n {
            assert!(Instant::now() < deadline, "{} of {n} threads stopped at syscall {nr}", self.stopped_at(nr));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        // SIGTERM: strace detaches, and its tracees go on (or are dead already).
        // SAFETY: kill(2) of the strace this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn tasks(pid: i64) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.flatten().map(|t| t.path()).collect())
        .unwrap_or_default()
}

/// A supervisor a failed mount leaves waiting for `lazyfs umount`: killed
/// at the end of the test, whatever happened.
struct KillAtEnd(i64);

impl Drop for KillAtEnd {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: kill(2) of a process this test's mount started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// The open table the supervisor holds (a memfd): (cached, passthrough) opens of `ino`.
fn open_table(supervisor: i64, ino: u64) -> Option<(u32, u32)> {
    let fd = std::fs::read_dir(format!("/proc/{supervisor}/fd"))
        .unwrap()
        .flatten()
        .find(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:lazyfs-opens")))
        .expect("the supervisor's open table")
        .path();
    let bytes = std::fs::read(fd).unwrap();
    let word = |slot: &[u8], at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().unwrap());
    bytes
        .chunks_exact(32)
        .find(|slot| u64::from_le_bytes(slot[..8].try_into().unwrap()) == ino && word(slot, 8) + word(slot, 12) > 0)
        .map(|slot| (word(slot, 8), word(slot, 12)))
}

/// Drops the pages the kernel cached of `file`, so a read asks the mount.
fn uncached(file: &std::fs::File) {
    // SAFETY: fadvise on a descriptor this test owns.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(file), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// The last lines of the mount's log, for a failure message.
fn log_tail(mount: &Mount) -> String {
    let log = std::fs::read_to_string(mount.cache.join("lazyfs.log")).unwrap_or_default();
    log.lines().rev().take(4).collect::<Vec<_>>().join("\n")
}

/// A file held open through a shared read-only mapping only: its last
/// munmap sends the kernel's RELEASE with no FLUSH before it (a close
/// would wait for a FLUSH the held replies never give).
struct Mapping {
    at: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn of(path: &Path, len: usize) -> Mapping {
        let file = std::fs::File::open(path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: a fresh read-only shared mapping of a file this test opened.
        let at = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_ne!(at, libc::MAP_FAILED, "mmap {}", path.display());
        Mapping { at, len }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once.
        unsafe { libc::munmap(self.at, self.len) };
    }
}

/// Two closes of one file in flight at a crash (both counted, neither
/// answered): the kernel sends both again and the successor must not count
/// either twice, or an unlinked file still open would be dropped under the
/// descriptor that holds it.
#[test]
fn two_closes_in_flight_at_a_crash_leave_an_unlinked_file_to_its_last_holder() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    let len = 1 << 20;
    dataset(&env.path("source"), &env.path("images"), &[("/t/scratch.db", len)]);
    let mount = local_mount(&env, &[]);
    let before = mount.status();
    let (pid, supervisor) = (before["pid"].as_i64().unwrap(), supervisor_of(&mount));
    let _end = KillAtEnd(supervisor);
    let path = mount.at("/t/scratch.db");
    // The application holds the file three times, then removes its name
    // (a scratch file kept open): two mappings and a descriptor.
    let keep = std::fs::File::open(&path).unwrap();
    let ino = keep.metadata().unwrap().ino();
    let maps = [Mapping::of(&path, len), Mapping::of(&path, len)];
    assert_eq!(open_table(supervisor, ino), Some((3, 0)), "three cached opens counted");
    std::fs::remove_file(&path).unwrap();

    // Both mappings go at once; the serving process dies before the kernel has either answer.
    let held = Strace::hold_replies(pid);
    drop(maps);
    held.wait_stopped_at(WRITEV, 1);
    // Time for the second close to be counted too, if it can be.
    std::thread::sleep(Duration::from_millis(500));
    kill_serving_as_of(&mount, &before);
    drop(held);

    assert_eq!(open_table(supervisor, ino), Some((1, 0)), "the open table after the closes sent again");
    uncached(&keep);
    let mut bytes = vec![0u8; 4096];
    keep.read_exact_at(&mut bytes, 0).expect("reading the unlinked file through the descriptor still open");
    assert!(bytes == content("/t/scratch.db", len)[..4096]);
}

/// Each change of names in flight at a crash, held after its journal record
/// is written and before the journal's fdatasync returns (so before the
/// reply): the kernel sends it again and the successor answers it as made,
/// exactly once.
#[test]
fn a_change_of_names_journaled_but_unanswered_at_a_crash_is_answered_as_made() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/n/seed", 10)]);
    let mount = local_mount(&env, &[]);
    let dir = mount.at("/n");
    std::fs::write(dir.join("a"), b"a").unwrap();
    std::fs::write(dir.join("gone"), b"g").unwrap();
    std::fs::write(dir.join("over"), b"o").unwrap();
    std::fs::write(dir.join("old"), b"x").unwrap();
    std::fs::create_dir(dir.join("emptydir")).unwrap();
    type Op = Box<dyn FnOnce(&Path) -> std::io::Result<()> + Send>;
    let ops: Vec<(&str, Op)> = vec![
        ("rename to a new name", Box::new(|d: &Path| std::fs::rename(d.join("a"), d.join("b")))),
        ("rename over a name", Box::new(|d: &Path| std::fs::rename(d.join("old"), d.join("over")))),
        (
            "create O_EXCL",
            Box::new(|d: &Path| {
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(d.join("new")).map(drop)
            }),
        ),
        ("mkdir", Box::new(|d: &Path| std::fs::create_dir(d.join("newdir")))),
        ("symlink", Box::new(|d: &Path| std::os::unix::fs::symlink("b", d.join("link")))),
        ("hard link", Box::new(|d: &Path| std::fs::hard_link(d.join("b"), d.join("hard")))),
        ("unlink", Box::new(|d: &Path| std::fs::remove_file(d.join("gone")))),
        ("rmdir", Box::new(|d: &Path| std::fs::remove_dir(d.join("emptydir")))),
    ];
    for (what, op) in ops {
        let before = mount.status();
        let held = Strace::hold_fdatasync(before["pid"].as_i64().unwrap());
        let d = dir.clone();
        let thread = std::thread::spawn(move || op(&d));
        held.wait_stopped_at(FDATASYNC, 1);
        kill_serving_as_of(&mount, &before);
        drop(held);
        thread.join().unwrap().unwrap_or_else(|e| panic!("{what}, in flight at the crash: {e}"));
    }
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["b", "hard", "link", "new", "newdir", "over", "seed"]);
    assert_eq!(std::fs::read(dir.join("over")).unwrap(), b"x");
    assert_eq!(std::fs::read(dir.join("hard")).unwrap(), b"a");
    assert_eq!(std::fs::metadata(dir.join("b")).unwrap().nlink(), 2);
}

/// A mount unmounted lazily (`umount -l`, or lazyfs's own SIGTERM of a busy
/// mount) lives on for the files still open under it; a crash then must not
/// end it: the successor serves the connection although the mountpoint no
/// longer shows it.
#[test]
fn a_crash_after_a_lazy_unmount_keeps_the_files_still_open_working() {
    let env = TestEnv::new();
    let len = 1 << 20;
    dataset(&env.path("source"), &env.path("images"), &[("/d/file", len)]);
    let mount = local_mount(&env, &["--max-restarts", "2"]);
    let before = mount.status();
    let (pid, supervisor) = (before["pid"].as_i64().unwrap(), supervisor_of(&mount));
    let _end = KillAtEnd(supervisor);
    let file = std::fs::File::open(mount.at("/d/file")).unwrap();
    let expected = content("/d/file", len);
    let mut bytes = vec![0u8; 4096];
    file.read_exact_at(&mut bytes, 0).unwrap();
    nix::mount::umount2(&mount.mountpoint, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(!common::mount::is_mounted(&mount.mountpoint));
    file.read_exact_at(&mut bytes, 8192).expect("a detached mount serves its open files");

    // SAFETY: kill(2) of the process serving this test's mount.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid);
    // Time for every restart the limit allows.
    std::thread::sleep(Duration::from_secs(2));
    uncached(&file);
    let read = file.read_exact_at(&mut bytes, 512 << 10);
    read.unwrap_or_else(|e| {
        panic!("the open file after a crash of its detached mount: {e}; log ends:\n{}", log_tail(&mount))
    });
    assert!(bytes == expected[512 << 10..(512 << 10) + 4096]);
    // Its last file closed, the detached mount ends, supervisor included.
    drop(file);
    wait_gone(supervisor);
}

/// A panic in a thread reading /dev/fuse (here: a thread spawn that fails,
/// EAGAIN as under a pids limit) is a crash like any other: a successor
/// serves, the supervisor does not take it for an unmount.
#[test]
fn a_serving_process_whose_fuse_threads_panic_is_replaced_not_taken_for_an_unmount() {
    let env = TestEnv::new();
    let top = env.path("source/srv/app");
    for d in 0..10 {
        std::fs::create_dir_all(top.join(format!("d{d}"))).unwrap();
        std::fs::write(top.join(format!("d{d}/f")), b"x").unwrap();
    }
    std::fs::write(top.join("rec.db"), b"rec").unwrap();
    lazyfs::images::write::write_dump(
        &env.path("images"),
        &[lazyfs::images::write::DumpFile::new("/srv/app/rec.db", 3)],
    )
    .unwrap();
    let mount = local_mount(&env, &["--subtree", "/srv/app"]);
    let (pid, supervisor) = (mount.status()["pid"].as_i64().unwrap(), supervisor_of(&mount));
    let _end = KillAtEnd(supervisor);
    assert!(mount.status()["dirs_unlisted"].as_u64().unwrap() > 4);
    {
        let _faults = Strace::attach(pid, &["-e", "trace=clone,clone3", "-e", "inject=clone,clone3:error=EAGAIN"]);
        // Each lookup in an unlisted directory spawns a thread to list it.
        for d in 0..6 {
            let _ = std::fs::metadata(mount.mountpoint.join(format!("d{d}/f")));
        }
    }
    // The faults are over: the mount must answer again (a new process if need be).
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let answer = std::fs::read(mount.mountpoint.join("d9/f"));
        if answer.is_ok() || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let answer = answer
        .unwrap_or_else(|e| panic!("the mount after its FUSE threads panicked: {e}; log ends:\n{}", log_tail(&mount)));
    assert_eq!(answer, b"x");
    assert!(alive(supervisor), "the supervisor ended while the mount is mounted");
}

/// `lazyfs upgrade --binary B` checks `B --version` first; a crash while
/// that check runs (a slow or hung binary) is recovered at once, not once
/// the check is over.
#[test]
fn a_crash_while_an_upgrade_is_checked_is_recovered_at_once() {
    let env = TestEnv::new();
    let len = 1 << 20;
    dataset(&env.path("source"), &env.path("images"), &[("/u/file", len)]);
    let mount = local_mount(&env, &[]);
    let before = mount.status();
    let supervisor = supervisor_of(&mount);
    let slow = script(&env, "lazyfs-slow", "#!/bin/sh\nsleep 20\necho 'lazyfs 9.9.9'\nexit 70\n");
    let file = std::fs::File::open(mount.at("/u/file")).unwrap();
    let mut upgrade = env
        .lazyfs()
        .args(["upgrade", mount.mountpoint.to_str().unwrap(), "--binary", slow.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The supervisor is running the check (`--version`).
    let checking = || {
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|p| {
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i64>().ok());
            let check = ppid == Some(supervisor)
                && std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c.windows(9).any(|w| w == b"--version"));
            check.then(|| p.file_name().to_str()?.parse::<i32>().ok()).flatten()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let check = loop {
        if let Some(check) = checking() {
            break check;
        }
        assert!(Instant::now() < deadline, "the supervisor never ran the check");
        std::thread::sleep(Duration::from_millis(20));
    };
    let started = Instant::now();
    kill_serving_as_of(&mount, &before);
    uncached(&file);
    let mut bytes = vec![0u8; 4096];
    file.read_exact_at(&mut bytes, 256 << 10).unwrap();
    let paused = started.elapsed();
    // SAFETY: kill(2) of the `lazyfs upgrade` this test started.
    unsafe { libc::kill(upgrade.id() as i32, libc::SIGKILL) };
    let _ = upgrade.wait();
    // The supervisor leaves its check running once the client is gone (not
    // this test's subject): ended here, as the test started it.
    let mut left = common::sshd::descendants(check);
    left.push(check);
    common::mount::end_processes(&left);
    assert!(paused < Duration::from_secs(5), "a read after the crash waited {paused:?} for the upgrade check");
}

/// `kill -9` of the supervisor: the serving process serves on, and `status`
/// no longer names a supervisor (nothing restarts the mount now).
#[test]
fn status_shows_no_supervisor_once_it_is_gone() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/s/file", 1000)]);
    let mount = local_mount(&env, &[]);
    let (pid, supervisor) = (mount.status()["pid"].as_i64().unwrap(), supervisor_of(&mount));
    // SAFETY: kill(2) of this test's mount's supervisor.
    unsafe { libc::kill(supervisor as i32, libc::SIGKILL) };
    wait_gone(supervisor);
    let status = mount.wait_for(|s| s["supervisor_pid"] == 0, "status names a supervisor that is gone");
    assert_eq!(status["pid"].as_i64(), Some(pid));
    assert_eq!(std::fs::read(mount.at("/s/file")).unwrap(), content("/s/file", 1000));
    let out = env.run(&["upgrade", mount.mountpoint.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("supervisor is gone"), "{stderr}");
    // `lazyfs umount` still ends it.
    umount(&mount);
    wait_gone(pid);
    assert!(!common::mount::is_mounted(&mount.mountpoint));
}

/// A crash restarts the build that was serving, even once its file is gone
/// or replaced (a package upgrade, a rebuild): the supervisor holds it open.
#[test]
fn a_crash_restarts_the_build_that_was_serving_even_once_its_file_is_gone() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/b/file", 100_000)]);
    let installed = env.path("lazyfs-installed");
    std::fs::copy(env!("CARGO_BIN_EXE_lazyfs"), &installed).unwrap();
    let mountpoint = env.path("mnt/m");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let out = env
        .lazyfs_with(installed.to_str().unwrap())
        .arg("mount")
        .arg(&mountpoint)
        .arg(env.path("images"))
        .arg(env.path("source"))
        .arg("--cache-dir")
        .arg(env.path("cache/m"))
        .output()
        .unwrap();
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    let mount = Mount { mountpoint, cache: env.path("cache/m"), env_home: env.tmp.path().into() };
    let _end = KillAtEnd(supervisor_of(&mount));
    let file = std::fs::File::open(mount.at("/b/file")).unwrap();
    std::fs::remove_file(&installed).unwrap();
    let status = kill_serving(&mount);
    // The very file that was serving: its path names it, gone.
    assert!(status["binary"].as_str().unwrap().starts_with(installed.to_str().unwrap()), "{status}");
    uncached(&file);
    let mut bytes = vec![0u8; 1000];
    file.read_exact_at(&mut bytes, 0).unwrap_or_else(|e| {
        panic!("reading after a crash, the mounting binary removed: {e}; log ends:\n{}", log_tail(&mount))
    });
    assert!(bytes == content("/b/file", 100_000)[..1000]);
}

/// Writes in flight at a crash (their replies held, so taken and made but
/// not answered) are done exactly once, not twice and not half: an append
/// and a write into a checkpoint file not fetched yet. Writes acknowledged
/// without fsync before the crash are there too, through the descriptors
/// opened before it and after a remount.
#[test]
fn writes_in_flight_at_a_crash_are_done_once_and_acknowledged_ones_kept() {
    let env = TestEnv::new();
    let len = 1 << 20;
    dataset(&env.path("source"), &env.path("images"), &[("/w/app.log", 1000), ("/w/model", len)]);
    let mount = local_mount(&env, &[]);
    let mut log = std::fs::OpenOptions::new().append(true).open(mount.at("/w/app.log")).unwrap();
    let model = std::fs::OpenOptions::new().read(true).write(true).open(mount.at("/w/model")).unwrap();
    log.write_all(b"acknowledged\n").unwrap();
    model.write_all_at(&[1u8; 4096], 300 << 10).unwrap();

    let before = mount.status();
    let held = Strace::hold_replies(before["pid"].as_i64().unwrap());
    let model = Arc::new(model);
    let in_flight = {
        let model = model.clone();
        std::thread::spawn(move || model.write_all_at(&[2u8; 65536], 600 << 10))
    };
    let appended = std::thread::spawn(move || log.write_all(b"in flight\n").map(|()| log));
    held.wait_stopped_at(WRITEV, 1);
    std::thread::sleep(Duration::from_millis(500));
    kill_serving_as_of(&mount, &before);
    drop(held);
    in_flight.join().unwrap().expect("a write in flight at the crash");
    let mut log = appended.join().unwrap().expect("an append in flight at the crash");
    log.write_all(b"after\n").unwrap();

    let mut expected_log = content("/w/app.log", 1000);
    expected_log.extend_from_slice(b"acknowledged\nin flight\nafter\n");
    let mut expected_model = content("/w/model", len);
    expected_model[300 << 10..(300 << 10) + 4096].fill(1);
    expected_model[600 << 10..(600 << 10) + 65536].fill(2);
    let mut through_old = vec![0u8; len];
    uncached(&model);
    model.read_exact_at(&mut through_old, 0).unwrap();
    assert!(through_old == expected_model, "the model through its descriptor after the crash");
    drop((log, model));
    let text = std::fs::read(mount.at("/w/app.log")).unwrap();
    assert_eq!(String::from_utf8_lossy(&text[1000..]), "acknowledged\nin flight\nafter\n");
    umount(&mount);
    let again = local_mount(&env, &[]);
    assert!(std::fs::read(again.at("/w/app.log")).unwrap() == expected_log, "app.log after a remount");
    assert!(std::fs::read(again.at("/w/model")).unwrap() == expected_model, "model after a remount");
}

/// A file made after a crash never gets the number of one the kernel still
/// holds (a local file unlinked while open): the old descriptor keeps its
/// own bytes, the new file its own.
#[test]
fn a_file_made_after_a_crash_never_takes_the_number_of_one_still_open() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/i/seed", 10)]);
    let mount = local_mount(&env, &[]);
    let dir = mount.at("/i");
    let mut held = Vec::new();
    for n in 0..4 {
        let path = dir.join(format!("scratch{n}"));
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        file.write_all(format!("old {n}").as_bytes()).unwrap();
        let ino = file.metadata().unwrap().ino();
        std::fs::remove_file(&path).unwrap();
        held.push((file, ino));
    }
    std::fs::write(dir.join("kept"), b"kept").unwrap();
    let kept = std::fs::metadata(dir.join("kept")).unwrap().ino();
    kill_serving(&mount);
    for n in 0..4 {
        std::fs::write(dir.join(format!("new{n}")), format!("new {n}")).unwrap();
        let ino = std::fs::metadata(dir.join(format!("new{n}"))).unwrap().ino();
        assert!(held.iter().all(|(_, old)| *old != ino) && ino != kept, "new{n} took number {ino}");
    }
    for (n, (file, ino)) in held.iter().enumerate() {
        assert_eq!(file.metadata().unwrap().ino(), *ino);
        uncached(file);
        let mut bytes = vec![0u8; 16];
        let read = file.read_at(&mut bytes, 0).unwrap();
        assert_eq!(String::from_utf8_lossy(&bytes[..read]), format!("old {n}"), "scratch{n} through its descriptor");
        assert_eq!(std::fs::read(dir.join(format!("new{n}"))).unwrap(), format!("new {n}").as_bytes());
    }
    assert_eq!(std::fs::read(dir.join("kept")).unwrap(), b"kept");
}

/// The processes whose command line names `cache` (a mount's supervisor and
/// serving processes).
fn processes_of(cache: &Path) -> Vec<i64> {
    let wanted = cache.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i64>().ok())
        .filter(|&pid| alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(wanted.len()).any(|w| w == wanted))
        })
        .collect()
}

/// SIGTERM to the supervisor, or `umount`, while it waits to restart (the
/// back-off after crashes in a row) or while a successor starts: the mount
/// ends cleanly, nothing it started is left running.
#[test]
fn sigterm_or_umount_during_a_restart_ends_the_mount_and_everything_it_started() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/r/file", 1000)]);
    for (backing_off, by_signal) in [(true, true), (false, true), (true, false), (false, false)] {
        let case = format!("backing off: {backing_off}, by signal: {by_signal}");
        let mount = local_mount(&env, &["--max-restarts", "9"]);
        let supervisor = supervisor_of(&mount);
        let _end = KillAtEnd(supervisor);
        if backing_off {
            kill_serving(&mount);
            kill_serving(&mount);
        }
        // The third crash in a row waits 0.5 s; the first none.
        let pid = mount.status()["pid"].as_i64().unwrap();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_gone(pid);
        if by_signal {
            unsafe { libc::kill(supervisor as i32, libc::SIGTERM) };
        } else {
            // EBUSY while another test's mount namespace holds a busy copy of
            // every mount (umount propagates to it): tried again.
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(e) = nix::mount::umount2(&mount.mountpoint, nix::mount::MntFlags::empty()) {
                assert!(e == nix::errno::Errno::EBUSY && Instant::now() < deadline, "{case}: umount: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_of(&mount.cache).is_empty() {
            assert!(Instant::now() < deadline, "{case}: left running: {:?}", processes_of(&mount.cache));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!common::mount::is_mounted(&mount.mountpoint), "{case}");
        assert!(env.run(&["status"]).stdout.starts_with(b"no lazyfs mounts"), "{case}");
    }
}

/// An upgrade to a build that starts but never serves (it hangs reading the
/// cache, say) is given up after a while: the build that served before
/// serves again, and the application's calls, which waited, are answered.
#[test]
fn an_upgrade_to_a_build_that_hangs_at_start_falls_back_to_the_old_one() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/h/file", 100_000)]);
    let mount = local_mount(&env, &[]);
    let before = mount.status();
    let _end = KillAtEnd(supervisor_of(&mount));
    let file = std::fs::File::open(mount.at("/h/file")).unwrap();
    let hangs = script(
        &env,
        "lazyfs-hangs",
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'lazyfs 9.9.9' && exit 0\nexec sleep 1000\n",
    );
    let mountpoint = mount.mountpoint.to_str().unwrap();
    let out = env.run(&["upgrade", mountpoint, "--binary", hangs.to_str().unwrap(), "--timeout", "120"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("the upgrade to") && stderr.contains("failed"), "{stderr}");
    let status = mount.status();
    assert_eq!(status["binary"], before["binary"], "{status}");
    uncached(&file);
    let mut bytes = vec![0u8; 1000];
    file.read_exact_at(&mut bytes, 50_000).unwrap();
    assert!(bytes == content("/h/file", 100_000)[50_000..51_000]);
}

/// A file mapped shared and writable across a crash: pages written back
/// before it stay written, pages still dirty at the crash are written back
/// to the successor, and pages dropped are read again from it.
#[test]
fn a_writable_mapping_keeps_working_across_a_crash() {
    let env = TestEnv::new();
    let len = 256 << 10;
    dataset(&env.path("source"), &env.path("images"), &[("/m/db", len)]);
    let mount = local_mount(&env, &[]);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(mount.at("/m/db")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: a shared read-write mapping of a file this test opened, unmapped below.
    let at =
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    assert_ne!(at, libc::MAP_FAILED);
    // SAFETY: the mapping is `len` bytes long and only this thread touches it.
    let pages = unsafe { std::slice::from_raw_parts_mut(at.cast::<u8>(), len) };
    let sync = |pages: &mut [u8]| {
        // SAFETY: msync of the mapping made above.
        assert_eq!(unsafe { libc::msync(pages.as_mut_ptr().cast(), pages.len(), libc::MS_SYNC) }, 0, "msync");
    };
    let mut expected = content("/m/db", len);
    pages[..4096].fill(7);
    expected[..4096].fill(7);
    sync(pages);
    pages[100 << 10..(100 << 10) + 4096].fill(8);
    expected[100 << 10..(100 << 10) + 4096].fill(8);

    kill_serving(&mount);
    sync(pages);
    pages[200 << 10..(200 << 10) + 4096].fill(9);
    expected[200 << 10..(200 << 10) + 4096].fill(9);
    sync(pages);
    assert!(pages[..] == expected[..], "the mapping after the crash");
    // SAFETY: the mapping made above, unmapped once; `pages` is not used after.
    unsafe { libc::munmap(at, len) };
    drop(file);
    assert!(std::fs::read(mount.at("/m/db")).unwrap() == expected, "read through the mount");
    umount(&mount);
    let again = local_mount(&env, &[]);
    assert!(std::fs::read(again.at("/m/db")).unwrap() == expected, "after a remount");
}

/// The children of `parent`.
fn children(parent: i64) -> Vec<i64> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i64>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i64>().ok())
                == Some(parent)
        })
        .collect()
}

/// Killed twice in a row, the second time while the successor starts (before
/// it serves): an application reading all along sees no error, only a wait.
#[test]
fn a_successor_killed_while_it_starts_is_replaced_and_reads_never_fail() {
    let env = TestEnv::new();
    let len = 4 << 20;
    dataset(&env.path("source"), &env.path("images"), &[("/k/file", len)]);
    let mount = local_mount(&env, &[]);
    let before = mount.status();
    let supervisor = supervisor_of(&mount);
    let _end = KillAtEnd(supervisor);
    let app = Arc::new(App::default());
    let file = std::fs::File::open(mount.at("/k/file")).unwrap();
    let a = app.clone();
    let reader = std::thread::spawn(move || {
        let expected = content("/k/file", len);
        let mut buf = vec![0u8; 4096];
        let mut at = 0;
        while !a.stop.load(Ordering::Relaxed) {
            uncached(&file);
            match file.read_exact_at(&mut buf, at as u64) {
                Ok(()) if buf == expected[at..at + 4096] => a.reads.fetch_add(1, Ordering::Relaxed),
                other => return a.error(format!("at {at}: {other:?}")),
            };
            at = (at + 40960) % (len - 4096);
        }
    });
    progressed(&app, 20);
    let first = before["pid"].as_i64().unwrap();
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    wait_gone(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        if let Some(&pid) = children(supervisor).iter().find(|&&pid| pid != first) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no successor started");
        std::thread::yield_now();
    };
    unsafe { libc::kill(second as i32, libc::SIGKILL) };
    wait_gone(second);
    let status = mount.wait_for(|s| s["restarts"] == 2, "no third serving process");
    assert!(status["last_restart_reason"].as_str().unwrap().contains(&second.to_string()), "{status}");
    progressed(&app, 20);
    app.stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let errors = app.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "the reader saw errors: {errors:?}");
}

const GETDENTS64: u64 = 217;

/// A crash while a directory is being listed from the source (held in its
/// `getdents64`): the successor lists it again and the `ls` in flight gets
/// every name, once.
#[test]
fn a_crash_during_a_listing_answers_the_listing_in_flight_whole() {
    let env = TestEnv::new();
    let top = env.path("source/srv/app");
    std::fs::create_dir_all(top.join("big")).unwrap();
    let mut expected: Vec<String> = (0..200).map(|n| format!("f{n:03}")).collect();
    for name in &expected {
        std::fs::write(top.join("big").join(name), name.as_bytes()).unwrap();
    }
    std::fs::write(top.join("rec.db"), b"rec").unwrap();
    lazyfs::images::write::write_dump(
        &env.path("images"),
        &[lazyfs::images::write::DumpFile::new("/srv/app/rec.db", 3)],
    )
    .unwrap();
    let mount = local_mount(&env, &["--subtree", "/srv/app"]);
    let before = mount.status();
    let _end = KillAtEnd(supervisor_of(&mount));
    let held = Strace::attach(
        before["pid"].as_i64().unwrap(),
        &["-e", "trace=getdents64", "-e", "inject=getdents64:delay_enter=20000000"],
    );
    let dir = mount.mountpoint.join("big");
    let listing = std::thread::spawn(move || -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().into_string().unwrap());
        }
        Ok(names)
    });
    held.wait_stopped_at(GETDENTS64, 1);
    kill_serving_as_of(&mount, &before);
    drop(held);
    let mut names = listing.join().unwrap().expect("a listing in flight at the crash");
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(std::fs::read(mount.mountpoint.join("big/f123")).unwrap(), b"f123");
}

/// Locks taken before a crash (`flock`, POSIX record locks) are still held
/// after it: another process cannot take them (the kernel keeps them; the
/// mount does not ask for lock requests).
#[test]
fn locks_held_before_a_crash_are_still_held_after_it() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/l/a.lock", 10), ("/l/b.db", 10)]);
    let mount = local_mount(&env, &[]);
    let flocked = std::fs::File::open(mount.at("/l/a.lock")).unwrap();
    let recorded = std::fs::OpenOptions::new().read(true).write(true).open(mount.at("/l/b.db")).unwrap();
    // SAFETY: flock and fcntl on descriptors this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&flocked), libc::LOCK_EX) }, 0);
    let whole =
        libc::flock { l_type: libc::F_WRLCK as i16, l_whence: libc::SEEK_SET as i16, l_start: 0, l_len: 0, l_pid: 0 };
    // SAFETY: as above; `whole` outlives the call.
    assert_eq!(unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&recorded), libc::F_SETLK, &whole) }, 0);
    kill_serving(&mount);
    let others = |lock: &str, path: &Path| {
        std::process::Command::new("python3")
            .args(["-c", &format!("import fcntl, sys; f = open(sys.argv[1], 'r+'); {lock}"), path.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(!others("fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", &mount.at("/l/a.lock")), "flock taken");
    assert!(!others("fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", &mount.at("/l/b.db")), "record lock taken");
    drop((flocked, recorded));
    assert!(others("fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", &mount.at("/l/a.lock")), "flock once released");
}
