//! Mounts that race for one mountpoint, and mounts detached while busy.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::mount::{Mount, Source, TestEnv, dataset, is_alive, is_mounted};

/// How many times `path` is a mountpoint (stacked mounts count each).
fn mounts_at(path: &Path) -> usize {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    mountinfo.lines().filter(|line| line.split(' ').nth(4) == Some(wanted.as_str())).count()
}

/// lazyfs daemons serving `mountpoint`.
fn daemons_for(mountpoint: &Path) -> Vec<i32> {
    let wanted = mountpoint.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&b"--daemon".as_slice()) && args.contains(&wanted)
        })
        .collect()
}

#[test]
fn of_twenty_racing_mounts_exactly_one_wins_and_the_others_leave_nothing() {
    let env = Arc::new(TestEnv::new());
    dataset(&env.path("source"), &env.path("images"), &[("/r/file", 10_000)]);
    let mountpoint = env.path("mnt").join("m");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let racers = 20;
    let start = Arc::new(Barrier::new(racers));
    let handles: Vec<_> = (0..racers)
        .map(|i| {
            let (env, start) = (env.clone(), start.clone());
            std::thread::spawn(move || {
                let mut command = env.lazyfs();
                command.arg("mount").arg(env.path("mnt").join("m")).arg(env.path("images")).arg(env.path("source"));
                // Cache dirs of their own: only the mountpoint is contended.
                command.arg("--cache-dir").arg(env.path("cache").join(format!("m{i}")));
                start.wait();
                command.output().unwrap()
            })
        })
        .collect();
    let outputs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let won = outputs.iter().filter(|o| o.status.success()).count();
    let mount = Mount { mountpoint: mountpoint.clone(), cache: env.path("cache"), env_home: env.tmp.path().into() };
    assert_eq!(won, 1, "{won} mounts won");
    for lost in outputs.iter().filter(|o| !o.status.success()) {
        let stderr = String::from_utf8_lossy(&lost.stderr);
        assert!(stderr.contains("another lazyfs process") || stderr.contains("already"), "{stderr}");
    }
    assert_eq!(mounts_at(&mountpoint), 1, "stacked mounts");
    assert_eq!(daemons_for(&mountpoint).len(), 1, "orphaned daemons");
    let status = env.run(&["status", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(std::fs::read(mount.at("/r/file")).is_ok());

    let out = mount.umount();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(&mountpoint));
    // `umount` answers just before the daemon exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemons_for(&mountpoint).is_empty() {
        assert!(Instant::now() < deadline, "a daemon stayed behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the mountpoint is free again.
    let again = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    assert!(std::fs::read(again.at("/r/file")).is_ok());
}

/// A process holding `path` open (as its stdin) until killed, or dropped.
struct Holder(std::process::Child);

impl Holder {
    fn start(path: &Path) -> Holder {
        let file = std::fs::File::open(path).unwrap();
        Holder(std::process::Command::new("sleep").arg("600").stdin(file).spawn().unwrap())
    }

    fn id(&self) -> u32 {
        self.0.id()
    }

    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `done` to hold of `lazyfs status --json` (all mounts).
fn wait_listed(env: &TestEnv, done: impl Fn(&serde_json::Value) -> bool, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = env.run(&["status", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if done(&listed) {
            return listed;
        }
        assert!(Instant::now() < deadline, "{what}: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn detached_mount_shows_until_its_holders_close(detach: impl FnOnce(&Mount)) {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/d/file", 10_000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let mut held = Holder::start(&mount.at("/d/file"));
    let pid = mount.status()["pid"].as_u64().unwrap();
    detach(&mount);

    let listed = wait_listed(&env, |l| l[0]["detached"] == true, "never shown as detached");
    assert_eq!(listed[0]["pid"], pid);
    let holders: Vec<u64> = listed[0]["holders"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    assert_eq!(holders, [u64::from(held.id())], "{listed}");
    let plain = env.run(&["status"]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains(&format!("detached (held open by PIDs {})", held.id())));

    let out = mount.umount();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already unmounted (detached)") && stderr.contains(&held.id().to_string()), "{stderr}");
    assert!(!stderr.contains("Invalid argument"), "{stderr}");

    held.kill();
    wait_listed(&env, |l| l.as_array().is_some_and(Vec::is_empty), "the detached daemon did not end");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the detached daemon {pid} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_mount_detached_by_umount_l_shows_as_detached_with_its_holders() {
    detached_mount_shows_until_its_holders_close(|mount| {
        let out = std::process::Command::new("umount").arg("-l").arg(&mount.mountpoint).output().unwrap();
        assert!(out.status.success(), "umount -l: {}", String::from_utf8_lossy(&out.stderr));
    });
}

#[test]
fn a_busy_mount_detached_on_sigterm_shows_as_detached_with_its_holders() {
    detached_mount_shows_until_its_holders_close(|mount| {
        let pid = mount.status()["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    });
}

/// Signalled again, a detached mount ends at once: a holder that never
/// closes does not keep lazyfs alive; its file then answers ENOTCONN.
#[test]
fn a_second_sigterm_ends_a_detached_mount_at_once() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/d/file", 10_000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let held = Holder::start(&mount.at("/d/file"));
    let pid = mount.status()["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_listed(&env, |l| l[0]["detached"] == true, "never shown as detached");
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(pid) {
        assert!(Instant::now() < deadline, "the detached daemon {pid} did not end on the second SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Path::new(&format!("/proc/{}", held.id())).exists(), "the holder is still there");
    let err = std::fs::read(format!("/proc/{}/fd/0", held.id())).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    wait_listed(&env, |l| l.as_array().is_some_and(Vec::is_empty), "the ended mount is still listed");
}
