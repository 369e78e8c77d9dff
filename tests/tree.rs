//! `--subtree DIR` serves the old host's whole DIR: every file, directory,
//! symlink, hard link and FIFO, with the source's sizes, modes, owners and
//! times, each directory listed when first looked in; over the tests' sshd
//! and from a local directory, through a real FUSE mount.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::mount::{Mount, Source, TestEnv, app_with_dirs, content};
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

/// `lazyfs wait PATH` and `lazyfs prefetch PATH` take a file of a directory
/// nothing has listed yet (its original path, or its path under the
/// mountpoint): the mount lists the directories on the way first, as a
/// `stat` of it would, instead of answering "not a file of this mount".
#[test]
fn wait_and_prefetch_take_a_file_of_a_directory_not_listed_yet() {
    let env = TestEnv::new();
    let root = env.path("source");
    let imgdir = images(&env, &old_host(&root, 10, 3));
    let mount = env.mount("paths", &imgdir, &Source::Local(root), &subtree_args());
    let mnt = mount.mountpoint.to_str().unwrap();
    let under = |rel: &str| format!("{mnt}/{rel}");
    // Lazy: nothing fetches them, so wait times out (3), having found them
    // (by original path, and relative to the mount).
    let wait = env.run(&["wait", mnt, &format!("{DIR}/d7/n7/f0.dat"), "d8/n8/f0.dat", "--timeout", "1"]);
    assert_eq!(wait.status.code(), Some(3), "wait: {}", String::from_utf8_lossy(&wait.stderr));
    let prefetch = env.run(&["prefetch", mnt, &under("d5/n5/f0.dat"), &format!("{DIR}/d6/n6/f1.dat")]);
    assert!(prefetch.status.success(), "prefetch: {}", String::from_utf8_lossy(&prefetch.stderr));
    let wait = env.run(&["wait", mnt, &format!("{DIR}/d5/n5/f0.dat"), &under("d6/n6/f1.dat"), "--timeout", "60"]);
    assert!(wait.status.success(), "wait: {}", String::from_utf8_lossy(&wait.stderr));
    let typo = env.run(&["wait", mnt, &under("d5/n5/no-such-file"), "--timeout", "1"]);
    assert_eq!(typo.status.code(), Some(2), "wait of a missing file: {}", String::from_utf8_lossy(&typo.stderr));
}

/// Reading a directory of the tree costs time in proportion to its size:
/// the kernel reads a big directory in many READDIR calls, each going on
/// from the entries its handle's first call took (building the whole list
/// again per call made `ls` of 100,000 files take 27 s). Compared within
/// this run: eight times the entries may take some more than eight times
/// as long, not sixty-four.
#[test]
fn reading_a_big_directory_costs_in_proportion_to_its_size() {
    let env = TestEnv::new();
    let app = env.path("source/srv/app");
    for (dir, count) in [("small", 5_000), ("big", 40_000)] {
        std::fs::create_dir_all(app.join(dir)).unwrap();
        for i in 0..count {
            std::fs::write(app.join(format!("{dir}/file-{i:06}")), b"x").unwrap();
        }
    }
    std::fs::write(app.join("rec"), b"recorded").unwrap();
    let imgdir = images(&env, &[DumpFile::new(format!("{DIR}/rec"), 8)]);
    let mount = env.mount("big", &imgdir, &Source::Local(env.path("source")), &subtree_args());
    // Both listed first (one lookup each): only the reading is timed, with
    // as many files on the mount for the one as for the other. The better
    // of two reads, against the load of a shared machine.
    for dir in ["small", "big"] {
        assert!(mount.mountpoint.join(dir).join("file-000001").exists());
    }
    let time_ls = |dir: &str| {
        let read = || {
            let started = Instant::now();
            let count = std::fs::read_dir(mount.mountpoint.join(dir)).unwrap().count();
            (count, started.elapsed())
        };
        let (count, first) = read();
        (count, first.min(read().1))
    };
    let (small_count, small) = time_ls("small");
    let (big_count, big) = time_ls("big");
    assert_eq!((small_count, big_count), (5_000, 40_000));
    let ratio = big.as_secs_f64() / small.as_secs_f64().max(1e-3);
    eprintln!("readdir: 5,000 entries {small:?}, 40,000 entries {big:?}: {ratio:.1}x");
    assert!(ratio < 24.0, "8x the entries took {ratio:.1}x as long ({small:?} vs {big:?}): quadratic");
    // A handle keeps its own entries only: a new read sees a change.
    std::fs::write(mount.mountpoint.join("small/new"), b"made here").unwrap();
    assert_eq!(std::fs::read_dir(mount.mountpoint.join("small")).unwrap().count(), 5_001);
}

/// The fsync-family calls of a process (every thread), as strace sees them.
struct Syncs {
    strace: std::process::Child,
    trace: PathBuf,
}

impl Syncs {
    fn attach(env: &TestEnv, mount: &Mount, name: &str) -> Syncs {
        let pid = mount.status()["pid"].as_u64().unwrap().to_string();
        let trace = env.path(name);
        let strace = Command::new("strace")
            .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,syncfs", "-o"])
            .arg(&trace)
            .args(["-p", &pid])
            .spawn()
            .expect("strace (scripts/setup installs it)");
        let traced = || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
        };
        let started = Instant::now();
        while !traced() {
            assert!(started.elapsed().as_secs() < 30, "strace never attached");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Every thread, not only the first.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Syncs { strace, trace }
    }

    /// Detaches (if the process still runs) and gives the calls seen.
    fn calls(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.strace.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.strace.wait().unwrap();
        std::fs::read_to_string(&self.trace).unwrap()
    }
}

impl Drop for Syncs {
    fn drop(&mut self) {
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

fn syncs_of(calls: &str, file: &str) -> usize {
    calls.lines().filter(|l| l.contains("sync(") && l.contains(file)).count()
}

/// An unmount makes what was fetched durable with one sync of the cache's
/// filesystem, not an fdatasync per spill file (989 for PostgreSQL's tree,
/// 1.2-4.3 s; a 100,000-file tree would make 100,000), and the tree's
/// listings (`CACHE/tree`) with it: a remount without the old host needs them.
#[test]
fn an_unmount_syncs_the_cache_filesystem_once_and_the_trees_listings() {
    let env = TestEnv::new();
    let root = env.path("source");
    let imgdir = images(&env, &old_host(&root, 20, 6));
    let mount = env.mount("unmount", &imgdir, &Source::Local(root), &subtree_args());
    let mnt = mount.mountpoint.to_str().unwrap();
    let read: Vec<String> = (2..10).flat_map(|d| (0..6).map(move |f| format!("{mnt}/d{d}/n{d}/f{f}.dat"))).collect();
    for path in &read {
        std::fs::read(path).unwrap();
    }
    // Verified, their chunks in the journal: what is left is the unmount's.
    let mut wait = vec!["wait", mnt];
    wait.extend(read.iter().map(String::as_str));
    assert!(env.run(&wait).status.success());
    let syncs = Syncs::attach(&env, &mount, "unmount.strace");
    assert!(mount.umount().status.success());
    let calls = syncs.calls();
    let spill = syncs_of(&calls, "/spill/");
    assert!(spill <= 16, "{spill} spill files synced one by one after {} files were read:\n{calls}", read.len());
    assert!(calls.contains("syncfs("), "no syncfs:\n{calls}");
    assert!(syncs_of(&calls, "/tree>") >= 1, "CACHE/tree not synced:\n{calls}");
}

/// Once every directory is listed and every file verified, the old host may
/// go (`source_needed` false, `wait` exits 0): the listings a remount needs
/// (`CACHE/tree`) are on disk by then, not only once the mount is unmounted.
#[test]
fn the_trees_listings_are_durable_before_the_old_host_may_go() {
    let env = TestEnv::new();
    let root = env.path("source");
    let imgdir = images(&env, &old_host(&root, 20, 3));
    let mount = env.mount("listings", &imgdir, &Source::Local(root), &subtree_args());
    let syncs = Syncs::attach(&env, &mount, "listings.strace");
    let mnt = mount.mountpoint.to_str().unwrap();
    assert!(env.run(&["prefetch", mnt]).status.success());
    let out = env.run(&["wait", mnt, "--timeout", "300"]);
    assert!(out.status.success(), "wait: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mount.status()["source_needed"], false);
    let calls = syncs.calls();
    assert!(syncs_of(&calls, "/tree>") >= 1, "CACHE/tree not synced while the old host is not needed:\n{calls}");
}

/// `lazyfs export` of a whole-directory mount makes the plain directory the
/// next start of the application runs from: every entry (the root, files,
/// directories, symlinks, FIFOs, hard links) with the numeric owners, modes
/// and times the mount shows, as `rsync -a --numeric-ids` keeps them; a
/// PostgreSQL data directory exported by root is still its user's.
#[test]
fn export_keeps_the_trees_numeric_owners_modes_and_times() {
    let env = TestEnv::new();
    let root = env.path("source");
    let imgdir = images(&env, &old_host(&root, 4, 3));
    let mount = env.mount("export", &imgdir, &Source::Local(root), &subtree_args());
    let exported = env.path("exported");
    let out = env.run(&["export", mount.mountpoint.to_str().unwrap(), exported.to_str().unwrap()]);
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    // A directory's size is its filesystem's own.
    let shown = |dir: &Path| -> Vec<String> {
        find(dir, false)
            .into_iter()
            .map(|line| {
                let mut fields: Vec<&str> = line.rsplitn(7, ' ').collect();
                if fields[6].ends_with(" d") {
                    fields[5] = "-";
                }
                fields.into_iter().rev().collect::<Vec<_>>().join(" ")
            })
            .collect()
    };
    let (on_mount, in_export) = (shown(&mount.mountpoint), shown(&exported));
    assert!(on_mount.iter().any(|l| l.contains(" 4242 4343 ")), "the tree's owners: {on_mount:#?}");
    assert_eq!(in_export, on_mount);
}

/// A file of the tree the restored application read (a page a web server
/// sent) is in the recorded access order, so the next migration of the
/// same application with `--prefetch-order recorded` fetches it early:
/// before the tree's other files (smallest first, it would be last). Its
/// directory is listed before the walk lists the rest, and the file takes
/// its recorded place in the queue once found.
#[test]
fn a_tree_file_read_after_the_restore_is_fetched_first_by_the_next_recorded_prefetch() {
    let env = TestEnv::new();
    let app = env.path("source/srv/app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("rec"), content("rec", 10_000)).unwrap();
    let imgdir = images(&env, &[DumpFile::new(format!("{DIR}/rec"), 10_000)]);
    for d in 0..10 {
        std::fs::create_dir_all(app.join(format!("a{d}"))).unwrap();
        for f in 0..30 {
            std::fs::write(app.join(format!("a{d}/f{f}")), content(&format!("{d}/{f}"), 16_384)).unwrap();
        }
    }
    std::fs::create_dir_all(app.join("zz")).unwrap();
    std::fs::write(app.join("zz/page.html"), content("page", 256 << 10)).unwrap();
    let source = Source::Local(env.path("source"));
    let first = env.mount("first", &imgdir, &source, &subtree_args());
    assert_eq!(std::fs::read(first.mountpoint.join("zz/page.html")).unwrap(), content("page", 256 << 10));
    assert!(first.umount().status.success());
    let recording = env.path("cache/first/recording");
    assert!(recording.exists(), "the first mount recorded nothing");

    let order = format!("--prefetch-order=recorded:{}", recording.display());
    let second = env.mount("second", &imgdir, &source, &["--subtree", DIR, "--prefetch", "-j", "1", &order]);
    let status = second.wait_for(|s| s["state"] == "complete", "the second mount never completed");
    let files = status["files"].as_array().unwrap();
    let done = |f: &serde_json::Value| f["completed_s"].as_f64().unwrap_or(f64::MAX);
    let page = files.iter().find(|f| f["path"] == "/srv/app/zz/page.html").expect("page.html");
    let before = files.iter().filter(|f| f["path"] != "/srv/app/rec" && done(f) < done(page)).count();
    assert!(before < 10, "{before} of the tree's {} other files were fetched before the page read last time", 300);
}

/// `lazyfs manifest --subtree` run on the old host by a user who cannot
/// read everything below DIR (root's `lost+found`, another user's 0600 file
/// or 0700 directory) leaves those out, a warning naming each, instead of
/// failing as a whole; a mount with that manifest then refuses their files
/// saying the manifest left them out (not "made after the manifest"), and
/// serves the rest.
#[test]
fn manifest_of_a_subtree_leaves_out_what_its_user_may_not_read() {
    let env = TestEnv::new();
    let root = env.path("source");
    let imgdir = images(&env, &old_host(&root, 2, 3));
    let locked = root.join("srv/app/lost+found");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::write(locked.join("inside"), b"root's").unwrap();
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    mode(&locked, 0o700);
    mode(env.tmp.path(), 0o755);
    mode(&imgdir, 0o777);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", env!("CARGO_BIN_EXE_lazyfs"), "manifest"])
        .arg(&imgdir)
        .arg("--root")
        .arg(&root)
        .args(["--subtree", DIR])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "manifest as nobody: {stderr}");
    assert!(stderr.contains("lost+found") && stderr.contains("secret"), "no warning names what was left out: {stderr}");

    let mount = env.mount("left-out", &imgdir, &Source::Local(root), &subtree_args());
    for path in ["lost+found/inside", "d0/n0/secret"] {
        let err = std::fs::read(mount.mountpoint.join(path)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{path}: {err}");
    }
    assert_eq!(std::fs::read(mount.mountpoint.join("d0/n0/f1.dat")).unwrap(), content("0/f1.dat", 1));
    let status = mount.status();
    for path in ["/srv/app/lost+found/inside", "/srv/app/d0/n0/secret"] {
        let file = status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).expect(path);
        let error = file["error"].as_str().unwrap_or_default();
        assert!(error.contains("left out"), "{path}: {error}");
    }
}

/// A directory removed through the mount before it was listed (empty on
/// the old host): `lazyfs wait` of a `--prefetch` mount exits 0 once the
/// rest is here: the removed directory is no longer counted unlisted.
#[test]
fn wait_exits_0_after_an_unlisted_empty_directory_is_removed() {
    let env = TestEnv::new();
    let imgdir = app_with_dirs(&env, 2);
    std::fs::create_dir_all(env.path("source/srv/app/empty")).unwrap();
    let source = Source::Local(env.path("source"));
    let mount = env.mount("rmdir", &imgdir, &source, &["--subtree", DIR]);
    std::fs::remove_dir(mount.mountpoint.join("empty")).unwrap();
    let prefetch = env.run(&["prefetch", mount.mountpoint.to_str().unwrap()]);
    assert!(prefetch.status.success(), "{}", String::from_utf8_lossy(&prefetch.stderr));
    let out = env.run(&["wait", mount.mountpoint.to_str().unwrap(), "--timeout", "30"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "wait: {} / status: {}",
        String::from_utf8_lossy(&out.stderr),
        mount.status()["dirs_unlisted"]
    );
}

/// Over SSH as an unprivileged user (as many old hosts allow only), a
/// directory of the tree that user may not read (root's `lost+found` at
/// the top of every ext4 filesystem, another user's 0700 directory) can
/// never be listed. `lazyfs wait` of a `--prefetch` mount must end, saying
/// which directory failed (exit 4, as for a failed file), instead of
/// waiting for it for ever (the walk asks again every second, and `wait`
/// without `--timeout` never returns).
#[test]
fn wait_reports_a_directory_the_ssh_user_may_not_read_instead_of_waiting_for_ever() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    // `nobody` logs in with the test's key and reads the source.
    let world = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    world(sshd.dir.path(), 0o755);
    world(&sshd.dir.path().join("authorized_keys"), 0o644);
    world(env.tmp.path(), 0o755);
    world(&env.path("source"), 0o755);
    let imgdir = app_with_dirs(&env, 3);
    let locked = env.path("source/srv/app/lost+found");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::write(locked.join("#1234"), b"a lost inode").unwrap();
    world(&locked, 0o700);

    let mountpoint = env.path("mnt/nobody");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let out = env
        .lazyfs()
        .arg("mount")
        .arg(&mountpoint)
        .arg(&imgdir)
        .arg(format!("nobody@127.0.0.1:{}", sshd.port))
        .arg("-i")
        .arg(sshd.user_key())
        .arg("--known-hosts")
        .arg(sshd.known_hosts())
        .arg("--source-root")
        .arg(env.path("source"))
        .arg("--cache-dir")
        .arg(env.path("cache/nobody"))
        .args(["--subtree", DIR, "--prefetch"])
        .output()
        .unwrap();
    assert!(out.status.success(), "mount as nobody: {}", String::from_utf8_lossy(&out.stderr));
    let _mount = common::mount::Mount {
        mountpoint: mountpoint.clone(),
        cache: env.path("cache/nobody"),
        env_home: env.tmp.path().into(),
    };
    assert_eq!(std::fs::read(mountpoint.join("d0/f")).unwrap(), b"a file", "the readable part is served");
    let wait = env.run(&["wait", mountpoint.to_str().unwrap(), "--timeout", "40"]);
    let stderr = String::from_utf8_lossy(&wait.stderr);
    assert_eq!(wait.status.code(), Some(4), "wait: {stderr}");
    assert!(stderr.contains("lost+found"), "wait does not name the directory: {stderr}");
}

/// A directory of the tree swapped for a symlink on the old host after its
/// parent was listed: its listing is refused, rightly, but then over SSH it
/// is kept as an empty directory (in `CACHE/tree` too) and counted listed,
/// so `wait` exits 0 with none of its files ever seen; from a local
/// directory the refusal (ENOTDIR, not mapped to "changed") is retried for
/// ever and `wait` never ends. A changed file is `failed` with its reason;
/// a changed directory must be reported the same way (exit 4 naming it).
#[test]
fn a_directory_swapped_for_a_symlink_on_the_old_host_fails_wait_naming_it() {
    let sshd = Sshd::start();
    for over_ssh in [true, false] {
        let env = TestEnv::new();
        let imgdir = app_with_dirs(&env, 2);
        let app = env.path("source/srv/app");
        let source = match over_ssh {
            true => Source::Ssh { sshd: &sshd, root: env.path("source") },
            false => Source::Local(env.path("source")),
        };
        let mount = env.mount("swap", &imgdir, &source, &["--subtree", DIR]);
        assert!(mount.mountpoint.join("d1").is_dir(), "the root is listed, d1 not yet");
        std::fs::rename(app.join("d1"), app.join("moved")).unwrap();
        std::os::unix::fs::symlink("moved", app.join("d1")).unwrap();
        let mnt = mount.mountpoint.to_str().unwrap();
        assert!(env.run(&["prefetch", mnt]).status.success());
        let wait = env.run(&["wait", mnt, "--timeout", "20"]);
        let stderr = String::from_utf8_lossy(&wait.stderr);
        let shown = std::fs::read_dir(mount.mountpoint.join("d1")).map(|d| d.count());
        assert_eq!(
            wait.status.code(),
            Some(4),
            "over ssh: {over_ssh}: wait: {stderr}; d1 on the mount: {shown:?} entries, on the old host a symlink"
        );
        assert!(stderr.contains("d1"), "over ssh: {over_ssh}: {stderr}");
    }
}

/// `lazyfs status` (the human line) says when directories of the tree are
/// still to be listed: a mount whose files are all here but whose tree is
/// not listed must not read only "N/N files present" and "fetching", with
/// no word of what it still waits for (`--json` has `dirs_unlisted`).
#[test]
fn status_says_directories_of_the_tree_are_not_listed_yet() {
    let env = TestEnv::new();
    let imgdir = app_with_dirs(&env, 2);
    let mount = env.mount("status", &imgdir, &Source::Local(env.path("source")), &["--subtree", DIR]);
    let status = mount.wait_for(|s| s["dirs_unlisted"].as_u64() > Some(0), "directories unlisted");
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("director"), "{} directories unlisted, status says: {text}", status["dirs_unlisted"]);
}
