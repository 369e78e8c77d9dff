//! The cache dir's state journal: which chunks of which file are present,
//! which files are verified (and against what), which were changed locally.
//!
//! Crash safety: a batch of `Present` records is appended (and the journal
//! fsynced) only after the spill files it names were fsynced, so a record
//! never claims bytes that were not fully written. A crash loses at most the
//! last batch, which is fetched again. A torn record at the end is cut off; a
//! journal that cannot be read otherwise is set aside, with a warning, and
//! nothing in it is trusted.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use prost::Message;

use super::{CHUNK_SIZE, CacheDir, StoreError, io_err};

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/lazyfs.cache.rs"));
}

use proto::{Header, JournalRecord, Local, Modified, Present, Reset, Verified, journal_record::Kind};

const VERSION: u32 = 1;
/// How long completed chunks may wait before they are made durable.
const BATCH_TIME: Duration = Duration::from_millis(200);

/// What the journal says of one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileRecord {
    pub size: u64,
    pub present: Vec<Range<u64>>,
    pub verified: Option<([u8; 32], String)>,
    pub modified: bool,
}

/// What the journal records, per original path.
pub type Records = HashMap<Vec<u8>, FileRecord>;

/// Which checkpoint and source a cache dir holds the files of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// A blake3 of the images and the source.
    pub id: Vec<u8>,
    /// "IMGDIR from SOURCE", for messages.
    pub name: String,
}

/// A journal as read: whose files it records, and what it records of them.
#[derive(Debug, Default)]
pub struct Loaded {
    pub owner: Owner,
    pub records: Records,
    /// The local changes to names and attributes, in the order they were made.
    pub local: Vec<Local>,
}

/// The journal's name in the cache dir.
pub const NAME: &str = "journal";

/// Reads the journal of `dir`, setting it aside if it cannot be read: what it
/// records, and a warning if it was set aside.
pub fn load(dir: &CacheDir) -> Result<(Loaded, Option<String>), StoreError> {
    match read_all(dir)? {
        Ok(loaded) => Ok((loaded, None)),
        Err(reason) => {
            let aside = format!(
                "{NAME}.bad-{}",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            );
            dir.rename(NAME, &aside)?;
            let warning = format!(
                "{}: {reason}; set aside as {} and not trusted: everything is fetched again",
                dir.join(NAME).display(),
                dir.join(&aside).display()
            );
            Ok((Loaded::default(), Some(warning)))
        }
    }
}

/// Reads the journal of `dir` without changing it (a missing one knows
/// nothing); the inner error says why it cannot be trusted.
pub fn read(dir: &CacheDir) -> Result<Result<Records, String>, StoreError> {
    Ok(read_all(dir)?.map(|loaded| loaded.records))
}

fn read_all(dir: &CacheDir) -> Result<Result<Loaded, String>, StoreError> {
    match dir.read(NAME) {
        Ok(bytes) => Ok(parse(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(Loaded::default())),
        Err(e) => Err(io_err(&dir.join(NAME))(e)),
    }
}

/// One record on disk: its length (varint), the record, and 4 bytes of its
/// blake3, so a damaged record is told from a good one.
pub(crate) fn encode(record: &impl Message) -> Vec<u8> {
    let body = record.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 9);
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(&body);
    out.extend_from_slice(&blake3::hash(&body).as_bytes()[..4]);
    out
}

/// The records of a file in the journal's framing, as their bodies: a
/// torn record at the end (a crash mid-append) ends them; a damaged one is
/// an error.
pub(crate) fn frames(mut bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let len = match prost::encoding::decode_varint(&mut bytes) {
            Ok(len) => len,
            Err(e) => return Some(Err(format!("unreadable record length: {e}"))),
        };
        // The last append stopped part way (a crash): what came before stands.
        let end = usize::try_from(len).ok().and_then(|l| l.checked_add(4)).filter(|&end| end <= bytes.len())?;
        let (body, check) = (&bytes[..end - 4], &bytes[end - 4..end]);
        bytes = &bytes[end..];
        if blake3::hash(body).as_bytes()[..4] != *check {
            bytes = &[];
            return Some(Err("a damaged record (checksum mismatch)".into()));
        }
        Some(Ok(body))
    })
}

fn parse(bytes: &[u8]) -> Result<Loaded, String> {
    let mut owner = Owner::default();
    let mut files: HashMap<Vec<u8>, FileRecord> = HashMap::new();
    let mut local = Vec::new();
    let mut first = true;
    for body in frames(bytes) {
        let record = JournalRecord::decode(body?).map_err(|e| format!("unreadable record: {e}"))?;
        match (first, record.kind) {
            (true, Some(Kind::Header(h))) if h.version == VERSION && h.chunk_size == CHUNK_SIZE => {
                owner = Owner { id: h.owner, name: h.owner_name };
            }
            (true, Some(Kind::Header(h))) => {
                return Err(format!("version {} with {}-byte chunks, not version {VERSION}", h.version, h.chunk_size));
            }
            (true, _) => return Err("no header".into()),
            (false, Some(Kind::Header(_))) | (false, None) => {
                return Err("a record out of place".into());
            }
            (false, Some(Kind::Present(p))) => {
                if p.first > p.end {
                    return Err("a reversed chunk range".into());
                }
                let file = files.entry(p.path).or_default();
                file.size = p.size;
                file.present.push(p.first..p.end);
            }
            (false, Some(Kind::Verified(v))) => {
                let hash: [u8; 32] = v.blake3.as_slice().try_into().map_err(|_| "a hash that is not 32 bytes")?;
                files.entry(v.path).or_default().verified = Some((hash, v.against));
            }
            (false, Some(Kind::Modified(m))) => {
                // Changed locally: what was verified before no longer holds.
                let file = files.entry(m.path).or_default();
                file.modified = true;
                file.verified = None;
            }
            (false, Some(Kind::Reset(r))) => {
                files.remove(&r.path);
            }
            (false, Some(Kind::Local(l))) => local.push(l),
        }
        first = false;
    }
    Ok(Loaded { owner, records: files, local })
}

enum Op {
    /// File number `file` is `JournalFile` (a file of the tree found after the mount began).
    File(usize, JournalFile),
    Present {
        file: usize,
        chunks: Range<u64>,
    },
    Record(JournalRecord),
    Flush(Sender<Result<(), String>>),
}

/// Appends to the journal from a thread of its own, in durable batches.
pub struct Journal {
    path: PathBuf,
    tx: Sender<Op>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Batches naming more spill files than this sync the filesystem instead.
const SYNC_EACH_UP_TO: usize = 16;

/// A file the journal writes `Present` records for: its path, spill size, and
/// the spill file to fsync before claiming its chunks (opened for that: only
/// a bounded set of spill files is open at a time).
#[derive(Default)]
pub struct JournalFile {
    pub path: Vec<u8>,
    pub size: u64,
    pub spill: PathBuf,
}

impl Journal {
    /// Starts a new journal in `dir` holding `snapshot` (what is known now),
    /// written to a temporary file and renamed over the old one.
    pub fn create(
        dir: &CacheDir,
        owner: &Owner,
        snapshot: Vec<JournalRecord>,
        files: Vec<JournalFile>,
    ) -> Result<Journal, StoreError> {
        let mut bytes = encode(&header(owner));
        for record in &snapshot {
            bytes.extend(encode(record));
        }
        dir.write_atomic(NAME, &bytes)?;
        let journal = dir.open_append(NAME)?;
        Self::start(&dir.join(NAME), journal, files)
    }

    fn start(path: &Path, journal: File, files: Vec<JournalFile>) -> Result<Journal, StoreError> {
        let (tx, rx) = mpsc::channel();
        let writer = Writer { path: path.to_path_buf(), journal, files };
        let thread = std::thread::Builder::new()
            .name("lazyfs-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(path))?;
        Ok(Journal { path: path.to_path_buf(), tx, thread: Some(thread) })
    }

    /// File number `index` (after those given at creation) is `file`.
    pub fn add_file(&self, index: usize, file: JournalFile) {
        let _ = self.tx.send(Op::File(index, file));
    }

    /// Chunks of file `file` (its index among the `files` given) are written.
    pub fn present(&self, file: usize, chunks: Range<u64>) {
        let _ = self.tx.send(Op::Present { file, chunks });
    }

    pub fn verified(&self, path: &[u8], hash: &blake3::Hash, against: &str) {
        let record =
            Kind::Verified(Verified { path: path.to_vec(), blake3: hash.as_bytes().to_vec(), against: against.into() });
        let _ = self.tx.send(Op::Record(JournalRecord { kind: Some(record) }));
    }

    pub fn modified(&self, path: &[u8]) {
        let _ =
            self.tx.send(Op::Record(JournalRecord { kind: Some(Kind::Modified(Modified { path: path.to_vec() })) }));
    }

    pub fn reset(&self, path: &[u8]) {
        let _ = self.tx.send(Op::Record(JournalRecord { kind: Some(Kind::Reset(Reset { path: path.to_vec() })) }));
    }

    /// A local change to names or attributes; durable once [`Journal::flush`] returns.
    pub fn local(&self, change: Local) {
        let _ = self.tx.send(Op::Record(local_record(change)));
    }

    /// Returns once everything sent so far is durable, or says why it is not.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = mpsc::channel();
        let answer = match self.tx.send(Op::Flush(done)) {
            Ok(()) => wait.recv().unwrap_or_else(|_| Err("the journal thread stopped".into())),
            Err(_) => Err("the journal thread stopped".into()),
        };
        answer.map_err(|message| StoreError::Io { path: self.path.clone(), source: std::io::Error::other(message) })
    }

    /// A journal whose appends all fail (the disk refuses them).
    #[cfg(test)]
    pub(crate) fn failing(dir: &Path) -> Journal {
        let path = dir.join("journal");
        std::fs::write(&path, b"").unwrap();
        let read_only = File::open(&path).unwrap();
        Self::start(&path, read_only, Vec::new()).unwrap()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::error!("{e}");
        }
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn header(owner: &Owner) -> JournalRecord {
    JournalRecord { kind: Some(Kind::Header(owner_header(owner))) }
}

/// The header saying whose files a cache dir's logs hold.
pub(crate) fn owner_header(owner: &Owner) -> Header {
    Header { version: VERSION, chunk_size: CHUNK_SIZE, owner: owner.id.clone(), owner_name: owner.name.clone() }
}

/// The record saying chunks `chunks` of `path` (spill `size` bytes) are present.
pub fn present_record(path: &[u8], chunks: Range<u64>, size: u64) -> JournalRecord {
    JournalRecord {
        kind: Some(Kind::Present(Present { path: path.to_vec(), first: chunks.start, end: chunks.end, size })),
    }
}

pub fn verified_record(path: &[u8], hash: &[u8; 32], against: &str) -> JournalRecord {
    JournalRecord {
        kind: Some(Kind::Verified(Verified { path: path.to_vec(), blake3: hash.to_vec(), against: against.into() })),
    }
}

pub fn local_record(change: Local) -> JournalRecord {
    JournalRecord { kind: Some(Kind::Local(change)) }
}

pub fn modified_record(path: &[u8]) -> JournalRecord {
    JournalRecord { kind: Some(Kind::Modified(Modified { path: path.to_vec() })) }
}

struct Writer {
    path: PathBuf,
    journal: File,
    files: Vec<JournalFile>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        let mut pending: Vec<Op> = Vec::new();
        let mut oldest: Option<Instant> = None;
        loop {
            let op = match oldest {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(since) => rx.recv_timeout(BATCH_TIME.saturating_sub(since.elapsed())),
            };
            match op {
                Ok(Op::File(index, file)) => {
                    if self.files.len() <= index {
                        self.files.resize_with(index + 1, JournalFile::default);
                    }
                    self.files[index] = file;
                }
                Ok(op) => {
                    let flush_now = matches!(op, Op::Flush(_));
                    pending.push(op);
                    oldest.get_or_insert_with(Instant::now);
                    if !flush_now {
                        continue;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit(std::mem::take(&mut pending));
                    return;
                }
            }
            self.commit(std::mem::take(&mut pending));
            oldest = None;
        }
    }

    /// Syncs the spill files the batch names, then appends and syncs its
    /// records. A batch naming many files syncs the cache's filesystem once
    /// (syncfs) instead of each file (100,000 small files were 100,000 fsyncs).
    fn commit(&mut self, ops: Vec<Op>) {
        let mut named: Vec<usize> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Present { file, .. } if *file < self.files.len() => Some(*file),
                _ => None,
            })
            .collect();
        named.sort_unstable();
        named.dedup();
        let mut synced = vec![false; self.files.len()];
        if named.len() > SYNC_EACH_UP_TO {
            // SAFETY: syncfs on the journal's open descriptor (the cache's filesystem).
            match unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&self.journal)) } {
                0 => named.iter().for_each(|&file| synced[file] = true),
                _ => log::error!("syncing the cache dir's filesystem: {}", std::io::Error::last_os_error()),
            }
        } else {
            for file in named {
                let entry = &self.files[file];
                match super::sync_path(&entry.spill) {
                    Ok(()) => synced[file] = true,
                    Err(e) => log::error!("syncing the spill file of {}: {e}", String::from_utf8_lossy(&entry.path)),
                }
            }
        }
        let mut bytes = Vec::new();
        let mut waiters = Vec::new();
        for op in ops {
            match op {
                Op::Present { file, chunks } => {
                    let Some(entry) = self.files.get(file).filter(|_| synced[file]) else {
                        continue;
                    };
                    bytes.extend(encode(&present_record(&entry.path, chunks, entry.size)));
                }
                Op::Record(record) => bytes.extend(encode(&record)),
                Op::Flush(done) => waiters.push(done),
                Op::File(..) => {}
            }
        }
        let written = match bytes.is_empty() {
            true => Ok(()),
            false => self.journal.write_all(&bytes).and_then(|()| self.journal.sync_data()),
        };
        // Nothing of this batch is known to be on disk: its records are
        // dropped, and whoever waits for them is told.
        let answer = written.map_err(|e| {
            log::error!("{}: {e}", self.path.display());
            format!("the state journal could not be written: {e}")
        });
        for done in waiters {
            let _ = done.send(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_with(dir: &CacheDir, records: Vec<JournalRecord>) -> PathBuf {
        let spill = dir.join("spill");
        std::fs::write(&spill, b"x").unwrap();
        let files = vec![JournalFile { path: b"/a".to_vec(), size: 100, spill }];
        let owner = Owner { id: b"id".to_vec(), name: "images from here".into() };
        let journal = Journal::create(dir, &owner, records, files).unwrap();
        journal.present(0, 0..2);
        journal.present(0, 5..6);
        journal.verified(b"/b", &blake3::hash(b"b"), "received");
        journal.modified(b"/c");
        journal.reset(b"/d");
        drop(journal);
        dir.join(NAME)
    }

    fn cache() -> (tempfile::TempDir, CacheDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open_cache(&tmp.path().join("c")).unwrap();
        (tmp, dir)
    }

    #[test]
    fn records_read_back() {
        let (_tmp, dir) = cache();
        journal_with(&dir, vec![present_record(b"/d", 0..1, 10)]);
        let (loaded, warning) = load(&dir).unwrap();
        assert!(warning.is_none());
        assert_eq!(loaded.owner.id, b"id");
        let files = loaded.records;
        assert_eq!(files[&b"/a".to_vec()].present, vec![0..2, 5..6]);
        assert_eq!(files[&b"/a".to_vec()].size, 100);
        assert_eq!(files[&b"/b".to_vec()].verified.as_ref().unwrap().0, *blake3::hash(b"b").as_bytes());
        assert!(files[&b"/c".to_vec()].modified);
        assert!(!files.contains_key(b"/d".as_slice()), "reset forgets");
    }

    #[test]
    fn a_torn_tail_is_cut_and_garbage_is_set_aside() {
        let (_tmp, dir) = cache();
        let path = journal_with(&dir, vec![]);
        let mut bytes = std::fs::read(&path).unwrap();
        let full = bytes.len();
        bytes.extend(encode(&present_record(b"/e", 0..9, 10)));
        bytes.truncate(full + 5);
        std::fs::write(&path, &bytes).unwrap();
        let (loaded, warning) = load(&dir).unwrap();
        let files = loaded.records;
        assert!(warning.is_none(), "{warning:?}");
        assert!(!files.contains_key(b"/e".as_slice()));
        assert_eq!(files[&b"/a".to_vec()].present.len(), 2);

        let mut garbage = std::fs::read(&path).unwrap();
        garbage[3] ^= 0xff;
        garbage[4] ^= 0xff;
        std::fs::write(&path, &garbage).unwrap();
        let (loaded, warning) = load(&dir).unwrap();
        assert!(loaded.records.is_empty());
        assert!(warning.unwrap().contains("set aside"));
        assert!(!path.exists());
    }

    /// Finding 3: a file verified, then changed locally, is not verified.
    #[test]
    fn a_modified_record_ends_what_was_verified() {
        let (_tmp, dir) = cache();
        journal_with(&dir, vec![verified_record(b"/c", &[1; 32], "manifest")]);
        let files = read(&dir).unwrap().unwrap();
        assert!(files[&b"/c".to_vec()].modified);
        assert_eq!(files[&b"/c".to_vec()].verified, None);
    }

    /// Finding 8: a flush whose records did not reach the disk says so.
    #[test]
    fn a_failed_append_reaches_the_flusher() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::failing(dir.path());
        assert!(journal.flush().is_ok(), "nothing to write");
        journal.modified(b"/a");
        let err = journal.flush().unwrap_err();
        assert!(err.to_string().contains("could not be written"), "{err}");
    }
}
