//! `--subtree`: changes waiting for a listing and the mount's FUSE threads,
//! through a real FUSE mount
//! served in this process over the fault-injecting source, so a listing can
//! be held for as long as the test wants. This test sets the process's
//! LAZYFS_RUNTIME_DIR, so it has a binary of its own.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::harness::{Core, Gate};
use common::mount::content;

/// A gate listings wait at until it opens.
/// The images record a file in each of six directories; their listing (the
/// walk's, right after the mount) hangs, as it does while the source is
/// silent (up to 5 s for the walk, then up to `--reconnect-timeout` for a
/// reader's own listing). Removing those recorded files is a change of a
/// directory not listed yet: it waits for the listing, but must not do so
/// on the FUSE session's threads (four): otherwise four such unlinks stop
/// every other operation on the mount, even opening a file that is here.
/// Lookups and readdirs answer from threads of their own; create, mkdir,
/// unlink, rmdir, rename, link and symlink do not.
#[test]
fn changes_waiting_for_a_listing_do_not_hold_the_mounts_threads() {
    let mut files: Vec<(String, Vec<u8>, bool)> =
        (0..6).map(|i| (format!("/srv/app/d{i}/rec"), b"recorded".to_vec(), true)).collect();
    files.push(("/srv/app/top".into(), content("top", 10_000), true));
    let refs: Vec<(&str, Vec<u8>, bool)> = files.iter().map(|(p, b, s)| (p.as_str(), b.clone(), *s)).collect();
    let mut core = Core::new(&refs);
    core.subtree = Some(PathBuf::from("/srv/app"));
    let held = Arc::new(Gate::default());
    let gate = held.clone();
    core.plan.on_list(move |dir| {
        if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with('d')) {
            gate.wait();
        }
        None
    });
    // SAFETY: this test binary runs this one test, before any thread of its
    // own: the registry of live mounts goes to the test's directory.
    unsafe { std::env::set_var("LAZYFS_RUNTIME_DIR", core.dir.path()) };
    let mountpoint = core.dir.path().join("mnt");
    let prepared = core.prepare(0).unwrap();
    let _unmount = Unmount(mountpoint.clone(), held.clone());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let serving = std::thread::spawn(move || {
        lazyfs::mount::serve(prepared, None, |_| ready_tx.send(()).unwrap()).unwrap();
    });
    ready.recv_timeout(Duration::from_secs(60)).unwrap();
    let top = mountpoint.join("top");
    assert_eq!(std::fs::read(&top).unwrap(), content("top", 10_000));

    let removers: Vec<_> = (0..6)
        .map(|i| {
            let rec = mountpoint.join(format!("d{i}/rec"));
            std::thread::spawn(move || std::fs::remove_file(rec))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let reader = std::thread::spawn(move || std::fs::read(top));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let reader_done = reader.is_finished();
    held.open();
    for remover in removers {
        remover.join().unwrap().unwrap();
    }
    assert_eq!(reader.join().unwrap().unwrap(), content("top", 10_000));
    nix::mount::umount(&mountpoint).unwrap();
    serving.join().unwrap();
    assert!(reader_done, "opening a file that is here waited behind unlinks waiting for a listing");
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
