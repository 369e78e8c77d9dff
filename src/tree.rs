//! The old host's directory below `--subtree`, served whole: what each
//! listing of it said (persisted in the cache dir's `tree`, so a remount or a
//! process taking the mount over rebuilds the same tree without the source),
//! which directories are being listed now, and the owner (`FetchFile`) of
//! each file a listing finds.
//!
//! The namespace decides where names go; this module knows what the source
//! (or the manifest made on the old host) said of them.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use prost::Message;

use crate::fetch::restore::{FileSpec, open_file};
use crate::fetch::{FetchFile, Phase};
use crate::manifest::Manifest;
use crate::namespace::Ino;
use crate::source::{DirEntry, SourceAttrs};
use crate::store::journal::proto::{EntryAttrs, ListedEntry, Listing, TreeRecord, tree_record};
use crate::store::journal::{self, Owner, Records};
use crate::store::{CacheDir, Presence, Store, StoreError};

/// The log's name in the cache dir.
pub const LOG_NAME: &str = "tree";

/// What a listing of one directory said.
#[derive(Debug, Clone)]
pub enum Listed {
    Entries(Vec<DirEntry>),
    /// It could not be listed for good (gone, no longer a directory): why.
    Missing(String),
}

/// The tree of one mount.
pub struct Tree {
    /// `--subtree`: where the mount's root is on the source.
    pub subtree: PathBuf,
    /// The root's own attributes (from the log, the manifest or the source).
    pub root: Option<SourceAttrs>,
    log: Mutex<File>,
    /// Appended since the last sync.
    dirty: AtomicBool,
    /// Listings read back from the log, by directory (relative to the
    /// root): each merged when its directory is first needed.
    persisted: Mutex<HashMap<Vec<u8>, Listed>>,
    /// Directories being listed now: a second asker waits for the first.
    listing: Mutex<HashSet<Ino>>,
    listed: Condvar,
    files: TreeFiles,
    /// Hard links found so far: what tells one file (see [`LinkKey`]) to the
    /// node of the first name.
    links: Mutex<HashMap<LinkKey, Ino>>,
}

/// What two names of one file (a hard link) share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LinkKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    /// The manifest's blake3 of its bytes, if it has them.
    hash: Option<[u8; 32]>,
}

/// How a file found in the tree gets its owner.
pub struct TreeFiles {
    pub store: Arc<Store>,
    /// What the journal says of files by path: trusted only for files whose
    /// listing comes from the log (the bytes were fetched under it).
    pub records: Mutex<Records>,
    pub manifest: Option<Arc<Manifest>>,
}

impl Tree {
    /// The tree of a mount whose cache dir is `dir`, owned by `owner`: the
    /// log read back (a damaged record ends what is kept, with a warning)
    /// and written afresh; `afresh` drops it (the cache holds another
    /// checkpoint's files, or nothing trusted).
    pub fn open(
        dir: &CacheDir,
        owner: &Owner,
        afresh: bool,
        subtree: &Path,
        files: TreeFiles,
    ) -> Result<Tree, StoreError> {
        let (mut persisted, mut root) = (HashMap::new(), None);
        let mut kept = Vec::new();
        if !afresh {
            match dir.read(LOG_NAME) {
                Ok(bytes) => {
                    if let Err(why) = read_log(&bytes, owner, &mut kept) {
                        log::warn!(
                            "{}: {why}: the directories after it are listed again",
                            dir.join(LOG_NAME).display()
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { path: dir.join(LOG_NAME), source: e }),
            }
        }
        let header = TreeRecord { kind: Some(tree_record::Kind::Header(journal::owner_header(owner))) };
        let mut bytes = journal::encode(&header);
        for record in &kept {
            bytes.extend(journal::encode(record));
            match &record.kind {
                Some(tree_record::Kind::Listing(listing)) => {
                    persisted.insert(listing.dir.clone(), from_listing(listing));
                }
                Some(tree_record::Kind::Root(attrs)) => root = Some(from_attrs(attrs)),
                _ => {}
            }
        }
        dir.write_atomic(LOG_NAME, &bytes)?;
        let log = dir.open_append(LOG_NAME)?;
        Ok(Tree {
            subtree: subtree.to_path_buf(),
            root,
            log: Mutex::new(log),
            dirty: AtomicBool::new(false),
            persisted: Mutex::new(persisted),
            listing: Mutex::new(HashSet::new()),
            listed: Condvar::new(),
            files,
            links: Mutex::new(HashMap::new()),
        })
    }

    /// Keeps the root's attributes (read from the source at mount).
    pub fn set_root(&mut self, attrs: SourceAttrs) -> Result<(), StoreError> {
        self.root = Some(attrs);
        self.append(&TreeRecord { kind: Some(tree_record::Kind::Root(to_attrs(&attrs))) })
    }

    /// The listing the log kept of `dir` (relative to the root), if any: taken.
    pub fn take_persisted(&self, dir: &Path) -> Option<Listed> {
        self.persisted.lock().unwrap_or_else(PoisonError::into_inner).remove(dir.as_os_str().as_bytes())
    }

    /// Appends what the source said of `dir` to the log (made durable by [`Tree::sync`]).
    pub fn keep(&self, dir: &Path, listed: &Listed) -> Result<(), StoreError> {
        let mut listing = Listing { dir: dir.as_os_str().as_bytes().to_vec(), ..Listing::default() };
        match listed {
            Listed::Entries(entries) => {
                listing.entries = entries
                    .iter()
                    .map(|e| ListedEntry {
                        name: e.name.as_bytes().to_vec(),
                        attrs: Some(to_attrs(&e.attrs)),
                        target: e.target.as_ref().map(|t| t.as_bytes().to_vec()).unwrap_or_default(),
                    })
                    .collect()
            }
            Listed::Missing(why) => listing.missing = why.clone(),
        }
        self.append(&TreeRecord { kind: Some(tree_record::Kind::Listing(listing)) })
    }

    fn append(&self, record: &TreeRecord) -> Result<(), StoreError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.write_all(&journal::encode(record)).map_err(|e| self.io(e))?;
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: PathBuf::from(LOG_NAME), source }
    }

    /// Makes every listing kept so far durable: before a local change that
    /// may depend on one is acknowledged, and at unmount.
    pub fn sync(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, Ordering::Relaxed) {
            let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = log.sync_data() {
                self.dirty.store(true, Ordering::Relaxed);
                return Err(self.io(e));
            }
        }
        Ok(())
    }

    /// Claims the listing of `dir`: true for the first asker; a later one
    /// waits until the first is done, and gets false.
    pub fn begin(&self, dir: Ino) -> bool {
        let mut listing = self.listing.lock().unwrap_or_else(PoisonError::into_inner);
        if listing.insert(dir) {
            return true;
        }
        while listing.contains(&dir) {
            listing = self.listed.wait(listing).unwrap_or_else(PoisonError::into_inner);
        }
        false
    }

    /// The listing of `dir` claimed by [`Tree::begin`] is done (merged or not).
    pub fn end(&self, dir: Ino) {
        self.listing.lock().unwrap_or_else(PoisonError::into_inner).remove(&dir);
        self.listed.notify_all();
    }

    /// What the namespace should show for an entry at `path` (relative to
    /// the root): the source's attributes, or the manifest's (exact times,
    /// inode number) when the manifest has the same kind of entry with the
    /// same size and mtime; and whether they are the manifest's.
    pub fn attrs_of(&self, path: &Path, listed: &SourceAttrs) -> (SourceAttrs, bool) {
        let original = self.subtree.join(path);
        let known = self.files.manifest.as_ref().and_then(|m| m.attrs(&original));
        match known {
            Some(known) if known.kind() == listed.kind() && same_content(&known, listed) => (known, true),
            _ => (*listed, false),
        }
    }

    /// The manifest's inode number for an entry, kept only on the
    /// subtree's own filesystem (numbers of two filesystems may collide).
    pub fn manifest_ino(&self, attrs: &SourceAttrs) -> Option<Ino> {
        let root_dev = self.root.and_then(|r| r.dev_ino).map(|(dev, _)| dev);
        attrs.dev_ino.filter(|(dev, _)| Some(*dev) == root_dev).and_then(|(_, ino)| crate::namespace::kept_ino(ino))
    }

    /// The node noted for an earlier name of the same file (a hard link) as
    /// the entry at `path` (relative to the root), if any (it may be gone
    /// since: the caller checks).
    pub fn hard_link(&self, path: &Path, attrs: &SourceAttrs) -> Option<Ino> {
        let key = self.link_key(path, attrs)?;
        self.links.lock().unwrap_or_else(PoisonError::into_inner).get(&key).copied()
    }

    /// Node `ino` is the file at `path` (relative to the root): later names
    /// of the same file become names of it.
    pub fn note_link(&self, path: &Path, attrs: &SourceAttrs, ino: Ino) {
        if let Some(key) = self.link_key(path, attrs) {
            self.links.lock().unwrap_or_else(PoisonError::into_inner).insert(key, ino);
        }
    }

    /// What tells the file at `path` (relative to the root) from others, if it
    /// may have other names: its device and inode number with a link count
    /// above 1, and what its bytes are known by. Numbers alone are not enough:
    /// a manifest is untrusted input, and overlayfs without `xino` gives two
    /// files of two layers one number; names whose sizes, mtimes or manifest
    /// hashes differ are never one file.
    fn link_key(&self, path: &Path, attrs: &SourceAttrs) -> Option<LinkKey> {
        let (dev, ino) = attrs.dev_ino.filter(|_| attrs.nlink.is_some_and(|n| n > 1))?;
        let hash = self.files.manifest.as_ref().and_then(|m| m.get(&self.subtree.join(path))).map(|h| h.whole);
        Some(LinkKey { dev, ino, size: attrs.size, mtime_ns: attrs.mtime_ns, hash })
    }

    /// The owner of the file at `path` (relative to the root) the listing
    /// found with `attrs`. The journal's record of it counts only when the
    /// listing is the one its bytes were fetched under (`from_log`). One that
    /// cannot be served is `failed`, never left out.
    pub fn make_file(&self, path: &Path, attrs: &SourceAttrs, from_log: bool) -> FetchFile {
        let original = self.subtree.join(path);
        let files = &self.files;
        let record = match from_log {
            true => {
                files.records.lock().unwrap_or_else(PoisonError::into_inner).remove(original.as_os_str().as_bytes())
            }
            false => None,
        };
        let expected = files.manifest.as_ref().and_then(|m| m.get(&original)).cloned();
        let spec = FileSpec {
            path: original.clone(),
            source_path: original.clone(),
            size: attrs.size,
            expected: expected.clone(),
            image_order: u64::MAX,
            listed: Some(attrs.stat()),
            written: false,
        };
        let refused = match (&files.manifest, &expected) {
            (Some(m), None) if let Some((out, why)) = m.left_out(&original) => Some(format!(
                "{}: not in the manifest, which left out {} ({why}): not served; make the manifest as a user \
                 who may read it (root)",
                original.display(),
                out.display()
            )),
            (Some(m), None) if m.covers(&original) => {
                Some(format!("{}: not in the manifest (made on the source after it): not served", original.display()))
            }
            (_, Some(e)) if e.size != attrs.size => Some(format!(
                "{}: the manifest records {} bytes, the source {}: changed since the manifest, not served",
                original.display(),
                e.size,
                attrs.size
            )),
            _ => None,
        };
        let made = match refused {
            Some(reason) => Err(reason),
            // Too large, or no room for its spill file (out of inodes): still shown, failed.
            None => open_file(&files.store, spec, record.as_ref()).map_err(|e| e.to_string()),
        };
        made.unwrap_or_else(|reason| failed_file(&files.store, &original, reason))
    }
}

/// A file that is not served: every read of it fails with `reason`. Nothing
/// is made for it in the cache dir (which may have no room left).
pub fn failed_file(store: &Store, original: &Path, reason: String) -> FetchFile {
    log::error!("{reason}");
    let spec = FileSpec {
        path: original.to_path_buf(),
        source_path: original.to_path_buf(),
        size: 0,
        expected: None,
        image_order: u64::MAX,
        listed: None,
        written: false,
    };
    FetchFile::new(spec, store.unmade_spill(original), 0, Presence::new(0), Phase::Failed(reason.into()))
}

/// Whether two looks at an entry show the same content: same size and
/// whole-second mtime (directories' change with their entries: kind alone).
fn same_content(a: &SourceAttrs, b: &SourceAttrs) -> bool {
    a.kind() == libc::S_IFDIR || a.stat() == b.stat()
}

/// Reads the log's records after its header into `kept`; stops at a damaged
/// record (what came before stands) or another owner's header (nothing).
fn read_log(bytes: &[u8], owner: &Owner, kept: &mut Vec<TreeRecord>) -> Result<(), String> {
    let mut first = true;
    for body in journal::frames(bytes) {
        let record = TreeRecord::decode(body?).map_err(|e| format!("an unreadable record ({e})"))?;
        match (first, &record.kind) {
            (true, Some(tree_record::Kind::Header(h))) if same_checkpoint(h, owner) => {}
            (true, _) => return Err("the listings of another checkpoint or source".into()),
            (false, Some(tree_record::Kind::Header(_)) | None) => return Err("a record out of place".into()),
            (false, _) => kept.push(record),
        }
        first = false;
    }
    Ok(())
}

/// Whether the log's header is of the checkpoint `owner` holds, listed below
/// the same subtree (its listings are of that subtree's directories).
fn same_checkpoint(header: &crate::store::journal::proto::Header, owner: &Owner) -> bool {
    let key = |i: &crate::identity::CacheIdentity| (i.images.clone(), i.subtree.clone());
    header.identity.as_ref().map(key) == owner.identity.as_ref().map(key)
}

fn from_listing(listing: &Listing) -> Listed {
    if !listing.missing.is_empty() {
        return Listed::Missing(listing.missing.clone());
    }
    Listed::Entries(
        listing
            .entries
            .iter()
            // Names were checked when listed; a log edited since is not trusted more.
            .filter(|e| crate::source::is_safe_name(&e.name))
            .map(|e| DirEntry {
                name: OsString::from_vec(e.name.clone()),
                attrs: e.attrs.as_ref().map(from_attrs).unwrap_or_default(),
                target: (e.attrs.as_ref().is_some_and(|a| a.mode & libc::S_IFMT == libc::S_IFLNK))
                    .then(|| OsString::from_vec(e.target.clone())),
            })
            .collect(),
    )
}

pub fn to_attrs(a: &SourceAttrs) -> EntryAttrs {
    EntryAttrs {
        mode: a.mode,
        size: a.size,
        uid: a.uid,
        gid: a.gid,
        atime_ns: a.atime_ns,
        mtime_ns: a.mtime_ns,
        ctime_ns: a.ctime_ns,
        dev: a.dev_ino.map(|(dev, _)| dev),
        ino: a.dev_ino.map(|(_, ino)| ino),
        nlink: a.nlink,
    }
}

pub fn from_attrs(a: &EntryAttrs) -> SourceAttrs {
    SourceAttrs {
        mode: a.mode,
        size: a.size,
        uid: a.uid,
        gid: a.gid,
        atime_ns: a.atime_ns,
        mtime_ns: a.mtime_ns,
        ctime_ns: a.ctime_ns,
        dev_ino: a.dev.zip(a.ino),
        nlink: a.nlink,
    }
}
