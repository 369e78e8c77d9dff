//! What `lazyfs push` put in an S3-compatible store, as a source: a file is
//! looked up in the index, its bytes read by ranged GETs of the objects that
//! hold them (at once, when a read spans several), and an object read whole
//! is checked against its name (the fetcher checks every 16 KiB chunk against
//! the index besides). No old host is involved; any number of mounts read one
//! prefix.
//!
//! A mount may start while the push still runs (the index goes up first): an
//! object not there yet is a transient failure, waited for like a lost
//! connection, until `lazyfs.done.BLAKE3` says the push is complete; then a missing
//! object is the store's loss, and the file fails.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use super::{Connection, Limits, Source, SourceError, SourceStat, WholeRead};
use crate::s3::index::{self, Entry, Index, Piece};
use crate::s3::{Bucket, S3Error, S3Url};

/// How long opening the source (reading the index) may wait on the store.
const OPEN_TIME: Duration = Duration::from_secs(30);
/// How often an incomplete push's `lazyfs.done.BLAKE3` is looked for again, at most.
const DONE_LOOK_EVERY: Duration = Duration::from_secs(1);
/// Small files fetched at once by one connection.
const FILES_IN_FLIGHT: usize = 32;

pub struct S3Source {
    shared: Arc<Shared>,
}

struct Shared {
    bucket: Bucket,
    index: Index,
    complete: AtomicBool,
    /// When `lazyfs.done.BLAKE3` was last looked for.
    looked: Mutex<Option<Instant>>,
}

impl S3Source {
    /// Reads the index at `url` (every failure here is before anything is mounted).
    pub fn open(url: &S3Url) -> Result<S3Source, SourceError> {
        let bucket = Bucket::open(url).map_err(open_error)?;
        let limits = Limits { deadline: None, stall: OPEN_TIME };
        let key = url.key(index::INDEX);
        let bytes = match bucket.block_on(bucket.get(&key, None, index::MAX_INDEX_BYTES, limits)) {
            Ok(bytes) => bytes,
            Err(S3Error::NotFound { .. }) => {
                let why = match bucket.block_on(bucket.anything_at_prefix(limits)) {
                    Ok(false) => "nothing is there".to_string(),
                    Ok(true) => {
                        format!("no {} there (not a lazyfs push, or one stopped before its index)", index::INDEX)
                    }
                    Err(e) => return Err(open_error(e)),
                };
                return Err(SourceError::Config(format!(
                    "{url}: {why}: run `lazyfs push IMGDIR {url}` on the old host first"
                )));
            }
            Err(e) => return Err(open_error(e)),
        };
        let index = Index::decode(&bytes)
            .map_err(|reason| SourceError::Config(format!("{url}/{}: not a lazyfs index: {reason}", index::INDEX)))?;
        let shared = Shared { bucket, index, complete: AtomicBool::new(false), looked: Mutex::new(None) };
        let complete = shared.bucket.block_on(shared.complete());
        log::info!(
            "{url}: {} files pushed from {}{}",
            shared.index.len(),
            shared.index.origin,
            if complete {
                ""
            } else {
                "; that push has not finished (or was interrupted): a file waits for objects not stored yet"
            }
        );
        Ok(S3Source { shared: Arc::new(shared) })
    }
}

impl Source for S3Source {
    /// A connection is a handle on the shared client; making one asks the
    /// store for the index's size, so a probe tells a silent store.
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        let shared = &self.shared;
        let limits = Limits { deadline: None, stall: time };
        let key = shared.bucket.url.key(index::INDEX);
        match shared.bucket.block_on(shared.bucket.head(&key, limits)) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let message = format!("{}: its {} is gone", shared.bucket.url, index::INDEX);
                return Err(SourceError::Store { message, transient: true });
            }
            Err(e) => return Err(runtime_error(e, None)),
        }
        Ok(Box::new(S3Connection { shared: self.shared.clone(), limits }))
    }

    fn describe(&self) -> String {
        self.shared.bucket.url.to_string()
    }

    fn pushed(&self) -> Option<&Index> {
        Some(&self.shared.index)
    }
}

impl Shared {
    fn entry(&self, path: &Path) -> Result<&Entry, SourceError> {
        self.index.get(path).ok_or_else(|| SourceError::NotFound {
            path: path.to_path_buf(),
            looked: format!("the index of {}", self.bucket.url),
        })
    }

    /// Whether the push is complete: once seen, for good; until then
    /// `lazyfs.done.BLAKE3` is looked for again at most every `DONE_LOOK_EVERY`.
    async fn complete(&self) -> bool {
        if self.complete.load(Ordering::Relaxed) {
            return true;
        }
        {
            let mut looked = self.looked.lock().unwrap_or_else(PoisonError::into_inner);
            if looked.is_some_and(|at| at.elapsed() < DONE_LOOK_EVERY) {
                return false;
            }
            *looked = Some(Instant::now());
        }
        let limits = Limits { deadline: None, stall: Duration::from_secs(5) };
        let key = self.bucket.url.key(&index::done_name(&self.index.id));
        let done = self.bucket.get(&key, None, 64, limits).await;
        let complete = done.is_ok_and(|bytes| bytes.trim_ascii() == self.index.id.as_bytes());
        if complete {
            self.complete.store(true, Ordering::Relaxed);
        }
        complete
    }

    /// Bytes `pieces` of the file at `path` into `buf`; what a failure is to the fetcher.
    async fn read(&self, path: &Path, pieces: &[Piece], buf: &mut [u8], limits: Limits) -> Result<(), SourceError> {
        match self.read_pieces(pieces, buf, limits).await {
            Ok(()) => Ok(()),
            Err(failure) => Err(self.source_error(path, failure).await),
        }
    }

    /// The bytes of `pieces` of the file at `path`, landed in `buf`.
    async fn read_pieces(&self, pieces: &[Piece], buf: &mut [u8], limits: Limits) -> Result<(), Failure> {
        let fetched = futures::future::join_all(pieces.iter().map(|piece| self.fetch(piece, limits))).await;
        for (piece, bytes) in pieces.iter().zip(fetched) {
            let bytes = bytes?;
            buf[piece.at..piece.at + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    /// One piece: a ranged GET of its object, checked against the object's
    /// name when it is the whole object.
    async fn fetch(&self, piece: &Piece, limits: Limits) -> Result<Bytes, Failure> {
        let key = self.index.object_key(&piece.object);
        let len = piece.range.end - piece.range.start;
        let bytes = self.bucket.get(&key, Some(piece.range.clone()), len, limits).await.map_err(|e| match e {
            S3Error::NotFound { .. } => Failure::Missing(key.clone()),
            S3Error::OutOfRange { .. } => Failure::Damaged(key.clone()),
            e => Failure::Store(e),
        })?;
        let damaged = bytes.len() as u64 != len || (piece.whole && blake3::hash(&bytes).as_bytes() != &piece.object);
        if damaged {
            return Err(Failure::Damaged(key));
        }
        Ok(bytes)
    }

    /// What a failure to read `path` is to the fetcher.
    async fn source_error(&self, path: &Path, failure: Failure) -> SourceError {
        let url = &self.bucket.url;
        match failure {
            Failure::Store(e) => runtime_error(e, Some(path)),
            Failure::Damaged(key) => SourceError::Store {
                message: format!(
                    "{}: object {key} does not hold the bytes it is named for (damaged or tampered with in the store): not \
                     served; `lazyfs push` of these images again replaces it",
                    path.display()
                ),
                transient: false,
            },
            Failure::Missing(key) if self.complete().await => SourceError::Store {
                message: format!(
                    "{}: object {key} is missing from the store, though the push to {url} finished",
                    path.display()
                ),
                transient: false,
            },
            Failure::Missing(key) => SourceError::Store {
                message: format!(
                    "{}: object {key} is not in the store yet: the push to {url} has not finished",
                    path.display()
                ),
                transient: true,
            },
        }
    }
}

/// Why a piece could not be had.
enum Failure {
    Store(S3Error),
    /// No such object.
    Missing(String),
    /// Its bytes are not the ones it is named for (or not as many).
    Damaged(String),
}

struct S3Connection {
    shared: Arc<Shared>,
    limits: Limits,
}

impl S3Connection {
    /// Checks that `len` bytes at `offset` are in the file, and which objects hold them.
    fn plan(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<Piece>, SourceError> {
        let entry = self.shared.entry(path)?;
        let end = offset + len as u64;
        if end > entry.size {
            return Err(SourceError::Short { path: path.to_path_buf(), end: entry.size, wanted: end });
        }
        Ok(self.shared.index.pieces(entry, offset..end))
    }
}

impl Connection for S3Connection {
    fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    fn stat(&mut self, path: &Path) -> Result<SourceStat, SourceError> {
        let entry = self.shared.entry(path)?;
        Ok(SourceStat { size: entry.size, mtime: entry.mtime_ns.div_euclid(1_000_000_000) })
    }

    fn read_exact_at(&mut self, path: &Path, _generation: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let pieces = self.plan(path, offset, buf.len())?;
        let shared = &self.shared;
        shared.bucket.block_on(shared.read(path, &pieces, buf, self.limits))
    }

    /// Many small files at once; a failure that a new request may mend
    /// fails the whole batch (the fetcher tries it again), others only their file.
    fn read_files(&mut self, files: &mut [WholeRead<'_>]) -> Result<(), SourceError> {
        let shared = &self.shared;
        let limits = self.limits;
        let plans: Vec<Result<Vec<Piece>, SourceError>> =
            files.iter().map(|f| self.plan(f.path, 0, f.buf.len())).collect();
        let results: Vec<Result<(), SourceError>> = shared.bucket.block_on(
            futures::stream::iter(files.iter_mut().zip(plans))
                .map(|(file, plan)| async move { shared.read(file.path, &plan?, file.buf, limits).await })
                .buffered(FILES_IN_FLIGHT)
                .collect(),
        );
        if let Some(lost) = results.iter().find_map(|r| r.as_ref().err().filter(|e| e.is_connection_lost())) {
            return Err(clone_transient(lost));
        }
        for (file, result) in files.iter_mut().zip(results) {
            file.result = result;
        }
        Ok(())
    }
}

/// A copy of a transient error (they carry only text and numbers).
fn clone_transient(error: &SourceError) -> SourceError {
    match error {
        SourceError::TimedOut { host, waited, path } => {
            SourceError::TimedOut { host: host.clone(), waited: *waited, path: path.clone() }
        }
        SourceError::Connect { addr, source } => {
            SourceError::Connect { addr: addr.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        other => SourceError::Store { message: other.to_string(), transient: true },
    }
}

/// What a failure to open the source means: bad input (exit 2) or not (exit 1).
fn open_error(error: S3Error) -> SourceError {
    match error {
        e if e.is_bad_input() => SourceError::Config(e.to_string()),
        e => runtime_error(e, None),
    }
}

/// A store's failure while serving, about `path` if given: every one but a
/// wrong setting may pass (credentials included: a session token renewed).
fn runtime_error(error: S3Error, path: Option<&Path>) -> SourceError {
    let about = |message: String| match path {
        Some(path) => format!("{}: {message}", path.display()),
        None => message,
    };
    match error {
        S3Error::TimedOut { endpoint, waited } => {
            SourceError::TimedOut { host: endpoint, waited, path: path.map(Path::to_path_buf) }
        }
        S3Error::Unreachable { endpoint, reason } => {
            SourceError::Connect { addr: endpoint, source: std::io::Error::other(reason) }
        }
        e @ (S3Error::Config(_) | S3Error::NoBucket { .. } | S3Error::OutOfRange { .. }) => {
            SourceError::Store { message: about(e.to_string()), transient: false }
        }
        e => SourceError::Store { message: about(e.to_string()), transient: true },
    }
}
