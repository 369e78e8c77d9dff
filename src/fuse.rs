//! The thin FUSE adapter: each `fuser` callback calls the filesystem core and
//! turns its answer into a reply or an errno. No lazyfs logic lives here.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::dir_handles::{DirHandles, Entries};
use crate::failover::opens::{Count, Held, OpenTable};
use crate::failover::request;
use crate::fs::{Attr, Creator, Filesystem, FsError, Kind, SetAttr};

/// The file set and its sizes come from the checkpoint and the source's
/// listings, and change only through this mount: the kernel may cache names
/// and attributes for long (but provisional ones: see [`ttl`]).
const TTL: Duration = Duration::from_secs(3600);
/// Concurrent background requests (readahead, async reads) the kernel may send.
const MAX_BACKGROUND: u16 = 64;

/// File handles say how a file was opened, so `release` knows what to undo.
const CACHED: FileHandle = FileHandle(0);
const PASSTHROUGH: FileHandle = FileHandle(1);

/// The adapter the session calls; what it holds is shared with the
/// answers given later from threads that waited for a listing.
pub struct FuseAdapter(Arc<Adapter>);

pub struct Adapter {
    fs: Arc<crate::fs::Filesystem>,
    /// Whether to hand the kernel verified files' spill files (FUSE passthrough).
    passthrough: Arc<AtomicBool>,
    opens: Mutex<OpenState>,
    /// Names the kernel connection in journal records (0: unsupervised, not named).
    connection: u64,
    /// Requests of this connection a predecessor made the change of.
    made: HashSet<u64>,
    /// Open directories and the entries each is reading.
    dirs: Arc<DirHandles>,
}

/// The open handles the kernel holds, per inode, and where a successor
/// finds them (a supervised mount's open table).
#[derive(Default)]
struct OpenState {
    by_ino: HashMap<u64, Opens>,
    table: Option<OpenTable>,
    /// The connection, to close backing files a predecessor registered.
    connection: Option<OwnedFd>,
    /// Per inode, the last request the predecessor counted: the requests
    /// the kernel sends again are the predecessor's, in any order, so they
    /// are checked against this, not against `last`, which this process's
    /// own counts move on.
    inherited: HashMap<u64, (u64, Count)>,
}

/// The open handles of one inode. The kernel allows one backing file per
/// inode and no cached open beside a passthrough one, so a file opened while
/// it was incomplete stays cached until every such open is closed.
#[derive(Default)]
struct Opens {
    cached: u32,
    passthrough: u32,
    backing: Option<Backing>,
    /// The last request that changed the counts, and how.
    last: Option<(u64, Count)>,
}

enum Backing {
    /// Registered by this process; closed when dropped.
    Ours(BackingId, u32),
    /// Registered by a predecessor: its id, until an open of ours needs it.
    Inherited(u32),
}

impl Opens {
    fn held(&self) -> Held {
        let backing = self.backing.as_ref().map(|b| match b {
            Backing::Ours(_, id) | Backing::Inherited(id) => *id,
        });
        Held { cached: self.cached, passthrough: self.passthrough, backing, last: self.last }
    }
}

// FUSE_DEV_IOC_BACKING_CLOSE: _IOW(229, 2, uint32_t).
nix::ioctl_write_ptr!(backing_close, 229, 2, u32);

impl std::ops::Deref for FuseAdapter {
    type Target = Adapter;

    fn deref(&self) -> &Adapter {
        &self.0
    }
}

/// What an answer given later needs of the request it answers.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// The request's number, without the mark of one sent again.
    unique: u64,
    /// Sent again (`FUSE_NOTIFY_RESEND`): its first taker died before answering.
    resent: bool,
}

impl Asked {
    fn of(req: &Request) -> Asked {
        Asked { unique: req.unique().0 & !FUSE_UNIQUE_RESEND, resent: resent(req) }
    }
}

impl OpenState {
    /// The backing file registered for `ino`, ours from now on (`wrap` takes
    /// over one a predecessor registered).
    fn ours(&mut self, ino: u64, wrap: impl FnOnce(u32) -> BackingId) -> Option<&BackingId> {
        let opens = self.by_ino.get_mut(&ino)?;
        if let Some(Backing::Inherited(id)) = opens.backing {
            opens.backing = Some(Backing::Ours(wrap(id), id));
        }
        match opens.backing.as_ref()? {
            Backing::Ours(backing, _) => Some(backing),
            Backing::Inherited(_) => None,
        }
    }

    /// How `req` changed the counts of `ino`, if it did before (it is sent
    /// again: its first taker died between counting and answering).
    fn counted(&self, asked: Asked, ino: u64) -> Option<Count> {
        let &(request, count) = self.inherited.get(&ino)?;
        (asked.resent && request == asked.unique).then_some(count)
    }

    /// Writes what is held of `ino` to the open table, and forgets an inode
    /// with nothing open any more (closing its backing file).
    fn settle(&mut self, ino: u64, asked: Asked, count: Count) {
        let Some(opens) = self.by_ino.get_mut(&ino) else { return };
        opens.last = Some((asked.unique, count));
        let gone = opens.cached == 0 && opens.passthrough == 0;
        let held = if gone { Held::default() } else { opens.held() };
        if let Some(table) = &mut self.table
            && let Err(e) = table.record(ino, &held)
        {
            log::error!("recording the open handles of inode {ino}: {e}");
        }
        // Dropping our BackingId closes it with the kernel; an inherited one is closed by number.
        if gone && let Some(Backing::Inherited(id)) = self.by_ino.remove(&ino).and_then(|o| o.backing) {
            // SAFETY: the ioctl reads one u32 the kernel is given a pointer to.
            let closed = self.connection.as_ref().map(|fd| unsafe { backing_close(fd.as_raw_fd(), &id) });
            if let Some(Err(e)) = closed {
                log::debug!("closing inherited backing file {id}: {e}");
            }
        }
    }
}

impl Adapter {
    /// Whether an open of `file` goes through passthrough (counted as one,
    /// its backing file registered): passthrough is on and no cached open of
    /// the inode is live.
    fn backing(
        &self,
        opens: &mut Opens,
        file: Option<std::fs::File>,
        open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
        wrap: impl Fn(u32) -> BackingId,
    ) -> bool {
        let Some(file) = file.filter(|_| opens.cached == 0 && self.passthrough.load(Ordering::Relaxed)) else {
            return false;
        };
        match opens.backing.take() {
            Some(Backing::Inherited(id)) => opens.backing = Some(Backing::Ours(wrap(id), id)),
            Some(ours) => opens.backing = Some(ours),
            None => match open_backing(&file) {
                Ok(backing) => {
                    // Its number goes into the open table, for a successor.
                    let id = backing.into_raw();
                    opens.backing = Some(Backing::Ours(wrap(id), id));
                }
                Err(e) => {
                    log::warn!("FUSE passthrough refused ({e}): files are served through lazyfs");
                    self.passthrough.store(false, Ordering::Relaxed);
                    return false;
                }
            },
        }
        opens.passthrough += 1;
        true
    }

    /// Whether `req` comes again (its first taker died before answering) and
    /// the change it asks for was made then (the journal says so).
    fn made_before(&self, req: &Request) -> bool {
        let asked = Asked::of(req);
        let made = asked.resent && self.made.contains(&asked.unique);
        if asked.resent {
            log::debug!("request {} sent again: {}", asked.unique, if made { "made before" } else { "not made yet" });
        }
        made
    }

    /// Makes a change on behalf of the request `asked`: its journal record names the request.
    fn on_behalf<T>(&self, asked: Asked, change: impl FnOnce() -> T) -> T {
        match self.connection {
            0 => change(),
            connection => request::on_behalf_of(connection, asked.unique, change),
        }
    }
}

/// What a create found or made.
enum Created {
    /// Made now: its data file.
    New(std::fs::File),
    /// Made by a predecessor for the same request (sent again).
    Before,
    /// There already and opened (a create sent again without `O_EXCL`).
    Opened(Option<std::fs::File>),
}

impl Adapter {
    /// Answers a create once the file is made (or found).
    fn created(&self, asked: Asked, created: Result<(Attr, Created), FsError>, reply: ReplyCreate) {
        // SAFETY: as in `open`.
        let wrap = |id| unsafe { reply.wrap_backing(id) };
        let (attr, file) = match created {
            Ok((attr, Created::New(file))) => (attr, Some(file)),
            Ok((attr, Created::Opened(file))) => (attr, file),
            // Sent again: made before, what is there is opened.
            Ok((attr, Created::Before)) => {
                let mut state = self.opens.lock().expect("opens");
                match state.counted(asked, attr.ino) {
                    // Counted then too: answered as it was counted.
                    Some(Count::PassthroughOpen) if let Some(backing) = state.ours(attr.ino, wrap) => {
                        let (fh, flags) = (PASSTHROUGH, FopenFlags::empty());
                        return reply.created_passthrough(
                            &ttl(&attr),
                            &file_attr(&attr),
                            Generation(0),
                            fh,
                            flags,
                            backing,
                        );
                    }
                    Some(Count::CachedOpen) => {
                        let (fh, flags) = (CACHED, FopenFlags::FOPEN_KEEP_CACHE);
                        return reply.created(&ttl(&attr), &file_attr(&attr), Generation(0), fh, flags);
                    }
                    _ => {}
                }
                drop(state);
                match self.fs.open(attr.ino, true) {
                    Ok(file) => (attr, file),
                    Err(e) => return reply.error(errno(&e)),
                }
            }
            Err(e) => return reply.error(errno(&e)),
        };
        let mut state = self.opens.lock().expect("opens");
        let opens = state.by_ino.entry(attr.ino).or_default();
        if self.backing(opens, file, |f| reply.open_backing(f), wrap) {
            state.settle(attr.ino, asked, Count::PassthroughOpen);
            let backing = state.ours(attr.ino, wrap).expect("registered above");
            return reply.created_passthrough(
                &ttl(&attr),
                &file_attr(&attr),
                Generation(0),
                PASSTHROUGH,
                FopenFlags::empty(),
                backing,
            );
        }
        opens.cached += 1;
        state.settle(attr.ino, asked, Count::CachedOpen);
        reply.created(&ttl(&attr), &file_attr(&attr), Generation(0), CACHED, FopenFlags::FOPEN_KEEP_CACHE)
    }
}

impl FuseAdapter {
    /// A change of names: made once, however often the kernel asks; one
    /// that waits for a listing is answered from a thread of its own.
    fn made_empty(
        &self,
        req: &Request,
        change: impl Fn(&Filesystem) -> Result<(), FsError> + Send + 'static,
        reply: ReplyEmpty,
    ) {
        if self.made_before(req) {
            return reply.ok();
        }
        let (adapter, asked) = (self.0.clone(), Asked::of(req));
        self.fs.then(move |fs| adapter.on_behalf(asked, || change(fs)), move |result| empty(result, reply))
    }

    /// A new name `name` in `parent`: made once; sent again, the entry as it is.
    fn made_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl Fn(&Filesystem) -> Result<Attr, FsError> + Send + 'static,
        reply: ReplyEntry,
    ) {
        if self.made_before(req) {
            let name = name.to_owned();
            return self.fs.then(move |fs| fs.lookup(parent.0, &name), move |result| entry(result, reply));
        }
        let (adapter, asked) = (self.0.clone(), Asked::of(req));
        self.fs.then(move |fs| adapter.on_behalf(asked, || make(fs)), move |result| entry(result, reply))
    }

    /// `passthrough`: whether to use FUSE passthrough (if the kernel agrees
    /// at INIT); it says afterwards whether it is on.
    pub fn new(fs: Arc<crate::fs::Filesystem>, passthrough: Arc<AtomicBool>) -> Self {
        let opens = Mutex::new(OpenState::default());
        let dirs = Arc::default();
        FuseAdapter(Arc::new(Adapter { fs, passthrough, opens, connection: 0, made: HashSet::new(), dirs }))
    }

    /// Serves kernel connection `connection` for a supervisor: keeps the open
    /// handles in `table` and names the requests in journal records, for a
    /// successor. For that successor: `held`, what its predecessor left open,
    /// and `device`, the connection (to close the predecessor's backing files).
    pub fn supervised(
        mut self,
        connection: u64,
        table: OpenTable,
        held: &HashMap<u64, Held>,
        device: Option<OwnedFd>,
    ) -> Self {
        let adapter = Arc::get_mut(&mut self.0).expect("not serving yet");
        adapter.connection = connection;
        adapter.made = adapter.fs.requests_made(connection);
        let by_ino = held
            .iter()
            .map(|(&ino, held)| {
                let backing = held.backing.map(Backing::Inherited);
                (ino, Opens { cached: held.cached, passthrough: held.passthrough, backing, last: held.last })
            })
            .collect();
        let inherited = held.iter().filter_map(|(&ino, held)| Some((ino, held.last?))).collect();
        *adapter.opens.lock().expect("opens") = OpenState { by_ino, table: Some(table), connection: device, inherited };
        self
    }
}

/// Answers a READDIR with the entries from `offset` on (each entry's offset
/// is the next one's index), as many as the kernel's buffer takes.
fn fill_dir(entries: &Entries, offset: u64, mut reply: ReplyDirectory) {
    for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
        if reply.add(INodeNo(*child), (i + 1) as u64, file_type(*kind), name) {
            break;
        }
    }
    reply.ok();
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
    /// Only the first serving process of a mount is asked: a successor keeps
    /// to what was agreed here (see `failover::link::Negotiated`).
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
        let name = name.to_owned();
        self.fs.then(move |fs| fs.lookup(parent.0, &name), move |result| entry(result, reply));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.fs.then(
            move |fs| fs.getattr_owned(ino.0),
            move |result| match result {
                Ok(attr) => reply.attr(&ttl(&attr), &file_attr(&attr)),
                Err(e) => reply.error(errno(&e)),
            },
        );
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

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // SAFETY (wrap_backing): the id is registered with this connection and
        // owned by this inode's entry alone.
        let wrap = |id| unsafe { reply.wrap_backing(id) };
        {
            let mut state = self.opens.lock().expect("opens");
            match state.counted(Asked::of(req), ino.0) {
                Some(Count::PassthroughOpen) if let Some(backing) = state.ours(ino.0, wrap) => {
                    return reply.opened_passthrough(PASSTHROUGH, FopenFlags::empty(), backing);
                }
                Some(Count::CachedOpen) => return reply.opened(CACHED, FopenFlags::FOPEN_KEEP_CACHE),
                _ => {}
            }
        }
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let backing_file = match self.fs.open(ino.0, write) {
            Ok(backing_file) => backing_file,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut state = self.opens.lock().expect("opens");
        let opens = state.by_ino.entry(ino.0).or_default();
        // The kernel reads (and writes) the local file itself.
        if self.backing(opens, backing_file, |f| reply.open_backing(f), wrap) {
            // Recorded before the kernel hears of it: a successor must know every open.
            state.settle(ino.0, Asked::of(req), Count::PassthroughOpen);
            let backing = state.ours(ino.0, wrap).expect("registered above");
            return reply.opened_passthrough(PASSTHROUGH, FopenFlags::empty(), backing);
        }
        if opens.passthrough > 0 {
            // The kernel refuses a cached open beside passthrough ones.
            drop(state);
            self.fs.release(ino.0);
            return reply.error(Errno::ETXTBSY);
        }
        opens.cached += 1;
        state.settle(ino.0, Asked::of(req), Count::CachedOpen);
        // Contents change only through this mount: keep the page cache across opens.
        reply.opened(CACHED, FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.opens.lock().expect("opens");
        if state.counted(Asked::of(req), ino.0) == Some(Count::Release) {
            return reply.ok();
        }
        if let Some(opens) = state.by_ino.get_mut(&ino.0) {
            if fh == PASSTHROUGH {
                opens.passthrough = opens.passthrough.saturating_sub(1);
            } else {
                opens.cached = opens.cached.saturating_sub(1);
            }
            state.settle(ino.0, Asked::of(req), Count::Release);
        }
        // Answered before the lock is let go, as every counted request is:
        // then at most one is counted and unanswered at a crash, the last
        // of its inode, which is all the open table remembers.
        reply.ok();
        drop(state);
        self.fs.release(ino.0);
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

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(self.dirs.open()), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        if let Some(entries) = self.dirs.entries(ino.0, fh.0, offset) {
            return fill_dir(&entries, offset, reply);
        }
        let dirs = self.dirs.clone();
        self.fs.then(
            move |fs| fs.readdir(ino.0),
            move |result| match result {
                Ok(entries) => {
                    let entries = Arc::new(entries);
                    dirs.keep(ino.0, fh.0, entries.clone());
                    fill_dir(&entries, offset, reply);
                }
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn releasedir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.release(ino.0, fh.0);
        reply.ok();
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
        let (name_owned, by) = (name.to_owned(), creator(req));
        self.made_entry(req, parent, name, move |fs| fs.mknod(parent.0, &name_owned, mode & !umask, by), reply)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (name_owned, by) = (name.to_owned(), creator(req));
        self.made_entry(req, parent, name, move |fs| fs.mkdir(parent.0, &name_owned, mode & !umask, by), reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let made_before = self.made_before(req);
        let (adapter, asked, by, name) = (self.0.clone(), Asked::of(req), creator(req), name.to_owned());
        let make = move |fs: &Filesystem| {
            let created = match made_before {
                false => adapter
                    .on_behalf(asked, || fs.create(parent.0, &name, mode & !umask, by))
                    .map(|(attr, file)| (attr, Created::New(file))),
                true => fs.lookup(parent.0, &name).map(|attr| (attr, Created::Before)),
            };
            match created {
                // Sent again, made before without O_EXCL: what is there is opened.
                Err(e) if e.errno == libc::EEXIST && asked.resent && flags & libc::O_EXCL == 0 => {
                    let attr = fs.lookup(parent.0, &name)?;
                    Ok((attr, Created::Opened(fs.open(attr.ino, true)?)))
                }
                created => created,
            }
        };
        let adapter = self.0.clone();
        self.fs.then(make, move |created| adapter.created(asked, created, reply));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.made_empty(req, move |fs| fs.unlink(parent.0, &name), reply)
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.made_empty(req, move |fs| fs.rmdir(parent.0, &name), reply)
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name_owned, target, by) = (name.to_owned(), target.to_owned(), creator(req));
        self.made_entry(req, parent, name, move |fs| fs.symlink(parent.0, &name_owned, &target, by), reply)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname, flags) = (name.to_owned(), newname.to_owned(), flags.bits());
        self.made_empty(req, move |fs| fs.rename(parent.0, &name, newparent.0, &newname, flags), reply)
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let name = newname.to_owned();
        self.made_entry(req, newparent, newname, move |fs| fs.link(ino.0, newparent.0, &name), reply)
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
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.made_empty(req, move |fs| fs.setxattr(ino.0, &name, &value, flags), reply)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        xattr(self.fs.getxattr(ino.0, name), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        xattr(self.fs.listxattr(ino.0), size, reply)
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.made_empty(req, move |fs| fs.removexattr(ino.0, &name), reply)
    }
}

/// The kernel marks a request it sends again (`FUSE_NOTIFY_RESEND`).
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

fn resent(req: &Request) -> bool {
    req.unique().0 & FUSE_UNIQUE_RESEND != 0
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
