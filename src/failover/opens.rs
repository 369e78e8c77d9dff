//! The open handles of a FUSE connection, kept where a successor finds them:
//! a memfd the supervisor holds for as long as the connection lives. The
//! kernel remembers every open file and every passthrough backing file the
//! serving process gave it; a successor must know them too, or it would drop
//! a file that is unlinked but still open, or answer a cached open beside a
//! passthrough one (which the kernel refuses).
//!
//! One fixed-size slot per inode with open handles, each update one `pwrite`:
//! a `kill -9` lands before or after it, never inside. Slots are reused; a
//! slot whose counts are zero is free.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use crate::namespace::Ino;

/// ino, cached opens, passthrough opens, backing id (0: none), what the last
/// request did (0: none), that request's id.
const SLOT: usize = 32;

/// What the kernel holds open of one inode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub cached: u32,
    pub passthrough: u32,
    /// The passthrough backing id registered with the connection, if any.
    pub backing: Option<u32>,
    /// The last request that changed the counts (recorded before it is
    /// answered): sent again to a successor, it is answered as counted.
    pub last: Option<(u64, Count)>,
}

/// What a request did to an inode's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    CachedOpen = 1,
    PassthroughOpen = 2,
    Release = 3,
}

impl Count {
    fn from_word(word: u32) -> Option<Count> {
        [Count::CachedOpen, Count::PassthroughOpen, Count::Release].into_iter().find(|c| *c as u32 == word)
    }
}

impl Held {
    /// Nothing open: the inode needs no slot.
    pub fn is_empty(&self) -> bool {
        self.cached == 0 && self.passthrough == 0
    }

    /// Open handles, of either kind.
    pub fn opens(&self) -> u32 {
        self.cached + self.passthrough
    }
}

pub struct OpenTable {
    file: File,
    slots: HashMap<Ino, u64>,
    free: Vec<u64>,
    /// Slots ever used (the file's length in slots).
    end: u64,
}

impl OpenTable {
    /// A table for a new connection.
    pub fn create() -> std::io::Result<OwnedFd> {
        nix::sys::memfd::memfd_create(c"lazyfs-opens", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(std::io::Error::from)
    }

    /// Opens the table in `fd` and reads what it holds.
    pub fn open(fd: OwnedFd) -> std::io::Result<(OpenTable, HashMap<Ino, Held>)> {
        let file = File::from(fd);
        // By position: the descriptor's offset is shared with its predecessor's.
        let mut bytes = vec![0; file.metadata()?.len() as usize];
        let read = crate::store::read_full(&file, 0, &mut bytes)?;
        bytes.truncate(read);
        let mut table = OpenTable { file, slots: HashMap::new(), free: Vec::new(), end: 0 };
        let mut held = HashMap::new();
        for (index, slot) in bytes.chunks_exact(SLOT).enumerate() {
            let word = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
            let ino = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
            let request = u64::from_le_bytes(slot[24..32].try_into().expect("8 bytes"));
            let entry = Held {
                cached: word(8),
                passthrough: word(12),
                backing: Some(word(16)).filter(|&id| id != 0),
                last: Count::from_word(word(20)).map(|count| (request, count)),
            };
            let index = index as u64;
            table.end = index + 1;
            if ino == 0 || entry.is_empty() || held.contains_key(&ino) {
                table.free.push(index);
            } else {
                held.insert(ino, entry);
                table.slots.insert(ino, index);
            }
        }
        Ok((table, held))
    }

    /// Records what is held of `ino` now.
    pub fn record(&mut self, ino: Ino, held: &Held) -> std::io::Result<()> {
        let index = match (self.slots.get(&ino), held.is_empty()) {
            (Some(&index), _) => index,
            (None, true) => return Ok(()),
            (None, false) => {
                let index = self.free.pop().unwrap_or_else(|| {
                    self.end += 1;
                    self.end - 1
                });
                self.slots.insert(ino, index);
                index
            }
        };
        let mut slot = [0u8; SLOT];
        if !held.is_empty() {
            slot[..8].copy_from_slice(&ino.to_le_bytes());
            slot[8..12].copy_from_slice(&held.cached.to_le_bytes());
            slot[12..16].copy_from_slice(&held.passthrough.to_le_bytes());
            slot[16..20].copy_from_slice(&held.backing.unwrap_or(0).to_le_bytes());
            if let Some((request, count)) = held.last {
                slot[20..24].copy_from_slice(&(count as u32).to_le_bytes());
                slot[24..32].copy_from_slice(&request.to_le_bytes());
            }
        }
        let written = self.file.write_all_at(&slot, index * SLOT as u64);
        if held.is_empty() {
            self.slots.remove(&ino);
            self.free.push(index);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn reopen(fd: &OwnedFd) -> (OpenTable, HashMap<Ino, Held>) {
        OpenTable::open(fd.as_fd().try_clone_to_owned().unwrap()).unwrap()
    }

    #[test]
    fn a_successor_reads_what_is_held_and_freed_slots_are_reused() {
        let fd = OpenTable::create().unwrap();
        let (mut table, held) = reopen(&fd);
        assert!(held.is_empty());
        let file = Held { cached: 2, passthrough: 0, backing: None, last: Some((40, Count::Release)) };
        let verified = Held { cached: 0, passthrough: 1, backing: Some(7), last: Some((41, Count::PassthroughOpen)) };
        table.record(10, &file).unwrap();
        table.record(11, &verified).unwrap();
        table.record(12, &file).unwrap();
        table.record(10, &Held::default()).unwrap();
        let (mut successor, held) = reopen(&fd);
        assert_eq!(held, HashMap::from([(11, verified), (12, file)]));
        // The successor fills the freed slot before growing the table.
        successor.record(13, &file).unwrap();
        assert_eq!(successor.end, 3);
        assert_eq!(reopen(&fd).1.len(), 3);
    }
}
