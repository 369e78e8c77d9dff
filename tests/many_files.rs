//! A checkpoint recording 100,000 files, mounted and prefetched under a
//! descriptor limit of 1,024 (`ulimit -n 1024`): spill files are opened as
//! they are used, a bounded number at a time.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::mount::{Mount, TestEnv, content};
use lazyfs::images::write::{DumpFile, write_dump};

const FILES: usize = 100_000;
const FD_LIMIT: u64 = 1024;

fn name(i: usize) -> String {
    format!("/many/d{:03}/f{i:06}", i / 1000)
}

/// Runs `command` with soft and hard descriptor limits of `FD_LIMIT`.
fn limited(command: &mut Command) -> &mut Command {
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: FD_LIMIT, rlim_max: FD_LIMIT };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Descriptors `pid` has open below `dir`.
fn open_below(pid: i32, dir: &Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir)))
        .count()
}

#[test]
fn a_hundred_thousand_files_mount_and_prefetch_under_ulimit_n_1024() {
    let env = TestEnv::new();
    let source = env.path("source");
    let mut records = Vec::with_capacity(FILES);
    let t0 = Instant::now();
    for i in 0..FILES {
        let path = name(i);
        let on_disk = source.join(path.trim_start_matches('/'));
        if i % 1000 == 0 {
            std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
        }
        let len = 1 + i % 200;
        std::fs::write(&on_disk, content(&path, len)).unwrap();
        records.push(DumpFile::new(path, len as u64));
    }
    eprintln!("{FILES} files written in {:.2} s", t0.elapsed().as_secs_f64());
    write_dump(&env.path("images"), &records).unwrap();
    eprintln!("their images written in {:.2} s", t0.elapsed().as_secs_f64());

    let mountpoint = env.path("mnt").join("m");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let cache = env.path("cache").join("m");
    let started = Instant::now();
    let out = limited(&mut env.lazyfs())
        .arg("mount")
        .arg(&mountpoint)
        .arg(env.path("images"))
        .arg(&source)
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--prefetch")
        .output()
        .unwrap();
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
    let mount = Mount { mountpoint, cache: cache.clone(), env_home: env.tmp.path().into() };
    eprintln!("{FILES} files: mounted in {:.2} s under ulimit -n {FD_LIMIT}", started.elapsed().as_secs_f64());

    let status = mount.status();
    assert_eq!(status["files_total"], FILES);
    let pid = status["pid"].as_i64().unwrap() as i32;
    // Reads of files prefetch has not reached yet, while it runs.
    for i in (0..FILES).rev().step_by(9_973) {
        assert!(std::fs::read(mount.at(&name(i))).unwrap() == content(&name(i), 1 + i % 200), "{}", name(i));
    }
    let out = env.run(&["wait", mount.mountpoint.to_str().unwrap(), "--timeout", "600"]);
    assert!(out.status.success(), "wait: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{FILES} files: mounted and all verified in {:.2} s", started.elapsed().as_secs_f64());
    let spill_fds = open_below(pid, &cache);
    assert!(spill_fds <= FD_LIMIT as usize / 2 + 16, "{spill_fds} descriptors open in the cache dir");
    for i in (0..FILES).step_by(7_919) {
        assert!(std::fs::read(mount.at(&name(i))).unwrap() == content(&name(i), 1 + i % 200), "{}", name(i));
    }
    let unmounting = Instant::now();
    let out = mount.umount();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("unmounted in {:.2} s", unmounting.elapsed().as_secs_f64());
}
