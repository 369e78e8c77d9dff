//! The cache dir's inode table: every inode number given on the mount's
//! kernel connection, with the origin of the node it was given to (a
//! checkpoint file's original path, a directory's path in the mount; none for
//! a node the local layer made, whose journal record holds its number). A
//! process taking the connection over gives each node the number the kernel
//! knows it by, whatever order it meets the nodes in.
//!
//! Append-only, one record per number, written without fsync: it must
//! outlive the process (the page cache does), not the machine (the kernel's
//! connection does not either). A fresh mount starts it anew.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;

use super::{CacheDir, StoreError};
use crate::namespace::{Ino, Numbers, ROOT_INO};

const NAME: &str = "inodes";

#[derive(Debug)]
pub struct InodeTable {
    file: File,
    by_origin: HashMap<Vec<u8>, Ino>,
    given: HashSet<Ino>,
    /// Numbers given to an origin: never the local layer's.
    named: HashSet<Ino>,
    next: Ino,
    /// Records not written yet: a namespace being built writes them at once
    /// when done ([`Numbers::settle`]), before the kernel knows any number.
    pending: Option<Vec<u8>>,
}

impl InodeTable {
    /// A new table for a new connection, with `reserved` given already (the
    /// numbers the journal's local records hold).
    pub fn create(dir: &CacheDir, reserved: impl IntoIterator<Item = Ino>) -> Result<InodeTable, StoreError> {
        dir.write_atomic(NAME, &[])?;
        let mut table = InodeTable::load(dir)?;
        for ino in reserved {
            table.reserve(ino);
        }
        Ok(table)
    }

    /// The table of a live connection, as its last process left it (a torn
    /// last record is cut off).
    pub fn load(dir: &CacheDir) -> Result<InodeTable, StoreError> {
        let io = |source| StoreError::Io { path: dir.join(NAME), source };
        let bytes = dir.read(NAME).map_err(io)?;
        let mut table = InodeTable {
            file: dir.open_append(NAME)?,
            by_origin: HashMap::new(),
            given: HashSet::new(),
            named: HashSet::new(),
            next: ROOT_INO + 1,
            pending: Some(Vec::new()),
        };
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + 12) {
            let ino = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(header[8..].try_into().expect("4 bytes")) as usize;
            let Some(origin) = bytes.get(at + 12..at + 12 + len) else { break };
            table.note(ino, Some(origin).filter(|o| !o.is_empty()));
            at += 12 + len;
        }
        if at < bytes.len() {
            table.file.set_len(at as u64).map_err(io)?;
        }
        Ok(table)
    }

    fn note(&mut self, ino: Ino, origin: Option<&[u8]>) {
        if let Some(origin) = origin {
            self.by_origin.insert(origin.to_vec(), ino);
            self.named.insert(ino);
        }
        self.given.insert(ino);
        self.next = self.next.max(ino + 1);
    }

    /// Records `ino` as given (to `origin`).
    fn append(&mut self, ino: Ino, origin: Option<&[u8]>) {
        let origin_bytes = origin.unwrap_or_default();
        let mut record = Vec::with_capacity(12 + origin_bytes.len());
        record.extend_from_slice(&ino.to_le_bytes());
        record.extend_from_slice(&(origin_bytes.len() as u32).to_le_bytes());
        record.extend_from_slice(origin_bytes);
        match &mut self.pending {
            Some(pending) => pending.extend(record),
            None => self.write(&record),
        }
        self.note(ino, origin);
    }

    fn write(&mut self, records: &[u8]) {
        if let Err(e) = self.file.write_all(records) {
            // The mount goes on; only a successor could number these nodes otherwise.
            log::error!("recording inode numbers in the inode table: {e}");
        }
    }
}

impl Numbers for InodeTable {
    fn number(&mut self, origin: Option<&[u8]>) -> Ino {
        if let Some(&ino) = origin.and_then(|o| self.by_origin.get(o)) {
            return ino;
        }
        let ino = self.next;
        self.append(ino, origin);
        ino
    }

    fn settle(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.write(&pending);
        }
    }

    fn reserve(&mut self, ino: Ino) -> bool {
        if ino <= ROOT_INO || self.named.contains(&ino) {
            return false;
        }
        if self.given.contains(&ino) {
            return true;
        }
        self.append(ino, None);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_numbers_origins_as_its_predecessor_did_in_any_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open_cache(&tmp.path().join("c")).unwrap();
        let mut first = InodeTable::create(&dir, [40]).unwrap();
        let a = first.number(Some(b"file\0/a"));
        let b = first.number(Some(b"file\0/b"));
        let made = first.number(None);
        assert!(a > 40 && b > a && made > b, "reserved numbers are never given again");
        assert_eq!(InodeTable::load(&dir).unwrap().next, ROOT_INO + 1, "written only once settled");
        first.settle();
        let later = first.number(None);
        assert_eq!(InodeTable::load(&dir).unwrap().next, later + 1, "settled, each number is written at once");
        // A torn last record (a kill mid-write) is cut off.
        std::fs::OpenOptions::new().append(true).open(dir.join(NAME)).unwrap().write_all(&[9, 9, 9]).unwrap();
        let mut successor = InodeTable::load(&dir).unwrap();
        assert_eq!(successor.number(Some(b"file\0/b")), b);
        assert_eq!(successor.number(Some(b"file\0/a")), a);
        assert!(successor.reserve(40) && successor.reserve(made) && !successor.reserve(a));
        let new = successor.number(Some(b"dir\0/c"));
        successor.settle();
        assert!(new > later);
        assert_eq!(InodeTable::load(&dir).unwrap().number(Some(b"dir\0/c")), new);
        // A fresh mount starts anew.
        let mut fresh = InodeTable::create(&dir, []).unwrap();
        fresh.settle();
        assert_eq!(fresh.number(Some(b"file\0/b")), ROOT_INO + 1);
    }
}
