//! The filesystem core: what each operation means for lazyfs, over the
//! namespace, the fetcher and the spill files. Knows nothing of FUSE: the
//! adapter in `fuse.rs` turns these results into replies and errnos.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::fetch::{FetchError, Fetcher};
use crate::namespace::{Ino, Namespace, NodeKind, ROOT_INO};

/// An operation's failure: the errno the caller gets, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    pub errno: i32,
    pub message: String,
}

impl FsError {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError { errno, message: message.into() }
    }
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
}

#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
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
}

pub struct StatFs {
    pub bytes_total: u64,
    pub files: u64,
}

/// One served file's attributes that may change locally.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

/// A file the mount serves.
pub struct ServedFile {
    /// The path the checkpoint recorded.
    pub path: PathBuf,
    meta: Mutex<Meta>,
    /// Whether a process of the checkpoint had it open for writing.
    written: bool,
}

/// What the checkpoint says of a file the mount serves.
pub struct ServedSpec {
    pub path: PathBuf,
    pub mode: u32,
    /// A process had it open for writing (or mapped it shared and writable):
    /// `criu restore` will open it for writing too.
    pub written: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct FsConfig {
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
}

pub struct Filesystem {
    ns: Namespace,
    files: Vec<Arc<ServedFile>>,
    fetcher: Fetcher,
    config: FsConfig,
    started: SystemTime,
}

pub type ReadReply = Box<dyn FnOnce(Result<&[u8], FsError>) + Send>;
pub type WriteReply = Box<dyn FnOnce(Result<u32, FsError>) + Send>;
pub type AttrReply = Box<dyn FnOnce(Result<Attr, FsError>) + Send>;

impl Filesystem {
    /// `modes[i]` is the recorded mode of fetcher file `i`.
    pub fn new(ns: Namespace, specs: Vec<ServedSpec>, fetcher: Fetcher, config: FsConfig) -> Self {
        let started = SystemTime::now();
        let files = specs
            .into_iter()
            .map(|ServedSpec { path, mode, written }| {
                let meta =
                    Meta { mode, uid: config.uid, gid: config.gid, atime: started, mtime: started, ctime: started };
                Arc::new(ServedFile { path, meta: Mutex::new(meta), written })
            })
            .collect();
        Filesystem { ns, files, fetcher, config, started }
    }

    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub fn served(&self, index: usize) -> &ServedFile {
        &self.files[index]
    }

    fn file_index(&self, ino: Ino) -> Result<usize, FsError> {
        match self.ns.node(ino).map(|n| &n.kind) {
            Some(NodeKind::File(index)) => Ok(*index),
            Some(NodeKind::Dir(_)) => Err(FsError::new(libc::EISDIR, "a directory")),
            None => Err(FsError::new(libc::ENOENT, format!("no inode {ino}"))),
        }
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        match self.ns.node(parent).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => {}
            Some(NodeKind::File(_)) => return Err(FsError::new(libc::ENOTDIR, "not a directory")),
            None => return Err(FsError::new(libc::ENOENT, format!("no inode {parent}"))),
        }
        let ino = self.ns.lookup(parent, name).ok_or_else(|| FsError::new(libc::ENOENT, "no such file"))?;
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        let node = self.ns.node(ino).ok_or_else(|| FsError::new(libc::ENOENT, format!("no inode {ino}")))?;
        Ok(match &node.kind {
            NodeKind::Dir(children) => Attr {
                ino,
                kind: Kind::Dir,
                size: 0,
                perm: 0o755,
                nlink: 2 + children.keys().filter(|n| self.is_dir(self.ns.lookup(ino, n))).count() as u32,
                uid: self.config.uid,
                gid: self.config.gid,
                atime: self.started,
                mtime: self.started,
                ctime: self.started,
            },
            NodeKind::File(index) => self.files[*index].attr(ino, self.fetcher.file(*index).len()),
        })
    }

    fn is_dir(&self, ino: Option<Ino>) -> bool {
        ino.and_then(|i| self.ns.node(i)).is_some_and(|n| matches!(n.kind, NodeKind::Dir(_)))
    }

    /// The entries of a directory, `.` and `..` first.
    pub fn readdir(&self, ino: Ino) -> Result<Vec<(Ino, Kind, OsString)>, FsError> {
        let node = self.ns.node(ino).ok_or_else(|| FsError::new(libc::ENOENT, format!("no inode {ino}")))?;
        let NodeKind::Dir(children) = &node.kind else {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        };
        let parent = if ino == ROOT_INO { ROOT_INO } else { node.parent };
        let mut entries = vec![(ino, Kind::Dir, OsString::from(".")), (parent, Kind::Dir, OsString::from(".."))];
        for (name, &child) in children {
            let kind = if self.is_dir(Some(child)) { Kind::Dir } else { Kind::File };
            entries.push((child, kind, name.clone()));
        }
        Ok(entries)
    }

    /// Checks an open; for a read-only open of a verified file, gives the spill
    /// file, which the kernel may then read directly (FUSE passthrough). Not
    /// for a file the checkpoint had open for writing: the kernel refuses a
    /// cached open beside passthrough ones, and `criu restore` opens such a
    /// file for writing too, after or before its read-only opens.
    pub fn open(&self, ino: Ino, write: bool) -> Result<Option<std::fs::File>, FsError> {
        let index = self.file_index(ino)?;
        if write && self.config.read_only {
            return Err(FsError::new(libc::EROFS, "mounted --read-only"));
        }
        if write || self.files[index].written {
            return Ok(None);
        }
        Ok(self.fetcher.file(index).verified_file()?)
    }

    /// Replies with bytes `offset..offset+size` once their chunks are present.
    pub fn read(&self, ino: Ino, offset: u64, size: u32, reply: ReadReply) {
        let index = match self.file_index(ino) {
            Ok(index) => index,
            Err(e) => return reply(Err(e)),
        };
        self.fetcher.read(
            index,
            offset,
            size,
            Box::new(move |bytes| match bytes {
                Ok(bytes) => reply(Ok(&bytes)),
                // A read that cannot be served is an I/O error, whatever the cause.
                Err(e) => reply(Err(FsError::new(libc::EIO, e.message.to_string()))),
            }),
        );
    }

    /// Writes locally once the whole file is present: the source is never written.
    pub fn write(&self, ino: Ino, offset: u64, data: Vec<u8>, reply: WriteReply) {
        let index = match self.writable(ino) {
            Ok(index) => index,
            Err(e) => return reply(Err(e)),
        };
        let served = self.files[index].clone();
        self.fetcher.write(
            index,
            offset,
            data,
            Box::new(move |written| {
                if written.is_ok() {
                    served.touch();
                }
                reply(written.map_err(FsError::from))
            }),
        );
    }

    pub fn setattr(&self, ino: Ino, change: SetAttr, reply: AttrReply) {
        let writes = change.size.is_some();
        if self.config.read_only && (writes || change.mode.is_some() || change.uid.is_some() || change.gid.is_some()) {
            return reply(Err(FsError::new(libc::EROFS, "mounted --read-only")));
        }
        let Ok(index) = self.file_index(ino) else {
            // Directories are synthesised: their attributes stay as they are.
            return reply(self.getattr(ino));
        };
        let served = self.files[index].clone();
        let apply = move |served: &ServedFile| {
            let mut meta = served.meta.lock().expect("meta");
            if let Some(mode) = change.mode {
                meta.mode = (meta.mode & !0o7777) | (mode & 0o7777);
            }
            meta.uid = change.uid.unwrap_or(meta.uid);
            meta.gid = change.gid.unwrap_or(meta.gid);
            meta.atime = change.atime.unwrap_or(meta.atime);
            meta.mtime = change.mtime.unwrap_or(meta.mtime);
            meta.ctime = SystemTime::now();
        };
        let Some(size) = change.size else {
            apply(&served);
            return reply(self.getattr(ino));
        };
        self.fetcher.truncate(
            index,
            size,
            Box::new(move |truncated| {
                reply(truncated.map_err(FsError::from).map(|len| {
                    served.touch();
                    apply(&served);
                    served.attr(ino, len)
                }))
            }),
        );
    }

    /// The file of `ino`, if it may be changed.
    fn writable(&self, ino: Ino) -> Result<usize, FsError> {
        let index = self.file_index(ino)?;
        if self.config.read_only {
            return Err(FsError::new(libc::EROFS, "mounted --read-only"));
        }
        Ok(index)
    }

    pub fn fsync(&self, ino: Ino) -> Result<(), FsError> {
        let index = self.file_index(ino)?;
        Ok(self.fetcher.file(index).sync()?)
    }

    pub fn statfs(&self) -> StatFs {
        let bytes_total = self.fetcher.files().iter().map(|f| f.len()).sum();
        StatFs { bytes_total, files: self.ns.len() as u64 }
    }
}

impl ServedFile {
    fn attr(&self, ino: Ino, size: u64) -> Attr {
        let meta = self.meta.lock().expect("meta");
        Attr {
            ino,
            kind: Kind::File,
            size,
            perm: (meta.mode & 0o7777) as u16,
            nlink: 1,
            uid: meta.uid,
            gid: meta.gid,
            atime: meta.atime,
            mtime: meta.mtime,
            ctime: meta.ctime,
        }
    }

    fn touch(&self) {
        let mut meta = self.meta.lock().expect("meta");
        let now = SystemTime::now();
        meta.mtime = now;
        meta.ctime = now;
    }
}
