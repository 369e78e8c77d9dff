//! The local layer through a real mount over the tests' sshd: SQLite in
//! rollback-journal and WAL mode, log rotation, atomic saves, directories,
//! links and unlinked open files; all of it survives umount, `kill -9` and a
//! remount, and the source is never written.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::mount::{Mount, Source, TestEnv, content, dataset};
use common::sshd::Sshd;
use lazyfs::images::write::{DumpFile, write_dump};

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().expect("sqlite3 (scripts/setup installs it)");
    assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Every file below `root` with its bytes (symlinks as their targets).
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if meta.is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                dirs.push(path);
            } else if meta.file_type().is_symlink() {
                out.insert(rel, std::fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes());
            } else if meta.is_file() {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn kill9(mount: &Mount) {
    mount.kill_all();
}

#[test]
fn applications_write_through_the_mount_and_it_survives_kill_and_remount() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let source = env.path("source");
    let mut records = dataset(&source, &env.path("images"), &[("/app/app.log", 3000), ("/app/config", 100)]);
    // The checkpoint's database, made on the old host, open for writing.
    sqlite(&source.join("app/data.db"), "create table t(x text); insert into t values ('old');");
    let db_len = std::fs::metadata(source.join("app/data.db")).unwrap().len();
    records.push(DumpFile { flags: libc::O_RDWR as u32, ..DumpFile::new("/app/data.db", db_len) });
    write_dump(&env.path("images"), &records).unwrap();
    let before = tree(&source);
    let ssh = || Source::Ssh { sshd: &sshd, root: source.clone() };

    let mount = env.mount("m", &env.path("images"), &ssh(), &[]);
    let app = mount.at("/app");
    let db = app.join("data.db");
    // Rollback journal: app.db-journal is made and removed per transaction.
    sqlite(&db, "insert into t values ('rollback 1'); insert into t values ('rollback 2');");
    // WAL: -wal and -shm files, the latter mapped shared.
    sqlite(&db, "pragma journal_mode=wal; insert into t values ('wal 1');");
    sqlite(&db, "insert into t values ('wal 2'); pragma wal_checkpoint(truncate);");
    assert_eq!(sqlite(&db, "select count(*) from t"), "5");
    // Log rotation.
    std::fs::rename(app.join("app.log"), app.join("app.log.1")).unwrap();
    std::fs::write(app.join("app.log"), b"new log\n").unwrap();
    // Atomic save over a recorded file.
    std::fs::write(app.join("config.tmp"), b"saved").unwrap();
    std::fs::rename(app.join("config.tmp"), app.join("config")).unwrap();
    // Directories made and removed, a symlink, a hard link, a FIFO, xattrs.
    std::fs::create_dir_all(app.join("cache/a/b")).unwrap();
    std::fs::remove_dir(app.join("cache/a/b")).unwrap();
    assert_eq!(std::fs::remove_dir(app.join("cache")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    std::os::unix::fs::symlink("app.log.1", app.join("latest")).unwrap();
    std::fs::hard_link(app.join("app.log"), app.join("app.log.hard")).unwrap();
    assert_eq!(std::fs::metadata(app.join("app.log")).unwrap().nlink(), 2);
    nix::unistd::mkfifo(&app.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    xattr_set(&app.join("app.log.1"), "user.rotated", b"yes");
    // An unlinked open file keeps working until closed.
    let mut open = std::fs::File::options().read(true).write(true).create_new(true).open(app.join("scratch")).unwrap();
    std::fs::remove_file(app.join("scratch")).unwrap();
    open.write_all(b"still here").unwrap();
    open.rewind().unwrap();
    let mut back = String::new();
    open.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here");
    drop(open);

    let expect = |app: &Path| {
        assert_eq!(
            sqlite(&app.join("data.db"), "select group_concat(x, ',') from t"),
            "old,rollback 1,rollback 2,wal 1,wal 2"
        );
        assert_eq!(std::fs::read(app.join("app.log.1")).unwrap(), content("/app/app.log", 3000));
        assert_eq!(std::fs::read(app.join("app.log")).unwrap(), b"new log\n");
        assert_eq!(std::fs::read(app.join("app.log.hard")).unwrap(), b"new log\n");
        assert_eq!(std::fs::read(app.join("config")).unwrap(), b"saved");
        assert!(!app.join("config.tmp").exists() && !app.join("scratch").exists());
        assert!(app.join("cache/a").is_dir() && !app.join("cache/a/b").exists());
        assert_eq!(std::fs::read_link(app.join("latest")).unwrap(), Path::new("app.log.1"));
        assert_eq!(std::fs::read(app.join("latest")).unwrap(), content("/app/app.log", 3000));
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(app.join("fifo")).unwrap().file_type().is_fifo());
        assert_eq!(xattr_get(&app.join("app.log.1"), "user.rotated"), b"yes");
    };
    expect(&app);
    assert_eq!(tree(&source), before, "the source is never written");
    // New app.log (two names, one file), the saved config, the changed
    // database are local; the replaced config is no longer a file of the mount.
    let status = mount.status();
    assert_eq!(status["local_files"], 3, "{status}");
    assert_eq!(status["local_bytes"], 8 + 5 + std::fs::metadata(&db).unwrap().len(), "{status}");
    assert_eq!(status["files_total"], 2, "{status}");
    assert_eq!(status["bytes_total"], 3000, "{status}");

    // Acknowledged changes survive kill -9 and a remount.
    kill9(&mount);
    drop(mount);
    let mount = env.mount("m", &env.path("images"), &ssh(), &[]);
    expect(&mount.at("/app"));
    sqlite(&mount.at("/app/data.db"), "insert into t values ('after kill')");
    std::fs::remove_file(mount.at("/app/app.log.hard")).unwrap();
    assert!(mount.umount().status.success());
    drop(mount);

    // And a clean umount and remount.
    let mount = env.mount("m", &env.path("images"), &ssh(), &[]);
    assert_eq!(sqlite(&mount.at("/app/data.db"), "select count(*) from t"), "6");
    assert!(!mount.at("/app/app.log.hard").exists());
    assert_eq!(std::fs::metadata(mount.at("/app/app.log")).unwrap().nlink(), 1);
    assert_eq!(tree(&source), before, "the source is never written");

    // `lazyfs export`: the tree as it is now, holes kept, in a plain directory.
    let sparse = std::fs::File::create(mount.at("/app/sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (64 << 20) - 3).unwrap();
    drop(sparse);
    let exported = env.path("exported");
    let out = env.run(&["export", mount.mountpoint.to_str().unwrap(), exported.to_str().unwrap()]);
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree(&exported), tree(&mount.mountpoint));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(exported.join("app/fifo")).unwrap().file_type().is_fifo());
    let blocks = std::fs::metadata(exported.join("app/sparse")).unwrap().blocks();
    assert!(blocks < 1024, "the hole was written out: {blocks} blocks");
    assert_eq!(sqlite(&exported.join("app/data.db"), "select count(*) from t"), "6");
}

#[test]
fn read_only_refuses_every_change() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/r/file", 100)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--read-only"]);
    let dir = mount.at("/r");
    let erofs = |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(std::fs::write(dir.join("new"), b"x"));
    erofs(std::fs::create_dir(dir.join("d")));
    erofs(std::fs::rename(dir.join("file"), dir.join("moved")));
    erofs(std::fs::remove_file(dir.join("file")));
    erofs(std::os::unix::fs::symlink("file", dir.join("link")));
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), content("/r/file", 100));
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let (p, n) = (cstr(path.as_os_str().as_encoded_bytes()), cstr(name.as_bytes()));
    let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn xattr_get(path: &Path, name: &str) -> Vec<u8> {
    let (p, n) = (cstr(path.as_os_str().as_encoded_bytes()), cstr(name.as_bytes()));
    let mut buf = vec![0u8; 256];
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(rc >= 0, "getxattr: {}", std::io::Error::last_os_error());
    buf.truncate(rc as usize);
    buf
}

fn cstr(bytes: &[u8]) -> std::ffi::CString {
    std::ffi::CString::new(bytes).unwrap()
}
