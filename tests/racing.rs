//! Mounts that race for one mountpoint, and mounts detached while busy.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::mount::{Mount, Source, TestEnv, dataset, is_mounted};

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
