//! `--subtree`: what another local user can do through an `allow_other`
//! mount while a directory's listing has not come (a real FUSE mount served in this process over the fault-injecting
//! source, its listing held). This test sets the process's
//! LAZYFS_RUNTIME_DIR, so it has a binary of its own.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::harness::{Core, Gate};
use lazyfs::mount::MountRequest;

/// `private` is `0700 4242:4242` on the old host and holds a recorded
/// `0644` file. With `allow_other` (set by itself when the images record
/// another user), the README promises other local users only what the
/// modes let them, as on the old host: `nobody` cannot go into `private`.
/// Until `private`'s parent is listed, lazyfs would show it as a made-up
/// `0755` directory of the mounting user, and `nobody` could read the file:
/// on such a mount a name of the images is answered once its directory's
/// listing has come (here a second after `nobody` asks).
#[test]
fn another_user_cannot_read_through_a_private_directory_before_it_is_listed() {
    let mut core = Core::new(&[("/srv/app/private/recin", b"not for nobody".to_vec(), true)]);
    let private = core.source.join("srv/app/private");
    std::os::unix::fs::chown(&private, Some(4242), Some(4242)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(core.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    core.subtree = Some(PathBuf::from("/srv/app"));
    let held = Arc::new(Gate::default());
    let gate = held.clone();
    // The listings of the root (which tells `private`'s mode) and of `private` wait.
    core.plan.on_list(move |_| {
        gate.wait();
        None
    });
    // SAFETY: this test binary runs this one test, before any thread of its
    // own: the registry of live mounts goes to the test's directory.
    unsafe { std::env::set_var("LAZYFS_RUNTIME_DIR", core.dir.path()) };
    let mountpoint = core.dir.path().join("mnt");
    std::fs::set_permissions(&mountpoint, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prepared = core.prepare_request(MountRequest { allow_other: true, ..core.request(0) }).unwrap();
    let _unmount = Unmount(mountpoint.clone(), held.clone());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let serving = std::thread::spawn(move || {
        lazyfs::mount::serve(prepared, None, |_| ready_tx.send(()).unwrap()).unwrap();
    });
    ready.recv_timeout(Duration::from_secs(60)).unwrap();
    // Other users reach the mountpoint (lazyfs makes the test's directory 0700 again).
    std::fs::set_permissions(core.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The listing comes a while after `nobody` asks (a slow link).
    let opener = held.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        opener.open();
    });
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "cat"])
        .arg(mountpoint.join("private/recin"))
        .output()
        .unwrap();
    late.join().unwrap();
    nix::mount::umount(&mountpoint).unwrap();
    serving.join().unwrap();
    assert!(
        !out.status.success(),
        "nobody read a file of a 0700 directory of uid 4242: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Opens the gate and detaches the mount if the test fails half way.
struct Unmount(PathBuf, Arc<Gate>);

impl Drop for Unmount {
    fn drop(&mut self) {
        self.1.open();
        if common::mount::is_mounted(&self.0) {
            let _ = lazyfs::mount::detach(&self.0);
        }
    }
}
