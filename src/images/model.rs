//! What a checkpoint records about files, independent of how it was stored.

use std::fmt;
use std::path::PathBuf;

use super::names::NameError;

/// The regular files (and the non-regular ones, with a reason) that a dump's
/// processes had open, mapped, ran or stood in.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub file_records: FileRecords,
    /// Every process of the dump, as pstree.img lists them.
    pub pids: Vec<u32>,
    /// The user ids the processes access files as (their fsuid), where the
    /// core images record credentials.
    pub fsuids: Vec<u32>,
    /// Set when an image that ties descriptors to processes is missing: then
    /// `files` is what every `fdinfo-*.img` refers to, and users have no pid.
    pub incomplete: Option<Incomplete>,
    /// Each path once, sorted by path.
    pub files: Vec<RecordedFile>,
}

/// Where the file records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRecords {
    /// `reg-files.img`, written up to CRIU 3.3.
    Legacy,
    /// `files.img`, CRIU 3.4 and later.
    Modern,
}

#[derive(Debug, Clone)]
pub struct RecordedFile {
    /// The path as the process saw it (inside its mount namespace).
    pub path: PathBuf,
    /// Where the bytes are on the old host: `path`, unless a bind mount moved it.
    pub source_path: PathBuf,
    /// Size at dump time; CRIU leaves it out for some files (O_APPEND, devices).
    pub size: Option<u64>,
    pub mode: Option<u32>,
    /// The union of the open flags of every open of this file.
    pub flags: u32,
    pub users: Vec<User>,
    /// Why lazyfs cannot serve this file, if it cannot.
    pub unservable: Option<Unservable>,
    /// Where the images first list it (`--prefetch-order image`).
    pub image_order: usize,
}

impl RecordedFile {
    pub fn is_servable(&self) -> bool {
        self.unservable.is_none()
    }
}

/// The first image missing from a directory that is not a whole dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    pub image: String,
    /// Why it should be there.
    pub why: String,
}

impl fmt::Display for Incomplete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is missing ({}): listing every regular file an fdinfo-*.img refers to, without the processes using it",
            self.image, self.why
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct User {
    /// `None` when the images do not say which process it is.
    pub pid: Option<u32>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Usage {
    /// Descriptor `fd`, opened with `flags`.
    Fd {
        fd: u32,
        flags: u32,
    },
    /// One memory mapping (a file mapped several times has several).
    Map,
    Exe,
    Cwd,
    Root,
}

impl Usage {
    /// The `kind` word of `lazyfs ls --json`, for users other than descriptors.
    pub fn kind(&self) -> &'static str {
        match self {
            Usage::Fd { .. } => "fd",
            Usage::Map => "map",
            Usage::Exe => "exe",
            Usage::Cwd => "cwd",
            Usage::Root => "root",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unservable {
    BadName(NameError),
    NotRegular(&'static str),
    /// Deleted while open: CRIU restores it from the image directory.
    Ghost {
        image: String,
    },
    LinkedRemap,
    ProcfsRemap,
    /// On a tmpfs of a dumped mount namespace: its contents are in the images.
    DumpedTmpfs,
    /// On a kernel filesystem (proc, sysfs, ...): there are no bytes to copy.
    SpecialFs(&'static str),
}

impl fmt::Display for Unservable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unservable::BadName(e) => write!(f, "name refused: {e}"),
            Unservable::NotRegular(kind) => write!(f, "not a regular file ({kind})"),
            Unservable::Ghost { image } => {
                write!(f, "deleted while open: CRIU restores it from {image}")
            }
            Unservable::LinkedRemap => {
                write!(f, "deleted while open but linked elsewhere (CRIU link remap)")
            }
            Unservable::ProcfsRemap => write!(f, "a /proc file (CRIU procfs remap)"),
            Unservable::DumpedTmpfs => {
                write!(f, "on a tmpfs whose contents CRIU dumped into the images")
            }
            Unservable::SpecialFs(fs) => write!(f, "on a {fs} filesystem: no bytes to copy"),
        }
    }
}

/// The file-type bits of a mode, named; `None` for a regular file.
pub fn non_regular_kind(mode: u32) -> Option<&'static str> {
    match mode & 0o170000 {
        0o100000 => None,
        0o040000 => Some("a directory"),
        0o020000 => Some("a character device"),
        0o060000 => Some("a block device"),
        0o010000 => Some("a FIFO"),
        0o120000 => Some("a symbolic link"),
        0o140000 => Some("a socket"),
        _ => Some("an unknown file type"),
    }
}
