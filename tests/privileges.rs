//! lazyfs clears set-user-ID, set-group-ID and file capabilities itself
//! (FUSE_HANDLE_KILLPRIV_V2, so the kernel does not ask it for
//! `security.capability` before every write): on a write and a truncate by a
//! user without CAP_FSETID (here `nobody`), on a chown by anyone, and
//! capabilities on every write and truncate; kept across a remount.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::mount::{Source, TestEnv, content, dataset};
use lazyfs::images::write::{DumpFile, write_dump};

const CAPABILITY: &str = "security.capability";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

/// A valid `security.capability` (revision 2, CAP_NET_BIND_SERVICE permitted).
fn set_capability(path: &Path) {
    let mut value = 0x0200_0000u32.to_le_bytes().to_vec();
    const CAP_NET_BIND_SERVICE: u32 = 10;
    for word in [1u32 << CAP_NET_BIND_SERVICE, 0, 0, 0] {
        value.extend_from_slice(&word.to_le_bytes());
    }
    let (path, name) = (CString::new(path.as_os_str().as_bytes()).unwrap(), CString::new(CAPABILITY).unwrap());
    // SAFETY: valid C strings and a buffer of the length given.
    let done = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(done, 0, "setxattr {CAPABILITY}: {}", std::io::Error::last_os_error());
}

fn has_capability(path: &Path) -> bool {
    let (path, name) = (CString::new(path.as_os_str().as_bytes()).unwrap(), CString::new(CAPABILITY).unwrap());
    // SAFETY: valid C strings; a size of 0 only asks for the value's length.
    let size = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    match size {
        -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODATA) => false,
        -1 => panic!("getxattr {CAPABILITY}: {}", std::io::Error::last_os_error()),
        _ => true,
    }
}

/// Makes `path` set-user-ID, set-group-ID (with group execute), writable by
/// everyone, with a capability.
fn privilege(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o6777)).unwrap();
    set_capability(path);
    assert_eq!(mode(path), 0o6777);
    assert!(has_capability(path));
}

fn as_nobody(script: &str, path: &Path) {
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "sh", "-c", script, "sh"])
        .arg(path)
        .output()
        .expect("runuser (util-linux)");
    assert!(out.status.success(), "{script} as nobody: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn writes_truncates_and_chowns_drop_privileges_as_linux_does() {
    let env = TestEnv::new();
    for dir in ["", "mnt", "source", "runtime"] {
        std::fs::set_permissions(env.path(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let checkpoint_file = "/app/tool";
    std::fs::create_dir_all(env.path("source/app")).unwrap();
    std::fs::write(env.path("source/app/tool"), content(checkpoint_file, 5000)).unwrap();
    write_dump(&env.path("images"), &[DumpFile { mode: 0o100777, ..DumpFile::new(checkpoint_file, 5000) }]).unwrap();
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--allow-other"]);
    let made = mount.at("/app/made");
    std::fs::write(&made, b"made through the mount").unwrap();

    for path in [&made, &mount.at(checkpoint_file)] {
        // A write by a user without CAP_FSETID: both go.
        privilege(path);
        as_nobody("printf x >> \"$1\"", path);
        assert_eq!(mode(path), 0o777, "{}", path.display());
        assert!(!has_capability(path), "{}", path.display());

        // By root (CAP_FSETID): the set-ID bits stay, the capability goes.
        privilege(path);
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"y", 1).unwrap();
        drop(file);
        assert_eq!(mode(path), 0o6777, "{}", path.display());
        assert!(!has_capability(path), "{}", path.display());

        // A truncate by `nobody`: both go.
        privilege(path);
        as_nobody("truncate -s 3 \"$1\"", path);
        assert_eq!((mode(path), std::fs::metadata(path).unwrap().len()), (0o777, 3), "{}", path.display());
        assert!(!has_capability(path), "{}", path.display());

        // A chown, even by root: both go.
        privilege(path);
        std::os::unix::fs::chown(path, Some(65534), None).unwrap();
        assert_eq!(mode(path), 0o777, "{}", path.display());
        assert!(!has_capability(path), "{}", path.display());

        // A set-group-ID file without group execute keeps the bit (mandatory locking).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o2767)).unwrap();
        as_nobody("printf z >> \"$1\"", path);
        assert_eq!(mode(path), 0o2767, "{}", path.display());
    }

    // What was dropped stays dropped: it was journaled like any change.
    privilege(&made);
    as_nobody("printf x >> \"$1\"", &made);
    drop(mount);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--allow-other"]);
    let made = mount.at("/app/made");
    assert_eq!(mode(&made), 0o777);
    assert!(!has_capability(&made));
    assert_eq!(mode(&mount.at(checkpoint_file)), 0o2767);
}

/// The point of handling privileges in lazyfs: 1,500 writes into a file made
/// through the mount (passthrough) no longer cost a GETXATTR each (the
/// kernel looked for `security.capability` before every write: 1,501 of them).
/// Counted in fuser's debug log of the requests the daemon got.
#[test]
fn writes_do_not_ask_the_daemon_for_capabilities() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/d/f", 1000)]);
    let mountpoint = env.path("mnt/m");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let out = env
        .lazyfs()
        .env("LAZYFS_LOG", "info,fuser::request=debug")
        .arg("mount")
        .arg(&mountpoint)
        .arg(env.path("images"))
        .arg(env.path("source"))
        .arg("--cache-dir")
        .arg(env.path("cache/m"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mount = common::mount::Mount {
        mountpoint: mountpoint.clone(),
        cache: env.path("cache/m"),
        env_home: env.tmp.path().into(),
    };
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(mountpoint.join("d/new")).unwrap();
    for i in 0..1500u64 {
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], (i * 7919 % 16384) * 4096).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let log = std::fs::read_to_string(mount.cache.join("lazyfs.log")).unwrap();
    let asked = log.lines().filter(|l| l.contains("GETXATTR")).count();
    assert!(log.contains("FSYNC"), "no requests in the log: is fuser's debug output still there?\n{log}");
    assert!(asked <= 2, "{asked} GETXATTR requests for 1,500 writes");
}
