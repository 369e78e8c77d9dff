//! Open directory handles and the entries each one reads. The kernel reads a
//! big directory in many READDIR calls, each starting where the last one
//! ended; building the whole entry list again for each call made reading a
//! directory cost the square of its size (`ls` of 100,000 entries: 27 s).
//! Each handle keeps the entries its first READDIR took (as mountpoint-s3's
//! readdir handles do), so reading a directory costs in proportion to its size.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::fs::Kind;
use crate::namespace::Ino;

/// A directory's entries, `.` and `..` first, as one READDIR from offset 0 saw them.
pub type Entries = Arc<Vec<(Ino, Kind, OsString)>>;

pub struct DirHandles {
    next: AtomicU64,
    /// By (directory, handle): a handle a predecessor process gave out
    /// (failover) may have the number of one of ours, never also its directory
    /// and then only with entries of that same directory.
    open: Mutex<HashMap<(Ino, u64), Entries>>,
}

impl Default for DirHandles {
    fn default() -> Self {
        // Numbered from the pid up: a successor's handles do not reuse its predecessor's.
        DirHandles { next: AtomicU64::new(u64::from(std::process::id()) << 32), open: Mutex::default() }
    }
}

impl DirHandles {
    /// A new handle, with no entries yet.
    pub fn open(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The entries `handle` of `dir` read so far, to go on at `offset`: none
    /// at offset 0 (a new read, or a `rewinddir`, which must see changes) or
    /// for a handle this process has not read yet.
    pub fn entries(&self, dir: Ino, handle: u64, offset: u64) -> Option<Entries> {
        if offset == 0 {
            return None;
        }
        self.open.lock().expect("dir handles").get(&(dir, handle)).cloned()
    }

    /// Keeps what a READDIR of `handle` read, for the calls that go on from it.
    pub fn keep(&self, dir: Ino, handle: u64, entries: Entries) {
        self.open.lock().expect("dir handles").insert((dir, handle), entries);
    }

    pub fn release(&self, dir: Ino, handle: u64) {
        self.open.lock().expect("dir handles").remove(&(dir, handle));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_goes_on_from_its_entries_until_a_rewind_or_its_release() {
        let handles = DirHandles::default();
        let (a, b) = (handles.open(), handles.open());
        assert_ne!(a, b);
        let entries: Entries = Arc::new(vec![(1, Kind::Dir, ".".into()), (1, Kind::Dir, "..".into())]);
        handles.keep(1, a, entries.clone());
        assert!(Arc::ptr_eq(&handles.entries(1, a, 1).unwrap(), &entries));
        assert!(handles.entries(1, a, 0).is_none(), "a rewind reads afresh");
        assert!(handles.entries(1, b, 1).is_none(), "another handle");
        assert!(handles.entries(2, a, 1).is_none(), "another directory");
        handles.release(1, a);
        assert!(handles.entries(1, a, 1).is_none(), "released");
    }
}
