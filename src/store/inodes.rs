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
    /// None until [`Numbers::keep_in`] (a fresh mount numbers before its cache dir is open).
    file: Option<File>,
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
    /// A new table for a new connection, kept nowhere yet.
    pub fn fresh() -> InodeTable {
        InodeTable {
            file: None,
            by_origin: HashMap::new(),
            given: HashSet::new(),
            named: HashSet::new(),
            next: ROOT_INO + 1,
            pending: Some(Vec::new()),
        }
    }

    /// The table of a live connection, as its last process left it (a torn
    /// last record is cut off).
    pub fn load(dir: &CacheDir) -> Result<InodeTable, StoreError> {
        let io = |source| StoreError::Io { path: dir.join(NAME), source };
        let bytes = dir.read(NAME).map_err(io)?;
        let mut table = InodeTable { file: Some(dir.open_append(NAME)?), ..InodeTable::fresh() };
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + 12) {
            let ino = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(header[8..].try_into().expect("4 bytes")) as usize;
            let Some(origin) = bytes.get(at + 12..at + 12 + len) else { break };
            table.note(ino, Some(origin).filter(|o| !o.is_empty()));
            at += 12 + len;
        }
        if at < bytes.len()
            && let Some(file) = &table.file
        {
            file.set_len(at as u64).map_err(io)?;
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
        let record = record(ino, origin);
        match &mut self.pending {
            Some(pending) => pending.extend(record),
            None => self.write(&record),
        }
        self.note(ino, origin);
    }

    fn write(&mut self, records: &[u8]) {
        let Some(file) = &mut self.file else { return };
        if let Err(e) = file.write_all(records) {
            // The mount goes on; only a successor could number these nodes otherwise.
            log::error!("recording inode numbers in the inode table: {e}");
        }
    }
}

impl Numbers for InodeTable {
    fn number(&mut self, key: Option<&[u8]>) -> Ino {
        if let Some(&ino) = key.and_then(|k| self.by_origin.get(k)) {
            return ino;
        }
        let ino = self.next;
        self.append(ino, key);
        ino
    }

    fn reserve_up_to(&mut self, max: Ino) {
        self.next = self.next.max(max.saturating_add(1));
    }

    fn settle(&mut self) {
        let Some(pending) = self.pending.take() else { return };
        match self.file {
            Some(_) => self.write(&pending),
            // Kept nowhere yet: `keep_in` writes everything.
            None => self.pending = None,
        }
    }

    fn keep_in(&mut self, dir: &CacheDir) -> Result<(), StoreError> {
        dir.write_atomic(NAME, &[])?;
        self.file = Some(dir.open_append(NAME)?);
        // Everything given so far, in one go.
        let given: Vec<(Ino, Option<Vec<u8>>)> = {
            let mut named: Vec<(Ino, Option<Vec<u8>>)> =
                self.by_origin.iter().map(|(origin, &ino)| (ino, Some(origin.clone()))).collect();
            named.extend(self.given.iter().filter(|i| !self.named.contains(i)).map(|&i| (i, None)));
            named
        };
        let records: Vec<u8> = given.iter().flat_map(|(ino, origin)| record(*ino, origin.as_deref())).collect();
        match &mut self.pending {
            Some(pending) => *pending = records,
            None => self.write(&records),
        }
        Ok(())
    }
}

fn record(ino: Ino, origin: Option<&[u8]>) -> Vec<u8> {
    let origin = origin.unwrap_or_default();
    let mut record = Vec::with_capacity(12 + origin.len());
    record.extend_from_slice(&ino.to_le_bytes());
    record.extend_from_slice(&(origin.len() as u32).to_le_bytes());
    record.extend_from_slice(origin);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_numbers_origins_as_its_predecessor_did_in_any_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open_cache(&tmp.path().join("c")).unwrap();
        let mut first = InodeTable::fresh();
        first.reserve_up_to(40);
        let a = first.number(Some(b"file\0/a"));
        let b = first.number(Some(b"file\0/b"));
        assert!(a > 40 && b > a, "reserved numbers are never given");
        first.settle();
        first.keep_in(&dir).unwrap();
        let made = first.number(None);
        assert_eq!(InodeTable::load(&dir).unwrap().next, made + 1, "kept, each number is written as it is given");
        // A torn last record (a kill mid-write) is cut off.
        std::fs::OpenOptions::new().append(true).open(dir.join(NAME)).unwrap().write_all(&[9, 9, 9]).unwrap();
        let mut successor = InodeTable::load(&dir).unwrap();
        assert_eq!(successor.number(Some(b"file\0/b")), b);
        assert_eq!(successor.number(Some(b"file\0/a")), a);
        successor.settle();
        let new = successor.number(Some(b"source\0c"));
        assert!(new > made);
        assert_eq!(InodeTable::load(&dir).unwrap().number(Some(b"source\0c")), new);
    }
}
