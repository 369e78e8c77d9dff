//! The recorded access order: which chunks of which files the readers of a
//! mount touched, in the order they first touched them. Every mount records
//! one ([`Recorder`]), shows it in `status --json` and leaves it in its cache
//! dir (`recording`) at unmount; `lazyfs manifest --recording` ships one with
//! the images; `--prefetch-order recorded` prefetches in its order, so what
//! the last restore of a checkpoint touched first arrives first.
//!
//! Format (version 1): the line `lazyfs-recording\n`, then one protobuf
//! `Recording` message (`proto/lazyfs/cache.proto`).
//!
//! While a mount runs, its recording grows in `recording.growing`: the same
//! format, each new or longer run appended as it happens (protobuf appends
//! repeated fields), as a piece that continues the run before it. A mount
//! killed (`kill -9`) leaves it; the next mount of the cache dir takes it as
//! the recording (a piece cut short at the end is left out). A clean
//! unmount writes `recording` whole and removes it.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;

pub use crate::store::journal::proto::{Recording, Touch};
use crate::store::{CHUNK_SIZE, CacheDir};

const MAGIC: &[u8] = b"lazyfs-recording\n";
const VERSION: u32 = 1;
/// The recording's name in a cache dir.
pub const FILE_NAME: &str = "recording";
/// The recording of the mount running (or killed), as it grows.
const GROWING: &str = "recording.growing";
/// Runs a mount records at most (a few MiB): past that, a workload reading
/// at random has said what it reads first long ago.
const MAX_TOUCHES: usize = 100_000;
/// A recording file larger than this is refused before it is read.
const MAX_FILE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: not a lazyfs recording ({reason}); give the `recording` file of a lazyfs cache dir, or the cache dir",
        path.display()
    )]
    Format { path: PathBuf, reason: String },
}

/// An empty recording of this version and chunk size.
pub fn new(touches: Vec<Touch>) -> Recording {
    Recording { version: VERSION, chunk_size: CHUNK_SIZE, touches }
}

/// Whether a decoded recording (from a file or a manifest) is one this lazyfs
/// can follow; the reason if not.
pub fn check(recording: &Recording) -> Result<(), String> {
    if recording.version != VERSION || recording.chunk_size != CHUNK_SIZE {
        return Err(format!(
            "version {} with {}-byte chunks; this lazyfs reads version {VERSION} with {CHUNK_SIZE}-byte chunks",
            recording.version, recording.chunk_size
        ));
    }
    match recording.touches.iter().find(|t| t.first >= t.end) {
        Some(t) => Err(format!("{}: an empty run of chunks", String::from_utf8_lossy(&t.path))),
        None => Ok(()),
    }
}

/// Reads the recording at `path`: a recording file, or a cache dir holding one.
pub fn load(path: &Path) -> Result<Recording, RecordingError> {
    let file = if path.is_dir() { path.join(FILE_NAME) } else { path.to_path_buf() };
    let io = |source| RecordingError::Io { path: file.clone(), source };
    let handle = std::fs::File::open(&file).map_err(io)?;
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that is too large.
    handle.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    decode(&bytes, &file)
}

/// The recording a cache dir holds, if any.
pub fn load_cached(cache_dir: &CacheDir) -> Result<Option<Recording>, RecordingError> {
    match cache_dir.read(FILE_NAME) {
        Ok(bytes) => decode(&bytes, &cache_dir.join(FILE_NAME)).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecordingError::Io { path: cache_dir.join(FILE_NAME), source }),
    }
}

/// Writes `recording` into `cache_dir` (through a temporary file, so a crash
/// leaves the old one or the new one), and drops the copy that grew while it
/// was recorded.
pub fn save(cache_dir: &CacheDir, recording: &Recording) -> Result<(), crate::store::StoreError> {
    let mut bytes = MAGIC.to_vec();
    recording.encode(&mut bytes).expect("Vec grows");
    cache_dir.write_atomic(FILE_NAME, &bytes)?;
    finish_growing(cache_dir)
}

/// Decodes a recording file's bytes (`path` names it in errors).
fn decode(bytes: &[u8], path: &Path) -> Result<Recording, RecordingError> {
    let bad = |reason: String| RecordingError::Format { path: path.to_path_buf(), reason };
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(bad(format!("more than the {MAX_FILE_BYTES} bytes a recording may have")));
    }
    let body = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("no `lazyfs-recording` line".into()))?;
    let mut recording = Recording::decode(body).map_err(|e| bad(e.to_string()))?;
    recording.touches = joined(std::mem::take(&mut recording.touches));
    check(&recording).map_err(bad)?;
    Ok(recording)
}

/// Runs as the recorder keeps them: a piece that continues the run before
/// it (same file, next chunk) is part of that run.
fn joined(pieces: Vec<Touch>) -> Vec<Touch> {
    let mut runs: Vec<Touch> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match runs.last_mut() {
            Some(run) if run.path == piece.path && run.end == piece.first => run.end = piece.end,
            _ => runs.push(piece),
        }
    }
    runs
}

/// The length of `body`'s whole fields: a piece cut short by a crash ends it.
fn whole_fields(body: &[u8]) -> usize {
    let mut rest = body;
    let mut whole = 0;
    while !rest.is_empty() {
        let Ok((_, wire_type)) = prost::encoding::decode_key(&mut rest) else { break };
        let complete = match wire_type {
            prost::encoding::WireType::Varint => prost::encoding::decode_varint(&mut rest).is_ok(),
            prost::encoding::WireType::LengthDelimited => match prost::encoding::decode_varint(&mut rest) {
                Ok(len) if len <= rest.len() as u64 => {
                    rest = &rest[len as usize..];
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if !complete {
            break;
        }
        whole = body.len() - rest.len();
    }
    whole
}

/// Takes the recording a killed mount left growing as the cache dir's
/// recording (what of it is whole), and returns it; gone either way. Call
/// before anything reads the cache dir's recording or records a new one.
pub fn recover(cache_dir: &CacheDir) -> Result<Option<Recording>, crate::store::StoreError> {
    let path = cache_dir.join(GROWING);
    let io = |source| crate::store::StoreError::Io { path: path.clone(), source };
    let bytes = match cache_dir.read(GROWING) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let whole = bytes.strip_prefix(MAGIC).map_or(0, |body| MAGIC.len() + whole_fields(body));
    let recovered = match decode(&bytes[..whole], &path) {
        Ok(recording) if !recording.touches.is_empty() => {
            log::info!("{}: the recording of a mount that did not end cleanly: kept", path.display());
            save(cache_dir, &recording)?;
            Some(recording)
        }
        Ok(_) => None,
        Err(e) => {
            log::warn!("{e}: ignored");
            None
        }
    };
    cache_dir.remove(GROWING).map_err(io)?;
    Ok(recovered)
}

/// Drops the cache dir's recording (it is of another checkpoint or source).
pub fn forget(cache_dir: &CacheDir) -> Result<(), crate::store::StoreError> {
    let gone = cache_dir.remove(FILE_NAME);
    gone.map_err(|source| crate::store::StoreError::Io { path: cache_dir.join(FILE_NAME), source })
}

/// After a clean unmount: `recording` holds it all, the growing copy goes.
fn finish_growing(cache_dir: &CacheDir) -> Result<(), crate::store::StoreError> {
    cache_dir.remove(GROWING).map_err(|source| crate::store::StoreError::Io { path: cache_dir.join(GROWING), source })
}

/// What to prefetch first: the runs of `recording` that name files of this
/// mount, in recorded order, as (file, chunks) clamped to the file.
/// `find` gives a recorded path's file index and chunk count.
pub fn plan(recording: &Recording, find: impl Fn(&[u8]) -> Option<(usize, u64)>) -> Vec<(usize, Range<u64>)> {
    recording
        .touches
        .iter()
        .filter_map(|touch| {
            let (file, chunks) = find(&touch.path)?;
            let run = touch.first.min(chunks)..touch.end.min(chunks);
            (!run.is_empty()).then_some((file, run))
        })
        .collect()
}

/// Runs of `recording` on files this mount does not show yet (files of the
/// tree in directories not listed yet), by path, in recorded order: each
/// with the rank of the next run [`plan`] gives (`planned` says which paths
/// it finds), whose place it takes once its file is found.
pub type Later = std::collections::HashMap<Vec<u8>, Vec<(u64, Range<u64>)>>;

pub fn later(recording: &Recording, planned: impl Fn(&[u8]) -> bool) -> Later {
    let mut later = Later::new();
    let mut rank = 0;
    for touch in &recording.touches {
        if planned(&touch.path) {
            rank += 1;
        } else if touch.first < touch.end {
            later.entry(touch.path.clone()).or_default().push((rank, touch.first..touch.end));
        }
    }
    later
}

/// A mount's recording as it happens: per file, which chunks were touched;
/// and the runs of first touches in order.
pub struct Recorder {
    state: Mutex<RecorderState>,
}

struct RecorderState {
    /// A bit per chunk, per file (allocated at its first touch).
    touched: Vec<Vec<u64>>,
    /// (file, chunks, microseconds since the mount started).
    runs: Vec<(usize, Range<u64>, u64)>,
    /// Where the runs are appended as they grow, if anywhere.
    growing: Option<Growing>,
}

/// `recording.growing` of a cache dir, opened at the first touch.
struct Growing {
    dir: CacheDir,
    file: Option<std::fs::File>,
    /// A file's recorded path.
    path_of: Box<dyn Fn(usize) -> Vec<u8> + Send>,
}

impl Growing {
    /// Appends `pieces` (file, chunks, at): one write, so a kill leaves whole
    /// pieces (or a last one cut short, which loading leaves out).
    fn append(&mut self, pieces: &[(usize, Range<u64>, u64)]) -> Result<(), crate::store::StoreError> {
        let mut bytes = Vec::new();
        if self.file.is_none() {
            bytes.extend_from_slice(MAGIC);
            new(Vec::new()).encode(&mut bytes).expect("Vec grows");
        }
        for (file, chunks, at_us) in pieces {
            let touch = Touch { path: (self.path_of)(*file), first: chunks.start, end: chunks.end, at_us: *at_us };
            prost::encoding::message::encode(3, &touch, &mut bytes);
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(self.dir.open_append(GROWING)?),
        };
        std::io::Write::write_all(file, &bytes)
            .map_err(|source| crate::store::StoreError::Io { path: self.dir.join(GROWING), source })
    }
}

impl Recorder {
    pub fn new(files: usize) -> Recorder {
        Recorder {
            state: Mutex::new(RecorderState { touched: vec![Vec::new(); files], runs: Vec::new(), growing: None }),
        }
    }

    /// From now on every new or longer run is also appended to `cache_dir`'s
    /// `recording.growing` (created at the first touch), naming files by
    /// `path_of`: a mount that is killed keeps what it recorded.
    pub fn grow_in(&self, cache_dir: CacheDir, path_of: impl Fn(usize) -> Vec<u8> + Send + 'static) {
        let growing = Growing { dir: cache_dir, file: None, path_of: Box::new(path_of) };
        self.state.lock().expect("recorder").growing = Some(growing);
    }

    /// A reader touched `chunks` of `file` (of `chunk_count` chunks) at `at_us`:
    /// the chunks nobody touched before join the recording.
    pub fn note(&self, file: usize, chunks: Range<u64>, chunk_count: u64, at_us: u64) {
        let mut state = self.state.lock().expect("recorder");
        let RecorderState { touched, runs, growing } = &mut *state;
        if touched.len() <= file {
            // A file of the tree found after the mount began.
            touched.resize(file + 1, Vec::new());
        }
        let bits = &mut touched[file];
        if bits.is_empty() {
            bits.resize(chunk_count.div_ceil(64) as usize, 0);
        }
        // What this touch adds, as pieces: each continues a run or starts one.
        let mut pieces: Vec<(usize, Range<u64>, u64)> = Vec::new();
        for chunk in chunks.start..chunks.end.min(chunk_count) {
            let (word, bit) = ((chunk / 64) as usize, 1u64 << (chunk % 64));
            if bits[word] & bit != 0 {
                continue;
            }
            let full = runs.len() >= MAX_TOUCHES;
            match runs.last_mut() {
                Some((f, run, at)) if *f == file && run.end == chunk => {
                    run.end += 1;
                    match pieces.last_mut() {
                        Some((_, piece, _)) if piece.end == chunk => piece.end += 1,
                        _ => pieces.push((file, chunk..chunk + 1, *at)),
                    }
                }
                _ if full => break,
                _ => {
                    runs.push((file, chunk..chunk + 1, at_us));
                    pieces.push((file, chunk..chunk + 1, at_us));
                }
            }
            bits[word] |= bit;
        }
        let failed = match growing.as_mut() {
            Some(growing) if !pieces.is_empty() => growing.append(&pieces).err(),
            _ => None,
        };
        if let Some(e) = failed {
            log::warn!("{e}: the recording is kept in memory only (written at unmount)");
            *growing = None;
        }
    }

    /// The runs so far, in order: (file, chunks, microseconds since the mount started).
    pub fn runs(&self) -> Vec<(usize, Range<u64>, u64)> {
        self.state.lock().expect("recorder").runs.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_touches_in_order_as_runs() {
        let recorder = Recorder::new(2);
        recorder.note(1, 4..6, 10, 1);
        recorder.note(1, 6..7, 10, 2); // extends the run
        recorder.note(0, 0..2, 3, 3);
        recorder.note(1, 5..9, 10, 4); // 5, 6 touched already
        recorder.note(0, 1..9, 3, 5); // clamped to the file's 3 chunks
        assert_eq!(recorder.runs(), [(1, 4..7, 1), (0, 0..2, 3), (1, 7..9, 4), (0, 2..3, 5)]);
    }

    #[test]
    fn saves_loads_and_refuses_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open_cache(&tmp.path().join("cache")).unwrap();
        assert!(load_cached(&dir).unwrap().is_none());
        let touch = Touch { path: b"/srv/model".to_vec(), first: 0, end: 2, at_us: 7 };
        save(&dir, &new(vec![touch.clone()])).unwrap();
        assert_eq!(load(dir.path()).unwrap().touches, std::slice::from_ref(&touch));
        assert_eq!(load_cached(&dir).unwrap().unwrap().touches, [touch]);
        let garbage = tmp.path().join("garbage");
        std::fs::write(&garbage, b"lazyfs-recording\n\xff\xff\xff").unwrap();
        let message = load(&garbage).unwrap_err().to_string();
        assert!(message.contains("not a lazyfs recording"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn a_growing_recording_is_recovered_whole_pieces_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open_cache(&tmp.path().join("cache")).unwrap();
        let recorder = Recorder::new(2);
        recorder.grow_in(dir.try_clone().unwrap(), |file| format!("/f{file}").into_bytes());
        recorder.note(1, 4..6, 10, 1);
        recorder.note(1, 6..7, 10, 2); // a piece continuing the run
        recorder.note(0, 0..2, 3, 3);
        recorder.note(1, 9..10, 10, 4);
        drop(recorder);
        let touch = |file: &str, first, end, at_us| Touch { path: file.as_bytes().to_vec(), first, end, at_us };
        let runs = [touch("/f1", 4, 7, 1), touch("/f0", 0, 2, 3), touch("/f1", 9, 10, 4)];
        // Whole, then with the last piece cut short (a crash mid-write).
        let grown = dir.read(GROWING).unwrap();
        recover(&dir).unwrap();
        assert!(!dir.exists(GROWING));
        assert_eq!(load_cached(&dir).unwrap().unwrap().touches, runs);
        std::fs::write(dir.join(GROWING), &grown[..grown.len() - 2]).unwrap();
        recover(&dir).unwrap();
        assert_eq!(load_cached(&dir).unwrap().unwrap().touches, runs[..2]);
    }

    #[test]
    fn plan_keeps_order_and_clamps() {
        let recording = new(vec![
            Touch { path: b"/b".to_vec(), first: 3, end: 90, at_us: 0 },
            Touch { path: b"/gone".to_vec(), first: 0, end: 1, at_us: 1 },
            Touch { path: b"/a".to_vec(), first: 0, end: 1, at_us: 2 },
            Touch { path: b"/b".to_vec(), first: 50, end: 60, at_us: 3 },
        ]);
        let find = |path: &[u8]| match path {
            b"/a" => Some((0, 1)),
            b"/b" => Some((1, 10)),
            _ => None,
        };
        assert_eq!(plan(&recording, find), [(1, 3..10), (0, 0..1)]);
    }
}
