//! Reads a CRIU image directory into a [`Checkpoint`]: the set of files its
//! processes used. Knows nothing of mounting or fetching.
//!
//! Images are untrusted: every failure is an [`ImageError`] naming the image
//! file, and every name goes through [`names::check_absolute`].

mod error;
pub mod framing;
mod model;
pub mod names;
pub mod proto;
pub mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

pub use error::{FrameError, ImageError, ImageErrorKind, Invalid};
use framing::Magic;
pub use model::{Checkpoint, FileRecords, Incomplete, RecordedFile, Unservable, Usage, User, non_regular_kind};
use proto::{
    CoreEntry, FdinfoEntry, FileEntry, FsEntry, Fstype, InventoryEntry, MmEntry, MntEntry, PstreeEntry, RegFileEntry,
    RemapFilePathEntry, RemapType, TaskKobjIdsEntry,
};

/// The images lazyfs reads are small (mm images hold a few thousand VMAs at most);
/// anything larger is refused before it is read into memory.
pub const MAX_IMAGE_SIZE: u64 = 256 << 20;

/// `vma_entry.status` bits saying the VMA maps a file whose id is in `shmid`.
const VMA_FILE_PRIVATE: u32 = 1 << 6;
const VMA_FILE_SHARED: u32 = 1 << 7;
const O_DIRECTORY: u32 = 0o200000;
const FD_TYPE_REG: u32 = 1;

impl Checkpoint {
    /// Reads every image of `dir` that says which files the dump used.
    pub fn load(dir: &Path) -> Result<Checkpoint, ImageError> {
        Loader::new(dir)?.load()
    }

    /// The one line to show when the directory is not a whole dump.
    pub fn warning(&self) -> Option<String> {
        self.incomplete.as_ref().map(|incomplete| format!("{}: {incomplete}", self.dir.display()))
    }

    pub fn servable(&self) -> impl Iterator<Item = &RecordedFile> {
        self.files.iter().filter(|f| f.is_servable())
    }
}

/// Feeds every image file of `dir` but the memory pages (large, and they say
/// nothing of files) to `hasher`, name and bytes, in name order: what tells
/// one checkpoint from another. An error names the file it is about.
pub fn hash_files(dir: &Path, hasher: &mut blake3::Hasher) -> Result<(), (PathBuf, std::io::Error)> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| (path, e)
    };
    let mut names: Vec<OsString> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    names.retain(|n| n.as_bytes().ends_with(b".img") && !n.as_bytes().starts_with(b"pages-"));
    names.sort();
    for name in names {
        let path = dir.join(&name);
        hasher.update(name.as_bytes()).update(&[0]);
        std::io::copy(&mut std::fs::File::open(&path).map_err(io(&path))?, hasher).map_err(io(&path))?;
    }
    Ok(())
}

struct Loader<'a> {
    dir: &'a Path,
}

/// `core.tc.task_state` (criu/include/pid.h): which images a task has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskState {
    Alive,
    /// A zombie: CRIU writes only its core-PID.img.
    Dead,
    Stopped,
    /// A task CRIU made up for a session or process group: its images are optional.
    Helper,
}

impl TaskState {
    fn from_image(value: u32) -> Option<TaskState> {
        match value {
            1 => Some(TaskState::Alive),
            2 => Some(TaskState::Dead),
            3 => Some(TaskState::Stopped),
            // TASK_HELPER was 4 before CRIU 3.0 and is 0x80 (COMPEL_TASK_MAX + 1) since.
            4 | 0x80 => Some(TaskState::Helper),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            TaskState::Alive => "a live task",
            TaskState::Dead => "a dead task",
            TaskState::Stopped => "a stopped task",
            TaskState::Helper => "a helper task",
        }
    }
}

/// What the walk over the tasks found: the users, and the first image a
/// task's state requires that is missing.
#[derive(Default)]
struct Walk {
    users: BTreeMap<u32, Vec<User>>,
    fsuids: std::collections::BTreeSet<u32>,
    fdinfo_cache: HashMap<String, Option<Vec<FdinfoEntry>>>,
    incomplete: Option<Incomplete>,
}

impl Walk {
    fn missing(&mut self, image: &str, why: String) {
        self.incomplete.get_or_insert_with(|| Incomplete { image: image.to_string(), why });
    }
}

/// A file id's record, with the file id's remap if it has one.
struct Reg {
    entry: RegFileEntry,
    remap: Option<Unservable>,
    /// Its place among the records, in the order the image lists them.
    position: usize,
}

/// The file records of a dump, by file id.
struct FileTable {
    file_records: FileRecords,
    regs: HashMap<u32, Reg>,
    /// Ids of descriptors that are not regular files (sockets, pipes, memfds...).
    others: HashSet<u32>,
}

impl<'a> Loader<'a> {
    fn new(dir: &'a Path) -> Result<Self, ImageError> {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok(Loader { dir }),
            Ok(_) => Err(ImageError::new(dir, ImageErrorKind::Missing("not a directory".into()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ImageError::new(dir, ImageErrorKind::Missing("no such directory".into())))
            }
            Err(e) => Err(ImageError::new(dir, ImageErrorKind::Io(e))),
        }
    }

    fn load(&self) -> Result<Checkpoint, ImageError> {
        let inventory: Option<InventoryEntry> = self.read_optional_one("inventory.img", framing::INVENTORY)?;
        let processes: Option<Vec<PstreeEntry>> = self.read_optional("pstree.img", framing::PSTREE)?;
        if processes.as_ref().is_some_and(Vec::is_empty) {
            return Err(self.invalid("pstree.img", Invalid::NoEntries));
        }
        let mut table = self.read_file_table()?;
        self.apply_remaps(&mut table.regs)?;
        let mounts = self.read_mounts()?;

        let mut walk = Walk::default();
        match (&inventory, &processes) {
            (None, _) => walk.missing("inventory.img", "every CRIU dump has it".into()),
            (_, None) => walk.missing("pstree.img", "every CRIU dump has it".into()),
            (Some(inventory), Some(processes)) => {
                for process in processes {
                    self.read_task(process.pid, inventory, &table, &mut walk)?;
                }
            }
        }
        // Every image that is here has been read (a damaged one is an error
        // even when another is missing); only then the fallback.
        let (users, incomplete) = match walk.incomplete {
            None => (walk.users, None),
            Some(incomplete) => (self.fdinfo_users(&table)?, Some(incomplete)),
        };
        let files = merge_by_path(&table.regs, users, &mounts);
        Ok(Checkpoint {
            dir: self.dir.to_path_buf(),
            file_records: table.file_records,
            pids: processes.unwrap_or_default().iter().map(|p| p.pid).collect(),
            fsuids: walk.fsuids.iter().copied().collect(),
            incomplete,
            files,
        })
    }

    /// The users of one task, read from the images its state says it has
    /// (criu/cr-restore.c): a dead task has only core-PID.img; a helper may
    /// lack the others; a live or stopped one has them all. A core image
    /// without a task state (images made by hand) is read as a live task's.
    fn read_task(
        &self,
        pid: u32,
        inventory: &InventoryEntry,
        table: &FileTable,
        walk: &mut Walk,
    ) -> Result<(), ImageError> {
        let core_name = format!("core-{pid}.img");
        let core: Option<CoreEntry> = self.read_optional_one(&core_name, framing::CORE)?;
        let state = match core.as_ref().and_then(|c| c.tc.as_ref()).and_then(|tc| tc.task_state) {
            None => TaskState::Alive,
            Some(value) => TaskState::from_image(value)
                .ok_or_else(|| self.invalid(&core_name, Invalid::UnknownTaskState(value)))?,
        };
        if let Some(creds) = core.as_ref().and_then(|c| c.thread_core).and_then(|t| t.creds) {
            walk.fsuids.extend(creds.fsuid.or(creds.euid));
        }
        let required = match state {
            TaskState::Dead => return Ok(()),
            TaskState::Helper => false,
            TaskState::Alive | TaskState::Stopped => true,
        };
        let missing = |walk: &mut Walk, image: &str| {
            if required {
                walk.missing(image, format!("pstree.img lists process {pid}, {}", state.describe()));
            }
        };
        let regs = &table.regs;

        let ids_name = format!("ids-{pid}.img");
        let ids = match core.and_then(|c| c.ids) {
            Some(ids) => Some(ids),
            None => self.read_optional_one::<TaskKobjIdsEntry>(&ids_name, framing::IDS)?,
        };
        match ids {
            None => missing(walk, &ids_name),
            Some(ids) => {
                let fdinfo_name = if inventory.fdinfo_per_id.unwrap_or(false) {
                    format!("fdinfo-{}.img", ids.files_id)
                } else {
                    format!("fdinfo-{pid}.img")
                };
                match self.fdinfo(&mut walk.fdinfo_cache, &fdinfo_name)? {
                    None => missing(walk, &fdinfo_name),
                    Some(fds) => {
                        for fd in fds.iter().filter(|fd| fd.r#type == FD_TYPE_REG) {
                            let reg = self.reg(regs, &fdinfo_name, format!("fd {}", fd.fd), fd.id.into())?;
                            let usage = Usage::Fd { fd: fd.fd, flags: reg.entry.flags };
                            walk.users.entry(fd.id).or_default().push(User { pid: Some(pid), usage });
                        }
                    }
                }
            }
        }

        let mm_name = format!("mm-{pid}.img");
        match self.read_optional_one::<MmEntry>(&mm_name, framing::MM)? {
            None => missing(walk, &mm_name),
            Some(mm) => {
                self.reg(regs, &mm_name, "exe_file_id".into(), mm.exe_file_id.into())?;
                walk.users.entry(mm.exe_file_id).or_default().push(User { pid: Some(pid), usage: Usage::Exe });
                for vma in &mm.vmas {
                    if vma.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED) == 0 {
                        continue;
                    }
                    let what = format!("the mapping at {:#x}", vma.start);
                    // A mapped memfd or other non-regular descriptor names a file
                    // id that is not a regular file: it has no path to serve.
                    match u32::try_from(vma.shmid).ok().filter(|id| regs.contains_key(id)) {
                        Some(id) => walk.users.entry(id).or_default().push(User { pid: Some(pid), usage: Usage::Map }),
                        None if u32::try_from(vma.shmid).is_ok_and(|id| table.others.contains(&id)) => {}
                        None => return Err(self.unknown_id(&mm_name, what, vma.shmid)),
                    }
                }
            }
        }

        let fs_name = format!("fs-{pid}.img");
        match self.read_optional_one::<FsEntry>(&fs_name, framing::FS)? {
            None => missing(walk, &fs_name),
            Some(fs) => {
                for (id, usage, what) in [(fs.cwd_id, Usage::Cwd, "cwd_id"), (fs.root_id, Usage::Root, "root_id")] {
                    self.reg(regs, &fs_name, what.into(), id.into())?;
                    walk.users.entry(id).or_default().push(User { pid: Some(pid), usage });
                }
            }
        }
        Ok(())
    }

    /// An fdinfo image, read once however many processes share it.
    fn fdinfo<'c>(
        &self,
        cache: &'c mut HashMap<String, Option<Vec<FdinfoEntry>>>,
        name: &str,
    ) -> Result<Option<&'c [FdinfoEntry]>, ImageError> {
        if !cache.contains_key(name) {
            let entries = self.read_optional(name, framing::FDINFO)?;
            cache.insert(name.to_string(), entries);
        }
        Ok(cache[name].as_deref())
    }

    /// What the original prototype listed: every regular file any
    /// `fdinfo-*.img` refers to, with its descriptors but no pid (nothing
    /// says which process an fdinfo image belongs to without the rest).
    fn fdinfo_users(&self, table: &FileTable) -> Result<BTreeMap<u32, Vec<User>>, ImageError> {
        let mut users: BTreeMap<u32, Vec<User>> = BTreeMap::new();
        for name in self.image_names("fdinfo-")? {
            for fd in self.read_required::<FdinfoEntry>(&name, framing::FDINFO)? {
                if fd.r#type != FD_TYPE_REG {
                    continue;
                }
                let reg = self.reg(&table.regs, &name, format!("fd {}", fd.fd), fd.id.into())?;
                let usage = Usage::Fd { fd: fd.fd, flags: reg.entry.flags };
                users.entry(fd.id).or_default().push(User { pid: None, usage });
            }
        }
        Ok(users)
    }

    /// The file records, in either format.
    fn read_file_table(&self) -> Result<FileTable, ImageError> {
        let mut table = FileTable { file_records: FileRecords::Modern, regs: HashMap::new(), others: HashSet::new() };
        let insert = |table: &mut FileTable, name: &str, entry: RegFileEntry, id: u32| {
            let position = table.regs.len();
            if table.regs.insert(id, Reg { entry, remap: None, position }).is_some() {
                return Err(self.invalid(name, Invalid::DuplicateId(id)));
            }
            Ok(())
        };
        if let Some(entries) = self.read_optional::<FileEntry>("files.img", framing::FILES)? {
            for entry in entries {
                if entry.r#type != FD_TYPE_REG {
                    table.others.insert(entry.id);
                    continue;
                }
                let reg = entry.reg.ok_or_else(|| self.invalid("files.img", Invalid::RegWithoutBody(entry.id)))?;
                insert(&mut table, "files.img", reg, entry.id)?;
            }
            return Ok(table);
        }
        match self.read_optional::<RegFileEntry>("reg-files.img", framing::REG_FILES)? {
            Some(entries) => {
                table.file_records = FileRecords::Legacy;
                for entry in entries {
                    let id = entry.id;
                    insert(&mut table, "reg-files.img", entry, id)?;
                }
                Ok(table)
            }
            None => Err(ImageError::new(
                &self.path("files.img"),
                ImageErrorKind::Missing(
                    "neither files.img nor reg-files.img is here: not a CRIU image directory?".into(),
                ),
            )),
        }
    }

    fn apply_remaps(&self, regs: &mut HashMap<u32, Reg>) -> Result<(), ImageError> {
        let Some(remaps) = self.read_optional::<RemapFilePathEntry>("remap-fpath.img", framing::REMAP_FPATH)? else {
            return Ok(());
        };
        for remap in remaps {
            let reason = match RemapType::try_from(remap.remap_type.unwrap_or(0) as i32) {
                Ok(RemapType::Ghost) => Unservable::Ghost { image: format!("ghost-file-{}.img", remap.remap_id) },
                Ok(RemapType::Linked) => Unservable::LinkedRemap,
                Ok(RemapType::Procfs) | Err(_) => Unservable::ProcfsRemap,
            };
            // A remap of a file nobody references is harmless; only a known id matters.
            if let Some(reg) = regs.get_mut(&remap.orig_id) {
                reg.remap = Some(reason);
            }
        }
        Ok(())
    }

    /// Every mount of every dumped mount namespace, by mount id.
    fn read_mounts(&self) -> Result<HashMap<i32, MntEntry>, ImageError> {
        let mut mounts = HashMap::new();
        for name in self.image_names("mountpoints-")? {
            for mount in self.read_required::<MntEntry>(&name, framing::MNTS)? {
                mounts.insert(mount.mnt_id as i32, mount);
            }
        }
        Ok(mounts)
    }

    /// The names of the images `PREFIX*.img` here, sorted.
    fn image_names(&self, prefix: &str) -> Result<Vec<String>, ImageError> {
        let io = |e| ImageError::new(self.dir, ImageErrorKind::Io(e));
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.dir).map_err(io)? {
            // CRIU names its images in ASCII: nothing else is one.
            let Ok(name) = entry.map_err(io)?.file_name().into_string() else { continue };
            if name.starts_with(prefix) && name.ends_with(".img") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn reg<'r>(&self, regs: &'r HashMap<u32, Reg>, image: &str, what: String, id: u64) -> Result<&'r Reg, ImageError> {
        u32::try_from(id).ok().and_then(|id| regs.get(&id)).ok_or_else(|| self.unknown_id(image, what, id))
    }

    fn unknown_id(&self, image: &str, what: String, id: u64) -> ImageError {
        self.invalid(image, Invalid::UnknownFileId { what, id })
    }

    fn invalid(&self, image: &str, invalid: Invalid) -> ImageError {
        ImageError::new(&self.path(image), invalid)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_required<M: prost::Message + Default>(&self, name: &str, magic: Magic) -> Result<Vec<M>, ImageError> {
        self.read_optional(name, magic)?.ok_or_else(|| self.missing(name))
    }

    fn missing(&self, name: &str) -> ImageError {
        ImageError::new(&self.path(name), ImageErrorKind::Missing("every CRIU dump has this image".into()))
    }

    fn read_optional_one<M: prost::Message + Default>(
        &self,
        name: &str,
        magic: Magic,
    ) -> Result<Option<M>, ImageError> {
        let Some(mut entries) = self.read_optional::<M>(name, magic)? else {
            return Ok(None);
        };
        match entries.len() {
            1 => Ok(entries.pop()),
            0 => Err(self.invalid(name, Invalid::NoEntries)),
            n => Err(self.invalid(name, Invalid::MoreThanOneEntry(n))),
        }
    }

    /// `None` when the image does not exist.
    fn read_optional<M: prost::Message + Default>(
        &self,
        name: &str,
        magic: Magic,
    ) -> Result<Option<Vec<M>>, ImageError> {
        let path = self.path(name);
        let err = |kind| ImageError::new(&path, kind);
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(ImageErrorKind::Io(e))),
        };
        if meta.len() > MAX_IMAGE_SIZE {
            return Err(err(ImageErrorKind::TooLarge { size: meta.len(), max: MAX_IMAGE_SIZE }));
        }
        let bytes = std::fs::read(&path).map_err(|e| err(ImageErrorKind::Io(e)))?;
        let entries = framing::decode_entries(&bytes, magic).map_err(|e| err(e.into()))?;
        Ok(Some(entries))
    }
}

/// Groups file ids by path (a second open, a mapping, each process's root all
/// get ids of their own) and decides for each path whether it can be served.
fn merge_by_path(
    regs: &HashMap<u32, Reg>,
    users: BTreeMap<u32, Vec<User>>,
    mounts: &HashMap<i32, MntEntry>,
) -> Vec<RecordedFile> {
    // Per path: the file, and the first remap or mount reason any of its ids has.
    let mut by_path: BTreeMap<Vec<u8>, (RecordedFile, Option<Unservable>)> = BTreeMap::new();
    for (id, id_users) in users {
        let reg = &regs[&id];
        let entry = &reg.entry;
        let (file, other_reason) = by_path.entry(entry.name.clone()).or_insert_with(|| {
            let (source_path, mount_reason) = resolve_mount(&entry.name, entry.mnt_id, mounts);
            let file = RecordedFile {
                path: PathBuf::from(OsString::from_vec(entry.name.clone())),
                source_path,
                size: None,
                mode: None,
                flags: 0,
                users: Vec::new(),
                unservable: None,
                image_order: reg.position,
            };
            (file, mount_reason)
        });
        file.size = file.size.max(entry.size);
        file.mode = file.mode.or(entry.mode);
        file.flags |= entry.flags;
        file.image_order = file.image_order.min(reg.position);
        file.users.extend(id_users);
        if other_reason.is_none() {
            other_reason.clone_from(&reg.remap);
        }
    }
    by_path
        .into_iter()
        .map(|(name, (mut file, other_reason))| {
            file.users.sort();
            file.unservable = names::check_absolute(&name)
                .err()
                .map(Unservable::BadName)
                .or_else(|| file_kind(&file).map(Unservable::NotRegular))
                .or(other_reason);
            file
        })
        .collect()
}

/// What the file is when it is not a regular file. Old images carry no mode:
/// then an O_DIRECTORY open, or use as a cwd or root, says it is a directory.
fn file_kind(file: &RecordedFile) -> Option<&'static str> {
    match file.mode {
        Some(mode) => non_regular_kind(mode),
        None => {
            let dir_use = file.users.iter().any(|u| matches!(u.usage, Usage::Cwd | Usage::Root));
            (dir_use || file.flags & O_DIRECTORY != 0).then_some("a directory")
        }
    }
}

/// Where a file of a dumped mount namespace lives on the old host. A bind
/// mount shows `root` of its filesystem at `mountpoint`, so the host path swaps
/// that prefix; tmpfs and kernel filesystems have nothing to fetch.
fn resolve_mount(name: &[u8], mnt_id: Option<i32>, mounts: &HashMap<i32, MntEntry>) -> (PathBuf, Option<Unservable>) {
    let as_is = PathBuf::from(OsString::from_vec(name.to_vec()));
    let Some(mount) = mnt_id.and_then(|id| mounts.get(&id)) else {
        return (as_is, None);
    };
    match Fstype::try_from(mount.fstype as i32) {
        Ok(Fstype::Tmpfs) => return (as_is, Some(Unservable::DumpedTmpfs)),
        Ok(Fstype::Unsupported | Fstype::Auto | Fstype::Fuse | Fstype::Overlayfs | Fstype::Aufs) => {}
        Ok(special) => return (as_is, Some(Unservable::SpecialFs(fstype_name(special)))),
        Err(_) => {}
    }
    let mountpoint = mount.mountpoint.strip_prefix(b".").unwrap_or(&mount.mountpoint);
    let rest = match name.strip_prefix(mountpoint) {
        Some(rest) if mountpoint == b"/" => rest,
        Some(rest) if rest.is_empty() || rest.starts_with(b"/") => rest.strip_prefix(b"/").unwrap_or(rest),
        _ => return (as_is, None),
    };
    let mut source = mount.root.clone();
    if !rest.is_empty() {
        if !source.ends_with(b"/") {
            source.push(b'/');
        }
        source.extend_from_slice(rest);
    }
    if let Err(e) = names::check_absolute(&source) {
        return (as_is, Some(Unservable::BadName(e)));
    }
    (PathBuf::from(std::ffi::OsStr::from_bytes(&source)), None)
}

fn fstype_name(fstype: Fstype) -> &'static str {
    match fstype {
        Fstype::Proc => "proc",
        Fstype::Sysfs => "sysfs",
        Fstype::Devtmpfs => "devtmpfs",
        Fstype::Devpts => "devpts",
        Fstype::Mqueue => "mqueue",
        Fstype::Cgroup | Fstype::Cgroup2 => "cgroup",
        Fstype::Debugfs | Fstype::Tracefs => "debugfs",
        _ => "kernel",
    }
}
