//! The manifest: blake3 of every recorded file, whole and per chunk, made on
//! the old host by `lazyfs manifest` and checked by the mount as chunks arrive.
//!
//! Format (version 1): the line `lazyfs-manifest\n`, then one protobuf
//! `Manifest` message (`proto/lazyfs/cache.proto`): the chunk size, and per
//! file its recorded path, size, whole-file blake3 and the blake3 of each
//! chunk (32 bytes each, concatenated); optionally, the access order a
//! restore recorded (`--recording`), for `--prefetch-order recorded`.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;
use rayon::prelude::*;

use crate::images::Checkpoint;
use crate::recording::{self, Recording};
use crate::source::SourceAttrs;
use crate::source::relative;
use crate::store::CHUNK_SIZE;
use crate::store::journal::proto::{Manifest as ManifestProto, ManifestEntry, ManifestFile, ManifestLeftOut};

const MAGIC: &[u8] = b"lazyfs-manifest\n";
const VERSION: u32 = 1;
pub const DEFAULT_NAME: &str = "lazyfs.manifest";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a lazyfs manifest: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("--root {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },
    #[error("no servable file is recorded below --subtree {} (`lazyfs ls IMGDIR` lists them)", .0.display())]
    EmptySubtree(PathBuf),
    #[error("none of the {count} recorded files could be hashed ({example}): no manifest written; is --root right?")]
    NothingHashed { count: usize, example: String },
}

/// The hashes of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    pub size: u64,
    pub whole: [u8; 32],
    pub chunks: Vec<[u8; 32]>,
}

impl FileHashes {
    /// Whether `bytes` are chunk `chunk` as the old host had it.
    pub fn chunk_matches(&self, chunk: u64, bytes: &[u8]) -> bool {
        self.chunks.get(chunk as usize).is_some_and(|want| blake3::hash(bytes).as_bytes() == want)
    }
}

/// Hashes chunk by chunk what `read_at` gives for a file of `size` bytes.
pub fn hash_chunks(
    size: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<FileHashes> {
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::with_capacity(size.div_ceil(CHUNK_SIZE) as usize);
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(CHUNK_SIZE) as usize;
        read_at(offset, &mut buf[..len])?;
        whole.update(&buf[..len]);
        chunks.push(*blake3::hash(&buf[..len]).as_bytes());
        offset += len as u64;
    }
    Ok(FileHashes { size, whole: *whole.finalize().as_bytes(), chunks })
}

pub struct Manifest {
    files: HashMap<Vec<u8>, FileHashes>,
    /// What the old host's lstat said of each file and entry (`--subtree`).
    attrs: HashMap<Vec<u8>, SourceAttrs>,
    /// With `--subtree`: the directory whose every file it holds.
    subtree: Option<PathBuf>,
    /// The access order shipped with the images, if any.
    pub recording: Option<Recording>,
    /// What it could not read below the subtree, and why.
    left_out: Vec<(PathBuf, String)>,
}

impl Manifest {
    pub fn get(&self, path: &Path) -> Option<&FileHashes> {
        self.files.get(path.as_os_str().as_bytes())
    }

    /// What the old host said of the file, directory or symlink at `path`
    /// (its inode number, link count, exact times), if the manifest records it.
    pub fn attrs(&self, path: &Path) -> Option<SourceAttrs> {
        self.attrs.get(path.as_os_str().as_bytes()).copied()
    }

    /// The largest inode number it records that a node may keep (see `namespace::kept_ino`).
    pub fn max_ino(&self) -> Option<u64> {
        self.attrs.values().filter_map(|a| crate::namespace::kept_ino(a.dev_ino?.1)).max()
    }

    /// Whether the manifest holds every file below `path`'s directory as it
    /// was: a file there it does not hold appeared after it.
    pub fn covers(&self, path: &Path) -> bool {
        self.subtree.as_ref().is_some_and(|dir| path.starts_with(dir) && path != dir)
    }

    /// Why the manifest holds nothing of `path`, if it left out `path` or a
    /// directory it is in (it could not read them).
    pub fn left_out(&self, path: &Path) -> Option<(&Path, &str)> {
        self.left_out.iter().find(|(out, _)| path.starts_with(out)).map(|(out, why)| (out.as_path(), why.as_str()))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let bytes = std::fs::read(path).map_err(|source| ManifestError::Io { path: path.into(), source })?;
        let bad = |reason: String| ManifestError::Format { path: path.into(), reason };
        let body = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("no `lazyfs-manifest` line".into()))?;
        let proto = ManifestProto::decode(body).map_err(|e| bad(e.to_string()))?;
        if proto.version != VERSION || proto.chunk_size != CHUNK_SIZE {
            return Err(bad(format!(
                "version {} with {}-byte chunks; this lazyfs reads version {VERSION} with {CHUNK_SIZE}-byte chunks",
                proto.version, proto.chunk_size
            )));
        }
        let mut files = HashMap::new();
        let mut attrs = HashMap::new();
        for entry in &proto.entries {
            if let Some(a) = &entry.attrs {
                attrs.insert(entry.path.clone(), crate::tree::from_attrs(a));
            }
        }
        for file in proto.files {
            if let Some(a) = &file.attrs {
                attrs.insert(file.path.clone(), crate::tree::from_attrs(a));
            }
            let whole: [u8; 32] =
                file.blake3.as_slice().try_into().map_err(|_| bad("a hash that is not 32 bytes".into()))?;
            let expected_chunks = file.size.div_ceil(CHUNK_SIZE) as usize;
            if file.chunk_blake3.len() != expected_chunks * 32 {
                return Err(bad(format!("{}: wrong number of chunk hashes", String::from_utf8_lossy(&file.path))));
            }
            let chunks = file.chunk_blake3.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect();
            files.insert(file.path, FileHashes { size: file.size, whole, chunks });
        }
        if let Some(recording) = &proto.recording {
            recording::check(recording).map_err(|reason| bad(format!("its recording: {reason}")))?;
        }
        let subtree = (!proto.subtree.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&proto.subtree)));
        let left_out = proto
            .left_out
            .into_iter()
            .map(|out| (PathBuf::from(std::ffi::OsString::from_vec(out.path)), out.reason))
            .collect();
        Ok(Manifest { files, attrs, subtree, recording: proto.recording, left_out })
    }
}

/// What `lazyfs manifest` did.
pub struct Summary {
    pub hashed: usize,
    pub bytes: u64,
    /// Files left out, and why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Hashes every servable file of `checkpoint` (below `subtree`, if given),
/// read below `root`, in parallel, and writes the manifest, with `recording`
/// if given, to `output` (through a temporary file). Writes nothing when no
/// file could be hashed.
pub fn create(
    checkpoint: &Checkpoint,
    root: &Path,
    subtree: Option<&Path>,
    recording: Option<Recording>,
    output: &Path,
) -> Result<Summary, ManifestError> {
    match std::fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(ManifestError::Root { path: root.into(), reason: "not a directory".into() }),
        Err(e) => return Err(ManifestError::Root { path: root.into(), reason: e.to_string() }),
    }
    let recorded: HashMap<&Path, Option<u64>> = checkpoint
        .servable()
        .filter(|f| subtree.is_none_or(|dir| f.path.strip_prefix(dir).is_ok_and(|p| !p.as_os_str().is_empty())))
        .map(|f| (f.source_path.as_path(), f.size))
        .collect();
    // With --subtree, every file below it (the mount serves them all);
    // otherwise the recorded files.
    let mut entries = Vec::new();
    let mut summary = Summary { hashed: 0, bytes: 0, skipped: Vec::new() };
    let files: Vec<(PathBuf, Option<u64>)> = match subtree {
        Some(dir) => {
            if !root.join(relative(dir)).is_dir() {
                return Err(ManifestError::EmptySubtree(dir.into()));
            }
            let mut files = Vec::new();
            walk(root, dir, &mut Walked { files: &mut files, entries: &mut entries, skipped: &mut summary.skipped })?;
            files.into_iter().map(|path| (path.clone(), recorded.get(path.as_path()).copied().flatten())).collect()
        }
        None => recorded.iter().map(|(path, size)| (path.to_path_buf(), *size)).collect(),
    };
    if let (Some(dir), true) = (subtree, files.is_empty() && recorded.is_empty() && entries.is_empty()) {
        return Err(ManifestError::EmptySubtree(dir.into()));
    }
    type Hashed = Result<(FileHashes, SourceAttrs), String>;
    let results: Vec<(PathBuf, Hashed)> = files
        .par_iter()
        .map(|(path, recorded_size)| {
            let on_disk = root.join(relative(path));
            let result = (|| {
                let handle = File::open(&on_disk).map_err(|e| format!("{}: {e}", on_disk.display()))?;
                let meta = handle.metadata().map_err(|e| e.to_string())?;
                let size = meta.len();
                if let Some(recorded) = recorded_size.filter(|&r| r != size) {
                    return Err(format!(
                        "{size} bytes, but the images record {recorded}: changed since the checkpoint"
                    ));
                }
                let hashes =
                    hash_chunks(size, |offset, buf| handle.read_exact_at(buf, offset)).map_err(|e| e.to_string())?;
                Ok((hashes, attrs_of(&meta)))
            })();
            (path.clone(), result)
        })
        .collect();

    let mut proto = ManifestProto {
        version: VERSION,
        chunk_size: CHUNK_SIZE,
        files: Vec::new(),
        recording,
        subtree: subtree.map(|s| s.as_os_str().as_bytes().to_vec()).unwrap_or_default(),
        entries,
        left_out: Vec::new(),
    };
    for (path, result) in results {
        match result {
            Ok((hashes, attrs)) => {
                summary.hashed += 1;
                summary.bytes += hashes.size;
                proto.files.push(ManifestFile {
                    path: path.as_os_str().as_bytes().to_vec(),
                    size: hashes.size,
                    blake3: hashes.whole.to_vec(),
                    chunk_blake3: hashes.chunks.concat(),
                    attrs: subtree.map(|_| crate::tree::to_attrs(&attrs)),
                });
            }
            Err(reason) => summary.skipped.push((path, reason)),
        }
    }
    if subtree.is_some() {
        proto.left_out = summary
            .skipped
            .iter()
            .map(|(path, reason)| ManifestLeftOut {
                path: path.as_os_str().as_bytes().to_vec(),
                reason: reason.clone(),
            })
            .collect();
    }
    if let (0, Some((path, reason))) = (summary.hashed, summary.skipped.first()) {
        let example = format!("{}: {reason}", path.display());
        return Err(ManifestError::NothingHashed { count: summary.skipped.len(), example });
    }
    let io = |source| ManifestError::Io { path: output.into(), source };
    let tmp = output.with_extension("tmp");
    let mut bytes = MAGIC.to_vec();
    proto.encode(&mut bytes).expect("Vec grows");
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::rename(&tmp, output).map_err(io)?;
    Ok(summary)
}

/// What `lstat` says, as a source tells it.
fn attrs_of(meta: &std::fs::Metadata) -> SourceAttrs {
    use std::os::unix::fs::MetadataExt;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    SourceAttrs {
        mode: meta.mode(),
        size: meta.size(),
        uid: meta.uid(),
        gid: meta.gid(),
        atime_ns: ns(meta.atime(), meta.atime_nsec()),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: Some(ns(meta.ctime(), meta.ctime_nsec())),
        dev_ino: Some((meta.dev(), meta.ino())),
        nlink: u32::try_from(meta.nlink()).ok(),
    }
}

/// What the walk of a subtree found.
struct Walked<'a> {
    files: &'a mut Vec<PathBuf>,
    entries: &'a mut Vec<ManifestEntry>,
    /// What it could not read (a directory or entry the user may not see), and why.
    skipped: &'a mut Vec<(PathBuf, String)>,
}

/// Every regular file below `dir` (read below `root`) into `files`, and
/// every other entry (directories, `dir` itself included, symlinks, FIFOs)
/// with its attributes into `entries`. Symlinks are not followed. What the
/// user may not read below `dir` (root's `lost+found`, another user's 0700
/// directory) is left out, and said why; `dir` itself must be readable.
fn walk(root: &Path, dir: &Path, walked: &mut Walked) -> Result<(), ManifestError> {
    let on_disk = root.join(relative(dir));
    let io = |source| ManifestError::Io { path: on_disk.clone(), source };
    let meta = std::fs::symlink_metadata(&on_disk).map_err(io)?;
    walked.entries.push(ManifestEntry {
        path: dir.as_os_str().as_bytes().to_vec(),
        attrs: Some(crate::tree::to_attrs(&attrs_of(&meta))),
        target: Vec::new(),
    });
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&on_disk)
        .map_err(io)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let at = on_disk.join(&name);
        let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
        let meta = match std::fs::symlink_metadata(&at) {
            Err(e) if denied(&e) => {
                walked.skipped.push((path, format!("{}: {e}", at.display())));
                continue;
            }
            other => other.map_err(|source| ManifestError::Io { path: at.clone(), source })?,
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            match walk(root, &path, walked) {
                Err(ManifestError::Io { path: failed, source }) if failed == at && denied(&source) => {
                    walked.skipped.push((path, format!("{}: {source}", at.display())));
                }
                other => other?,
            }
        } else if kind.is_file() {
            walked.files.push(path);
        } else {
            let target = match kind.is_symlink() {
                true => std::fs::read_link(&at).map_err(|source| ManifestError::Io { path: at.clone(), source })?,
                false => PathBuf::new(),
            };
            walked.entries.push(ManifestEntry {
                path: path.as_os_str().as_bytes().to_vec(),
                attrs: Some(crate::tree::to_attrs(&attrs_of(&meta))),
                target: target.as_os_str().as_bytes().to_vec(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_hashes_cover_the_file() {
        let data: Vec<u8> = (0..(2 * CHUNK_SIZE + 10)).map(|i| (i * i % 251) as u8).collect();
        let hashes = hash_chunks(data.len() as u64, |offset, buf| {
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(hashes.chunks.len(), 3);
        assert_eq!(hashes.whole, *blake3::hash(&data).as_bytes());
        assert!(hashes.chunk_matches(2, &data[2 * CHUNK_SIZE as usize..]));
        assert!(!hashes.chunk_matches(1, &data[..CHUNK_SIZE as usize]));
        assert!(!hashes.chunk_matches(9, &data[..1]));
    }
}
