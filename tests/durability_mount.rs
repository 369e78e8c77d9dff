//! Issue 21 through real FUSE mounts over the tests' sshd: other spellings
//! of SOURCE find the same cache dir's local changes; another host is
//! refused and nothing held is dropped; a remount needs no old host once
//! every file is here; a full cache disk refuses changes with ENOSPC, loses
//! none that were acknowledged, and takes them again once there is room.

mod common;

use std::process::Output;

use common::mount::{Mount, Source, TestEnv, content, dataset};
use common::sshd::{Sshd, whoami};
use common::tmpfs::Tmpfs;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Finding 2 (SSH): `127.0.0.1:PORT`, `ssh://USER@127.0.0.1:PORT`, a root
/// spelled with a trailing slash and `localhost:PORT` (the same host key)
/// are one source: the local change stays, nothing starts afresh. Another
/// host serving the same directory is refused: nothing is fetched from it,
/// nothing held is dropped.
#[test]
fn other_spellings_of_the_source_keep_the_local_layer_another_host_is_refused() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let source = env.path("source");
    dataset(&source, &env.path("images"), &[("/app/a", 40_000), ("/app/b", 50_000)]);
    let root = source.display().to_string();
    sshd.know_as("localhost");
    let images = env.path("images");

    let plain = format!("{}:{}", "127.0.0.1", sshd.port);
    let out = env.mount_spelled("m", &images, &sshd, &plain, &["--source-root", &root]);
    let mount = env.mounted("m", &out);
    assert_eq!(std::fs::read(mount.at("/app/a")).unwrap(), content("/app/a", 40_000));
    std::fs::write(mount.at("/app/mine"), b"acknowledged").unwrap();
    assert!(mount.umount().status.success());

    let spellings = [
        (format!("ssh://{}@127.0.0.1:{}", whoami(), sshd.port), format!("{root}/")),
        (format!("{}@127.0.0.1:{}", whoami(), sshd.port), format!("{root}/./")),
        (format!("localhost:{}", sshd.port), root.clone()),
    ];
    for (target, root) in &spellings {
        // Connected before it returns: a spelling is confirmed on a connection
        // (a mount that needs no byte from the source would make none).
        let out = env.mount_spelled("m", &images, &sshd, target, &["--source-root", root, "--wait-for-source"]);
        let mount = env.mounted("m", &out);
        assert!(!stderr(&out).contains("afresh"), "{target}: {}", stderr(&out));
        assert_eq!(std::fs::read(mount.at("/app/mine")).unwrap(), b"acknowledged", "{target}");
        assert!(mount.umount().status.success());
    }
    let log = std::fs::read_to_string(env.path("cache/m/lazyfs.log")).unwrap();
    assert!(log.contains("is the source this cache dir was filled from"), "the new spellings were confirmed");

    // Another host (its own host key) serving the same directory.
    let other = Sshd::start();
    let target = format!("127.0.0.1:{}", other.port);
    let out = env.mount_spelled("m", &images, &other, &target, &["--source-root", &root]);
    let mount = env.mounted("m", &out);
    assert_eq!(std::fs::read(mount.at("/app/mine")).unwrap(), b"acknowledged");
    assert_eq!(std::fs::read(mount.at("/app/a")).unwrap(), content("/app/a", 40_000), "cached bytes still served");
    let refused = std::fs::read(mount.at("/app/b")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EIO));
    let status = mount.status();
    // Found on its first connection (the mount made none before returning):
    // status says why and what to do; no file is failed for it (the right
    // source serves them on a remount).
    let why = status["source_error"].as_str().unwrap();
    assert!(why.contains("not the source") && why.contains("--discard-local-changes"), "{status}");
    assert!(status["degraded_reason"].as_str().unwrap().contains("not the source"), "{status}");
    let b = status["files"].as_array().unwrap().iter().find(|f| f["path"] == "/app/b").unwrap();
    assert_ne!(b["state"], "verified", "{b}");
    assert!(mount.umount().status.success());

    let out = env.mount_spelled("m", &images, &sshd, &plain, &["--source-root", &root]);
    let mount = env.mounted("m", &out);
    assert_eq!(std::fs::read(mount.at("/app/b")).unwrap(), content("/app/b", 50_000));
    assert_eq!(std::fs::read(mount.at("/app/mine")).unwrap(), b"acknowledged");
    assert!(mount.umount().status.success());
}

/// Finding 3: once status said the old host is no longer needed, a remount
/// with it gone works (and says so), local changes included.
#[test]
fn a_remount_works_with_the_old_host_gone_once_every_file_is_here() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/d/a", 30_000), ("/d/b", 300_000)]);
    let ssh = Source::Ssh { sshd: &sshd, root: env.path("source") };
    let mount = env.mount("m", &env.path("images"), &ssh, &["--prefetch"]);
    mount.wait_for(|s| s["source_needed"] == false, "the source is still needed");
    std::fs::write(mount.at("/d/mine"), b"local").unwrap();
    assert!(mount.umount().status.success());
    drop(mount);

    let (target, root) = (sshd.target(), env.path("source").display().to_string());
    sshd.stop();
    let out = env.mount_spelled("m", &env.path("images"), &sshd, &target, &["--source-root", &root]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("no longer needed"), "says so: {}", stderr(&out));
    let mount = Mount { mountpoint: env.path("mnt/m"), cache: env.path("cache/m"), env_home: env.tmp.path().into() };
    assert_eq!(std::fs::read(mount.at("/d/b")).unwrap(), content("/d/b", 300_000));
    assert_eq!(std::fs::read(mount.at("/d/mine")).unwrap(), b"local");
    std::fs::write(mount.at("/d/later"), b"still writable").unwrap();
    assert_eq!(mount.status()["source_needed"], false);
    assert!(mount.umount().status.success());
}

/// Finding 1, as the issue tried it: a 2 MiB cache disk, files made, the disk
/// filled through the mount, renames with long names until one is refused
/// (ENOSPC, not made), room made by removing through the mount, ten more
/// files, `kill -9`, remount: every acknowledged change is there.
#[test]
fn a_full_cache_disk_and_kill_9_lose_no_acknowledged_change() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/app/data", 10_000)]);
    // The mounts' cache dirs are below env/cache: a tmpfs of 2 MiB.
    let tmpfs = Tmpfs::mount(&env.path("cache"), "2m");
    let ssh = Source::Ssh { sshd: &sshd, root: env.path("source") };
    let mount = env.mount("m", &env.path("images"), &ssh, &[]);
    let app = mount.at("/app");
    std::fs::write(app.join("precious.txt"), b"precious").unwrap();
    std::fs::create_dir(app.join("dir1")).unwrap();
    std::fs::write(app.join("dir1/h"), b"h").unwrap();
    let mut fill = std::fs::File::create(app.join("fill")).unwrap();
    let full = loop {
        if let Err(e) = std::io::Write::write_all(&mut fill, &[7; 64 << 10]) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC));
    drop(fill);

    let mut name = app.join("dir1/h");
    let mut renamed = 0;
    let refused = loop {
        let to = app.join("dir1").join(format!("{renamed:06}-").repeat(29));
        match std::fs::rename(&name, &to) {
            Ok(()) => name = to,
            Err(e) => break (e, to),
        }
        renamed += 1;
        assert!(renamed < 100_000, "a full disk never refused a change");
    };
    assert_eq!(refused.0.raw_os_error(), Some(libc::ENOSPC), "{:?}", refused.0);
    assert!(name.exists() && !refused.1.exists(), "a refused rename is not made");
    let status = mount.status();
    assert!(status["degraded_reason"].as_str().unwrap_or_default().contains("full"), "status says why: {status}");

    std::fs::remove_file(app.join("fill")).unwrap();
    for i in 0..10 {
        std::fs::write(app.join(format!("new{i}")), format!("new {i}")).unwrap();
    }
    mount.kill_all();
    drop(mount);

    let mount = env.mount("m", &env.path("images"), &ssh, &[]);
    let app = mount.at("/app");
    assert_eq!(std::fs::read(app.join("precious.txt")).unwrap(), b"precious");
    let renamed_to = app.join("dir1").join(name.file_name().unwrap());
    assert_eq!(std::fs::read(renamed_to).unwrap(), b"h", "{renamed} acknowledged renames");
    assert!(!app.join("fill").exists());
    for i in 0..10 {
        assert_eq!(std::fs::read(app.join(format!("new{i}"))).unwrap(), format!("new {i}").as_bytes());
    }
    assert!(mount.umount().status.success());
    drop(tmpfs);
}

/// Finding 3 with the whole directory (`--subtree`): once every file and
/// directory is here, a remount with the old host gone serves the tree from
/// the cache dir, files the images never recorded included.
#[test]
fn a_whole_directory_remounts_with_the_old_host_gone() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    let top = env.path("source/srv/app");
    for (rel, len) in [("data/a.db", 30_000), ("lib/mod/x.py", 500), ("lib/mod/y.py", 70_000), ("README", 10)] {
        std::fs::create_dir_all(top.join(rel).parent().unwrap()).unwrap();
        std::fs::write(top.join(rel), content(rel, len)).unwrap();
    }
    let records = vec![lazyfs::images::write::DumpFile::new("/srv/app/data/a.db", 30_000)];
    lazyfs::images::write::write_dump(&env.path("images"), &records).unwrap();
    let root = env.path("source").display().to_string();
    let (target, args) = (sshd.target(), ["--subtree", "/srv/app", "--source-root", &root]);
    let mount = env.mounted(
        "m",
        &env.mount_spelled("m", &env.path("images"), &sshd, &target, &[&args[..], &["--prefetch"]].concat()),
    );
    mount.wait_for(|s| s["source_needed"] == false, "the source is still needed");
    std::fs::write(mount.mountpoint.join("lib/mod/z.py"), b"made here").unwrap();
    assert!(mount.umount().status.success());
    drop(mount);

    sshd.stop();
    let out = env.mount_spelled("m", &env.path("images"), &sshd, &target, &args);
    assert!(stderr(&out).contains("no longer needed"), "{}", stderr(&out));
    let mount = env.mounted("m", &out);
    assert_eq!(std::fs::read(mount.mountpoint.join("lib/mod/y.py")).unwrap(), content("lib/mod/y.py", 70_000));
    assert_eq!(std::fs::read(mount.mountpoint.join("README")).unwrap(), content("README", 10));
    assert_eq!(std::fs::read(mount.mountpoint.join("lib/mod/z.py")).unwrap(), b"made here");
    let mut names: Vec<_> =
        std::fs::read_dir(mount.mountpoint.join("lib/mod")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["x.py", "y.py", "z.py"]);
    assert!(mount.umount().status.success());
}
