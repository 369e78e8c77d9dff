//! `--subtree DIR` (the old host's whole DIR, lazily listed) in the core,
//! without FUSE or sshd: a local source seen through a fault-injecting one
//! whose listings can be refused or held (`tests/common/harness.rs`).

mod common;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::harness::{Core, Gate};
use lazyfs::namespace::ROOT_INO;

const SUBTREE: &str = "/srv/app";

/// Lookups waiting for a listing (a burst of them, the listing held) are
/// answered from a bounded pool of threads, not a thread each: a thread
/// that cannot be started would panic, and thousands of them are a load of
/// their own.
#[test]
fn lookups_waiting_for_a_listing_share_a_bounded_pool_of_threads() {
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    core.subtree = Some(PathBuf::from(SUBTREE));
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    core.plan.on_list(move |_| {
        held.wait();
        None
    });
    core.mount(0).unwrap();
    let (tx, answers) = mpsc::channel();
    for i in 0..300 {
        let (tx, name) = (tx.clone(), OsString::from(format!("missing{i}")));
        core.fs().then(
            move |fs| fs.lookup(ROOT_INO, &name),
            move |found| {
                let _ = tx.send(found.map(|_| ()).map_err(|e| e.errno));
            },
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let threads = core.fs().waiting_threads();
    gate.open();
    for _ in 0..300 {
        assert_eq!(answers.recv_timeout(Duration::from_secs(60)).unwrap(), Err(libc::ENOENT));
    }
    assert!(threads <= 64, "{threads} threads for 300 lookups waiting for one listing");
    assert!(core.fs().lookup(ROOT_INO, OsStr::new("rec")).is_ok());
}
