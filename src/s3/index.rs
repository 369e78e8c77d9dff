//! What `lazyfs push` keeps in a store, and how a reader finds a file's bytes
//! there.
//!
//! Below `s3://BUCKET/PREFIX`: `lazyfs.index` (the line `lazyfs-index\n`, then
//! one protobuf `Index`, `proto/lazyfs/index.proto`) and, once every object
//! it names is stored, `lazyfs.done.BLAKE3` (BLAKE3 the hex blake3 of the
//! index's bytes: one per index, so a push that finishes after another
//! replaced its index cannot say the other one is complete).
//! Each file is cut into objects of `object_size` bytes at fixed offsets (the
//! last one shorter), stored once in the bucket under the index's `objects`
//! key prefix and the hex blake3 of their bytes: an object already there,
//! from this file, another one or an earlier push, is not sent again. The
//! index is a manifest: per 16 KiB chunk a blake3, so a reader checks every
//! chunk of a ranged GET, and whole objects against their names.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use prost::Message;

use crate::manifest::FileHashes;
use crate::recording::{self, Recording};
use crate::store::CHUNK_SIZE;
pub use crate::store::journal::proto::{Index as IndexProto, IndexFile};

pub const INDEX: &str = "lazyfs.index";
/// The name, below the prefix, that says every object of the index of blake3 `id` (hex) is stored.
pub fn done_name(id: &str) -> String {
    format!("lazyfs.done.{id}")
}
/// Where objects go in the bucket unless `lazyfs push --objects` says otherwise.
pub const DEFAULT_OBJECTS: &str = "lazyfs-chunks/";
/// Bytes of a file per object unless `lazyfs push --object-size` says otherwise
/// (see README "Push": the size that measured best).
pub const DEFAULT_OBJECT_SIZE: u64 = 4 << 20;
/// Object sizes a push may choose: whole chunks, from one to 4,096 (64 MiB).
pub const OBJECT_SIZES: Range<u64> = CHUNK_SIZE..(64 << 20) + 1;
/// An index larger than this is refused before it is read (it would describe
/// some 500 TiB).
pub const MAX_INDEX_BYTES: u64 = 1 << 30;

const MAGIC: &[u8] = b"lazyfs-index\n";
const VERSION: u32 = 1;

/// An object's name: the blake3 of its bytes.
pub type ObjectName = [u8; 32];

/// One file as the index has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub hashes: FileHashes,
    pub objects: Vec<ObjectName>,
}

/// A decoded, checked index.
#[derive(Debug)]
pub struct Index {
    /// The hex blake3 of its bytes: what `lazyfs.done.BLAKE3` and the images'
    /// `lazyfs.pushed` name it by.
    pub id: String,
    pub object_size: u64,
    /// Key prefix of the objects in the bucket.
    pub objects: String,
    /// blake3 of the image files the push read.
    pub images: [u8; 32],
    /// "IMGDIR on HOST".
    pub origin: String,
    pub recording: Option<Recording>,
    files: HashMap<Vec<u8>, Entry>,
}

/// Part of a read that one object answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub object: ObjectName,
    /// The bytes wanted, as offsets in the object.
    pub range: Range<u64>,
    /// They are the whole object (so it can be checked against its name).
    pub whole: bool,
    /// Where they go, as an offset in the read's buffer.
    pub at: usize,
}

impl Index {
    /// Decodes an index's bytes, refusing anything inconsistent: it comes
    /// from the network.
    pub fn decode(bytes: &[u8]) -> Result<Index, String> {
        let body = bytes.strip_prefix(MAGIC).ok_or("no `lazyfs-index` line")?;
        let proto = IndexProto::decode(body).map_err(|e| e.to_string())?;
        if proto.version != VERSION || proto.chunk_size != CHUNK_SIZE {
            return Err(format!(
                "version {} with {}-byte chunks; this lazyfs reads version {VERSION} with {CHUNK_SIZE}-byte chunks",
                proto.version, proto.chunk_size
            ));
        }
        let object_size = proto.object_size;
        if !OBJECT_SIZES.contains(&object_size) || !object_size.is_multiple_of(CHUNK_SIZE) {
            return Err(format!("objects of {object_size} bytes"));
        }
        let images = proto.images.as_slice().try_into().map_err(|_| "an images hash that is not 32 bytes")?;
        if let Some(recording) = &proto.recording {
            recording::check(recording).map_err(|reason| format!("its recording: {reason}"))?;
        }
        let mut files = HashMap::with_capacity(proto.files.len());
        for file in proto.files {
            let name = || String::from_utf8_lossy(&file.path).into_owned();
            let whole =
                file.blake3.as_slice().try_into().map_err(|_| format!("{}: a hash that is not 32 bytes", name()))?;
            if file.chunk_blake3.len() as u64 != file.size.div_ceil(CHUNK_SIZE).saturating_mul(32) {
                return Err(format!("{}: wrong number of chunk hashes", name()));
            }
            if file.objects.len() as u64 != file.size.div_ceil(object_size).saturating_mul(32) {
                return Err(format!("{}: wrong number of objects", name()));
            }
            let entry = Entry {
                size: file.size,
                mode: file.mode,
                uid: file.uid,
                gid: file.gid,
                mtime_ns: file.mtime_ns,
                hashes: FileHashes { size: file.size, whole, chunks: split32(&file.chunk_blake3) },
                objects: split32(&file.objects),
            };
            if files.insert(file.path.clone(), entry).is_some() {
                return Err(format!("{} is listed twice", name()));
            }
        }
        Ok(Index {
            id: blake3::hash(bytes).to_hex().to_string(),
            object_size,
            objects: proto.objects,
            images,
            // Shown in messages and logs: the store's words, escaped.
            origin: crate::ui::printable(&proto.origin),
            recording: proto.recording,
            files,
        })
    }

    /// The bytes of an index (files sorted by path, so the same push gives
    /// the same bytes).
    pub fn encode(mut proto: IndexProto) -> Vec<u8> {
        proto.version = VERSION;
        proto.chunk_size = CHUNK_SIZE;
        proto.files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut bytes = MAGIC.to_vec();
        proto.encode(&mut bytes).expect("Vec grows");
        bytes
    }

    /// The file at `path` on the old host.
    pub fn get(&self, path: &Path) -> Option<&Entry> {
        self.files.get(path.as_os_str().as_bytes())
    }

    /// Every file's entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.files.values()
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The key of object `name` in the bucket.
    pub fn object_key(&self, name: &ObjectName) -> String {
        object_key(&self.objects, name)
    }

    /// Which objects answer bytes `range` of `entry`, and which of their bytes.
    pub fn pieces(&self, entry: &Entry, range: Range<u64>) -> Vec<Piece> {
        pieces(self.object_size, entry, range)
    }
}

/// The key of object `name` below `objects`.
pub fn object_key(objects: &str, name: &ObjectName) -> String {
    format!("{objects}{}", blake3::Hash::from_bytes(*name).to_hex())
}

fn pieces(object_size: u64, entry: &Entry, range: Range<u64>) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut offset = range.start;
    while offset < range.end.min(entry.size) {
        let index = offset / object_size;
        let object = index * object_size..((index + 1) * object_size).min(entry.size);
        let end = range.end.min(object.end);
        out.push(Piece {
            object: entry.objects[index as usize],
            range: offset - object.start..end - object.start,
            whole: offset == object.start && end == object.end,
            at: (offset - range.start) as usize,
        });
        offset = end;
    }
    out
}

fn split32(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect()
}

/// A file's hashes for the index, from what `read_at` gives for its `size`
/// bytes (read once, in order): per chunk, whole, and per object.
pub fn hash_file(
    size: u64,
    object_size: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<(FileHashes, Vec<ObjectName>)> {
    let mut objects = Vec::with_capacity(size.div_ceil(object_size) as usize);
    let mut object = blake3::Hasher::new();
    let hashes = crate::manifest::hash_chunks(size, |offset, buf| {
        read_at(offset, buf)?;
        object.update(buf);
        let end = offset + buf.len() as u64;
        if end.is_multiple_of(object_size) || end == size {
            objects.push(*object.finalize().as_bytes());
            object.reset();
        }
        Ok(())
    })?;
    Ok((hashes, objects))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u64, object_size: u64) -> Entry {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let (hashes, objects) = hash_file(size, object_size, |offset, buf| {
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        Entry { size, mode: 0o100644, uid: 0, gid: 0, mtime_ns: 0, hashes, objects }
    }

    #[test]
    fn objects_are_named_by_their_bytes() {
        let object_size = 4 * CHUNK_SIZE;
        let size = 9 * CHUNK_SIZE + 5;
        let e = entry(size, object_size);
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(e.objects.len(), 3);
        for (i, name) in e.objects.iter().enumerate() {
            let start = i * object_size as usize;
            let end = (start + object_size as usize).min(data.len());
            assert_eq!(name, blake3::hash(&data[start..end]).as_bytes(), "object {i}");
        }
        assert_eq!(e.hashes.whole, *blake3::hash(&data).as_bytes());
        assert_eq!(e.hashes.chunks.len(), 10);
    }

    #[test]
    fn a_read_maps_onto_objects() {
        let object_size = 4 * CHUNK_SIZE;
        let e = entry(9 * CHUNK_SIZE + 5, object_size);
        let c = CHUNK_SIZE;
        // One chunk inside the first object: a ranged GET.
        assert_eq!(
            pieces(object_size, &e, c..2 * c),
            vec![Piece { object: e.objects[0], range: c..2 * c, whole: false, at: 0 }]
        );
        // Across the boundary: the end of one object, the whole next one, the start of the last.
        let got = pieces(object_size, &e, 3 * c..8 * c + 1);
        assert_eq!(
            got,
            vec![
                Piece { object: e.objects[0], range: 3 * c..4 * c, whole: false, at: 0 },
                Piece { object: e.objects[1], range: 0..4 * c, whole: true, at: c as usize },
                Piece { object: e.objects[2], range: 0..1, whole: false, at: 5 * c as usize },
            ]
        );
        // The short last object, whole.
        assert!(pieces(object_size, &e, 8 * c..9 * c + 5)[0].whole);
        assert!(pieces(object_size, &e, 0..0).is_empty());
    }

    #[test]
    fn an_index_round_trips_and_damage_is_refused() {
        let object_size = 4 * CHUNK_SIZE;
        let e = entry(5 * CHUNK_SIZE, object_size);
        let file = IndexFile {
            path: b"/srv/a b".to_vec(),
            size: e.size,
            mode: 0o100600,
            blake3: e.hashes.whole.to_vec(),
            chunk_blake3: e.hashes.chunks.concat(),
            objects: e.objects.concat(),
            ..Default::default()
        };
        let proto = IndexProto {
            object_size,
            objects: DEFAULT_OBJECTS.into(),
            images: vec![7; 32],
            files: vec![file.clone()],
            ..Default::default()
        };
        let bytes = Index::encode(proto.clone());
        let index = Index::decode(&bytes).unwrap();
        let got = index.get(Path::new("/srv/a b")).unwrap();
        assert_eq!((got.size, got.mode, &got.objects), (e.size, 0o100600, &e.objects));
        assert!(index.object_key(&e.objects[0]).starts_with("lazyfs-chunks/"));

        let damaged = |change: &dyn Fn(&mut IndexProto)| {
            let mut proto = proto.clone();
            change(&mut proto);
            Index::decode(&Index::encode(proto)).unwrap_err()
        };
        assert!(damaged(&|p| p.files[0].objects.pop().map(|_| ()).unwrap_or(())).contains("wrong number of objects"));
        assert!(damaged(&|p| p.files[0].size += 1).contains("wrong number of chunk hashes"));
        assert!(damaged(&|p| p.object_size = CHUNK_SIZE + 1).contains("objects of"));
        assert!(damaged(&|p| p.files.push(file.clone())).contains("listed twice"));
        assert!(damaged(&|p| p.images.pop().map(|_| ()).unwrap_or(())).contains("images hash"));
        assert!(Index::decode(b"garbage").unwrap_err().contains("lazyfs-index"));
    }
}
