//! The spill files open at one time: a bounded set, so a checkpoint with
//! 100,000 files mounts under the usual limit of 1,024 descriptors (and the
//! kernel's 65,530 mappings). A spill file is opened (and mapped) when it is
//! first used and closed again when others are used more recently: eviction
//! goes round the open ones and spares each one used since its last turn
//! (the CLOCK approximation of least recently used).

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// How many spill files may be open at once when the descriptor limit is
/// `fd_limit`: half of it (the rest is for connections, FUSE, the journal),
/// at most 4,096.
pub fn capacity_for(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 2).unwrap_or(usize::MAX).clamp(16, 4096)
}

/// Raises the soft limit on open descriptors to the hard one; returns the
/// soft limit then.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                log::warn!("cannot raise the open file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Where one spill file keeps its descriptor while open.
#[derive(Default)]
pub(super) struct Slot {
    pub(super) file: RwLock<Option<File>>,
    /// Used since eviction last looked at it.
    used: AtomicBool,
}

impl Slot {
    pub(super) fn touch(&self) {
        self.used.store(true, Ordering::Relaxed);
    }
}

/// The set of open spill files, shared by every spill file of a store.
pub struct OpenSpills {
    capacity: usize,
    /// The open slots, in the order eviction looks at them.
    ring: Mutex<VecDeque<Weak<Slot>>>,
}

impl OpenSpills {
    pub fn new(capacity: usize) -> OpenSpills {
        OpenSpills { capacity: capacity.max(1), ring: Mutex::new(VecDeque::new()) }
    }

    /// `slot` was just opened: count it, and close others beyond the capacity.
    pub(super) fn opened(&self, slot: &Arc<Slot>) {
        let mut ring = self.ring.lock().expect("open spills");
        ring.push_back(Arc::downgrade(slot));
        // Each slot gets at most one second chance per pass: bounded work.
        let mut looked = 0;
        while ring.len() > self.capacity && looked < 2 * ring.len() {
            looked += 1;
            let Some(candidate) = ring.pop_front() else { break };
            let Some(candidate) = candidate.upgrade() else { continue };
            if candidate.used.swap(false, Ordering::Relaxed) {
                ring.push_back(Arc::downgrade(&candidate));
                continue;
            }
            // In use right now (a read, a resize): spare it this time.
            match candidate.file.try_write() {
                Ok(mut file) => *file = None,
                Err(_) => ring.push_back(Arc::downgrade(&candidate)),
            }
        }
    }

    /// Spill files open now (at most the capacity, give or take those in use).
    pub fn open_count(&self) -> usize {
        let ring = self.ring.lock().expect("open spills");
        ring.iter().filter_map(Weak::upgrade).filter(|s| s.file.read().map(|f| f.is_some()).unwrap_or(false)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_follows_the_limit() {
        assert_eq!(capacity_for(1024), 512);
        assert_eq!(capacity_for(10), 16);
        assert_eq!(capacity_for(1 << 20), 4096);
    }

    #[test]
    fn the_least_recently_used_are_closed_first() {
        let dir = tempfile::tempdir().unwrap();
        let spills = OpenSpills::new(2);
        let slots: Vec<Arc<Slot>> = (0..3).map(|_| Arc::new(Slot::default())).collect();
        let open = |i: usize| {
            let path = dir.path().join(i.to_string());
            std::fs::write(&path, b"bytes").unwrap();
            *slots[i].file.write().unwrap() = Some(File::open(&path).unwrap());
            spills.opened(&slots[i]);
        };
        let is_open = |i: usize| slots[i].file.read().unwrap().is_some();
        open(0);
        open(1);
        slots[0].touch();
        open(2);
        // 1 was used least recently: closed; 0 was used since it opened.
        assert!(is_open(0) && !is_open(1) && is_open(2));
        assert_eq!(spills.open_count(), 2);
    }
}
