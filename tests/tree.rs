//! `--subtree DIR` serves the old host's whole DIR: every file, directory,
//! symlink, hard link and FIFO, with the source's sizes, modes, owners and
//! times, each directory listed when first looked in; over the tests' sshd
//! and from a local directory, through a real FUSE mount.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::mount::{Mount, Source, TestEnv, content};
use common::sshd::Sshd;
use lazyfs::images::write::{DumpFile, write_dump};

/// The directory the checkpointed process used, as a path on the old host.
const DIR: &str = "/srv/app";

/// Writes the old host's DIR below `root`: `dirs` x `per_dir` files in
/// nested directories, and every kind of entry a tree has. Returns the
/// files the images record (two of them).
fn old_host(root: &Path, dirs: usize, per_dir: usize) -> Vec<DumpFile> {
    let top = root.join(&DIR[1..]);
    for d in 0..dirs {
        let dir = top.join(format!("d{}/n{}", d % 10, d));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            let name = format!("f{f}.dat");
            let len = [0, 1, 700, 4096, 20_000, 70_000][(d + f) % 6];
            std::fs::write(dir.join(&name), content(&format!("{d}/{name}"), len)).unwrap();
        }
    }
    let odd = top.join("odd names");
    std::fs::create_dir_all(&odd).unwrap();
    for name in ["sp ace", "quo'te\"", "$dollar;semi", "new\nline", "back`tick`"] {
        std::fs::write(odd.join(name), content(name, 99)).unwrap();
    }
    std::fs::create_dir_all(top.join("empty/also-empty")).unwrap();
    std::fs::write(top.join("d0/n0/secret"), b"only its owner").unwrap();
    std::fs::write(top.join("rec.db"), content("rec.db", 50_000)).unwrap();
    std::fs::write(top.join("d1/n1/rec.log"), content("rec.log", 3_000)).unwrap();
    let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, top.join(at)).unwrap();
    link("d0/n0/f1.dat", "relative");
    link("/etc/hostname", "absolute");
    link("nowhere/at/all", "dangling");
    link("d1", "to-a-dir");
    std::fs::hard_link(top.join("d0/n0/f2.dat"), top.join("hard-link")).unwrap();
    nix::unistd::mkfifo(&top.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    // Numeric owners no passwd entry names, modes a database uses.
    let chown = |at: &str, uid: u32, gid: u32| {
        std::os::unix::fs::lchown(top.join(at), Some(uid), Some(gid)).unwrap();
    };
    chown("d0/n0/secret", 4242, 4343);
    chown("d1", 4242, 4343);
    chown("to-a-dir", 4242, 4343);
    let chmod = |at: &str, mode: u32| {
        std::fs::set_permissions(top.join(at), std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    chmod("d0/n0/secret", 0o600);
    chmod("d1", 0o750);
    chmod("rec.db", 0o600);
    let mut rec_db = DumpFile::new(format!("{DIR}/rec.db"), 50_000);
    rec_db.mode = 0o100600;
    let records = vec![rec_db, DumpFile::new(format!("{DIR}/d1/n1/rec.log"), 3_000)];
    // Last, as a process working there leaves it: directory times settle.
    records
}

/// `find DIR -printf` as the issue compares them, sorted; with
/// `whole_seconds`, times cut to the second (all SFTP v3 tells).
fn find(dir: &Path, whole_seconds: bool) -> Vec<String> {
    let out = Command::new("find").arg(dir).args(["-printf", "%P\\0%y %s %m %U %G %T@ %l\\0"]).output().unwrap();
    assert!(out.status.success(), "find: {}", String::from_utf8_lossy(&out.stderr));
    let fields: Vec<String> = String::from_utf8_lossy(&out.stdout).split('\0').map(String::from).collect();
    let mut lines: Vec<String> = fields
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            let mut attrs: Vec<String> = c[1].split(' ').map(String::from).collect();
            if whole_seconds {
                attrs[5] = attrs[5].split('.').next().unwrap().to_string();
            }
            format!("{:?} {}", c[0], attrs.join(" "))
        })
        .collect();
    lines.sort();
    lines
}

fn images(env: &TestEnv, records: &[DumpFile]) -> PathBuf {
    let imgdir = env.path("images");
    write_dump(&imgdir, records).unwrap();
    imgdir
}

fn subtree_args() -> Vec<&'static str> {
    vec!["--subtree", DIR]
}

#[test]
fn a_local_tree_shows_as_the_old_host_has_it_exact_times_included() {
    let env = TestEnv::new();
    let records = old_host(&env.path("source"), 40, 25);
    let imgdir = images(&env, &records);
    let mount = env.mount("local", &imgdir, &Source::Local(env.path("source")), &subtree_args());
    // The files the images record are there before any listing.
    assert_eq!(std::fs::read(mount.mountpoint.join("rec.db")).unwrap(), content("rec.db", 50_000));
    let expected = find(&env.path("source").join(&DIR[1..]), false);
    assert!(expected.len() > 1_000, "{}", expected.len());
    assert_eq!(find(&mount.mountpoint, false), expected);
    // Hard links are one file (the local source tells inode numbers).
    let (a, b) = (mount.mountpoint.join("d0/n0/f2.dat"), mount.mountpoint.join("hard-link"));
    assert_eq!(std::fs::metadata(&a).unwrap().ino(), std::fs::metadata(&b).unwrap().ino());
    assert_eq!(std::fs::read(&b).unwrap(), std::fs::read(env.path("source/srv/app/hard-link")).unwrap());
    for name in ["sp ace", "quo'te\"", "$dollar;semi", "new\nline", "back`tick`"] {
        assert_eq!(std::fs::read(mount.mountpoint.join("odd names").join(name)).unwrap(), content(name, 99));
    }
    let status = mount.wait_for(|s| s["files_total"].as_u64() > Some(1_000), "tree files counted");
    assert_eq!(status["source_needed"], true, "{status}");
}

#[test]
fn an_ssh_tree_shows_as_the_old_host_has_it_to_the_second() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let root = env.path("source");
    let records = old_host(&root, 20, 10);
    let imgdir = images(&env, &records);
    let source = Source::Ssh { sshd: &sshd, root: root.clone() };
    let mount = env.mount("ssh", &imgdir, &source, &subtree_args());
    // SFTP v3 tells whole seconds, no inode numbers and no link counts: hard
    // links show as separate files of the same bytes.
    assert_eq!(find(&mount.mountpoint, true), find(&root.join(&DIR[1..]), true));
    let (a, b) = (mount.mountpoint.join("d0/n0/f2.dat"), mount.mountpoint.join("hard-link"));
    assert_ne!(std::fs::metadata(&a).unwrap().ino(), std::fs::metadata(&b).unwrap().ino());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(std::fs::read_link(mount.mountpoint.join("absolute")).unwrap(), Path::new("/etc/hostname"));
    let secret = std::fs::metadata(mount.mountpoint.join("d0/n0/secret")).unwrap();
    assert_eq!((secret.uid(), secret.gid(), secret.mode() & 0o7777), (4242, 4343, 0o600));
}

#[test]
fn reading_five_files_fetches_five_files() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let root = env.path("source");
    let records = old_host(&root, 30, 20);
    let imgdir = images(&env, &records);
    let mount = env.mount("lazy", &imgdir, &Source::Ssh { sshd: &sshd, root: root.clone() }, &subtree_args());
    let read = ["d3/n3/f2.dat", "d3/n13/f5.dat", "d4/n4/f1.dat", "odd names/new\nline", "d9/n29/f4.dat"];
    let mut bytes = 0;
    for path in read {
        let got = std::fs::read(mount.mountpoint.join(path)).unwrap();
        assert_eq!(got, std::fs::read(root.join(&DIR[1..]).join(path)).unwrap(), "{path}");
        bytes += got.len() as u64;
    }
    let status = mount.status();
    let fetched: Vec<&str> = status["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["bytes_on_demand"].as_u64() > Some(0) || f["reads"].as_u64() > Some(0))
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(fetched.len() <= 5, "{fetched:?}");
    assert!(status["bytes_on_demand"].as_u64().unwrap() <= bytes + 5 * 16384, "{status}");
    // Only the directories on the way were listed: far from all 600 files.
    assert!(status["files_total"].as_u64().unwrap() < 200, "{}", status["files_total"]);
    assert_eq!(status["source_needed"], true);
}

#[test]
fn prefetch_lists_and_fetches_everything_then_the_old_host_can_go() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    let root = env.path("source");
    let records = old_host(&root, 30, 20);
    let imgdir = images(&env, &records);
    let source = Source::Ssh { sshd: &sshd, root: root.clone() };
    let mut args = subtree_args();
    args.push("--prefetch");
    let mount = env.mount("prefetch", &imgdir, &source, &args);
    let out = env.run(&["wait", mount.mountpoint.to_str().unwrap(), "--timeout", "300"]);
    assert!(out.status.success(), "wait: {}", String::from_utf8_lossy(&out.stderr));
    let status = mount.status();
    assert_eq!(status["source_needed"], false, "{status}");
    assert!(status["files_total"].as_u64().unwrap() > 600, "{}", status["files_total"]);
    assert_eq!(status["files_failed"], 0, "{status}");
    sshd.stop();
    let top = root.join(&DIR[1..]);
    assert_eq!(find(&mount.mountpoint, true), find(&top, true));
    for entry in walk(&top) {
        let rel = entry.strip_prefix(&top).unwrap();
        assert_eq!(std::fs::read(mount.mountpoint.join(rel)).unwrap(), std::fs::read(&entry).unwrap(), "{rel:?}");
    }
}

#[test]
fn a_manifest_catches_a_same_size_same_mtime_change_and_gives_inode_numbers() {
    let env = TestEnv::new();
    let root = env.path("source");
    let records = old_host(&root, 10, 10);
    let imgdir = images(&env, &records);
    let top = root.join(&DIR[1..]);
    let out = env.run(&["manifest", imgdir.to_str().unwrap(), "--root", root.to_str().unwrap(), "--subtree", DIR]);
    assert!(out.status.success(), "manifest: {}", String::from_utf8_lossy(&out.stderr));
    // The old host's file changes after the manifest: same size, same mtime.
    let changed = top.join("d2/n2/f3.dat");
    let before = std::fs::metadata(&changed).unwrap();
    let mut bytes = std::fs::read(&changed).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&changed, &bytes).unwrap();
    let times = std::fs::FileTimes::new().set_modified(before.modified().unwrap());
    std::fs::File::options().write(true).open(&changed).unwrap().set_times(times).unwrap();
    assert_eq!(std::fs::metadata(&changed).unwrap().mtime(), before.mtime());

    let mount = env.mount("manifest", &imgdir, &Source::Local(root.clone()), &subtree_args());
    let err = std::fs::read(mount.mountpoint.join("d2/n2/f3.dat")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        std::fs::read(mount.mountpoint.join("d2/n2/f4.dat")).unwrap(),
        std::fs::read(top.join("d2/n2/f4.dat")).unwrap()
    );
    // The old host's inode numbers and exact times, recorded files too.
    for path in ["rec.db", "d2/n2/f4.dat", "d1/n1/rec.log"] {
        let (here, there) =
            (std::fs::metadata(mount.mountpoint.join(path)).unwrap(), std::fs::metadata(top.join(path)).unwrap());
        assert_eq!((here.ino(), here.mtime_nsec()), (there.ino(), there.mtime_nsec()), "{path}");
    }
    let status = mount.wait_for(|s| s["files_failed"].as_u64() > Some(0), "the changed file fails");
    let failed: Vec<_> = status["files"].as_array().unwrap().iter().filter(|f| f["state"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0]["error"].as_str().unwrap().contains("manifest"), "{failed:?}");
}

#[test]
fn a_remount_rebuilds_the_tree_from_its_listings_without_the_source() {
    let env = TestEnv::new();
    let root = env.path("source");
    let records = old_host(&root, 10, 10);
    let imgdir = images(&env, &records);
    let top = root.join(&DIR[1..]);
    let expected = find(&top, false);
    let mut args = subtree_args();
    args.push("--prefetch");
    let mount = env.mount("again", &imgdir, &Source::Local(root.clone()), &args);
    mount.wait_for(|s| s["source_needed"] == false, "everything local");
    // A local change in a listed directory, then an unmount.
    std::fs::write(mount.mountpoint.join("d3/n3/new"), b"made here").unwrap();
    assert!(mount.umount().status.success());
    // The old host's tree changes: the remount shows what was listed.
    std::fs::write(top.join("d3/n3/appeared-later"), b"x").unwrap();
    std::fs::remove_file(top.join("d4/n4/f0.dat")).unwrap();
    let mount = env.mount("again", &imgdir, &Source::Local(root.clone()), &subtree_args());
    let mut shown = find(&mount.mountpoint, false);
    // The directory the local change went into has a new mtime.
    shown.retain(|line| !line.starts_with("\"d3/n3/new\" ") && !line.starts_with("\"d3/n3\" "));
    let mut wanted = expected.clone();
    wanted.retain(|line| !line.starts_with("\"d3/n3\" "));
    assert_eq!(shown, wanted);
    assert_eq!(std::fs::read(mount.mountpoint.join("d3/n3/new")).unwrap(), b"made here");
    assert_eq!(
        std::fs::read(mount.mountpoint.join("d4/n4/f0.dat")).unwrap(),
        content("4/f0.dat", [0, 1, 700, 4096, 20_000, 70_000][4])
    );
}

#[test]
fn a_subtree_with_no_recorded_file_mounts() {
    let env = TestEnv::new();
    let root = env.path("source");
    old_host(&root, 3, 3);
    let imgdir = images(&env, &[DumpFile::new("/etc/elsewhere", 0)]);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/elsewhere"), b"").unwrap();
    let mount = env.mount("empty", &imgdir, &Source::Local(root.clone()), &subtree_args());
    assert_eq!(find(&mount.mountpoint, false), find(&root.join(&DIR[1..]), false));
    let out = env.try_mount("recorded-only", &imgdir, &Source::Local(root), &["--subtree", DIR, "--recorded-only"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    drop::<Mount>(mount);
}

/// Every regular file below `dir`, symlinks not followed.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.extend(walk(&entry.path()));
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    files
}

#[test]
fn a_file_changed_on_the_source_since_it_was_listed_is_failed_not_served() {
    let env = TestEnv::new();
    let root = env.path("source");
    let records = old_host(&root, 3, 3);
    let imgdir = images(&env, &records);
    let mount = env.mount("changed", &imgdir, &Source::Local(root.clone()), &subtree_args());
    let listed = std::fs::read_dir(mount.mountpoint.join("d0/n0")).unwrap().count();
    assert!(listed >= 3, "{listed}");
    let top = root.join(&DIR[1..]);
    // One grows; the other keeps its size but gets a later mtime.
    std::fs::write(top.join("d0/n0/f1.dat"), b"xy").unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
    let times = std::fs::FileTimes::new().set_modified(later);
    std::fs::File::options().write(true).open(top.join("d0/n0/f2.dat")).unwrap().set_times(times).unwrap();
    for name in ["f1.dat", "f2.dat"] {
        let err = std::fs::read(mount.mountpoint.join("d0/n0").join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
    }
    let status = mount.wait_for(|s| s["files_failed"] == 2, "both changed files fail");
    for file in status["files"].as_array().unwrap().iter().filter(|f| f["state"] == "failed") {
        assert!(file["error"].as_str().unwrap().contains("changed since it was listed"), "{file}");
    }
    // An unchanged neighbour is served.
    let ok = std::fs::read(mount.mountpoint.join("d0/n0/f0.dat")).unwrap();
    assert_eq!(ok, std::fs::read(top.join("d0/n0/f0.dat")).unwrap());
}
