//! Mount lifecycle: readiness, failures that leave nothing mounted, umount,
//! signals, stale mounts, and files missing on the source.

mod common;

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::{Source, TestEnv, content, dataset, is_mounted};
use common::sshd::Sshd;

fn daemon_pid(env: &TestEnv, mount: &common::mount::Mount) -> i32 {
    let _ = env;
    mount.status()["pid"].as_i64().unwrap() as i32
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unknown_host_key_is_refused_and_nothing_is_mounted_with_wait_for_source() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/k/file", 10)]);
    std::fs::write(sshd.known_hosts(), "").unwrap();
    let source = Source::Ssh { sshd: &sshd, root: env.path("source") };
    let out = env.try_mount("m", &env.path("images"), &source, &["--wait-for-source"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--accept-new-host-key") && stderr.contains("SHA256:"), "{stderr}");
    assert!(!is_mounted(&env.path("mnt/m")));

    let out = env.try_mount(
        "m",
        &env.path("images"),
        &Source::Ssh { sshd: &sshd, root: env.path("source") },
        &["--accept-new-host-key"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mount = common::mount::Mount {
        mountpoint: env.path("mnt/m"),
        cache: env.path("cache/m"),
        env_home: env.tmp.path().into(),
    };
    assert_eq!(std::fs::read(mount.at("/k/file")).unwrap(), content("/k/file", 10));
}

/// Without --wait-for-source, `mount` returns before the source answers.
/// A source that refuses lazyfs (an unknown host key) is said at once: the
/// first read of a missing byte fails (EIO), status names the reason, `wait`
/// exits 1 with it on one line, and the log has it. A source that does not
/// answer (a closed port) is tried again, as a lost connection is: status
/// says why at once, a reader gets EIO once --reconnect-timeout passed, and
/// `wait` times out (exit 3) saying why.
#[test]
fn a_source_that_cannot_be_used_after_a_lazy_mount_is_said_at_once() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/k/file", 10)]);
    std::fs::write(sshd.known_hosts(), "").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let key = sshd.user_key().display().to_string();
    let cases: [(&str, Vec<String>, &[&str], i32); 2] = [
        ("unknown-key", vec![sshd.target(), "-i".into(), key], &["--accept-new-host-key", "SHA256:"], 1),
        ("closed-port", vec![format!("root@127.0.0.1:{closed}")], &["cannot connect", "trying again"], 3),
    ];
    for (name, source, said, wait_code) in cases {
        let mountpoint = env.path("mnt").join(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        let out = env
            .lazyfs()
            .arg("mount")
            .arg(&mountpoint)
            .arg(env.path("images"))
            .args(&source)
            .arg("--known-hosts")
            .arg(sshd.known_hosts())
            .arg("--cache-dir")
            .arg(env.path("cache").join(name))
            .args(["--reconnect-timeout", "3"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let mount = common::mount::Mount {
            mountpoint: mountpoint.clone(),
            cache: env.path("cache").join(name),
            env_home: env.tmp.path().into(),
        };
        let status = mount.wait_for(|s| s["state"] == "degraded", "never degraded");
        let reason = status["degraded_reason"].as_str().unwrap().to_string();
        assert_eq!(status["source_error"].is_null(), wait_code != 1, "{name}: {status}");
        let started = Instant::now();
        let err = std::fs::read(mount.at("/k/file")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
        assert!(started.elapsed() < Duration::from_secs(20), "{name}: EIO only after {:?}", started.elapsed());
        let out = env.run(&["wait", mountpoint.to_str().unwrap(), "--timeout", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(wait_code), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        let log = std::fs::read_to_string(mount.cache.join("lazyfs.log")).unwrap();
        for needle in said {
            assert!(reason.contains(needle), "{name}: {needle} not in {reason}");
            assert!(stderr.contains(needle), "{name}: {needle} not in {stderr}");
        }
        assert!(log.contains(said[0]), "{name}: {} not in the log:\n{log}", said[0]);
    }
}

#[test]
fn failures_before_the_mount_leave_nothing_mounted() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/f/file", 10)]);
    let local = Source::Local(env.path("source"));

    // Bad images: exit 2, naming the image.
    let out = env.try_mount("bad-images", &env.path("nonexistent-images"), &local, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent-images"));
    let malformed = common::fixtures().join("malformed/truncated-entry");
    let out = env.try_mount("malformed", &malformed, &local, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("files.img"));

    // A mountpoint that is missing, or not empty.
    let out = env
        .lazyfs()
        .arg("mount")
        .arg(env.path("no-such-dir"))
        .arg(env.path("images"))
        .arg(env.path("source"))
        .arg("--cache-dir")
        .arg(env.path("cache/x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir_all(env.path("mnt/full")).unwrap();
    std::fs::write(env.path("mnt/full/x"), "").unwrap();
    let out = env.try_mount("full", &env.path("images"), &local, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // An unreachable host, with --wait-for-source: exit 1 (the mountpoint is
    // fine: it is checked first).
    std::fs::create_dir_all(env.path("mnt/unreachable")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = env
        .lazyfs()
        .arg("mount")
        .arg(env.path("mnt/unreachable"))
        .arg(env.path("images"))
        .arg(format!("root@127.0.0.1:{port}"))
        .arg("--cache-dir")
        .arg(env.path("cache/u"))
        .arg("--wait-for-source")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");

    for name in ["bad-images", "malformed", "full", "unreachable"] {
        assert!(!is_mounted(&env.path("mnt").join(name)), "{name}");
    }
}

#[test]
fn umount_stops_the_process_and_leaves_nothing_mounted() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/u/file", 1000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let pid = daemon_pid(&env, &mount);
    let out = mount.umount();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(&mount.mountpoint));
    wait_gone(pid);

    // Status and umount of what is no longer a mount: a clear message, non-zero.
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a lazyfs mount"));
    let out = env.run(&["umount", mount.mountpoint.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn umount_of_a_busy_mount_says_so_and_keeps_it() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/b/file", 1000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let held = std::fs::File::open(mount.at("/b/file")).unwrap();
    let out = mount.umount();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("busy"), "{stderr}");
    // Who holds it, as `fuser -m` would say: this test's process.
    let me = format!("{} (", std::process::id());
    assert!(stderr.contains(&me), "{stderr}");
    assert!(is_mounted(&mount.mountpoint));
    drop(held);
    assert!(mount.umount().status.success());
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let env = TestEnv::new();
        dataset(&env.path("source"), &env.path("images"), &[("/s/file", 1000)]);
        let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
        let pid = daemon_pid(&env, &mount);
        unsafe { libc::kill(pid, signal) };
        wait_gone(pid);
        assert!(!is_mounted(&mount.mountpoint), "signal {signal}");
        assert!(env.run(&["status"]).stdout.starts_with(b"no lazyfs mounts"));
    }
}

#[test]
fn a_stale_mount_of_a_killed_process_is_cleared_by_the_next_mount() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/st/file", 1000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    mount.kill_all();
    let err = std::fs::metadata(&mount.mountpoint).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)), "not a stale mount: {err}");

    let again = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    assert_eq!(std::fs::read(again.at("/st/file")).unwrap(), content("/st/file", 1000));
}

#[test]
fn a_file_missing_on_the_source_is_an_io_error_and_the_others_work() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/x/gone", 5000), ("/x/here", 5000)]);
    std::fs::remove_file(env.path("source/x/gone")).unwrap();
    let mount = env.mount("m", &env.path("images"), &Source::Ssh { sshd: &sshd, root: env.path("source") }, &[]);

    let err = std::fs::read(mount.at("/x/gone")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(std::fs::read(mount.at("/x/here")).unwrap(), content("/x/here", 5000));
    let log = std::fs::read_to_string(mount.cache.join("lazyfs.log")).unwrap();
    assert!(log.contains("/x/gone: not found on the source"), "{log}");
    let status = mount.status();
    let gone = status["files"].as_array().unwrap().iter().find(|f| f["path"] == "/x/gone").unwrap();
    assert_eq!(gone["state"], "failed");
    assert!(gone["error"].as_str().unwrap().contains("not found"));
}

#[test]
fn foreground_mount_serves_until_interrupted() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/fg/file", 100)]);
    let mountpoint = env.path("mnt/fg");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut child = env
        .lazyfs()
        .arg("mount")
        .arg("-f")
        .arg(&mountpoint)
        .arg(env.path("images"))
        .arg(env.path("source"))
        .arg("--cache-dir")
        .arg(env.path("cache/fg"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8];
    while !String::from_utf8_lossy(&seen).contains("mounted at") {
        assert_eq!(stderr.read(&mut byte).unwrap(), 1, "{}", String::from_utf8_lossy(&seen));
        seen.push(byte[0]);
    }
    assert_eq!(std::fs::read(mountpoint.join("fg/file")).unwrap(), content("/fg/file", 100));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mountpoint));
    let _ = Command::new("true").status();
}

/// A process that copied the mount namespace (here `unshare -m` with private
/// propagation, as `ip netns exec` and many sandboxes do) keeps a copy of the
/// mount that the unmount does not reach: `lazyfs umount` still ends in
/// bounded time, and the copy answers ENOTCONN instead of hanging.
#[test]
fn umount_ends_even_when_another_mount_namespace_holds_a_copy() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/ns/file", 1000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let pid = daemon_pid(&env, &mount);
    let file = mount.at("/ns/file");
    // The copy: a shell in a new mount namespace that waits, then tries the file.
    let mut copy = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"read _; cat "$1" >/dev/null 2>&1; echo "cat=$?""#,
            "sh",
        ])
        .arg(&file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The namespace exists once the shell runs: wait for it to differ from ours.
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{}/ns/mnt", copy.id())).ok().is_none_or(|ns| ns == ours) {
        assert!(Instant::now() < deadline, "unshare did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let out = mount.umount();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_gone(pid);
    assert!(started.elapsed() < Duration::from_secs(20), "umount took {:?}", started.elapsed());
    assert!(!is_mounted(&mount.mountpoint));
    // The copy's file no longer answers, and nothing hangs.
    use std::io::Write;
    copy.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = copy.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.trim().starts_with("cat=") && said.trim() != "cat=0", "the copy still served the file: {said}");
}

/// A test that passes but leaves a process (or a mount) below its directory
/// fails, and what it left is ended: the suite leaves nothing behind.
#[test]
fn a_test_that_leaves_a_process_behind_fails_and_the_process_ends() {
    let env = TestEnv::new();
    let mut left = Command::new("sleep").arg("600").current_dir(env.path("source")).spawn().unwrap();
    let pid = left.id() as i32;
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(env)));
    assert!(dropped.is_err(), "a process left behind went unnoticed");
    left.wait().unwrap();
    assert!(!common::mount::is_alive(pid));
}
