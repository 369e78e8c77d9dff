//! Real FUSE mounts over a real sshd (and a local directory source).

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::mount::{Source, TestEnv, content, dataset, is_mounted};
use common::sshd::Sshd;
use lazyfs::store::CHUNK_SIZE;

const CHUNK: usize = CHUNK_SIZE as usize;

fn odd_files() -> Vec<(&'static str, usize)> {
    vec![
        ("/srv/app/empty", 0),
        ("/srv/app/one", 1),
        ("/srv/app/chunk-minus-one", CHUNK - 1),
        ("/srv/app/chunk", CHUNK),
        ("/srv/app/chunk-plus-one", CHUNK + 1),
        ("/srv/app/three-megs.bin", 3 << 20),
        ("/srv/app/dir with space/quote's \"dq\" $(touch x);`id`", 5000),
        ("/srv/app/new\nline", 300),
        ("/srv/other/ünïcødé", 70_000),
    ]
}

/// Random ranges (deterministic) to read back.
fn ranges(len: usize, count: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    (0..count)
        .map(|_| {
            let offset = if len == 0 { 0 } else { next() % len };
            (offset, 1 + next() % (3 * CHUNK))
        })
        .collect()
}

fn check_ranges(mounted: &Path, expected: &[u8], count: usize, seed: u64) {
    let file = File::open(mounted).unwrap();
    for (offset, len) in ranges(expected.len(), count, seed) {
        let mut buf = vec![0; len];
        let n = read_at_most(&file, &mut buf, offset as u64);
        let end = (offset + len).min(expected.len());
        assert_eq!(&buf[..n], &expected[offset..end], "{} at {offset}+{len}", mounted.display());
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

#[test]
fn every_byte_through_an_ssh_mount_equals_the_source() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files = odd_files();
    dataset(&env.path("source"), &env.path("images"), &files);
    let mount = env.mount("m", &env.path("images"), &Source::Ssh { sshd: &sshd, root: env.path("source") }, &[]);

    for (path, len) in &files {
        let mounted = mount.at(path);
        let meta = std::fs::metadata(&mounted).unwrap();
        assert_eq!(meta.len(), *len as u64, "{path}");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        let expected = content(path, *len);
        check_ranges(&mounted, &expected, 40, len.wrapping_add(7) as u64);
        assert!(std::fs::read(&mounted).unwrap() == expected, "{path}");
    }
}

#[test]
fn a_small_read_fetches_only_a_chunk_or_two() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/data/big.bin", 64 << 20), ("/data/other", 10 << 20)]);
    let mount = env.mount("m", &env.path("images"), &Source::Ssh { sshd: &sshd, root: env.path("source") }, &[]);

    let mut buf = [0u8; 4096];
    File::open(mount.at("/data/big.bin")).unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &content("/data/big.bin", 4096)[..]);

    let status = mount.status();
    let present = status["bytes_present"].as_u64().unwrap();
    assert!((4096..=2 * CHUNK_SIZE).contains(&present), "{present} bytes fetched for a 4 KiB read");
    // Only the chunks read took space in the cache.
    let spill_blocks: u64 =
        std::fs::read_dir(mount.cache.join("spill")).unwrap().map(|e| e.unwrap().metadata().unwrap().blocks()).sum();
    assert!(spill_blocks * 512 <= 2 * CHUNK_SIZE + 65536, "{} bytes allocated", spill_blocks * 512);
    assert_eq!(status["files"].as_array().unwrap().len(), 2);
}

/// A process reads what it opens: a small file (up to 1 MiB) opened for
/// reading is fetched whole at once, in a batch with the others opened
/// meanwhile (a restore opens them all, then the process reads them one by
/// one); a larger one, or one opened only for writing, is not.
#[test]
fn small_files_opened_for_reading_are_fetched_whole_before_they_are_read() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let small: Vec<(String, usize)> = (0..40).map(|i| (format!("/o/mod{i:02}.py"), 3_000 + i * 977)).collect();
    let mut files: Vec<(&str, usize)> = small.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    files.extend([("/o/large", 3 << 20), ("/o/written", 5_000)]);
    dataset(&env.path("source"), &env.path("images"), &files);
    let mount = env.mount("m", &env.path("images"), &Source::Ssh { sshd: &sshd, root: env.path("source") }, &[]);
    let held: Vec<File> = small.iter().map(|(path, _)| File::open(mount.at(path)).unwrap()).collect();
    let large = File::open(mount.at("/o/large")).unwrap();
    let written = std::fs::OpenOptions::new().write(true).open(mount.at("/o/written")).unwrap();
    let file = |s: &serde_json::Value, path: &str| {
        s["files"].as_array().unwrap().iter().find(|f| f["path"] == path).cloned().unwrap()
    };
    let status = mount.wait_for(
        |s| small.iter().all(|(path, _)| file(s, path)["state"] == "verified"),
        "the small files opened were not fetched",
    );
    for (path, len) in &small {
        assert_eq!(file(&status, path)["reads"], 0, "{path} was read");
        assert_eq!(file(&status, path)["bytes_present"], *len, "{path}");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = mount.status();
    assert_eq!(file(&status, "/o/large")["bytes_present"], 0, "a large file opened is not fetched whole");
    assert_eq!(file(&status, "/o/written")["bytes_present"], 0, "a file opened for writing only is not");
    for ((path, len), mut held) in small.iter().zip(held) {
        let mut bytes = Vec::new();
        held.read_to_end(&mut bytes).unwrap();
        assert!(bytes == content(path, *len), "{path}");
    }
    drop((large, written));
}

#[test]
fn concurrent_readers_get_exact_bytes() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let files = [("/c/a", 5 << 20), ("/c/b", 3 << 20), ("/c/c", 777_777)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let mount = env.mount("m", &env.path("images"), &Source::Ssh { sshd: &sshd, root: env.path("source") }, &[]);

    std::thread::scope(|scope| {
        for reader in 0..8u64 {
            let mount = &mount;
            scope.spawn(move || {
                for (path, len) in files {
                    check_ranges(&mount.at(path), &content(path, len), 30, reader * 1000 + len as u64);
                }
            });
        }
    });
}

#[test]
fn writes_stay_local_and_the_source_is_never_written() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/w/file", 200_000), ("/w/trunc", 300_000)]);
    let source_file = env.path("source/w/file");
    let before = std::fs::read(&source_file).unwrap();
    let mount = env.mount("m", &env.path("images"), &Source::Ssh { sshd: &sshd, root: env.path("source") }, &[]);

    let mut file = File::options().read(true).write(true).open(mount.at("/w/file")).unwrap();
    file.seek(SeekFrom::Start(150_000)).unwrap();
    file.write_all(b"written locally").unwrap();
    file.write_all_at(b"tail", 199_998).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let mut expected = before.clone();
    expected[150_000..150_015].copy_from_slice(b"written locally");
    expected.truncate(199_998);
    expected.extend_from_slice(b"tail");
    assert!(std::fs::read(mount.at("/w/file")).unwrap() == expected);
    assert!(std::fs::read(&source_file).unwrap() == before, "the source changed");

    // Truncating keeps what is below the new end.
    File::options().write(true).open(mount.at("/w/trunc")).unwrap().set_len(1000).unwrap();
    assert!(std::fs::read(mount.at("/w/trunc")).unwrap() == content("/w/trunc", 1000));
    assert_eq!(std::fs::metadata(env.path("source/w/trunc")).unwrap().len(), 300_000);

    let status = mount.status();
    let states: Vec<&str> = status["files"].as_array().unwrap().iter().map(|f| f["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["modified", "modified"]);
}

#[test]
fn attributes_outlive_the_mount_and_locks_are_the_kernels() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/m/file", 100)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let path = mount.at("/m/file");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    File::options().write(true).open(&path).unwrap().set_modified(when).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().mtime(), 1_000_000);

    // flock and fcntl locks are handled by the kernel, per mount.
    {
        let a = File::open(&path).unwrap();
        let b = File::open(&path).unwrap();
        let _held =
            nix::fcntl::Flock::lock(a, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).unwrap();
        let refused = nix::fcntl::Flock::lock(b, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(matches!(refused, Err((_, nix::errno::Errno::EWOULDBLOCK))));
    }

    // Attributes are journaled like names: they outlive the mount.
    assert!(mount.umount().status.success());
    drop(mount);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    let meta = std::fs::metadata(mount.at("/m/file")).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, meta.mtime()), (0o600, 1_000_000));
}

#[test]
fn read_only_refuses_writes() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/r/file", 100)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--read-only"]);
    let err = File::options().write(true).open(mount.at("/r/file")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::read(mount.at("/r/file")).unwrap(), content("/r/file", 100));
}

#[test]
fn flat_layout_uses_the_prototype_names() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/srv/app/db", 10), ("/etc/conf", 20)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--layout", "flat"]);
    let mut names: Vec<String> =
        std::fs::read_dir(&mount.mountpoint).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["etc.conf", "srv.app.db"]);
    assert_eq!(std::fs::read(mount.mountpoint.join("srv.app.db")).unwrap(), content("/srv/app/db", 10));

    // Two files with one flat name: refused, naming both, nothing mounted.
    let images = env.path("images-collide");
    dataset(&env.path("source"), &images, &[("/a.b/c", 1), ("/a/b.c", 2)]);
    let out = env.try_mount("collide", &images, &Source::Local(env.path("source")), &["--layout", "flat"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/a.b/c") && stderr.contains("/a/b.c"), "{stderr}");
    assert!(!is_mounted(&env.path("mnt/collide")));
}

/// Flat names have no directories, so `--layout flat --subtree DIR` cannot
/// show DIR whole: refused in one line that says what to give instead
/// (nothing mounted), not silently served as the recorded files only; with
/// `--recorded-only` it serves the recorded files below DIR, flat.
#[test]
fn flat_layout_with_subtree_says_the_whole_directory_is_not_served() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/srv/app/x/db", 10), ("/etc/conf", 20)]);
    std::fs::write(env.path("source/srv/app/not-recorded"), b"the rest of the directory").unwrap();
    let (images, source) = (env.path("images"), Source::Local(env.path("source")));
    let out = env.try_mount("whole", &images, &source, &["--layout", "flat", "--subtree", "/srv/app"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--layout flat") && stderr.contains("--recorded-only"), "{stderr}");
    assert!(!is_mounted(&env.path("mnt/whole")));

    let args = ["--layout", "flat", "--subtree", "/srv/app", "--recorded-only"];
    let mount = env.mount("recorded", &images, &source, &args);
    let names: Vec<_> = std::fs::read_dir(&mount.mountpoint).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["x.db"]);
}

#[test]
fn subtree_mounted_at_the_original_directory_shows_original_paths() {
    let env = TestEnv::new();
    // The checkpointed process used files under DATA; on the new host DATA is an
    // empty directory and the mount goes there, as a stock criu restore needs.
    let data = env.path("restore-here/data");
    let data_str = data.to_str().unwrap().to_string();
    let files: Vec<(String, usize)> = vec![
        (format!("{data_str}/a.txt"), 24),
        (format!("{data_str}/deep/b.bin"), 100_000),
        ("/etc/elsewhere".into(), 5),
    ];
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    std::fs::create_dir_all(&data).unwrap();

    let out = env
        .lazyfs()
        .arg("mount")
        .arg(&data)
        .arg(env.path("images"))
        .arg(env.path("source"))
        .arg("--subtree")
        .arg(&data)
        .arg("--cache-dir")
        .arg(env.path("cache/subtree"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let guard = common::mount::Mount {
        mountpoint: data.clone(),
        cache: env.path("cache/subtree"),
        env_home: env.tmp.path().into(),
    };
    for (path, len) in &files[..2] {
        assert_eq!(std::fs::read(path).unwrap(), content(path, *len), "{path}");
    }
    let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    drop(guard);
    assert!(!is_mounted(&data));
}
