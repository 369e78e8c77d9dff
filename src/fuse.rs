//! The thin FUSE adapter: each `fuser` callback calls the filesystem core and
//! turns its answer into a reply or an errno. No lazyfs logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, Creator, FsError, Kind, SetAttr};

/// The file set and its sizes come from the checkpoint and the source's
/// listings, and change only through this mount: the kernel may cache names
/// and attributes for long (but provisional ones: see [`ttl`]).
const TTL: Duration = Duration::from_secs(3600);
/// Concurrent background requests (readahead, async reads) the kernel may send.
const MAX_BACKGROUND: u16 = 64;

/// File handles say how a file was opened, so `release` knows what to undo.
const CACHED: FileHandle = FileHandle(0);
const PASSTHROUGH: FileHandle = FileHandle(1);

pub struct FuseAdapter {
    fs: Arc<crate::fs::Filesystem>,
    /// Whether to hand the kernel verified files' spill files (FUSE passthrough).
    passthrough: AtomicBool,
    opens: Mutex<HashMap<u64, Opens>>,
}

/// The open handles of one inode. The kernel allows one backing file per
/// inode and no cached open beside a passthrough one, so a file opened while
/// it was incomplete stays cached until every such open is closed.
#[derive(Default)]
struct Opens {
    cached: usize,
    passthrough: usize,
    backing: Option<BackingId>,
}

impl FuseAdapter {
    /// The backing id for a passthrough open of `file` (counted as one), if
    /// passthrough is on and no cached open of the inode is live.
    fn backing<'a>(
        &self,
        opens: &'a mut Opens,
        file: Option<std::fs::File>,
        open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<&'a BackingId> {
        let file = file.filter(|_| opens.cached == 0 && self.passthrough.load(Ordering::Relaxed))?;
        if opens.backing.is_none() {
            match open_backing(&file) {
                Ok(backing) => opens.backing = Some(backing),
                Err(e) => {
                    log::warn!("FUSE passthrough refused ({e}): files are served through lazyfs");
                    self.passthrough.store(false, Ordering::Relaxed);
                    return None;
                }
            }
        }
        opens.passthrough += 1;
        opens.backing.as_ref()
    }

    pub fn new(fs: Arc<crate::fs::Filesystem>, passthrough: bool) -> Self {
        FuseAdapter { fs, passthrough: AtomicBool::new(passthrough), opens: Mutex::new(HashMap::new()) }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno)
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(MAX_BACKGROUND);
        // lazyfs drops set-ID bits and capabilities itself (`fs.rs`), so the
        // kernel does not ask for `security.capability` before every write.
        if config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2).is_err() {
            log::info!(
                "this kernel cannot leave privileges to lazyfs: each write costs it a look at the file's capabilities"
            );
        }
        if self.passthrough.load(Ordering::Relaxed) {
            // Spill files may sit on a stacked filesystem (overlayfs) themselves.
            let enabled =
                config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(2).is_ok();
            if !enabled {
                log::info!("this kernel has no FUSE passthrough: verified files are served through lazyfs");
            }
            self.passthrough.store(enabled, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.fs.lookup_then(parent.0, name, Box::new(move |result| entry(result, reply)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.attr(&ttl(&attr), &file_attr(&attr)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // fuser 0.18 does not pass FATTR_KILL_SUIDGID (a truncate by a caller
        // without CAP_FSETID): root stands for CAP_FSETID.
        let kill_set_ids = size.is_some() && req.uid() != 0;
        let change = SetAttr { mode, uid, gid, size, atime: atime.map(time), mtime: mtime.map(time), kill_set_ids };
        self.fs.setattr(
            ino.0,
            change,
            Box::new(move |result| match result {
                Ok(attr) => reply.attr(&ttl(&attr), &file_attr(&attr)),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let backing_file = match self.fs.open(ino.0, write) {
            Ok(backing_file) => backing_file,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut all = self.opens.lock().expect("opens");
        let opens = all.entry(ino.0).or_default();
        // The kernel reads (and writes) the local file itself.
        if let Some(backing) = self.backing(opens, backing_file, |f| reply.open_backing(f)) {
            return reply.opened_passthrough(PASSTHROUGH, FopenFlags::empty(), backing);
        }
        if opens.passthrough > 0 {
            // The kernel refuses a cached open beside passthrough ones.
            drop(all);
            self.fs.release(ino.0);
            return reply.error(Errno::ETXTBSY);
        }
        opens.cached += 1;
        // Contents change only through this mount: keep the page cache across opens.
        reply.opened(CACHED, FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut all = self.opens.lock().expect("opens");
        if let Some(opens) = all.get_mut(&ino.0) {
            if fh == PASSTHROUGH {
                opens.passthrough = opens.passthrough.saturating_sub(1);
            } else {
                opens.cached = opens.cached.saturating_sub(1);
            }
            if opens.passthrough == 0 && opens.cached == 0 {
                // Dropping the BackingId closes it with the kernel.
                all.remove(&ino.0);
            }
        }
        drop(all);
        self.fs.release(ino.0);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.fs.read(
            ino.0,
            offset,
            size,
            Box::new(move |result| match result {
                Ok(bytes) => reply.data(bytes),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.fs.write(
            ino.0,
            offset,
            data.to_vec(),
            write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID),
            Box::new(move |result| match result {
                Ok(written) => reply.written(written),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        // Writes reach the spill file as they come: nothing is buffered here.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.fs.readdir_then(
            ino.0,
            Box::new(move |result| match result {
                Ok(entries) => {
                    for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                        if reply.add(INodeNo(*child), (i + 1) as u64, file_type(*kind), name) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stats = self.fs.statfs();
        let blocks = stats.bytes_total.div_ceil(4096);
        reply.statfs(blocks, 0, 0, stats.files, 0, 4096, 255, 4096);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        entry(self.fs.mknod(parent.0, name, mode & !umask, creator(req)), reply)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        entry(self.fs.mkdir(parent.0, name, mode & !umask, creator(req)), reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let (attr, file) = match self.fs.create(parent.0, name, mode & !umask, creator(req)) {
            Ok(created) => created,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut all = self.opens.lock().expect("opens");
        let opens = all.entry(attr.ino).or_default();
        if let Some(backing) = self.backing(opens, Some(file), |f| reply.open_backing(f)) {
            return reply.created_passthrough(
                &TTL,
                &file_attr(&attr),
                Generation(0),
                PASSTHROUGH,
                FopenFlags::empty(),
                backing,
            );
        }
        opens.cached += 1;
        reply.created(&ttl(&attr), &file_attr(&attr), Generation(0), CACHED, FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.fs.unlink(parent.0, name), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.fs.rmdir(parent.0, name), reply)
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        entry(self.fs.symlink(parent.0, name, target, creator(req)), reply)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()), reply)
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        entry(self.fs.link(ino.0, newparent.0, newname), reply)
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: fuser::ReplyLseek) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(Errno::EINVAL) };
        match self.fs.seek(ino.0, offset, whence) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(self.fs.fsyncdir(ino.0), reply)
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(self.fs.setxattr(ino.0, name, value, flags), reply)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        xattr(self.fs.getxattr(ino.0, name), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        xattr(self.fs.listxattr(ino.0), size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.fs.removexattr(ino.0, name), reply)
    }
}

fn creator(req: &Request) -> Creator {
    Creator { uid: req.uid(), gid: req.gid() }
}

fn entry(result: Result<Attr, FsError>, reply: ReplyEntry) {
    match result {
        Ok(attr) => reply.entry(&ttl(&attr), &file_attr(&attr), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// How long the kernel may keep a node's name and attributes: not at all
/// while they are provisional (its directory of the tree not listed yet).
fn ttl(attr: &Attr) -> Duration {
    if attr.provisional { Duration::ZERO } else { TTL }
}

fn empty(result: Result<(), FsError>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// An attribute value or name list: its size when asked with size 0, ERANGE
/// if it does not fit.
fn xattr(result: Result<Vec<u8>, FsError>, size: u32, reply: fuser::ReplyXattr) {
    match result {
        Ok(value) if size == 0 => reply.size(value.len() as u32),
        Ok(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(value) => reply.data(&value),
        Err(e) => reply.error(errno(&e)),
    }
}
