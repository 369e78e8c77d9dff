//! `lazyfs push IMGDIR s3://BUCKET/PREFIX`, run on the old host: every file a
//! mount of the same arguments would serve goes to an S3-compatible store as
//! content-addressed objects, with an index (see `s3::index`), so any number
//! of hosts can mount the prefix and the old host can go.
//!
//! 1. Every file is read once and hashed (per 16 KiB chunk, whole, per
//!    object), in parallel.
//! 2. The index goes up first: a mount can start now.
//! 3. The objects go up, `-j` at a time: those of the recorded access order
//!    first (what the last restore read first), then smallest file first. An
//!    object already in the bucket is not sent again, so a push interrupted
//!    and run again sends only what is missing: a listing of the objects'
//!    prefix (made while the files are hashed) says which are there, or, for
//!    a store too large to list cheaply, a HEAD per object; one there is
//!    checked to hold its bytes (its ETag against their MD5, else fetched
//!    and hashed), or sent again. Each object is read and hashed again as it
//!    is sent: a file that changed since it was hashed fails the push rather
//!    than go up under a wrong name.
//! 4. `lazyfs.done.BLAKE3` says the push of the index of that blake3 is
//!    complete; then the index is read again: one another push replaced
//!    meanwhile is an error (its images no longer mount from the prefix).

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rayon::prelude::*;

use crate::images::{Checkpoint, ImageError, RecordedFile};
use crate::recording::Recording;
use crate::s3::index::{self, Entry, Index, IndexFile, IndexProto, ObjectName};
use crate::s3::{Bucket, ObjectInfo, S3Error, S3Url, pin};
use crate::source::{self, Limits, SourceError, SourceSpec, relative};
use crate::store::CHUNK_SIZE;

/// Everything `lazyfs push` was asked, resolved.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub imgdir: PathBuf,
    pub url: S3Url,
    /// On this host, file `/a/b` is read from `source_root/a/b`.
    pub source_root: PathBuf,
    pub subtree: Option<PathBuf>,
    /// Objects in flight at once.
    pub jobs: usize,
    pub object_size: u64,
    /// Key prefix of the objects in the bucket.
    pub objects: String,
    /// The access order to push first (and to ship for `--prefetch-order recorded`).
    pub recording: Option<Recording>,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Images(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] S3Error),
    #[error("--source-root {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no servable file is recorded below --subtree {} (`lazyfs ls IMGDIR` lists them)", .0.display())]
    EmptySubtree(PathBuf),
    #[error("none of the {count} recorded files could be read ({example}): nothing pushed; is --source-root right?")]
    NothingRead { count: usize, example: String },
    #[error("{}: changed while it was being pushed; run `lazyfs push` again (what went up stays)", .0.display())]
    Changed(PathBuf),
    #[error(
        "cannot write {} (it tells the new hosts which index to trust): {source}; push from a copy of the images you can write",
        path.display()
    )]
    Pin { path: PathBuf, source: std::io::Error },
    #[error(
        "{url}: another push (from {origin}) replaced the index while this one ran: {} no longer mounts from \
         there; push to another prefix, or run this push again once the other is done (what went up stays)",
        imgdir.display()
    )]
    Replaced { url: S3Url, origin: String, imgdir: PathBuf },
}

impl PushError {
    /// 2 for bad input (images, arguments, the URL or the settings), else 1.
    pub fn exit_code(&self) -> u8 {
        use crate::cli::exit;
        match self {
            PushError::Images(_) | PushError::EmptySubtree(_) | PushError::Root { .. } | PushError::Pin { .. } => {
                exit::BAD_INPUT
            }
            PushError::Store(e) if e.is_bad_input() => exit::BAD_INPUT,
            _ => exit::RUNTIME,
        }
    }
}

/// How far a push is; read by whoever shows it while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_hashed: AtomicU64,
    /// Set once the index is stored (mounts can start).
    pub index_stored: std::sync::atomic::AtomicBool,
    /// Distinct objects of this push, and their bytes.
    pub objects_total: AtomicU64,
    pub object_bytes_total: AtomicU64,
    /// Objects checked so far (sent, or found in the store), and their bytes.
    pub objects_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub objects_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub objects_present: AtomicU64,
}

/// What a push did.
#[derive(Debug)]
pub struct Summary {
    pub files: usize,
    pub bytes: u64,
    /// Files left out, and why.
    pub skipped: Vec<(PathBuf, String)>,
    pub objects: u64,
    pub objects_sent: u64,
    pub bytes_sent: u64,
    pub objects_present: u64,
}

/// One hashed file.
struct Hashed {
    recorded: PathBuf,
    source_path: PathBuf,
    entry: Entry,
    ctime_ns: i64,
}

/// One object to store: where its bytes are.
#[derive(Debug, Clone)]
struct Upload {
    name: ObjectName,
    source_path: PathBuf,
    offset: u64,
    len: u64,
}

/// How many times an object's upload is tried before the push gives up.
const TRIES: u32 = 4;

pub fn push(request: &PushRequest, progress: &Progress) -> Result<Summary, PushError> {
    let checkpoint = Checkpoint::load(&request.imgdir)?;
    let below = |f: &&RecordedFile| {
        request.subtree.as_deref().is_none_or(|dir| f.path.strip_prefix(dir).is_ok_and(|p| !p.as_os_str().is_empty()))
    };
    // Paths a bind mount showed twice are one file on the old host, stored once.
    let mut seen = HashSet::new();
    let files: Vec<&RecordedFile> =
        checkpoint.servable().filter(below).filter(|f| seen.insert(&f.source_path)).collect();
    if let (Some(dir), true) = (&request.subtree, files.is_empty()) {
        return Err(PushError::EmptySubtree(dir.clone()));
    }
    let mut images = blake3::Hasher::new();
    crate::images::hash_files(&request.imgdir, &mut images).map_err(|(path, source)| PushError::Io { path, source })?;
    let root_error = |e: SourceError| PushError::Root { path: request.source_root.clone(), reason: e.to_string() };
    let root: Arc<dyn source::Source> =
        source::open(&SourceSpec::Local(request.source_root.clone()), Path::new("/")).map_err(root_error)?.into();

    // Wrong credentials, a missing bucket, a silent endpoint: said before
    // anything is read.
    let bucket = Bucket::open(&request.url)?;
    bucket.block_on(bucket.anything_at_prefix(Limits { deadline: None, stall: Duration::from_secs(30) }))?;

    progress.files_total.store(files.len() as u64, Ordering::Relaxed);
    let bytes_total: u64 = files.iter().filter_map(|f| f.size).sum();
    progress.bytes_total.store(bytes_total, Ordering::Relaxed);
    // While the files are read and hashed, the bucket is asked which objects it has.
    let objects_guess = files.len() as u64 + bytes_total / request.object_size;
    let (hashed_all, stored) = std::thread::scope(|scope| {
        let stored = scope.spawn(|| bucket.block_on(stored_objects(&bucket, &request.objects, objects_guess)));
        (hash_all(&files, &root, request, progress), stored.join().expect("listing does not panic"))
    });
    let (hashed, skipped) = hashed_all;
    if let (true, Some((path, reason))) = (hashed.is_empty(), skipped.first()) {
        let example = format!("{}: {reason}", path.display());
        return Err(PushError::NothingRead { count: skipped.len(), example });
    }

    let proto = IndexProto {
        object_size: request.object_size,
        objects: request.objects.clone(),
        images: images.finalize().as_bytes().to_vec(),
        origin: format!("{} on {}", request.imgdir.display(), host_name()),
        files: hashed.iter().map(index_file).collect(),
        recording: request.recording.clone(),
        ..Default::default()
    };
    let bytes = Index::encode(proto);
    let id = blake3::hash(&bytes).to_hex().to_string();
    // Before the index goes up: a mount serves only an index its images name.
    pin::write(&request.imgdir, &request.url, &id)
        .map_err(|source| PushError::Pin { path: pin::path(&request.imgdir), source })?;
    bucket.block_on(bucket.put(&request.url.key(index::INDEX), Bytes::from(bytes)))?;
    progress.index_stored.store(true, Ordering::Relaxed);

    let uploads = plan(&hashed, request.recording.as_ref(), request.object_size);
    progress.objects_total.store(uploads.len() as u64, Ordering::Relaxed);
    progress.object_bytes_total.store(uploads.iter().map(|u| u.len).sum(), Ordering::Relaxed);
    bucket.block_on(upload_all(&bucket, &root, uploads, &stored, request, progress))?;
    bucket.block_on(bucket.put(&request.url.key(&index::done_name(&id)), Bytes::from(id.clone())))?;
    still_ours(&bucket, request, &id)?;

    Ok(Summary {
        files: hashed.len(),
        bytes: hashed.iter().map(|h| h.entry.size).sum(),
        skipped,
        objects: progress.objects_total.load(Ordering::Relaxed),
        objects_sent: progress.objects_sent.load(Ordering::Relaxed),
        bytes_sent: progress.bytes_sent.load(Ordering::Relaxed),
        objects_present: progress.objects_present.load(Ordering::Relaxed),
    })
}

/// Whether the index at the prefix is still this push's (of blake3 `id`):
/// another push may have replaced it meanwhile, and these images would no
/// longer mount from there.
fn still_ours(bucket: &Bucket, request: &PushRequest, id: &str) -> Result<(), PushError> {
    let limits = Limits { deadline: None, stall: Duration::from_secs(30) };
    let key = request.url.key(index::INDEX);
    let there = bucket.block_on(bucket.get(&key, None, index::MAX_INDEX_BYTES, limits))?;
    if blake3::hash(&there).to_hex().as_str() == id {
        return Ok(());
    }
    let origin = Index::decode(&there).map_or_else(|_| "not a lazyfs index".to_string(), |other| other.origin);
    Err(PushError::Replaced { url: request.url.clone(), origin, imgdir: request.imgdir.clone() })
}

/// Reads and hashes every file, in parallel; files that cannot be read (or
/// changed since the checkpoint) are left out, with the reason.
fn hash_all(
    files: &[&RecordedFile],
    root: &Arc<dyn source::Source>,
    request: &PushRequest,
    progress: &Progress,
) -> (Vec<Hashed>, Vec<(PathBuf, String)>) {
    let results: Vec<(PathBuf, Result<Hashed, String>)> = files
        .par_iter()
        .map(|file| {
            let result = (|| {
                let mut connection = root.connect().map_err(|e| e.to_string())?;
                let path = &file.source_path;
                let size = connection.stat(path).map_err(|e| e.to_string())?.size;
                match file.size {
                    Some(recorded) if recorded != size => {
                        return Err(format!(
                            "{size} bytes, but the images record {recorded}: changed since the checkpoint"
                        ));
                    }
                    Some(_) => {}
                    // CRIU left its size out: counted now it is known.
                    None => _ = progress.bytes_total.fetch_add(size, Ordering::Relaxed),
                }
                let on_disk = request.source_root.join(relative(path));
                let meta = std::fs::symlink_metadata(&on_disk).map_err(|e| format!("{}: {e}", on_disk.display()))?;
                let (hashes, objects) = index::hash_file(size, request.object_size, |offset, buf| {
                    connection.read_exact_at(path, 0, offset, buf).map_err(std::io::Error::other)?;
                    progress.bytes_hashed.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
                let nanos = |secs: i64, nsec: i64| secs.saturating_mul(1_000_000_000).saturating_add(nsec);
                Ok(Hashed {
                    recorded: file.path.clone(),
                    source_path: path.clone(),
                    entry: Entry {
                        size,
                        mode: meta.mode(),
                        uid: meta.uid(),
                        gid: meta.gid(),
                        mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
                        hashes,
                        objects,
                    },
                    ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
                })
            })();
            (file.path.clone(), result)
        })
        .collect();
    let mut hashed = Vec::new();
    let mut skipped = Vec::new();
    for (path, result) in results {
        match result {
            Ok(h) => hashed.push(h),
            Err(reason) => skipped.push((path, reason)),
        }
    }
    (hashed, skipped)
}

fn index_file(hashed: &Hashed) -> IndexFile {
    let e = &hashed.entry;
    IndexFile {
        path: hashed.source_path.as_os_str().as_bytes().to_vec(),
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime_ns: e.mtime_ns,
        ctime_ns: hashed.ctime_ns,
        blake3: e.hashes.whole.to_vec(),
        chunk_blake3: e.hashes.chunks.concat(),
        objects: e.objects.concat(),
    }
}

/// Every distinct object once, in the order to send them: the objects
/// under the recording's runs, in its order; then each file's, smallest
/// file first.
fn plan(hashed: &[Hashed], recording: Option<&Recording>, object_size: u64) -> Vec<Upload> {
    let mut seen = HashSet::new();
    let mut uploads = Vec::new();
    let mut add = |file: &Hashed, object: u64| {
        let name = file.entry.objects[object as usize];
        if seen.insert(name) {
            let offset = object * object_size;
            let len = object_size.min(file.entry.size - offset);
            uploads.push(Upload { name, source_path: file.source_path.clone(), offset, len });
        }
    };
    let by_recorded: HashMap<&[u8], &Hashed> = hashed.iter().map(|h| (h.recorded.as_os_str().as_bytes(), h)).collect();
    for touch in recording.map(|r| r.touches.as_slice()).unwrap_or_default() {
        let Some(file) = by_recorded.get(touch.path.as_slice()) else { continue };
        let objects = file.entry.objects.len() as u64;
        let first = touch.first.saturating_mul(CHUNK_SIZE) / object_size;
        let end = touch.end.saturating_mul(CHUNK_SIZE).div_ceil(object_size).min(objects);
        for object in first..end {
            add(file, object);
        }
    }
    let mut by_size: Vec<&Hashed> = hashed.iter().collect();
    by_size.sort_by(|a, b| (a.entry.size, &a.source_path).cmp(&(b.entry.size, &b.source_path)));
    for file in by_size {
        for object in 0..file.entry.objects.len() as u64 {
            add(file, object);
        }
    }
    uploads
}

/// What the bucket has under the objects' prefix, as far as a listing
/// cheaper than a HEAD per object tells.
struct Stored {
    /// Object names listed, and what the listing says of each.
    listed: HashMap<ObjectName, ObjectInfo>,
    /// The listing was complete: an object not in it is not in the bucket.
    complete: bool,
}

/// Lists the objects' prefix, one request per 1,000 keys, while that costs
/// less than asking for each of about `objects` objects (8 HEADs at a time);
/// an error or a larger store leaves the rest to HEADs.
async fn stored_objects(bucket: &Bucket, prefix: &str, objects: u64) -> Stored {
    let pages = 1 + objects / 8;
    let limits = Limits { deadline: None, stall: Duration::from_secs(30) };
    match bucket.list(prefix, (pages * 1000) as usize, limits).await {
        Ok((listed, complete)) => {
            let listed = listed
                .into_iter()
                .filter_map(|(name, info)| Some((*blake3::Hash::from_hex(name).ok()?.as_bytes(), info)))
                .collect();
            Stored { listed, complete }
        }
        Err(e) => {
            log::warn!("listing {prefix}: {e}: asking for each object instead");
            Stored { listed: HashMap::new(), complete: false }
        }
    }
}

/// Sends what the bucket does not have yet, `request.jobs` at a time, in
/// `uploads`' order.
async fn upload_all(
    bucket: &Bucket,
    root: &Arc<dyn source::Source>,
    uploads: Vec<Upload>,
    stored: &Stored,
    request: &PushRequest,
    progress: &Progress,
) -> Result<(), PushError> {
    let mut results = futures::stream::iter(uploads)
        .map(|upload| upload_one(bucket, root, upload, stored, &request.objects, progress))
        .buffer_unordered(request.jobs.max(1));
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

async fn upload_one(
    bucket: &Bucket,
    root: &Arc<dyn source::Source>,
    upload: Upload,
    stored: &Stored,
    objects: &str,
    progress: &Progress,
) -> Result<(), PushError> {
    let key = index::object_key(objects, &upload.name);
    let limits = Limits { deadline: None, stall: Duration::from_secs(30) };
    let listed = stored.listed.get(&upload.name).copied();
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let present = match listed {
                Some(info) => Some(info),
                // A complete listing said it is not there (a try after a failed PUT asks again).
                None if stored.complete && tries == 1 => None,
                None => bucket.head(&key, limits).await?,
            };
            let bytes = read_object(root, &upload).await?;
            if let Some(info) = present.filter(|info| info.size == upload.len) {
                if holds(bucket, &key, info, &bytes, &upload.name, limits).await? {
                    return Ok(false);
                }
                log::warn!("{key}: the store holds other bytes under this name (damaged, or overwritten): sent again");
            }
            bucket.put(&key, bytes).await?;
            Ok::<bool, PushError>(true)
        };
        match attempt.await {
            Ok(sent) => {
                let counter = if sent { &progress.objects_sent } else { &progress.objects_present };
                counter.fetch_add(1, Ordering::Relaxed);
                if sent {
                    progress.bytes_sent.fetch_add(upload.len, Ordering::Relaxed);
                }
                progress.objects_done.fetch_add(1, Ordering::Relaxed);
                progress.bytes_done.fetch_add(upload.len, Ordering::Relaxed);
                return Ok(());
            }
            Err(PushError::Store(e)) if e.is_transient() && tries < TRIES => {
                log::warn!("{key}: {e}: trying again");
                tokio::time::sleep(Duration::from_millis(200 << tries)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the object the store has under `key` (of `info`) holds `bytes`
/// (named `name`): its ETag against their MD5 where the store gives one
/// (no request), else its bytes fetched and hashed. The size alone would
/// keep an object damaged or overwritten in the store for good.
async fn holds(
    bucket: &Bucket,
    key: &str,
    info: ObjectInfo,
    bytes: &Bytes,
    name: &ObjectName,
    limits: Limits,
) -> Result<bool, PushError> {
    if let Some(e_tag) = info.md5 {
        let bytes = bytes.clone();
        let md5 = tokio::task::spawn_blocking(move || <md5::Md5 as md5::Digest>::digest(&bytes))
            .await
            .expect("hashing does not panic");
        if md5.as_slice() == e_tag {
            return Ok(true);
        }
    }
    // Not an MD5 of these bytes: damaged, or a store whose ETags are something else.
    match bucket.get(key, None, info.size, limits).await {
        Ok(stored) => Ok(blake3::hash(&stored).as_bytes() == name),
        Err(S3Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// An object's bytes, read again from its file and checked against its name.
async fn read_object(root: &Arc<dyn source::Source>, upload: &Upload) -> Result<Bytes, PushError> {
    let root = root.clone();
    let upload = upload.clone();
    tokio::task::spawn_blocking(move || {
        let path = &upload.source_path;
        let io = |e: SourceError| PushError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) };
        let mut buf = vec![0u8; upload.len as usize];
        let mut connection = root.connect().map_err(io)?;
        match connection.read_exact_at(path, 0, upload.offset, &mut buf) {
            Err(SourceError::Short { .. }) => return Err(PushError::Changed(path.clone())),
            other => other.map_err(io)?,
        }
        if blake3::hash(&buf).as_bytes() != &upload.name {
            return Err(PushError::Changed(path.clone()));
        }
        Ok(Bytes::from(buf))
    })
    .await
    .expect("reading an object does not panic")
}

/// This host's name, for the index's `origin`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "?".into())
}
