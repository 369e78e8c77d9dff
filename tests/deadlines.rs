//! Deadlines: a source that goes silent (its sshd stopped, not killed), a
//! source path that never answers (a file on a hung mount on the old host),
//! and unmounting whatever the source does. Bounds are generous (a loaded machine); they mean "no hang".

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::mount::{Mount, Source, TestEnv, content, dataset, is_alive, is_mounted, processes_using};
use common::sshd::{Sshd, descendants};
use lazyfs::images::write::{DumpFile, write_dump};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The test's sshd and every session process it started, stopped (SIGSTOP):
/// connections stay open, nothing answers. Resumed when dropped, always.
struct Silenced {
    pids: Vec<i32>,
}

impl Silenced {
    fn new(sshd: &Sshd) -> Silenced {
        let listener = sshd.pid();
        let mut silenced = Silenced { pids: vec![listener] };
        // SAFETY: kill(2) on PIDs this test started (the sshd and its children).
        unsafe { libc::kill(listener, libc::SIGSTOP) };
        // Sessions may fork while being stopped: repeat until no new one shows.
        loop {
            let new: Vec<i32> = descendants(listener).into_iter().filter(|p| !silenced.pids.contains(p)).collect();
            if new.is_empty() {
                return silenced;
            }
            for pid in new {
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                silenced.pids.push(pid);
            }
        }
    }
}

impl Drop for Silenced {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: as above; resuming processes this test stopped.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

fn ssh<'a>(sshd: &'a Sshd, env: &TestEnv) -> Source<'a> {
    Source::Ssh { sshd, root: env.path("source") }
}

fn file_status(status: &Value, path: &str) -> Value {
    status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).cloned().unwrap()
}

/// Reads `path` whole in a thread; the result and how long it took.
fn read_timed(path: PathBuf) -> std::thread::JoinHandle<(std::io::Result<Vec<u8>>, Duration)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = std::fs::read(path);
        (result, started.elapsed())
    })
}

#[test]
fn a_silent_source_answers_readers_eio_within_the_reconnect_timeout_then_bytes_again() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/s/first", 100_000), ("/s/second", 300_000)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--reconnect-timeout", "5"]);
    assert!(std::fs::read(mount.at("/s/first")).unwrap() == content("/s/first", 100_000));

    let silenced = Silenced::new(&sshd);
    let (result, waited) = read_timed(mount.at("/s/second")).join().unwrap();
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    eprintln!("silent source, --reconnect-timeout 5: the reader got EIO after {:.2} s", waited.as_secs_f64());
    assert!(waited < Duration::from_secs(20), "no bound on the wait: {waited:?}");
    assert!(waited >= Duration::from_secs(4), "EIO before the timeout: {waited:?}");
    // A second reader meanwhile is bounded the same way.
    let (result, waited) = read_timed(mount.at("/s/second")).join().unwrap();
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(waited < Duration::from_secs(20), "no bound on the second wait: {waited:?}");

    drop(silenced);
    // Back: the same file reads (it is not failed for good).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match std::fs::read(mount.at("/s/second")) {
            Ok(bytes) => {
                assert!(bytes == content("/s/second", 300_000));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no bytes after the source woke: {e}"),
        }
    }
    mount.wait_for(|s| file_status(s, "/s/second")["state"] == "verified", "not verified after the source woke");
}

/// A hung mount on the old host: below the source root, `/h` is a lazyfs
/// mount whose own source (a second sshd) is silenced, so reading `/h/stuck`
/// there blocks while its look (LSTAT) and OPEN are answered. Dropped in
/// field order: the silence ends, then the inner mount goes (its daemon
/// ends even if the outer sshd's session still waits on it), then its sshd.
struct HungMount {
    _silenced: Silenced,
    inner: Mount,
    _sshd: Sshd,
}

/// A source with good files and a file on a hung mount (`/h/stuck`, 10 bytes).
fn hung_world(env: &TestEnv, fine: &[(&str, usize)]) -> HungMount {
    let sshd = Sshd::start();
    dataset(&env.path("inner"), &env.path("inner-images"), &[("/stuck", 10)]);
    let mountpoint = env.path("source/h");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let cache = env.path("cache/inner");
    let mut command = env.lazyfs();
    command.arg("mount").arg(&mountpoint).arg(env.path("inner-images")).arg(sshd.target());
    command.arg("-i").arg(sshd.user_key()).arg("--known-hosts").arg(sshd.known_hosts());
    command.arg("--source-root").arg(env.path("inner")).arg("--cache-dir").arg(&cache);
    // Connected before it returns: silenced after, its LSTAT and OPEN still answer.
    let out = command.args(["--reconnect-timeout", "600", "--wait-for-source"]).output().unwrap();
    assert!(out.status.success(), "inner mount: {}", String::from_utf8_lossy(&out.stderr));
    let inner = Mount { mountpoint, cache, env_home: env.tmp.path().into() };
    let mut records = dataset(&env.path("source"), &env.path("scratch"), fine);
    records.push(DumpFile::new("/h/stuck", 10));
    write_dump(&env.path("images"), &records).unwrap();
    let silenced = Silenced::new(&sshd);
    HungMount { _silenced: silenced, inner, _sshd: sshd }
}

fn bounded_umount(mount: &Mount) {
    let started = Instant::now();
    let out = mount.umount();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(15), "umount took {:?}", started.elapsed());
    assert!(!is_mounted(&mount.mountpoint));
}

#[test]
fn a_hung_source_path_costs_only_its_own_file() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let fine = [("/f/fine.txt", 5_000), ("/f/other", 200_000)];
    let _hung = hung_world(&env, &fine);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--reconnect-timeout", "4"]);

    let stuck = read_timed(mount.at("/h/stuck"));
    std::thread::sleep(Duration::from_millis(300));
    for (path, len) in fine {
        let (result, waited) = read_timed(mount.at(path)).join().unwrap();
        assert!(result.unwrap() == content(path, len), "{path}");
        assert!(waited < Duration::from_secs(3), "{path} waited {waited:?} behind the stuck file");
    }
    let (result, waited) = stuck.join().unwrap();
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(waited < Duration::from_secs(20), "the stuck read took {waited:?}");

    // Tried again on the next read, then failed for good with the reason.
    let (result, _) = read_timed(mount.at("/h/stuck")).join().unwrap();
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    let status = mount.wait_for(|s| file_status(s, "/h/stuck")["state"] == "failed", "the stuck file never failed");
    let reason = file_status(&status, "/h/stuck")["error"].to_string();
    assert!(reason.contains("did not answer"), "{reason}");
    let started = Instant::now();
    assert_eq!(std::fs::read(mount.at("/h/stuck")).unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(started.elapsed() < Duration::from_secs(2), "a failed file still waits");
    bounded_umount(&mount);
}

#[test]
fn a_hung_path_in_a_prefetch_batch_holds_no_other_file_hostage() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    // Smallest first: the hung file's 10 bytes open the first batch, the rest follow it.
    let fine: Vec<(String, usize)> = (0..40).map(|i| (format!("/f/small-{i:02}"), 1_000 + i)).collect();
    let mut fine_refs: Vec<(&str, usize)> = fine.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    fine_refs.push(("/f/fine.txt", 3_000));
    let _hung = hung_world(&env, &fine_refs);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "--reconnect-timeout", "4"]);

    let (result, waited) = read_timed(mount.at("/f/fine.txt")).join().unwrap();
    assert!(result.unwrap() == content("/f/fine.txt", 3_000));
    eprintln!("fine.txt next to a hung file in a prefetch batch: read in {:.2} s", waited.as_secs_f64());
    assert!(waited < Duration::from_secs(8), "fine.txt waited {waited:?} behind the stuck file");

    let status = mount.wait_for(
        |s| {
            s["files"].as_array().unwrap().iter().all(|f| f["state"] == "verified" || f["path"] == "/h/stuck")
                && file_status(s, "/h/stuck")["state"] == "failed"
        },
        "not every fine file verified, or the stuck one not failed",
    );
    let reason = file_status(&status, "/h/stuck")["error"].to_string();
    assert!(reason.contains("did not answer"), "{reason}");
    for (path, len) in &fine_refs {
        assert!(std::fs::read(mount.at(path)).unwrap() == content(path, *len), "{path}");
    }
    bounded_umount(&mount);
}

#[test]
fn umount_ends_in_bounded_time_while_the_source_is_silent() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/u/big", 64 << 20), ("/u/small", 1_000)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--prefetch", "-j", "2"]);
    mount.wait_for(|s| s["bytes_present"].as_u64().unwrap() > 0, "no progress");
    let _silenced = Silenced::new(&sshd);
    std::thread::sleep(Duration::from_millis(500));
    bounded_umount(&mount);
}

/// A daemon ends on SIGTERM even while a request to it hangs: the old host's
/// sftp-server waits in the kernel on a read of the hung inner mount, so that
/// mount stays busy (the first SIGTERM detaches it) and the request never
/// ends; the next SIGTERM ends the daemon, and the waiting session with it.
#[test]
fn a_daemon_ends_on_sigterm_while_a_request_to_it_hangs() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let hung = hung_world(&env, &[("/f/fine.txt", 5_000)]);
    let mount = env.mount("m", &env.path("images"), &ssh(&sshd, &env), &["--reconnect-timeout", "4"]);
    let stuck = read_timed(mount.at("/h/stuck"));

    // The inner mount's own processes name its mountpoint: the one waiting is the old host's sftp-server.
    let inner = hung.inner.status();
    let own = [&inner["pid"], &inner["supervisor_pid"]].map(|pid| pid.as_i64().unwrap() as i32);
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let waiting: Vec<i32> =
            processes_using(&hung.inner.mountpoint).into_iter().filter(|pid| !own.contains(pid)).collect();
        if !waiting.is_empty() {
            break waiting;
        }
        assert!(Instant::now() < deadline, "nothing reads the hung mount");
        std::thread::sleep(Duration::from_millis(50));
    };
    let daemon = Pid::from_raw(hung.inner.status()["pid"].as_i64().unwrap() as i32);
    kill(daemon, Signal::SIGTERM).unwrap();
    hung.inner.wait_for(|s| s["detached"] == true, "the busy mount was not detached");
    kill(daemon, Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(daemon.as_raw()) {
        assert!(Instant::now() < deadline, "the daemon did not end on the second SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The request that hung is answered: no session waits in the kernel any more.
    let in_kernel_wait =
        |pid: &i32| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") D "));
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting.iter().any(in_kernel_wait) {
        assert!(Instant::now() < deadline, "a session still waits on the ended mount: {waiting:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (result, _) = stuck.join().unwrap();
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
}
