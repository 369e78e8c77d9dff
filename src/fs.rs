//! The filesystem core: what each operation means for lazyfs, over the
//! namespace, the fetcher and the spill files. Knows nothing of FUSE: the
//! adapter in `fuse.rs` turns these results into replies and errnos.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use crate::fetch::{FetchError, Fetcher, Phase};
use crate::namespace::{Ino, LocalAttrs, Meta, Namespace, Node, NodeKind, Origin, ROOT_INO};
use crate::source::{DirEntry, SourceAttrs};
use crate::store::journal::proto::{Local, LocalOp};
use crate::store::local::LocalFiles;
use crate::tree::{Listed, Tree};

/// An operation's failure: the errno the caller gets, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    pub errno: i32,
    pub message: String,
    /// The operation needs this directory of the tree listed first (it is
    /// then tried again): never seen outside the core.
    unlisted: Option<Ino>,
}

impl FsError {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError { errno, message: message.into(), unlisted: None }
    }

    /// Directory `dir` must be listed before the operation can go on.
    fn unlisted(dir: Ino) -> Self {
        FsError { errno: libc::EAGAIN, message: "the directory is not listed yet".into(), unlisted: Some(dir) }
    }
}

thread_local! {
    /// Set while an operation runs that must not wait for a listing (see
    /// [`Filesystem::then`]).
    static NO_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `op` on this thread without ever waiting for a listing: a listing
/// it needs fails it (with the directory to list) instead.
fn without_waiting<T>(op: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_WAIT.set(self.0);
        }
    }
    let _restore = Restore(NO_WAIT.replace(true));
    op()
}

impl From<FetchError> for FsError {
    fn from(e: FetchError) -> Self {
        FsError::new(e.errno, e.message.to_string())
    }
}

impl From<crate::store::StoreError> for FsError {
    fn from(e: crate::store::StoreError) -> Self {
        FsError::new(e.errno(), e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
}

#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
    /// What the images say until the source's listing of its directory
    /// tells its owner and times: the kernel should not keep it.
    pub provisional: bool,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// What a setattr changes; `None` leaves a field as it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    /// A truncate by a caller without `CAP_FSETID`: set-ID bits go too.
    pub kill_set_ids: bool,
}

pub struct StatFs {
    pub bytes_total: u64,
    pub files: u64,
}

/// What a new [`Filesystem`] makes again.
pub struct Replay<'a> {
    /// The local changes a journal holds, made again in order over the
    /// checkpoint's tree.
    pub changes: &'a [Local],
    /// The open handles per inode the kernel holds already (a successor's
    /// predecessor opened them): a file unlinked but open stays.
    pub held_open: &'a HashMap<Ino, u32>,
}

/// What the checkpoint says of a file the mount serves.
pub struct ServedSpec {
    pub path: PathBuf,
    pub mode: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct FsConfig {
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
    /// The times the checkpoint's files and directories show: the cache
    /// dir's first mount, the same at every mount.
    pub created: SystemTime,
    /// Other users may use the mount (`allow_other`): a node of the images
    /// is shown to nobody before its directory's listing gives its owner and
    /// mode (made-up ones could let another user through a private directory).
    pub shared: bool,
}

/// Who makes a new node: its owner.
#[derive(Debug, Clone, Copy)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
}

/// Whether [`Filesystem::apply`] makes a change or only checks it can be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Check,
    Make,
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
/// Directories the background walk of the tree lists in one pipeline.
const WALK_BATCH: usize = 64;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
const XATTR_CREATE: i32 = libc::XATTR_CREATE;
const XATTR_REPLACE: i32 = libc::XATTR_REPLACE;

/// The checkpoint's files plus the local layer: names, attributes and new
/// files changed through the mount, each change journaled (and the journal
/// fsynced) before it is made and acknowledged. The source is never written.
pub struct Filesystem {
    ns: Arc<RwLock<Namespace>>,
    /// The local changes made so far (replayed and new), in order, each
    /// with what it touched (to leave out, compacted, what no longer counts).
    changes: Mutex<Vec<(Local, Footprint)>>,
    /// With `--subtree` (and not `--recorded-only`): the source's tree
    /// below it, listed as it is needed.
    tree: Option<Tree>,
    local: LocalFiles,
    /// Open handles per inode: an unlinked file lives until its last close.
    opens: Mutex<HashMap<Ino, u32>>,
    fetcher: Fetcher,
    config: FsConfig,
    /// Operations that wait for a listing, off the caller's thread.
    waiting: crate::deferred::Deferred,
}

/// Threads at most for operations waiting for a listing: each waits for
/// one pipeline of the listing lane, bounded by the readers' deadline.
const WAITING_THREADS: usize = 64;

pub type ReadReply = Box<dyn FnOnce(Result<&[u8], FsError>) + Send>;
pub type WriteReply = Box<dyn FnOnce(Result<u32, FsError>) + Send>;
pub type AttrReply = Box<dyn FnOnce(Result<Attr, FsError>) + Send>;
pub type DirReply = Box<dyn FnOnce(Result<Vec<(Ino, Kind, OsString)>, FsError>) + Send>;

/// The nodes a local change needed and changed, as it was made.
#[derive(Debug, Clone, Default)]
struct Footprint {
    /// The nodes it cannot be made again without: those its paths named on
    /// the way, and the node it made (not a file a rename replaced: without
    /// it the rename ends the same).
    touched: Vec<Ino>,
    /// The nodes it made, removed, moved, linked or changed; `None`: it did
    /// not apply (it is kept as it is).
    changed: Option<Vec<Ino>>,
}

impl Footprint {
    /// What `record` is about to touch in `ns`; [`Footprint::made`] completes it.
    fn before(ns: &Namespace, record: &Local) -> Footprint {
        let (mut touched, at) = Filesystem::resolve_all(ns, &record.path);
        let (mut on_to, target) = Filesystem::resolve_all(ns, &record.to);
        let replaces = record.op() == LocalOp::Rename && record.flags != RENAME_EXCHANGE;
        if replaces && target.is_some() && target != at {
            on_to.pop();
        }
        touched.extend(on_to);
        let changed = match record.op() {
            LocalOp::File | LocalOp::Dir | LocalOp::Symlink | LocalOp::Fifo => Vec::new(),
            LocalOp::Rename => at.into_iter().chain(target).collect(),
            _ => at.into_iter().collect(),
        };
        Footprint { touched, changed: Some(changed) }
    }

    /// The change applied (`made`: the node it made), or did not (`None`).
    fn made(mut self, applied: Option<Option<Ino>>) -> Footprint {
        match applied {
            Some(made) => {
                self.touched.extend(made);
                self.changed.as_mut().expect("before").extend(made);
            }
            None => self.changed = None,
        }
        self
    }
}

fn not_found(ino: Ino) -> FsError {
    FsError::new(libc::ENOENT, format!("no inode {ino}"))
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn from_nanos(ns: i64) -> SystemTime {
    match u64::try_from(ns) {
        Ok(n) => SystemTime::UNIX_EPOCH + Duration::from_nanos(n),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs()),
    }
}

fn bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

impl Filesystem {
    /// `specs[i]` describes fetcher file `i`; `replay` what a journal holds
    /// and the kernel still has open.
    pub fn new(
        mut ns: Namespace,
        specs: Vec<ServedSpec>,
        fetcher: Fetcher,
        local: LocalFiles,
        replay: Replay<'_>,
        config: FsConfig,
        tree: Option<Tree>,
    ) -> Result<Self, crate::store::StoreError> {
        let created = config.created;
        // What the images say, until a listing (or the manifest) says more.
        for node in ns.nodes_mut() {
            node.meta = Meta {
                perm: node.meta.perm,
                uid: config.uid,
                gid: config.gid,
                atime: created,
                mtime: created,
                ctime: created,
                ..Meta::default()
            };
            if let NodeKind::File(index) = node.kind {
                node.meta.perm = specs[index].mode & 0o7777;
            }
        }
        if let Some(root) = tree.as_ref().and_then(|t| t.root) {
            let pinned = ns.is_pinned(ROOT_INO);
            if let Some(node) = ns.node_mut(ROOT_INO) {
                apply_source_attrs(&mut node.meta, &root, !pinned);
            }
        }
        fetcher.set_unlisted_dirs(if tree.is_some() { ns.unlisted_count() } else { 0 });
        let fs = Filesystem {
            ns: Arc::new(RwLock::new(ns)),
            changes: Mutex::new(Vec::with_capacity(replay.changes.len())),
            tree,
            local,
            opens: Mutex::new(replay.held_open.clone()),
            fetcher,
            config,
            waiting: crate::deferred::Deferred::new(WAITING_THREADS, "lazyfs-listing-wait"),
        };
        for (seq, change) in replay.changes.iter().enumerate() {
            if change.op() == LocalOp::File {
                fs.local.reopen(change.id)?;
            }
            let mut footprint = Footprint::default();
            let applied = fs.listing_first(|fs| {
                let mut ns = fs.ns_mut();
                footprint = Footprint::before(&ns, change);
                fs.apply(&mut ns, change, seq as u64, Step::Make)
            });
            if let Err(e) = &applied {
                log::warn!("the journal's {:?} of {:?} does not apply: {e}", change.op(), os(&change.path));
            }
            let footprint = footprint.made(applied.ok());
            fs.changes.lock().unwrap_or_else(PoisonError::into_inner).push((change.clone(), footprint));
        }
        fs.local.sweep()?;
        Ok(fs)
    }

    /// Runs `op`, listing first each directory of the tree it needs listed
    /// (and running it again).
    fn listing_first<T>(&self, mut op: impl FnMut(&Self) -> Result<T, FsError>) -> Result<T, FsError> {
        // Each try lists one more directory at least: a path is not deeper than this.
        for _ in 0..4096 {
            match op(self) {
                Err(FsError { unlisted: Some(dir), .. }) => self.ensure_listed(dir)?,
                other => return other,
            }
        }
        Err(FsError::new(libc::ELOOP, "too many directories to list on the way"))
    }

    /// Lists directory `dir` of the tree unless it is listed already (from
    /// the listings the cache dir kept, else the source, for a reader who
    /// waits); waits for a listing of it already under way.
    pub fn ensure_listed(&self, dir: Ino) -> Result<(), FsError> {
        let Some(tree) = &self.tree else { return Ok(()) };
        for _ in 0..3 {
            if !self.namespace().is_unlisted(dir) {
                return Ok(());
            }
            if NO_WAIT.get() {
                return Err(FsError::unlisted(dir));
            }
            if tree.begin(dir) {
                return self.list(tree, &[dir], true);
            }
        }
        Err(FsError::new(libc::EIO, "the directory could not be listed"))
    }

    /// For a process taking a live mount over: lists again, from the
    /// listings the cache dir kept (never the source), every directory its
    /// predecessor listed, so every node the kernel may ask for by number
    /// exists (numbered by its origin, as it was).
    pub fn relist_kept(&self) {
        let Some(tree) = &self.tree else { return };
        loop {
            let unlisted: Vec<(Ino, PathBuf)> = {
                let ns = self.namespace();
                ns.unlisted().filter_map(|dir| Some((dir, ns.source_path(dir)?.to_path_buf()))).collect()
            };
            let mut merged = 0;
            for (dir, path) in unlisted {
                if tree.begin(dir) {
                    if let Some(listed) = tree.take_persisted(&path) {
                        self.merge(tree, dir, &path, listed, true);
                        merged += 1;
                    }
                    tree.end(dir);
                }
            }
            // A listing shows directories of its own: their listings next.
            if merged == 0 {
                return;
            }
        }
    }

    /// Directories of the tree that could not be listed for good: their
    /// original paths, paths in the mount, and why.
    pub fn failed_dirs(&self) -> Vec<(PathBuf, PathBuf, String)> {
        let Some(tree) = &self.tree else { return Vec::new() };
        let ns = self.namespace();
        let mut failed: Vec<_> = ns
            .failed()
            .map(|(dir, why)| {
                let at = ns.mount_path(dir);
                (tree.subtree.join(&at), at, why.to_string())
            })
            .collect();
        failed.sort();
        failed
    }

    /// Directories of the tree not listed yet.
    pub fn unlisted_dirs(&self) -> usize {
        match self.tree {
            Some(_) => self.namespace().unlisted_count(),
            None => 0,
        }
    }

    /// Lists directories of the tree in the background, for as long as the
    /// mount lives: first those holding files of the images (until then
    /// their owners and times are provisional), then, once prefetch of every
    /// file is asked for, all of them (each listing queues its files).
    pub fn walk_tree(self: &Arc<Self>) {
        if self.tree.is_none() {
            return;
        }
        let fs = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("lazyfs-tree".into())
            .spawn(move || {
                let mut failing = false;
                while let Some(fs) = fs.upgrade() {
                    let everything = fs.fetcher.prefetching_all();
                    let pause = match fs.list_some(WALK_BATCH, !everything) {
                        Ok(0) if everything => return,
                        Ok(0) => Some(Duration::from_millis(500)),
                        Ok(_) => None,
                        Err(e) => {
                            if !std::mem::replace(&mut failing, true) {
                                log::warn!("listing the tree: {e}; trying again");
                            }
                            Some(Duration::from_secs(1))
                        }
                    };
                    drop(fs);
                    if let Some(pause) = pause {
                        std::thread::sleep(pause);
                    }
                }
            })
            .expect("spawning the tree walker");
    }

    /// Lists some directories of the tree not listed yet (at most `max`;
    /// with `images_only`, only those holding nodes of the images), for a
    /// walk nobody waits on; how many it listed.
    fn list_some(&self, max: usize, images_only: bool) -> Result<usize, FsError> {
        let Some(tree) = &self.tree else { return Ok(0) };
        let mut unlisted: Vec<Ino> = {
            let ns = self.namespace();
            let holds_nodes =
                |dir: Ino| matches!(ns.node(dir).map(|n| &n.kind), Some(NodeKind::Dir(c)) if !c.is_empty());
            ns.unlisted().filter(|&dir| !images_only || holds_nodes(dir)).collect()
        };
        // Found first, listed first: the walk goes breadth first.
        unlisted.sort_unstable();
        unlisted.truncate(max);
        let claimed: Vec<Ino> = unlisted.into_iter().filter(|&dir| tree.begin(dir)).collect();
        let count = claimed.len();
        self.list(tree, &claimed, false).map(|()| count)
    }

    /// Lists `dirs` (claimed by [`Tree::begin`]) and merges what is found;
    /// each claim ends as soon as its directory is done (one the cache dir
    /// kept at once: a reader waiting for it does not wait for the source's).
    fn list(&self, tree: &Tree, dirs: &[Ino], for_reader: bool) -> Result<(), FsError> {
        let mut claims = Claims { tree, dirs: dirs.to_vec() };
        let paths: Vec<(Ino, PathBuf)> = {
            let ns = self.namespace();
            dirs.iter()
                .filter(|&&dir| ns.is_unlisted(dir))
                .filter_map(|&dir| Some((dir, ns.source_path(dir)?.to_path_buf())))
                .collect()
        };
        let mut from_source = Vec::new();
        for (dir, path) in paths {
            match tree.take_persisted(&path) {
                Some(listed) => {
                    self.merge(tree, dir, &path, listed, true);
                    claims.end(dir);
                }
                None => from_source.push((dir, path)),
            }
        }
        if from_source.is_empty() {
            return Ok(());
        }
        let on_source = from_source.iter().map(|(_, path)| tree.subtree.join(path)).collect();
        let listings =
            self.fetcher.list_dirs(on_source, for_reader).map_err(|e| FsError::new(libc::EIO, e.to_string()))?;
        let mut lost = None;
        for ((dir, path), listing) in from_source.into_iter().zip(listings) {
            let listed = match listing {
                Ok(entries) => Listed::Entries(entries),
                // The connection, not the directory: listed again later.
                Err(e) if e.is_connection_lost() => {
                    log::warn!("{e}");
                    lost.get_or_insert(e);
                    continue;
                }
                // Gone, no longer a directory, refused (permission denied):
                // what the images put in it is what it shows, and it is
                // reported failed, as a file would be; the log keeps it so,
                // for a remount's local changes to apply as they were made.
                Err(e) => Listed::Missing(e.to_string()),
            };
            tree.keep(&path, &listed)?;
            self.merge(tree, dir, &path, listed, false);
            claims.end(dir);
        }
        match lost {
            Some(e) => Err(FsError::new(libc::EIO, e.to_string())),
            None => Ok(()),
        }
    }

    /// Puts what a listing of directory `dir` (at `path` below the root)
    /// found into the namespace: a name the directory has already (the
    /// images', or the local layer's) stays as it is, taking the source's
    /// owner and times if it came from the images; any other becomes a node,
    /// a regular file with an owner of its own. `from_log`: the listing is
    /// the one the cache dir kept, under which its files' bytes were fetched.
    fn merge(&self, tree: &Tree, dir: Ino, path: &Path, listed: Listed, from_log: bool) {
        let entries = match listed {
            Listed::Entries(entries) => entries,
            Listed::Missing(why) => {
                log::error!("{why}: the directory shows only what the images and local changes put in it");
                let mut ns = self.ns_mut();
                ns.set_failed(dir, why);
                ns.set_unlisted(dir, false);
                self.count_unlisted(&ns);
                return;
            }
        };
        let entries: Vec<(DirEntry, SourceAttrs, bool)> = entries
            .into_iter()
            .map(|entry| {
                let (attrs, exact) = tree.attrs_of(&path.join(&entry.name), &entry.attrs);
                (entry, attrs, exact)
            })
            .collect();
        // Owners of the new files, made outside the namespace's lock (each
        // looks at its spill file).
        let new_files: Vec<bool> = {
            let ns = self.namespace();
            let Some(NodeKind::Dir(children)) = ns.node(dir).map(|n| &n.kind) else { return };
            entries
                .iter()
                .map(|(entry, attrs, _)| {
                    attrs.kind() == libc::S_IFREG
                        && !children.contains_key(&entry.name)
                        && Self::linked(&ns, tree, &path.join(&entry.name), attrs).is_none()
                })
                .collect()
        };
        let mut made: Vec<Option<crate::fetch::FetchFile>> = entries
            .iter()
            .zip(new_files)
            .map(|((entry, attrs, _), new)| new.then(|| tree.make_file(&path.join(&entry.name), attrs, from_log)))
            .collect();
        let mut ns = self.ns_mut();
        for ((entry, attrs, exact), file) in entries.into_iter().zip(made.drain(..)) {
            let name = entry.name.as_os_str();
            if let Some(ino) = ns.lookup(dir, name) {
                let pinned = ns.is_pinned(ino);
                let Some(node) = ns.node_mut(ino) else { continue };
                let from_images = matches!(node.origin, Origin::File | Origin::Source(_));
                // Another kind of file there now (a directory replaced by a
                // symlink): its mode and owner are not this node's.
                if from_images && same_kind(&node.kind, attrs.kind()) {
                    // A recorded file keeps the images' mode, a recorded directory its recorded one.
                    let perm = matches!(node.kind, NodeKind::Dir(_)) && !pinned;
                    apply_source_attrs(&mut node.meta, &attrs, perm);
                    // Its other names on the source (hard links) are names of it.
                    if matches!(node.kind, NodeKind::File(_)) {
                        tree.note_link(&path.join(name), &attrs, ino);
                    }
                }
                continue;
            }
            let wanted = exact.then(|| tree.manifest_ino(&attrs)).flatten();
            let mut meta = Meta::default();
            apply_source_attrs(&mut meta, &attrs, true);
            let origin = Origin::Source(path.join(name).into_boxed_path());
            match attrs.kind() {
                libc::S_IFREG => {
                    let at = path.join(name);
                    if let Some(first) = Self::linked(&ns, tree, &at, &attrs) {
                        ns.link(first, dir, name);
                        continue;
                    }
                    // The first name went meanwhile: this one is the file now.
                    let file = file.unwrap_or_else(|| tree.make_file(&at, &attrs, from_log));
                    let index = self.fetcher.add_file(file);
                    let ino = ns.add_as(wanted, dir, name, NodeKind::File(index), meta, Origin::File);
                    ns.set_file_ino(index, ino);
                    tree.note_link(&at, &attrs, ino);
                }
                libc::S_IFDIR => {
                    let ino = ns.add_as(wanted, dir, name, NodeKind::Dir(Default::default()), meta, origin);
                    ns.set_unlisted(ino, true);
                }
                libc::S_IFLNK => {
                    let Some(target) = entry.target else { continue };
                    ns.add_as(wanted, dir, name, NodeKind::Symlink(target), meta, origin);
                }
                libc::S_IFIFO => {
                    ns.add_as(wanted, dir, name, NodeKind::Fifo, meta, origin);
                }
                // Devices and sockets have no place in a data mount (it is nodev).
                _ => log::debug!("{}: a device or socket on the source: not shown", path.join(name).display()),
            }
        }
        ns.set_unlisted(dir, false);
        self.count_unlisted(&ns);
    }

    /// The node of an earlier name of the file at `at` (a hard link), if it
    /// is still there (its names may all have been removed since, and it
    /// closed: then this name is the file).
    fn linked(ns: &Namespace, tree: &Tree, at: &Path, attrs: &SourceAttrs) -> Option<Ino> {
        tree.hard_link(at, attrs).filter(|&first| ns.node(first).is_some())
    }

    /// Tells the fetcher how many directories of the tree are still to be
    /// listed (the source is needed until none is). Once none is, the old
    /// host may go: every listing is made durable first.
    fn count_unlisted(&self, ns: &Namespace) {
        let Some(tree) = &self.tree else { return };
        let unlisted = ns.unlisted_count();
        if unlisted == 0
            && let Err(e) = tree.sync()
        {
            log::error!("making the tree's listings durable: {e}");
        }
        self.fetcher.set_unlisted_dirs(unlisted);
    }

    /// Makes every listing kept so far durable (at unmount).
    pub fn sync_listings(&self) {
        if let Some(tree) = &self.tree
            && let Err(e) = tree.sync()
        {
            log::error!("making the tree's listings durable: {e}");
        }
    }

    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    pub fn namespace(&self) -> RwLockReadGuard<'_, Namespace> {
        self.ns.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn ns_mut(&self) -> RwLockWriteGuard<'_, Namespace> {
        self.ns.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn opens(&self) -> MutexGuard<'_, HashMap<Ino, u32>> {
        self.opens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// The requests of kernel connection `connection` whose changes the
    /// journal holds.
    pub fn requests_made(&self, connection: u64) -> std::collections::HashSet<u64> {
        let changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        changes.iter().filter(|(c, _)| c.connection == connection && connection != 0).map(|(c, _)| c.request).collect()
    }

    /// The local changes a replay needs to make the local layer as it is
    /// now, in order, and the data files of the files made here and gone
    /// since (for a journal rewritten at unmount, when nothing is open).
    /// Left out: all that made, moved, linked, changed and removed nodes
    /// made here and gone since, unless a change kept went through one of
    /// them (a file moved out of a directory since removed keeps that
    /// directory's making); an attribute change a later one on the same
    /// node overwrites whole.
    pub fn compacted_local_changes(&self) -> (Vec<Local>, Vec<u64>) {
        use std::collections::HashSet;
        let ns = self.namespace();
        let changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        let gone = |ino: &Ino| ns.node(*ino).is_none_or(|n| n.links.is_empty());
        let makes = |c: &Local| matches!(c.op(), LocalOp::File | LocalOp::Dir | LocalOp::Symlink | LocalOp::Fifo);
        let mut dead: HashSet<Ino> = changes
            .iter()
            .filter(|(c, _)| makes(c))
            .filter_map(|(_, f)| f.changed.as_ref()?.first().copied())
            .filter(gone)
            .collect();
        // Whether a change can be left out depends on the nodes it changed.
        let mut changing: HashMap<Ino, Vec<usize>> = HashMap::new();
        for (at, (_, footprint)) in changes.iter().enumerate() {
            for ino in footprint.changed.iter().flatten().filter(|ino| dead.contains(ino)) {
                changing.entry(*ino).or_default().push(at);
            }
        }
        let only_dead = |f: &Footprint, dead: &HashSet<Ino>| {
            f.changed.as_ref().is_some_and(|c| !c.is_empty() && c.iter().all(|ino| dead.contains(ino)))
        };
        // A change kept keeps every node it went through.
        let mut work: Vec<usize> = (0..changes.len()).collect();
        while let Some(at) = work.pop() {
            let footprint = &changes[at].1;
            if only_dead(footprint, &dead) {
                continue;
            }
            for ino in &footprint.touched {
                if dead.remove(ino) {
                    work.extend(changing.get(ino).into_iter().flatten());
                }
            }
        }
        // Attributes set again later, on the same node, are overwritten; so
        // is an xattr set or removed before one set whatever was there.
        let fields = |c: &Local| {
            [c.mode.is_some(), c.uid.is_some(), c.gid.is_some(), c.atime_ns.is_some(), c.mtime_ns.is_some()]
        };
        let mut set_later: HashMap<Ino, [bool; 5]> = HashMap::new();
        let mut xattr_set_later: HashSet<(Ino, &[u8])> = HashSet::new();
        let mut keep = vec![true; changes.len()];
        for (at, (change, footprint)) in changes.iter().enumerate().rev() {
            if only_dead(footprint, &dead) {
                keep[at] = false;
                continue;
            }
            let Some(&[ino]) = footprint.changed.as_deref() else { continue };
            match change.op() {
                LocalOp::Setattr => {
                    let later = set_later.entry(ino).or_default();
                    let now = fields(change);
                    keep[at] = now.iter().zip(later.iter()).any(|(&now, &later)| now && !later);
                    later.iter_mut().zip(now).for_each(|(later, now)| *later |= now);
                }
                LocalOp::Setxattr | LocalOp::Removexattr => {
                    let name = (ino, change.name.as_slice());
                    keep[at] = !xattr_set_later.contains(&name);
                    if keep[at] && change.op() == LocalOp::Setxattr && change.flags == 0 {
                        xattr_set_later.insert(name);
                    }
                }
                _ => {}
            }
        }
        let dropped_files = changes
            .iter()
            .zip(&keep)
            .filter(|((c, _), kept)| !**kept && c.op() == LocalOp::File)
            .map(|((c, _), _)| c.id);
        let dropped_files = dropped_files.collect();
        let kept = changes.iter().zip(&keep).filter(|(_, kept)| **kept).map(|((c, _), _)| c.clone()).collect();
        (kept, dropped_files)
    }

    /// Data file `id` (of a file made here and gone) is no one's.
    pub fn remove_local_file(&self, id: u64) {
        self.local.remove(id);
    }

    /// The entry `name` of `parent`: a name the images record is answered at
    /// once; another one in a directory of the tree not listed yet waits
    /// for its listing.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        self.listing_first(|fs| fs.lookup_listed(parent, name))
    }

    /// Runs `op` and replies with its answer, for a caller that must not
    /// block (the FUSE session's threads): an `op` that needs a listing (a
    /// lookup of a name the images lack, a readdir, a change of a directory's
    /// names) is run again, and answered, from a thread of the pool for work
    /// that waits. `op` changes nothing before it has every listing it needs.
    pub fn then<T: 'static>(
        self: &Arc<Self>,
        op: impl Fn(&Self) -> Result<T, FsError> + Send + 'static,
        reply: impl FnOnce(Result<T, FsError>) + Send + 'static,
    ) {
        match without_waiting(|| op(self)) {
            Err(FsError { unlisted: Some(_), .. }) => {
                let fs = self.clone();
                self.waiting.run(move || reply(op(&fs)));
            }
            answer => reply(answer),
        }
    }

    /// Threads now waiting for listings on behalf of callers that must not block.
    pub fn waiting_threads(&self) -> usize {
        self.waiting.threads()
    }

    fn lookup_listed(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        let ns = self.namespace();
        match Self::child(&ns, parent, name)? {
            Some(ino) => self.owned_attr(&ns, ino),
            None if ns.is_unlisted(parent) => Err(FsError::unlisted(parent)),
            None => Err(FsError::new(libc::ENOENT, "no such file")),
        }
    }

    /// The entry `name` of directory `parent`, if any.
    fn child(ns: &Namespace, parent: Ino, name: &OsStr) -> Result<Option<Ino>, FsError> {
        match ns.node(parent).map(|n| &n.kind) {
            Some(NodeKind::Dir(children)) => Ok(children.get(name).copied()),
            Some(_) => Err(FsError::new(libc::ENOTDIR, "not a directory")),
            None => Err(not_found(parent)),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        self.attr(&self.namespace(), ino)
    }

    /// The attributes the kernel checks accesses against (GETATTR, see
    /// [`FsConfig::shared`]): on a mount other users may use, those of a node
    /// of the images wait for its directory's listing.
    pub fn getattr_owned(&self, ino: Ino) -> Result<Attr, FsError> {
        self.listing_first(|fs| fs.owned_attr(&fs.namespace(), ino))
    }

    fn owned_attr(&self, ns: &Namespace, ino: Ino) -> Result<Attr, FsError> {
        let attr = self.attr(ns, ino)?;
        match ns.node(ino).and_then(|n| n.links.first()) {
            Some(&(parent, _)) if self.config.shared && ns.is_unlisted(parent) && attr.provisional => {
                Err(FsError::unlisted(parent))
            }
            _ => Ok(attr),
        }
    }

    fn attr(&self, ns: &Namespace, ino: Ino) -> Result<Attr, FsError> {
        let node = ns.node(ino).ok_or_else(|| not_found(ino))?;
        let mut mtime = node.meta.mtime;
        let (kind, size, nlink) = match &node.kind {
            NodeKind::Dir(children) => {
                let dirs = children.values().filter(|&&c| Self::is_dir(ns, c)).count() as u32;
                (Kind::Dir, 0, 2 + dirs)
            }
            NodeKind::File(index) => {
                let file = self.fetcher.file(*index);
                mtime = file.local_mtime().unwrap_or(mtime);
                (Kind::File, file.len(), node.links.len() as u32)
            }
            NodeKind::Local(id) => {
                let data = self.local_file(*id)?.metadata().map_err(|e| FsError::new(libc::EIO, e.to_string()))?;
                // The data file's own time: every write (passthrough ones
                // too) moves it, a set time is given to it, and it outlives the process.
                mtime = data.modified().unwrap_or(mtime);
                (Kind::File, data.len(), node.links.len() as u32)
            }
            NodeKind::Symlink(target) => (Kind::Symlink, target.len() as u64, node.links.len() as u32),
            NodeKind::Fifo => (Kind::Fifo, 0, node.links.len() as u32),
        };
        let meta = &node.meta;
        let size = if kind == Kind::Dir { meta.dir_size } else { size };
        // Until its directory is listed, a node of the images shows the
        // mounting user as its owner; until a directory is listed itself,
        // its link count counts none of its subdirectories: the kernel asks again.
        let provisional = self.tree.is_some()
            && !matches!(node.origin, Origin::Local(_))
            && (node.links.first().is_some_and(|&(parent, _)| ns.is_unlisted(parent)) || ns.is_unlisted(ino));
        Ok(Attr {
            ino,
            provisional,
            kind,
            size,
            perm: (meta.perm & 0o7777) as u16,
            nlink,
            uid: meta.uid,
            gid: meta.gid,
            atime: meta.atime,
            mtime,
            ctime: meta.ctime,
        })
    }

    fn is_dir(ns: &Namespace, ino: Ino) -> bool {
        ns.node(ino).is_some_and(|n| matches!(n.kind, NodeKind::Dir(_)))
    }

    fn kind(ns: &Namespace, ino: Ino) -> Kind {
        match ns.node(ino).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => Kind::Dir,
            Some(NodeKind::Symlink(_)) => Kind::Symlink,
            Some(NodeKind::Fifo) => Kind::Fifo,
            _ => Kind::File,
        }
    }

    fn local_file(&self, id: u64) -> Result<Arc<std::fs::File>, FsError> {
        self.local.get(id).ok_or_else(|| FsError::new(libc::EIO, format!("local file {id} is not open")))
    }

    /// The entries of a directory, `.` and `..` first (a directory of the
    /// tree is listed first).
    pub fn readdir(&self, ino: Ino) -> Result<Vec<(Ino, Kind, OsString)>, FsError> {
        self.ensure_listed(ino)?;
        self.entries(ino)
    }

    fn entries(&self, ino: Ino) -> Result<Vec<(Ino, Kind, OsString)>, FsError> {
        let ns = self.namespace();
        let node = ns.node(ino).ok_or_else(|| not_found(ino))?;
        let NodeKind::Dir(children) = &node.kind else {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        };
        let parent = node.links.first().map_or(ROOT_INO, |l| l.0);
        let mut entries = vec![(ino, Kind::Dir, OsString::from(".")), (parent, Kind::Dir, OsString::from(".."))];
        for (name, &child) in children {
            entries.push((child, Self::kind(&ns, child), name.clone()));
        }
        Ok(entries)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        match self.namespace().node(ino).map(|n| &n.kind) {
            Some(NodeKind::Symlink(target)) => Ok(target.as_bytes().to_vec()),
            Some(_) => Err(FsError::new(libc::EINVAL, "not a symbolic link")),
            None => Err(not_found(ino)),
        }
    }

    /// Checks an open and counts it (until [`Filesystem::release`]). Gives
    /// the file the kernel may then read and write directly (FUSE
    /// passthrough), if any: a file made through the mount (its data file),
    /// or, for a read-only open, a verified file of the checkpoint (its spill
    /// file). Not for a file the checkpoint had open for writing: the kernel
    /// refuses a cached open beside passthrough ones, and `criu restore` opens
    /// such a file for writing too, after or before its read-only opens. Not
    /// for writing a checkpoint file either: its writes go through lazyfs,
    /// which marks it local.
    pub fn open(&self, ino: Ino, write: bool) -> Result<Option<std::fs::File>, FsError> {
        if write && self.config.read_only {
            return Err(FsError::new(libc::EROFS, "mounted --read-only"));
        }
        let ns = self.namespace();
        // Writes that bypass lazyfs could not drop a file's privileges.
        let privileged = ns
            .node(ino)
            .is_some_and(|n| crate::privileges::privileged(n.meta.perm, n.meta.xattrs.keys().map(|k| k.as_os_str())));
        let passthrough = match ns.node(ino).map(|n| &n.kind) {
            // A failed file shows no bytes (size 0): the kernel would read it as empty.
            Some(NodeKind::File(index)) if !write && let Phase::Failed(why) = self.fetcher.file(*index).phase() => {
                return Err(FsError::new(libc::EIO, why.to_string()));
            }
            Some(NodeKind::File(_)) if write => None,
            Some(NodeKind::File(index)) => {
                // Read next, as a rule: a small file is fetched whole at once.
                self.fetcher.opened(*index);
                let file = self.fetcher.file(*index);
                match file.written {
                    true => None,
                    false => file.verified_file()?,
                }
            }
            Some(NodeKind::Local(_)) if write && privileged => None,
            Some(NodeKind::Local(id)) => Some(self.local_file(*id)?.try_clone().map_err(|e| io_error(&e))?),
            Some(NodeKind::Dir(_)) => return Err(FsError::new(libc::EISDIR, "a directory")),
            Some(_) => return Err(FsError::new(libc::EINVAL, "not a regular file")),
            None => return Err(not_found(ino)),
        };
        *self.opens().entry(ino).or_default() += 1;
        Ok(passthrough)
    }

    /// An open of `ino` is closed: an unlinked file goes with its last close.
    pub fn release(&self, ino: Ino) {
        let mut ns = self.ns_mut();
        {
            let mut opens = self.opens();
            match opens.get_mut(&ino) {
                Some(1) => {
                    opens.remove(&ino);
                }
                Some(n) => *n -= 1,
                None => {}
            }
        }
        self.drop_if_gone(&mut ns, ino);
    }

    /// Drops `ino` if no name and no open is left of it.
    fn drop_if_gone(&self, ns: &mut Namespace, ino: Ino) {
        let gone = ns.node(ino).is_some_and(|n| n.links.is_empty()) && !self.opens().contains_key(&ino);
        if !gone || ino == ROOT_INO {
            return;
        }
        match ns.remove(ino).map(|n| n.kind) {
            Some(NodeKind::Local(id)) => self.local.remove(id),
            // Nobody can reach it: what is not fetched yet never will be.
            Some(NodeKind::File(index)) => self.fetcher.file(index).forget(),
            _ => {}
        }
    }

    /// Replies with bytes `offset..offset+size` once their chunks are present.
    pub fn read(&self, ino: Ino, offset: u64, size: u32, reply: ReadReply) {
        let kind = self.namespace().node(ino).map(|n| match n.kind {
            NodeKind::File(index) => Ok(index),
            NodeKind::Local(id) => Err(Some(id)),
            _ => Err(None),
        });
        match kind {
            Some(Ok(index)) => self.fetcher.read(
                index,
                offset,
                size,
                Box::new(move |bytes| match bytes {
                    Ok(bytes) => reply(Ok(&bytes)),
                    // A read that cannot be served is an I/O error, whatever the cause.
                    Err(e) => reply(Err(FsError::new(libc::EIO, e.message.to_string()))),
                }),
            ),
            Some(Err(Some(id))) => {
                let mut buf = vec![0u8; size as usize];
                let read = self
                    .local_file(id)
                    .and_then(|f| crate::store::read_full(&f, offset, &mut buf).map_err(|e| io_error(&e)));
                reply(read.map(|n| &buf[..n]))
            }
            Some(Err(None)) => reply(Err(FsError::new(libc::EINVAL, "not a regular file"))),
            None => reply(Err(not_found(ino))),
        }
    }

    /// Writes locally (a checkpoint's file once it is all present): the source
    /// is never written. The file's capabilities go first, and with
    /// `kill_set_ids` (a writer without `CAP_FSETID`) its set-ID bits.
    pub fn write(&self, ino: Ino, offset: u64, data: Vec<u8>, kill_set_ids: bool, reply: WriteReply) {
        if self.config.read_only {
            return reply(Err(FsError::new(libc::EROFS, "mounted --read-only")));
        }
        let (kind, dropped) = match self.namespace().node(ino) {
            Some(node) => match node.kind {
                NodeKind::File(index) => (Ok(index), Self::dropped(node, kill_set_ids)),
                NodeKind::Local(id) => (Err(id), Self::dropped(node, kill_set_ids)),
                _ => return reply(Err(FsError::new(libc::EINVAL, "not a regular file"))),
            },
            None => return reply(Err(not_found(ino))),
        };
        if let Some(dropped) = dropped
            && let Err(e) = self.drop_privileges(ino, dropped)
        {
            return reply(Err(e));
        }
        match kind {
            Ok(index) => self.fetcher.write(index, offset, data, self.touch_after(ino, reply)),
            Err(id) => {
                let written = self
                    .local_file(id)
                    .and_then(|f| f.write_all_at(&data, offset).map_err(|e| io_error(&e)))
                    .map(|()| data.len() as u32);
                if written.is_ok() {
                    self.touch(ino);
                }
                reply(written)
            }
        }
    }

    /// A reply that stamps `ino`'s mtime first if the change was made.
    fn touch_after<T: Send + 'static>(
        &self,
        ino: Ino,
        reply: Box<dyn FnOnce(Result<T, FsError>) + Send>,
    ) -> crate::fetch::Reply<T> {
        let ns = self.ns.clone();
        Box::new(move |result: Result<T, FetchError>| {
            if result.is_ok() {
                touch(&mut ns.write().unwrap_or_else(PoisonError::into_inner), ino);
            }
            reply(result.map_err(FsError::from))
        })
    }

    fn touch(&self, ino: Ino) {
        touch(&mut self.ns_mut(), ino);
    }
}

/// Listings claimed ([`Tree::begin`]) and not ended yet: ended when dropped.
struct Claims<'a> {
    tree: &'a Tree,
    dirs: Vec<Ino>,
}

impl Claims<'_> {
    fn end(&mut self, dir: Ino) {
        if let Some(at) = self.dirs.iter().position(|&d| d == dir) {
            self.dirs.swap_remove(at);
            self.tree.end(dir);
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        self.dirs.drain(..).for_each(|dir| self.tree.end(dir));
    }
}

/// Whether a node of kind `kind` and a source entry of type `file_type` (`S_IFMT` bits) are one kind of file.
fn same_kind(kind: &NodeKind, file_type: u32) -> bool {
    let node_type = match kind {
        NodeKind::Dir(_) => libc::S_IFDIR,
        NodeKind::File(_) | NodeKind::Local(_) => libc::S_IFREG,
        NodeKind::Symlink(_) => libc::S_IFLNK,
        NodeKind::Fifo => libc::S_IFIFO,
    };
    node_type == file_type
}

/// Takes what the source (or the manifest) says of a node into its
/// attributes (its permission bits too with `perm`), but those changed
/// through the mount: a local change is newer than any listing.
fn apply_source_attrs(meta: &mut Meta, attrs: &SourceAttrs, perm: bool) {
    let local = meta.changed_locally;
    if perm && !local.perm {
        meta.perm = attrs.mode & 0o7777;
    }
    if !local.uid {
        meta.uid = attrs.uid;
    }
    if !local.gid {
        meta.gid = attrs.gid;
    }
    if !local.atime {
        meta.atime = from_nanos(attrs.atime_ns);
    }
    if !local.mtime {
        meta.mtime = from_nanos(attrs.mtime_ns);
    }
    if local == LocalAttrs::default() {
        meta.ctime = from_nanos(attrs.ctime_ns.unwrap_or(attrs.mtime_ns));
    }
    meta.dir_size = attrs.size;
}

fn touch(ns: &mut Namespace, ino: Ino) {
    if let Some(node) = ns.node_mut(ino) {
        let now = SystemTime::now();
        node.meta.mtime = now;
        node.meta.ctime = now;
    }
}

fn io_error(e: &std::io::Error) -> FsError {
    FsError::new(
        e.raw_os_error().filter(|&n| n == libc::ENOSPC || n == libc::EDQUOT).unwrap_or(libc::EIO),
        e.to_string(),
    )
}

/// An error with its own errno (ENXIO past the end of the data).
fn io_error_errno(e: &std::io::Error) -> FsError {
    FsError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
}

/// The local layer's changes: each checked, journaled and the journal
/// fsynced, then made, before it is acknowledged.
impl Filesystem {
    fn writable(&self) -> Result<(), FsError> {
        match self.config.read_only {
            true => Err(FsError::new(libc::EROFS, "mounted --read-only")),
            false => Ok(()),
        }
    }

    pub fn setattr(self: &Arc<Self>, ino: Ino, change: SetAttr, reply: AttrReply) {
        let meta = change.mode.is_some()
            || change.uid.is_some()
            || change.gid.is_some()
            || change.atime.is_some()
            || change.mtime.is_some();
        if (meta || change.size.is_some())
            && let Err(e) = self.writable()
        {
            return reply(Err(e));
        }
        // A chown drops the file's set-ID bits and capabilities, whoever makes
        // it; a truncate drops them as a write does.
        let chown = change.uid.is_some() || change.gid.is_some();
        let dropped = match self.namespace().node(ino) {
            Some(node) if chown || change.size.is_some() => Self::dropped(node, chown || change.kill_set_ids),
            _ => None,
        };
        if let Some(dropped) = dropped
            && let Err(e) = self.drop_privileges(ino, dropped)
        {
            return reply(Err(e));
        }
        if meta {
            let mut ns = self.ns_mut();
            let record = Local {
                op: LocalOp::Setattr.into(),
                path: ns
                    .node(ino)
                    .filter(|n| !n.links.is_empty())
                    .map(|_| bytes(&ns.mount_path(ino)))
                    .unwrap_or_default(),
                mode: change.mode,
                uid: change.uid,
                gid: change.gid,
                atime_ns: change.atime.map(nanos),
                mtime_ns: change.mtime.map(nanos),
                ..Local::default()
            };
            let changed = match (ino, record.path.is_empty()) {
                // Unlinked but open: nothing to journal, no name to journal it by.
                (ROOT_INO, _) | (_, false) => self.change(&mut ns, record),
                (_, true) => Self::set_meta(&mut ns, ino, &record).map(|_| None),
            };
            if let Err(e) = changed {
                return reply(Err(e));
            }
            // A file's time, once it is local, is its bytes' (see `attr`):
            // set once the change is journaled.
            let set = match (ns.node(ino).map(|n| &n.kind), change.mtime) {
                (Some(NodeKind::Local(id)), Some(mtime)) => {
                    self.local_file(*id).and_then(|f| f.set_modified(mtime).map_err(|e| io_error(&e)))
                }
                (Some(NodeKind::File(index)), Some(mtime)) => {
                    self.fetcher.file(*index).set_local_mtime(mtime).map_err(FsError::from)
                }
                _ => Ok(()),
            };
            if let Err(e) = set {
                return reply(Err(e));
            }
        }
        let Some(size) = change.size else {
            return reply(self.getattr(ino));
        };
        let kind = self.namespace().node(ino).map(|n| match n.kind {
            NodeKind::File(index) => Ok(index),
            NodeKind::Local(id) => Err(Some(id)),
            _ => Err(None),
        });
        match kind {
            Some(Ok(index)) => {
                let fs = self.clone();
                self.fetcher.truncate(
                    index,
                    size,
                    Box::new(move |truncated| {
                        reply(truncated.map_err(FsError::from).and_then(|_| {
                            fs.touch(ino);
                            fs.getattr(ino)
                        }))
                    }),
                )
            }
            Some(Err(Some(id))) => {
                let truncated = self.local_file(id).and_then(|f| f.set_len(size).map_err(|e| io_error(&e)));
                reply(truncated.and_then(|()| {
                    self.touch(ino);
                    self.getattr(ino)
                }))
            }
            Some(Err(None)) => reply(Err(FsError::new(libc::EISDIR, "not a regular file"))),
            None => reply(Err(not_found(ino))),
        }
    }

    /// What a change of `node`'s file drops of its privileges (see
    /// [`crate::privileges`]); directories keep theirs.
    fn dropped(node: &Node, set_ids: bool) -> Option<crate::privileges::Dropped> {
        let file = matches!(node.kind, NodeKind::File(_) | NodeKind::Local(_));
        let capability = node.meta.xattrs.contains_key(OsStr::new(crate::privileges::CAPABILITY));
        file.then(|| crate::privileges::dropped(node.meta.perm, capability, set_ids)).flatten()
    }

    /// Takes `dropped` away from `ino`, journaled like any change.
    fn drop_privileges(&self, ino: Ino, dropped: crate::privileges::Dropped) -> Result<(), FsError> {
        let mut ns = self.ns_mut();
        let path = match ns.node(ino) {
            Some(node) if node.links.is_empty() => Vec::new(),
            Some(_) => bytes(&ns.mount_path(ino)),
            None => return Err(not_found(ino)),
        };
        let mut records = Vec::new();
        if let Some(perm) = dropped.perm {
            records.push(Local {
                op: LocalOp::Setattr.into(),
                path: path.clone(),
                mode: Some(perm),
                ..Local::default()
            });
        }
        if dropped.capability {
            let name = crate::privileges::CAPABILITY.as_bytes().to_vec();
            records.push(Local { op: LocalOp::Removexattr.into(), path: path.clone(), name, ..Local::default() });
        }
        for record in records {
            match path.is_empty() {
                // Unlinked but open: nothing to journal, no name to journal it by.
                true if record.op() == LocalOp::Setattr => Self::set_meta(&mut ns, ino, &record)?,
                true => Self::set_xattr(&mut ns, ino, &record, Step::Make)?,
                false => self.change(&mut ns, record).map(drop)?,
            }
        }
        Ok(())
    }

    /// Makes a file's written bytes durable.
    pub fn fsync(&self, ino: Ino) -> Result<(), FsError> {
        let kind = self.namespace().node(ino).map(|n| match n.kind {
            NodeKind::File(index) => Ok(index),
            NodeKind::Local(id) => Err(Some(id)),
            _ => Err(None),
        });
        match kind {
            Some(Ok(index)) => Ok(self.fetcher.file(index).sync()?),
            Some(Err(Some(id))) => self.local_file(id)?.sync_data().map_err(|e| io_error(&e)),
            Some(Err(None)) => Ok(()),
            None => Err(not_found(ino)),
        }
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE: where data or a hole starts at or
    /// after `offset`, as the local file says (a checkpoint file not yet
    /// complete is all data: its holes may still be fetched).
    pub fn seek(&self, ino: Ino, offset: u64, whence: i32) -> Result<u64, FsError> {
        use std::os::fd::AsRawFd;
        let local = match self.namespace().node(ino).map(|n| &n.kind) {
            Some(NodeKind::Local(id)) => Some(self.local_file(*id)?),
            Some(NodeKind::File(_)) => None,
            Some(_) => return Err(FsError::new(libc::EINVAL, "not a regular file")),
            None => return Err(not_found(ino)),
        };
        let Some(file) = local else {
            let len = self.getattr(ino)?.size;
            return match whence {
                _ if offset >= len => Err(FsError::new(libc::ENXIO, "past the end")),
                libc::SEEK_DATA => Ok(offset),
                _ => Ok(len),
            };
        };
        let offset = libc::off_t::try_from(offset).map_err(|_| FsError::new(libc::EINVAL, "offset too large"))?;
        // SAFETY: lseek on a descriptor we own; its file position is never
        // used (only pread/pwrite), and the answer comes back whole.
        match unsafe { libc::lseek(file.as_raw_fd(), offset, whence) } {
            -1 => Err(io_error_errno(&std::io::Error::last_os_error())),
            at => Ok(at as u64),
        }
    }

    /// A directory's changes are durable once acknowledged: nothing waits.
    pub fn fsyncdir(&self, ino: Ino) -> Result<(), FsError> {
        match Self::is_dir(&self.namespace(), ino) {
            true => Ok(()),
            false => Err(FsError::new(libc::ENOTDIR, "not a directory")),
        }
    }

    /// The files made through the mount, and their bytes.
    pub fn local_usage(&self) -> (u64, u64) {
        let ns = self.namespace();
        let sizes = ns.nodes().filter_map(|n| match n.kind {
            NodeKind::Local(id) => Some(self.local.get(id).and_then(|f| f.metadata().ok()).map_or(0, |m| m.len())),
            _ => None,
        });
        sizes.fold((0, 0), |(files, bytes), size| (files + 1, bytes + size))
    }

    pub fn statfs(&self) -> StatFs {
        let bytes_total = self.fetcher.files().iter().map(|f| f.len()).sum();
        StatFs { bytes_total, files: self.namespace().len() as u64 }
    }

    /// The path (from the mount's root) of `name` in directory `parent`.
    fn entry_path(ns: &Namespace, parent: Ino, name: &OsStr) -> Result<Vec<u8>, FsError> {
        Self::child(ns, parent, name)?;
        Ok(bytes(&ns.mount_path(parent).join(name)))
    }

    /// Makes a node as `record` says; with `open`, counts an open of it
    /// before anyone else can see it (an unlink right after must not take a
    /// file its creator holds open).
    fn new_node(&self, parent: Ino, name: &OsStr, record: Local, open: bool) -> Result<Attr, FsError> {
        self.writable()?;
        self.listing_first(|fs| {
            let mut ns = fs.ns_mut();
            let path = Self::entry_path(&ns, parent, name)?;
            if Self::child(&ns, parent, name)?.is_some() {
                return Err(FsError::new(libc::EEXIST, "exists"));
            }
            let now = Some(nanos(SystemTime::now()));
            let mut record = Local { path, atime_ns: now, mtime_ns: now, ..record.clone() };
            // In a set-group-ID directory, a new node takes its group (and a directory the bit).
            if let Some(dir) = ns.node(parent).map(|n| &n.meta).filter(|m| m.perm & libc::S_ISGID != 0) {
                record.gid = Some(dir.gid);
                if record.op() == LocalOp::Dir {
                    record.mode = record.mode.map(|mode| mode | libc::S_ISGID);
                }
            }
            let ino = fs.change(&mut ns, record)?.expect("a new node");
            if open {
                *fs.opens().entry(ino).or_default() += 1;
            }
            fs.attr(&ns, ino)
        })
    }

    /// Creates a regular file, opened once (released by [`Filesystem::release`]);
    /// gives its data file too, for FUSE passthrough.
    pub fn create(&self, parent: Ino, name: &OsStr, mode: u32, by: Creator) -> Result<(Attr, std::fs::File), FsError> {
        self.writable()?;
        let id = self.local.create()?;
        let record = Self::node_record(LocalOp::File, mode, by);
        let made = self
            .local_file(id)
            .and_then(|file| file.try_clone().map_err(|e| io_error(&e)))
            .and_then(|file| Ok((self.new_node(parent, name, Local { id, ..record }, true)?, file)));
        if made.is_err() {
            self.local.remove(id);
        }
        made
    }

    fn node_record(op: LocalOp, mode: u32, by: Creator) -> Local {
        Local { op: op.into(), mode: Some(mode & 0o7777), uid: Some(by.uid), gid: Some(by.gid), ..Local::default() }
    }

    pub fn mkdir(&self, parent: Ino, name: &OsStr, mode: u32, by: Creator) -> Result<Attr, FsError> {
        self.new_node(parent, name, Self::node_record(LocalOp::Dir, mode, by), false)
    }

    pub fn symlink(&self, parent: Ino, name: &OsStr, target: &Path, by: Creator) -> Result<Attr, FsError> {
        let record = Local { to: bytes(target), ..Self::node_record(LocalOp::Symlink, 0o777, by) };
        self.new_node(parent, name, record, false)
    }

    /// Only FIFOs: device nodes and sockets have no place in a data mount.
    pub fn mknod(&self, parent: Ino, name: &OsStr, mode: u32, by: Creator) -> Result<Attr, FsError> {
        match mode & libc::S_IFMT {
            libc::S_IFIFO => self.new_node(parent, name, Self::node_record(LocalOp::Fifo, mode, by), false),
            libc::S_IFREG => {
                let (attr, _) = self.create(parent, name, mode, by)?;
                self.release(attr.ino);
                Ok(attr)
            }
            _ => {
                self.writable()?;
                Err(FsError::new(libc::EPERM, "only regular files and FIFOs can be made here"))
            }
        }
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        self.writable()?;
        // The file's own directories are on the change's way too.
        self.listing_first(|fs| {
            let mut ns = fs.ns_mut();
            let node = ns.node(ino).ok_or_else(|| not_found(ino))?;
            if node.links.is_empty() {
                return Err(FsError::new(libc::ENOENT, "unlinked"));
            }
            let record = Local {
                op: LocalOp::Link.into(),
                path: bytes(&ns.mount_path(ino)),
                to: Self::entry_path(&ns, parent, name)?,
                ..Local::default()
            };
            fs.change(&mut ns, record)?;
            fs.attr(&ns, ino)
        })
    }

    fn remove_entry(&self, parent: Ino, name: &OsStr, op: LocalOp) -> Result<(), FsError> {
        self.writable()?;
        self.listing_first(|fs| {
            let mut ns = fs.ns_mut();
            let record = Local { op: op.into(), path: Self::entry_path(&ns, parent, name)?, ..Local::default() };
            fs.change(&mut ns, record).map(drop)
        })
    }

    /// Removes a name; an open file keeps working until its last close.
    pub fn unlink(&self, parent: Ino, name: &OsStr) -> Result<(), FsError> {
        self.remove_entry(parent, name, LocalOp::Unlink)
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<(), FsError> {
        self.remove_entry(parent, name, LocalOp::Rmdir)
    }

    /// `flags`: [`RENAME_NOREPLACE`], [`RENAME_EXCHANGE`] or none.
    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        to_parent: Ino,
        to_name: &OsStr,
        flags: u32,
    ) -> Result<(), FsError> {
        self.writable()?;
        self.listing_first(|fs| {
            let mut ns = fs.ns_mut();
            let record = Local {
                op: LocalOp::Rename.into(),
                path: Self::entry_path(&ns, parent, name)?,
                to: Self::entry_path(&ns, to_parent, to_name)?,
                flags,
                ..Local::default()
            };
            fs.change(&mut ns, record).map(drop)
        })
    }

    /// `flags`: XATTR_CREATE, XATTR_REPLACE or none.
    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<(), FsError> {
        self.xattr(ino, LocalOp::Setxattr, name, value.to_vec(), flags as u32)
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<(), FsError> {
        self.xattr(ino, LocalOp::Removexattr, name, Vec::new(), 0)
    }

    fn xattr(&self, ino: Ino, op: LocalOp, name: &OsStr, value: Vec<u8>, flags: u32) -> Result<(), FsError> {
        self.writable()?;
        let mut ns = self.ns_mut();
        let node = ns.node(ino).ok_or_else(|| not_found(ino))?;
        let path = match node.links.is_empty() && ino != ROOT_INO {
            true => Vec::new(),
            false => bytes(&ns.mount_path(ino)),
        };
        let record = Local { op: op.into(), path, name: name.as_bytes().to_vec(), value, flags, ..Local::default() };
        match record.path.is_empty() && ino != ROOT_INO {
            true => Self::set_xattr(&mut ns, ino, &record, Step::Make),
            false => self.change(&mut ns, record).map(drop),
        }
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>, FsError> {
        let ns = self.namespace();
        let node = ns.node(ino).ok_or_else(|| not_found(ino))?;
        node.meta.xattrs.get(name).cloned().ok_or_else(|| FsError::new(libc::ENODATA, "no such attribute"))
    }

    /// The attribute names, each followed by a NUL.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let ns = self.namespace();
        let node = ns.node(ino).ok_or_else(|| not_found(ino))?;
        Ok(node.meta.xattrs.keys().flat_map(|k| k.as_bytes().iter().copied().chain([0])).collect())
    }

    /// Checks `record` can be made, makes it durable in the journal (naming
    /// the request it was made for, if any), then makes it, all under the
    /// namespace's lock: a change the journal cannot hold (a full disk:
    /// ENOSPC) is never made, and one that is answered is never lost.
    fn change(&self, ns: &mut Namespace, mut record: Local) -> Result<Option<Ino>, FsError> {
        let seq = self.changes.lock().unwrap_or_else(PoisonError::into_inner).len() as u64;
        self.apply(ns, &record, seq, Step::Check)?;
        if let Some((connection, request)) = crate::failover::request::current() {
            (record.connection, record.request) = (connection, request);
        }
        // The listings the change is made over are durable before it is.
        if let Some(tree) = &self.tree {
            tree.sync()?;
        }
        self.fetcher.journal().change(record.clone())?;
        let footprint = Footprint::before(ns, &record);
        let ino = self.apply(ns, &record, seq, Step::Make)?;
        let footprint = footprint.made(Some(ino));
        self.changes.lock().unwrap_or_else(PoisonError::into_inner).push((record, footprint));
        self.count_unlisted(ns);
        Ok(ino)
    }

    /// Makes the change `record` says (or with [`Step::Check`] only finds out
    /// whether it can be), resolving its paths: the same live and when a
    /// journal is replayed. A new node's inode is returned.
    /// A directory of the tree on the way that is not listed yet (and does
    /// not have the name) fails with [`FsError::unlisted`], as does the
    /// directory whose names the change changes: the caller lists it and
    /// applies the change again. `seq` numbers the change among the local ones.
    fn apply(&self, ns: &mut Namespace, record: &Local, seq: u64, step: Step) -> Result<Option<Ino>, FsError> {
        let path = Path::new(os(&record.path));
        let op = record.op();
        if matches!(op, LocalOp::Setattr | LocalOp::Setxattr | LocalOp::Removexattr) {
            let ino = Self::walk(ns, path)?;
            return match op {
                LocalOp::Setattr if step == Step::Check => Ok(None),
                LocalOp::Setattr => Self::set_meta(ns, ino, record).map(|_| None),
                _ => Self::set_xattr(ns, ino, record, step).map(|_| None),
            };
        }
        let (parent, name) = Self::split(ns, path)?;
        let existing = Self::child(ns, parent, name)?;
        let new_kind = match op {
            LocalOp::File => Some(NodeKind::Local(record.id)),
            LocalOp::Dir => Some(NodeKind::Dir(Default::default())),
            LocalOp::Symlink => Some(NodeKind::Symlink(OsString::from_vec(record.to.clone()))),
            LocalOp::Fifo => Some(NodeKind::Fifo),
            _ => None,
        };
        if let Some(kind) = new_kind {
            if existing.is_some() {
                return Err(FsError::new(libc::EEXIST, "exists"));
            }
            if step == Step::Check {
                return Ok(None);
            }
            let time = from_nanos(record.mtime_ns.unwrap_or_default());
            let meta = Meta {
                perm: record.mode.unwrap_or(0o644),
                uid: record.uid.unwrap_or(self.config.uid),
                gid: record.gid.unwrap_or(self.config.gid),
                atime: time,
                mtime: time,
                ctime: time,
                ..Meta::default()
            };
            let ino = ns.add(parent, name, kind, meta, Origin::Local(seq));
            touch(ns, parent);
            return Ok(Some(ino));
        }
        let ino = existing.ok_or_else(|| FsError::new(libc::ENOENT, "no such file"))?;
        match op {
            LocalOp::Link => {
                if Self::is_dir(ns, ino) {
                    return Err(FsError::new(libc::EPERM, "a directory cannot be hard-linked"));
                }
                let (to_parent, to_name) = Self::split(ns, Path::new(os(&record.to)))?;
                if Self::child(ns, to_parent, to_name)?.is_some() {
                    return Err(FsError::new(libc::EEXIST, "exists"));
                }
                if step == Step::Check {
                    return Ok(None);
                }
                ns.link(ino, to_parent, to_name);
                touch(ns, to_parent);
            }
            LocalOp::Unlink | LocalOp::Rmdir => {
                Self::check_removable(ns, ino, op == LocalOp::Rmdir)?;
                if step == Step::Check {
                    return Ok(None);
                }
                ns.unlink(parent, name);
                touch(ns, parent);
                self.drop_if_gone(ns, ino);
            }
            LocalOp::Rename => {
                let (to_parent, to_name) = Self::split(ns, Path::new(os(&record.to)))?;
                let target = Self::child(ns, to_parent, to_name)?;
                self.rename_in(ns, (parent, name, ino), (to_parent, to_name, target), record.flags, step)?;
            }
            _ => return Err(FsError::new(libc::EINVAL, format!("unknown local change {}", record.op))),
        }
        Ok(None)
    }

    /// The directory and name of `path`; the directory must be listed.
    fn split<'a>(ns: &Namespace, path: &'a Path) -> Result<(Ino, &'a OsStr), FsError> {
        let name = path.file_name().ok_or_else(|| FsError::new(libc::EINVAL, "no name"))?;
        let parent = Self::walk(ns, path.parent().unwrap_or(Path::new("")))?;
        if ns.is_unlisted(parent) {
            return Err(FsError::unlisted(parent));
        }
        Ok((parent, name))
    }

    /// The nodes on `path` (from the root) as far as it leads, and the one it
    /// names (the root for an empty path), if it leads all the way.
    fn resolve_all(ns: &Namespace, path: &[u8]) -> (Vec<Ino>, Option<Ino>) {
        let names = Path::new(os(path)).iter();
        let (count, mut on) = (names.clone().count(), Vec::new());
        for name in names {
            match Self::child(ns, on.last().copied().unwrap_or(ROOT_INO), name) {
                Ok(Some(child)) => on.push(child),
                _ => break,
            }
        }
        let at = match on.len() == count {
            true => Some(on.last().copied().unwrap_or(ROOT_INO)),
            false => None,
        };
        (on, at)
    }

    /// The inode at `path` (from the root), as a lookup of each name finds it.
    fn walk(ns: &Namespace, path: &Path) -> Result<Ino, FsError> {
        path.iter().try_fold(ROOT_INO, |dir, name| match Self::child(ns, dir, name)? {
            Some(child) => Ok(child),
            None if ns.is_unlisted(dir) => Err(FsError::unlisted(dir)),
            None => Err(FsError::new(libc::ENOENT, "no such file")),
        })
    }

    /// Whether `ino` may be removed by rmdir (`dir`) or unlink. A directory
    /// of the tree not listed yet is listed first: the source may hold
    /// entries in it.
    fn check_removable(ns: &Namespace, ino: Ino, dir: bool) -> Result<(), FsError> {
        match (&ns.node(ino).ok_or_else(|| not_found(ino))?.kind, dir) {
            (NodeKind::Dir(_), true) if ns.is_unlisted(ino) => Err(FsError::unlisted(ino)),
            (NodeKind::Dir(children), true) if children.is_empty() => Ok(()),
            (NodeKind::Dir(_), true) => Err(FsError::new(libc::ENOTEMPTY, "not empty")),
            (NodeKind::Dir(_), false) => Err(FsError::new(libc::EISDIR, "a directory")),
            (_, true) => Err(FsError::new(libc::ENOTDIR, "not a directory")),
            (_, false) => Ok(()),
        }
    }

    fn rename_in(
        &self,
        ns: &mut Namespace,
        (parent, name, ino): (Ino, &OsStr, Ino),
        (to_parent, to_name, target): (Ino, &OsStr, Option<Ino>),
        flags: u32,
        step: Step,
    ) -> Result<(), FsError> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 || flags == RENAME_NOREPLACE | RENAME_EXCHANGE {
            return Err(FsError::new(libc::EINVAL, "unsupported rename flags"));
        }
        if target == Some(ino) {
            // Onto itself (or another name of the same file): nothing changes.
            return match flags {
                RENAME_NOREPLACE => Err(FsError::new(libc::EEXIST, "exists")),
                _ => Ok(()),
            };
        }
        // A directory cannot move below itself.
        let into_itself = |moved: Ino, dir: Ino| Self::is_dir(ns, moved) && ns.is_within(dir, moved);
        if into_itself(ino, to_parent) || target.is_some_and(|t| into_itself(t, parent)) && flags == RENAME_EXCHANGE {
            return Err(FsError::new(libc::EINVAL, "a directory cannot move below itself"));
        }
        match (flags, target) {
            (RENAME_EXCHANGE, None) => return Err(FsError::new(libc::ENOENT, "nothing to exchange with")),
            (RENAME_NOREPLACE, Some(_)) => return Err(FsError::new(libc::EEXIST, "exists")),
            (RENAME_EXCHANGE, _) | (_, None) => {}
            (_, Some(target)) => Self::check_removable(ns, target, Self::is_dir(ns, ino))?,
        }
        if step == Step::Check {
            return Ok(());
        }
        if flags == RENAME_EXCHANGE {
            let target = target.expect("checked above");
            ns.unlink(parent, name);
            ns.unlink(to_parent, to_name);
            ns.link(ino, to_parent, to_name);
            ns.link(target, parent, name);
        } else {
            if let Some(target) = target {
                ns.unlink(to_parent, to_name);
                self.drop_if_gone(ns, target);
            }
            ns.unlink(parent, name);
            ns.link(ino, to_parent, to_name);
        }
        touch(ns, parent);
        touch(ns, to_parent);
        Ok(())
    }

    fn node_mut(ns: &mut Namespace, ino: Ino) -> Result<&mut Node, FsError> {
        ns.node_mut(ino).ok_or_else(|| not_found(ino))
    }

    fn set_meta(ns: &mut Namespace, ino: Ino, record: &Local) -> Result<(), FsError> {
        let meta = &mut Self::node_mut(ns, ino)?.meta;
        let local = &mut meta.changed_locally;
        local.perm |= record.mode.is_some();
        local.uid |= record.uid.is_some();
        local.gid |= record.gid.is_some();
        local.atime |= record.atime_ns.is_some();
        local.mtime |= record.mtime_ns.is_some();
        if let Some(mode) = record.mode {
            meta.perm = mode & 0o7777;
        }
        meta.uid = record.uid.unwrap_or(meta.uid);
        meta.gid = record.gid.unwrap_or(meta.gid);
        meta.atime = record.atime_ns.map_or(meta.atime, from_nanos);
        meta.mtime = record.mtime_ns.map_or(meta.mtime, from_nanos);
        meta.ctime = SystemTime::now();
        Ok(())
    }

    fn set_xattr(ns: &mut Namespace, ino: Ino, record: &Local, step: Step) -> Result<(), FsError> {
        let xattrs = &mut Self::node_mut(ns, ino)?.meta.xattrs;
        let name = OsString::from_vec(record.name.clone());
        let exists = xattrs.contains_key(&name);
        match record.op() {
            LocalOp::Removexattr if !exists => return Err(FsError::new(libc::ENODATA, "no such attribute")),
            _ if exists && record.flags as i32 & XATTR_CREATE != 0 => {
                return Err(FsError::new(libc::EEXIST, "the attribute exists"));
            }
            _ if !exists && record.flags as i32 & XATTR_REPLACE != 0 => {
                return Err(FsError::new(libc::ENODATA, "no such attribute"));
            }
            _ if step == Step::Check => {}
            LocalOp::Removexattr => {
                xattrs.remove(&name);
            }
            _ => {
                xattrs.insert(name, record.value.clone());
            }
        }
        Ok(())
    }
}
