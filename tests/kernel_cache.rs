//! The kernel's page cache of a mount and files fetched again: the one test
//! here sets the process's LAZYFS_RUNTIME_DIR, so it has a binary of its own.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::harness::{Core, Fault, Gate};
use common::mount::content;

/// Finding 6: a file fetched again because it changed on the source drops
/// what the kernel cached of its old bytes (pages are kept across opens).
/// In-process mount over a fault-injecting source: the transfer stalls while
/// the file is swapped, so the restart is certain.
#[test]
fn a_file_fetched_again_drops_what_the_kernel_cached_of_it() {
    let len = 16 << 20;
    let old = content("/c/file", len);
    let new = content("/c/file-v2", len);
    let core = Core::new(&[("/c/file", old.clone(), true)]);
    let gate = std::sync::Arc::new(Gate::default());
    let stall = gate.clone();
    core.plan.on_read(move |_, offset, _| match offset >= 8 << 20 {
        true => Fault::Stall(stall.clone()),
        false => Fault::Pass,
    });
    // SAFETY: this test binary runs this one test, before any thread of its
    // own: the registry of live mounts goes to the test's directory.
    unsafe { std::env::set_var("LAZYFS_RUNTIME_DIR", core.dir.path()) };
    let mountpoint = core.dir.path().join("mnt");
    let prepared = core.prepare(4).unwrap();
    let _unmount = Unmount(mountpoint.clone());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let serving = std::thread::spawn(move || {
        lazyfs::mount::serve(prepared, None, |_| ready_tx.send(()).unwrap()).unwrap();
    });
    ready.recv_timeout(Duration::from_secs(60)).unwrap();
    let at = mountpoint.join("c/file");
    let mut head = vec![0u8; 1 << 20];
    File::open(&at).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head == old[..1 << 20]);

    let tmp = core.source.join("c/.tmp");
    std::fs::write(&tmp, &new).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(10);
    File::options().write(true).open(&tmp).unwrap().set_modified(later).unwrap();
    std::fs::rename(&tmp, core.source.join("c/file")).unwrap();
    gate.open();

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = lazyfs::control::Client::connect(&mountpoint).unwrap().status().unwrap();
        if status.files[0].state() == lazyfs::control::proto::FileState::Verified {
            break status;
        }
        assert!(Instant::now() < deadline, "never verified: {:?}", status.files[0]);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.files[0].blake3, blake3::hash(&new).to_hex().as_str());
    let served = std::fs::read(&at).unwrap();
    assert!(served[..1 << 20] == new[..1 << 20], "the kernel served its cached old bytes");
    assert!(served == new);
    nix::mount::umount(&mountpoint).unwrap();
    serving.join().unwrap();
}

/// Detaches the mount if the test fails half way.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if common::mount::is_mounted(&self.0) {
            let _ = lazyfs::mount::detach(&self.0);
        }
    }
}
