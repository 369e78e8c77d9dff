//! The cache dir's state journal: which chunks of which file are present,
//! which files are verified (and against what), which were changed locally,
//! and the local layer's changes to names and attributes.
//!
//! Crash safety: a batch of `Present` records is appended (and the journal
//! fsynced) only after the spill files it names were fsynced, so a record
//! never claims bytes that were not fully written. A crash loses at most the
//! last batch, which is fetched again. A local change is answered only once
//! its record is durable, and is then never dropped:
//! - an append that fails part way (a full disk) is cut back to the last
//!   whole record before anyone is answered, so nothing appended later hides
//!   behind a torn record; the refused change is not made;
//! - the journal keeps a reserve of allocated room past its end; while it
//!   cannot be refilled (the disk is full) changes are refused with ENOSPC,
//!   but removals, which give room back, still go in;
//! - a record cut short at the end is a crash mid-append and is cut off; a
//!   damaged record followed by more is not: the mount is refused, nothing
//!   changed, with a way to go on ([`keep_intact`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prost::Message;

use super::{CHUNK_SIZE, CacheDir, StoreError, io_err};

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/lazyfs.cache.rs"));
}

use proto::{
    CacheIdentity, Header, JournalRecord, Local, LocalOp, Modified, Present, Reset, SourceIdentity, Verified,
    journal_record::Kind,
};

const VERSION: u32 = 1;
/// How long completed chunks may wait before they are made durable.
const BATCH_TIME: Duration = Duration::from_millis(200);
/// Room kept allocated past the journal's end (`fallocate`), so removals can
/// be journaled on a full disk, and a full disk is seen before an append fails.
const RESERVE: u64 = 64 << 10;
/// No record is this long (the longest, a local change with a 64 KiB xattr
/// value and two paths, is under 80 KiB): a length past it is damage, not a
/// record cut short by a crash.
const MAX_RECORD: u64 = 1 << 20;

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

/// Whose files a cache dir holds, and since when.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Owner {
    /// `None`: not known (no journal, or one older than identities).
    pub identity: Option<CacheIdentity>,
    /// The first mount of the cache dir, in nanoseconds since the epoch.
    pub created_ns: i64,
    /// What a journal older than identities said instead: a blake3 of the
    /// images and SOURCE as given (see `identity::legacy_owner`). Never written.
    pub legacy: Vec<u8>,
}

/// A journal as read: whose files it records, and what it records of them.
#[derive(Debug, Default)]
pub struct Loaded {
    pub owner: Owner,
    pub records: Records,
    /// The local changes to names and attributes, in the order they were made.
    pub local: Vec<Local>,
    /// Where its last whole record ends (a torn append after it is cut off).
    pub whole_len: u64,
}

impl Loaded {
    /// Whether a mount changed anything here: names, attributes or bytes.
    pub fn has_local_changes(&self) -> bool {
        !self.local.is_empty() || self.records.values().any(|r| r.modified)
    }
}

/// Why a journal cannot be read on, and where: every record before `at` is whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub path: PathBuf,
    pub at: u64,
    pub len: u64,
    /// Whole records before the damage.
    pub intact: usize,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} at byte {} of {}, after {} whole record(s); nothing was changed: mount again with \
             --recover-journal to keep those records (what was journaled after the damage is lost; the journal \
             is kept beside it), or with --discard-local-changes to start this cache dir afresh",
            self.path.display(),
            self.reason,
            self.at,
            self.len,
            self.intact
        )
    }
}

/// The journal's name in the cache dir.
pub const NAME: &str = "journal";

/// Reads the journal of `dir` (a missing one knows nothing), or says where
/// and why it is damaged. Changes nothing.
pub fn load(dir: &CacheDir) -> Result<Result<Loaded, Damage>, StoreError> {
    match dir.read(NAME) {
        Ok(bytes) => Ok(parse(&bytes).map_err(|(at, intact, reason)| Damage {
            path: dir.join(NAME),
            at,
            len: bytes.len() as u64,
            intact,
            reason,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(Loaded::default())),
        Err(e) => Err(io_err(&dir.join(NAME))(e)),
    }
}

/// Reads the journal of `dir` without changing it (a missing one knows
/// nothing); the inner error says why it cannot be trusted.
pub fn read(dir: &CacheDir) -> Result<Result<Records, String>, StoreError> {
    Ok(load(dir)?.map(|loaded| loaded.records).map_err(|damage| damage.to_string()))
}

/// Keeps the whole records before `damage`: the journal is first copied
/// whole to `journal.damaged-SECS`, then cut at the damage. Returns the copy.
pub fn keep_intact(dir: &CacheDir, damage: &Damage) -> Result<PathBuf, StoreError> {
    let kept = format!("{NAME}.damaged-{}", now_secs());
    let bytes = dir.read(NAME).map_err(io_err(&dir.join(NAME)))?;
    dir.write_atomic(&kept, &bytes)?;
    let journal = dir.open_rw(NAME)?;
    journal.set_len(damage.at).and_then(|()| journal.sync_all()).map_err(io_err(&dir.join(NAME)))?;
    Ok(dir.join(kept))
}

/// Replaces the journal of `dir` by one owned by `owner` holding `records`,
/// atomically (a temporary file renamed over it, both synced).
pub fn rewrite(dir: &CacheDir, owner: &Owner, records: &[JournalRecord]) -> Result<(), StoreError> {
    let mut bytes = encode(&header(owner));
    for record in records {
        bytes.extend(encode(record));
    }
    dir.write_atomic(NAME, &bytes)
}

/// Removes the journal of `dir` (nothing is known any more), durably.
pub fn remove(dir: &CacheDir) -> Result<(), StoreError> {
    dir.remove(NAME).map_err(io_err(&dir.join(NAME)))?;
    dir.sync()
}

/// Moves the journal aside as `journal.TAG-SECS` (its records no longer
/// count); returns where it went, if there was one.
pub fn set_aside(dir: &CacheDir, tag: &str) -> Result<Option<PathBuf>, StoreError> {
    if !dir.exists(NAME) {
        return Ok(None);
    }
    let aside = format!("{NAME}.{tag}-{}", now_secs());
    dir.rename(NAME, &aside)?;
    dir.sync()?;
    Ok(Some(dir.join(aside)))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
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

/// What the bytes at a record's start hold.
enum Next<'a> {
    /// A whole record's body, and the bytes it took.
    Body(&'a [u8], usize),
    /// The last append stopped part way (a crash): what came before stands.
    Torn,
    Damaged(String),
}

/// The records of a file in the journal's framing (the tree's log's too), as
/// their bodies: a record cut short at the end (a crash mid-append), or zeros
/// to the end, end them; a damaged one is an error, and the last item.
pub(crate) fn frames(mut bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    std::iter::from_fn(move || match next_frame(bytes) {
        _ if bytes.is_empty() => None,
        Next::Body(body, used) => {
            bytes = &bytes[used..];
            Some(Ok(body))
        }
        Next::Torn => None,
        Next::Damaged(_) if bytes.iter().all(|&b| b == 0) => None,
        Next::Damaged(reason) => {
            bytes = &[];
            Some(Err(reason))
        }
    })
}

fn next_frame(bytes: &[u8]) -> Next<'_> {
    let mut rest = bytes;
    let len = match prost::encoding::decode_varint(&mut rest) {
        Ok(len) => len,
        // A length whose every byte says "more follows" was cut short.
        Err(_) if bytes.len() < 10 && bytes.iter().all(|b| b & 0x80 != 0) => return Next::Torn,
        Err(e) => return Next::Damaged(format!("an unreadable record length ({e})")),
    };
    if len > MAX_RECORD {
        return Next::Damaged(format!("a record length of {len} bytes"));
    }
    let head = bytes.len() - rest.len();
    let end = len as usize + 4;
    if end > rest.len() {
        return Next::Torn;
    }
    let (body, check) = (&rest[..end - 4], &rest[end - 4..end]);
    if blake3::hash(body).as_bytes()[..4] != *check {
        // The very last record, damaged: a crash mid-append on a disk that
        // lost its tail (power loss).
        return match end == rest.len() {
            true => Next::Torn,
            false => Next::Damaged("a damaged record (checksum mismatch)".into()),
        };
    }
    Next::Body(body, head + end)
}

/// The journal's records, or where (byte, whole records before) and why it is damaged.
fn parse(all: &[u8]) -> Result<Loaded, (u64, usize, String)> {
    let mut loaded = Loaded::default();
    let mut at = 0;
    let mut intact = 0;
    while at < all.len() {
        match next_frame(&all[at..]) {
            Next::Body(body, used) => {
                let record = JournalRecord::decode(body).map_err(|e| format!("an unreadable record ({e})"));
                record
                    .and_then(|record| add(&mut loaded, record, intact == 0))
                    .map_err(|reason| (at as u64, intact, reason))?;
                at += used;
                intact += 1;
            }
            Next::Torn => break,
            // Zeros to the end: a tail the disk lost (power loss), not damage.
            Next::Damaged(_) if all[at..].iter().all(|&b| b == 0) => break,
            Next::Damaged(reason) => return Err((at as u64, intact, reason)),
        }
    }
    loaded.whole_len = at as u64;
    Ok(loaded)
}

/// Adds what `record` says to `loaded` (`first`: it must be the header).
fn add(loaded: &mut Loaded, record: JournalRecord, first: bool) -> Result<(), String> {
    let files = &mut loaded.records;
    match (first, record.kind) {
        (true, Some(Kind::Header(h))) if h.version == VERSION && h.chunk_size == CHUNK_SIZE => {
            loaded.owner = Owner { identity: h.identity, created_ns: h.created_ns, legacy: h.owner };
        }
        (true, Some(Kind::Header(h))) => {
            return Err(format!(
                "a journal of version {} with {}-byte chunks, not version {VERSION} with {CHUNK_SIZE}",
                h.version, h.chunk_size
            ));
        }
        (true, _) => return Err("no header".into()),
        (false, Some(Kind::Header(_))) | (false, None) => return Err("a record out of place".into()),
        (false, Some(Kind::HeaderAgain(h))) => {
            loaded.owner = Owner { identity: h.identity, created_ns: h.created_ns, legacy: h.owner };
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
        (false, Some(Kind::Local(l))) => loaded.local.push(l),
        (false, Some(Kind::Source(source))) => {
            if let Some(identity) = loaded.owner.identity.as_mut() {
                identity.source = Some(source);
            }
        }
    }
    Ok(())
}

/// What a waiter is told: durable, or the errno and why not.
type Answer = Result<(), (Option<i32>, String)>;

enum Op {
    /// File number `file` is `JournalFile` (a file of the tree found after the mount began).
    File(usize, JournalFile),
    Present {
        file: usize,
        chunks: Range<u64>,
    },
    /// What is known of a file (or of the source): kept until it is written.
    Record(JournalRecord),
    /// A local change: written, or refused, and the answer sent.
    Change(JournalRecord, Sender<Answer>),
    Flush(Sender<Answer>),
}

/// Appends to the journal from a thread of its own, in durable batches.
pub struct Journal {
    path: PathBuf,
    tx: Sender<Op>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Why changes are refused now, if they are (the disk is full).
    refusing: Arc<Mutex<Option<String>>>,
}

/// Batches naming more spill files than this sync the filesystem instead.
pub const SYNC_EACH_UP_TO: usize = 16;

/// A file the journal writes `Present` records for: its path, spill size, and
/// its spill file, to fsync before claiming its chunks (through the spill
/// directory's descriptor: only a bounded set of spill files is open at a time).
pub struct JournalFile {
    pub path: Vec<u8>,
    pub size: u64,
    pub spill: (Arc<CacheDir>, String),
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
        rewrite(dir, owner, &snapshot)?;
        let journal = dir.open_append(NAME)?;
        Self::start(&dir.join(NAME), journal, files)
    }

    /// Goes on appending to the journal of `dir` as it is, whole up to
    /// `whole_len` (what [`load`] read of it), now owned by `owner`: for a
    /// mount that cannot [`Journal::create`] its new one for want of room
    /// (the copy needs as much again). What it holds must be this mount's.
    pub fn resume(
        dir: &CacheDir,
        owner: &Owner,
        whole_len: u64,
        files: Vec<JournalFile>,
    ) -> Result<Journal, StoreError> {
        let journal = dir.open_append(NAME)?;
        journal.set_len(whole_len).and_then(|()| journal.sync_data()).map_err(io_err(&dir.join(NAME)))?;
        let journal = Self::start(&dir.join(NAME), journal, files)?;
        let again = JournalRecord { kind: Some(Kind::HeaderAgain(owner_header(owner))) };
        let _ = journal.tx.send(Op::Record(again));
        journal.flush()?;
        Ok(journal)
    }

    fn start(path: &Path, journal: File, files: Vec<JournalFile>) -> Result<Journal, StoreError> {
        let (tx, rx) = mpsc::channel();
        let good_len = journal.metadata().map_err(io_err(path))?.len();
        let refusing = Arc::new(Mutex::new(None));
        let writer = Writer {
            path: path.to_path_buf(),
            journal,
            files: files.into_iter().map(Some).collect(),
            good_len,
            whole: true,
            retained: Vec::new(),
            reserve: Reserve::Kept,
            refusing: refusing.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("lazyfs-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(path))?;
        Ok(Journal { path: path.to_path_buf(), tx, thread: Some(thread), refusing })
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
        let _ = self.tx.send(Op::Record(modified_record(path)));
    }

    pub fn reset(&self, path: &[u8]) {
        let _ = self.tx.send(Op::Record(JournalRecord { kind: Some(Kind::Reset(Reset { path: path.to_vec() })) }));
    }

    /// What journals what connections show of the source from now on (see [`SourceIdentity`]).
    pub fn source_recorder(&self) -> Box<dyn Fn(SourceIdentity) + Send> {
        let tx = Mutex::new(self.tx.clone());
        Box::new(move |source| {
            let record = JournalRecord { kind: Some(Kind::Source(source)) };
            let _ = tx.lock().unwrap_or_else(PoisonError::into_inner).send(Op::Record(record));
        })
    }

    /// A local change to names or attributes: returns once it is durable, or
    /// says why it is not (then it must not be made). On a full disk only
    /// removals are taken.
    pub fn change(&self, change: Local) -> Result<(), StoreError> {
        let (done, wait) = mpsc::channel();
        let sent = self.tx.send(Op::Change(local_record(change), done));
        self.answer(sent.ok().and_then(|()| wait.recv().ok()))
    }

    /// Returns once everything sent so far is durable, or says why it is not.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = mpsc::channel();
        let sent = self.tx.send(Op::Flush(done));
        self.answer(sent.ok().and_then(|()| wait.recv().ok()))
    }

    fn answer(&self, answer: Option<Answer>) -> Result<(), StoreError> {
        let error = match answer {
            Some(Ok(())) => return Ok(()),
            Some(Err((Some(errno), _))) => std::io::Error::from_raw_os_error(errno),
            Some(Err((None, message))) => std::io::Error::other(message),
            None => std::io::Error::other("the journal thread stopped"),
        };
        Err(StoreError::Io { path: self.path.clone(), source: error })
    }

    /// Why changes are refused now (the cache filesystem is full), if they are.
    pub fn refusing(&self) -> Option<String> {
        self.refusing.lock().unwrap_or_else(PoisonError::into_inner).clone()
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

/// The header saying whose files a cache dir's logs hold (the tree's too).
pub(crate) fn owner_header(owner: &Owner) -> Header {
    Header {
        version: VERSION,
        chunk_size: CHUNK_SIZE,
        identity: owner.identity.clone(),
        created_ns: owner.created_ns,
        ..Header::default()
    }
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

/// The records that say what `record` says of the file at `path`.
pub fn file_records(path: &[u8], record: &FileRecord) -> Vec<JournalRecord> {
    let mut records: Vec<JournalRecord> =
        record.present.iter().map(|run| present_record(path, run.clone(), record.size)).collect();
    if let Some((hash, against)) = &record.verified {
        records.push(verified_record(path, hash, against));
    }
    if record.modified {
        records.push(modified_record(path));
    }
    records
}

pub fn local_record(change: Local) -> JournalRecord {
    JournalRecord { kind: Some(Kind::Local(change)) }
}

pub fn modified_record(path: &[u8]) -> JournalRecord {
    JournalRecord { kind: Some(Kind::Modified(Modified { path: path.to_vec() })) }
}

/// The journal's reserve of allocated room past its end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reserve {
    Kept,
    /// The disk is full: only removals are taken.
    Low,
    /// The filesystem cannot preallocate: appends fail when it is full.
    Unsupported,
}

struct Writer {
    path: PathBuf,
    journal: File,
    /// By file number (a file of the tree found after the mount is added later).
    files: Vec<Option<JournalFile>>,
    /// The journal's length up to its last whole record.
    good_len: u64,
    /// False while a failed append's bytes could not be cut off.
    whole: bool,
    /// Records of what is known (never local changes) that could not be
    /// written yet: they still hold, and go first in the next append.
    retained: Vec<u8>,
    reserve: Reserve,
    refusing: Arc<Mutex<Option<String>>>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        self.top_up();
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
                        self.files.resize_with(index + 1, || None);
                    }
                    self.files[index] = Some(file);
                }
                Ok(op) => {
                    let now = matches!(op, Op::Flush(_) | Op::Change(..));
                    pending.push(op);
                    oldest.get_or_insert_with(Instant::now);
                    if !now {
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
    /// records: what is known first, the local changes last (so an append cut
    /// short never leaves a whole change behind a torn one), and answers.
    fn commit(&mut self, ops: Vec<Op>) {
        let synced = self.sync_spills(&ops);
        if self.reserve == Reserve::Low {
            // Room again (a file was removed)?
            self.top_up();
        }
        let low = self.reserve == Reserve::Low;
        let mut known = std::mem::take(&mut self.retained);
        let mut changes = Vec::new();
        let mut waiters = Vec::new();
        for op in ops {
            match op {
                // Fetched bytes can be fetched again: on a full disk the
                // reserve is kept for removals.
                Op::Present { file, .. } if low || synced.get(file) != Some(&true) => {}
                Op::Present { file, chunks } => {
                    let Some(entry) = self.file(file) else { continue };
                    known.extend(encode(&present_record(&entry.path, chunks, entry.size)));
                }
                Op::Record(JournalRecord { kind: Some(Kind::Verified(_)) }) if low => {}
                Op::Record(record) => known.extend(encode(&record)),
                Op::Change(record, done) if low && !gives_room(&record) => {
                    let _ = done.send(Err((Some(libc::ENOSPC), self.refusing().unwrap_or_default())));
                }
                Op::Change(record, done) => {
                    changes.extend(encode(&record));
                    waiters.push(done);
                }
                Op::Flush(done) => waiters.push(done),
                Op::File(..) => {}
            }
        }
        let answer = self.append(&known, &changes).map_err(|e| {
            log::error!("{}: {e}", self.path.display());
            self.retained = known;
            (e.raw_os_error(), format!("the state journal could not be written: {e}"))
        });
        for done in waiters {
            let _ = done.send(answer.clone());
        }
        self.top_up();
    }

    fn file(&self, index: usize) -> Option<&JournalFile> {
        self.files.get(index)?.as_ref()
    }

    /// Which of the files the batch names are synced (fsync through the spill
    /// directory's descriptor; a batch naming many syncs the cache's
    /// filesystem once (syncfs): 100,000 small files were 100,000 fsyncs).
    fn sync_spills(&self, ops: &[Op]) -> Vec<bool> {
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
            for (file, entry) in named.into_iter().filter_map(|file| Some((file, self.file(file)?))) {
                let (dir, name) = &entry.spill;
                match dir.sync_file(name) {
                    Ok(()) => synced[file] = true,
                    Err(e) => {
                        log::error!("syncing the spill file of {}: {e}", String::from_utf8_lossy(&entry.path))
                    }
                }
            }
        }
        synced
    }

    /// Appends `known` then `changes` and syncs them. An append that fails
    /// is cut back to the last whole record, so the next one does not land
    /// behind torn bytes; until that succeeds, nothing more is appended.
    fn append(&mut self, known: &[u8], changes: &[u8]) -> std::io::Result<()> {
        if !self.whole {
            self.cut_back()?;
        }
        if known.is_empty() && changes.is_empty() {
            return Ok(());
        }
        let bytes = [known, changes].concat();
        match self.journal.write_all(&bytes).and_then(|()| self.journal.sync_data()) {
            Ok(()) => {
                self.good_len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.cut_back();
                Err(e)
            }
        }
    }

    fn cut_back(&mut self) -> std::io::Result<()> {
        match self.journal.set_len(self.good_len).and_then(|()| self.journal.sync_data()) {
            Ok(()) => {
                if !self.whole {
                    log::info!("{}: cut back to its last whole record: changes are taken again", self.path.display());
                }
                self.whole = true;
                self.top_up();
                Ok(())
            }
            Err(e) => {
                if self.whole {
                    log::error!(
                        "{}: a failed append cannot be cut off ({e}): changes are refused until it can",
                        self.path.display()
                    );
                }
                self.whole = false;
                Err(e)
            }
        }
    }

    /// Keeps `RESERVE` bytes allocated past the journal's end; notes (and
    /// says) when that stops or starts working again.
    fn top_up(&mut self) {
        use std::os::fd::AsRawFd;
        if self.reserve == Reserve::Unsupported {
            return;
        }
        let (Ok(start), Ok(len)) = (libc::off_t::try_from(self.good_len), libc::off_t::try_from(RESERVE)) else {
            return;
        };
        // SAFETY: fallocate on our own descriptor, past the data (KEEP_SIZE): it only allocates.
        let done = unsafe { libc::fallocate(self.journal.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, start, len) };
        let error = (done != 0).then(std::io::Error::last_os_error);
        match error.as_ref().and_then(std::io::Error::raw_os_error) {
            None if self.reserve == Reserve::Low => {
                log::info!("{}: the cache filesystem has room again: changes are taken again", self.path.display());
                self.reserve = Reserve::Kept;
                *self.refusing.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            None => {}
            Some(libc::ENOSPC | libc::EDQUOT) if self.reserve != Reserve::Low => {
                let reason = format!(
                    "the cache filesystem is full ({}): changes through the mount are refused (ENOSPC) until there \
                     is room; removing files still works",
                    self.path.display()
                );
                log::warn!("{reason}");
                self.reserve = Reserve::Low;
                *self.refusing.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
            }
            Some(libc::ENOSPC | libc::EDQUOT) => {}
            Some(_) => self.reserve = Reserve::Unsupported,
        }
    }

    fn refusing(&self) -> Option<String> {
        self.refusing.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A change that gives room back (or takes none beyond its record): taken on a full disk.
fn gives_room(record: &JournalRecord) -> bool {
    matches!(&record.kind, Some(Kind::Local(l)) if matches!(l.op(), LocalOp::Unlink | LocalOp::Rmdir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        let identity = CacheIdentity { images: b"id".to_vec(), imgdir: "images".into(), ..CacheIdentity::default() };
        Owner { identity: Some(identity), created_ns: 7, legacy: Vec::new() }
    }

    fn journal_with(dir: &CacheDir, records: Vec<JournalRecord>) -> PathBuf {
        dir.write_atomic("spill", b"x").unwrap();
        let spill = (Arc::new(dir.try_clone().unwrap()), "spill".to_string());
        let files = vec![JournalFile { path: b"/a".to_vec(), size: 100, spill }];
        let journal = Journal::create(dir, &owner(), records, files).unwrap();
        journal.present(0, 0..2);
        journal.present(0, 5..6);
        journal.verified(b"/b", &blake3::hash(b"b"), "received");
        journal.modified(b"/c");
        journal.reset(b"/d");
        journal.change(Local { op: LocalOp::Dir.into(), path: b"x".to_vec(), ..Local::default() }).unwrap();
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
        let loaded = load(&dir).unwrap().unwrap();
        assert_eq!(loaded.owner, owner());
        let files = &loaded.records;
        assert_eq!(files[&b"/a".to_vec()].present, vec![0..2, 5..6]);
        assert_eq!(files[&b"/a".to_vec()].size, 100);
        assert_eq!(files[&b"/b".to_vec()].verified.as_ref().unwrap().0, *blake3::hash(b"b").as_bytes());
        assert!(files[&b"/c".to_vec()].modified);
        assert!(!files.contains_key(b"/d".as_slice()), "reset forgets");
        assert_eq!(loaded.local.len(), 1);
        assert!(loaded.has_local_changes());
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_refuses_changing_nothing() {
        let (_tmp, dir) = cache();
        let path = journal_with(&dir, vec![]);
        let whole = std::fs::read(&path).unwrap();
        let records = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            load(&dir).unwrap().map(|l| (l.records[&b"/a".to_vec()].present.len(), l.local.len()))
        };
        // Cut inside a record, inside a record's length, or zeros a power
        // loss left: what came before stands.
        let mut torn = whole.clone();
        torn.extend(&encode(&present_record(b"/e", 0..9, 10))[..5]);
        assert_eq!(records(&torn), Ok((2, 1)));
        let mut in_length = whole.clone();
        in_length.push(0x85);
        assert_eq!(records(&in_length), Ok((2, 1)));
        let mut zeros = whole.clone();
        zeros.extend([0; 300]);
        assert_eq!(records(&zeros), Ok((2, 1)));
        let mut last_damaged = whole.clone();
        let at = last_damaged.len() - 6;
        last_damaged[at] ^= 0x20;
        assert_eq!(records(&last_damaged), Ok((2, 0)), "the last record, damaged: a torn append");

        // Damage followed by more records: refused, nothing changed.
        let mut damaged = whole.clone();
        let at = damaged.windows(2).position(|w| w == b"/b").unwrap();
        damaged[at + 1] ^= 0x55;
        std::fs::write(&path, &damaged).unwrap();
        let damage = load(&dir).unwrap().unwrap_err();
        assert_eq!(damage.intact, 3, "header and two Present records before it");
        assert!(damage.to_string().contains("--recover-journal"), "{damage}");
        assert_eq!(std::fs::read(&path).unwrap(), damaged, "not changed by reading");

        let kept = keep_intact(&dir, &damage).unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), damaged, "the damaged journal kept whole");
        let loaded = load(&dir).unwrap().unwrap();
        assert_eq!(loaded.records[&b"/a".to_vec()].present.len(), 2);
        assert!(loaded.local.is_empty());
    }

    /// Issue 21: on a full disk only removals go in (into the reserve); once
    /// that is used up an append fails part way and is cut back, refused
    /// with ENOSPC; with room again every change is taken; and the journal
    /// reads back exactly the changes that were answered yes.
    #[test]
    fn a_full_disk_refuses_changes_cuts_failed_appends_back_and_takes_changes_again() {
        let tmp = tempfile::tempdir().unwrap();
        let options = Some("size=1m,mode=0700");
        nix::mount::mount(Some("tmpfs"), tmp.path(), Some("tmpfs"), nix::mount::MsFlags::empty(), options).unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(tmp.path());
        let dir = CacheDir::open_cache(&tmp.path().join("c")).unwrap();
        let journal = Journal::create(&dir, &owner(), Vec::new(), Vec::new()).unwrap();
        let change = |op: LocalOp, n: usize| Local {
            op: op.into(),
            path: vec![b'a' + (n % 26) as u8; 4000],
            ..Local::default()
        };
        let mut made = vec![];
        journal.change(change(LocalOp::Dir, 0)).unwrap();
        made.push(0);
        let mut filler = File::create(tmp.path().join("filler")).unwrap();
        while filler.write_all(&[1; 4096]).is_ok() {}
        let refused = |e: StoreError| e.errno() == libc::ENOSPC;
        // Removals go in until the reserve is used up; then one is refused.
        let mut n = 1;
        loop {
            match journal.change(change(LocalOp::Unlink, n)) {
                Ok(()) => made.push(n),
                Err(e) => {
                    assert!(refused(e));
                    break;
                }
            }
            n += 1;
            assert!(n < 1000, "a full disk took every removal");
        }
        assert!(made.len() > 5, "the reserve took removals: {made:?}");
        assert!(refused(journal.change(change(LocalOp::Dir, n + 1)).unwrap_err()));
        assert!(journal.refusing().unwrap().contains("full"));
        drop(filler);
        std::fs::remove_file(tmp.path().join("filler")).unwrap();
        journal.change(change(LocalOp::Dir, n + 2)).unwrap();
        made.push(n + 2);
        assert_eq!(journal.refusing(), None);
        drop(journal);
        let loaded = load(&dir).unwrap().unwrap();
        let paths: Vec<u8> = loaded.local.iter().map(|l| l.path[0]).collect();
        let expected: Vec<u8> = made.iter().map(|n| b'a' + (n % 26) as u8).collect();
        assert_eq!(paths, expected, "exactly the changes answered yes");
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
        assert!(err.to_string().contains("journal"), "{err}");
        let change = journal.change(Local { op: LocalOp::Dir.into(), path: b"x".to_vec(), ..Local::default() });
        assert!(change.is_err(), "a change that is not durable is refused");
    }
}
