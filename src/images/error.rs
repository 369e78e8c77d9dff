//! Errors of the image reader. Every one names the image file and says what is
//! wrong with it in one line.

use std::fmt;
use std::path::{Path, PathBuf};

use super::framing::Magic;

/// What is wrong with the bytes of one image file.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("too short for a magic word ({len} bytes): empty or truncated image")]
    NoMagic { len: usize },
    #[error("wrong magic {found:#010x}, expected {} ({:#010x})", expected.name, expected.value)]
    WrongMagic { expected: Magic, found: u32 },
    #[error("truncated at byte {offset}: {have} bytes left where a 4-byte entry length should be")]
    TruncatedLength { offset: usize, have: usize },
    #[error("entry at byte {offset} claims {len} bytes, more than any entry may have: damaged image")]
    EntryTooLarge { offset: usize, len: u32 },
    #[error("truncated: entry at byte {offset} claims {len} bytes but only {remaining} follow")]
    EntryPastEnd { offset: usize, len: usize, remaining: usize },
    #[error("entry {index} at byte {offset} is not a valid protobuf message: {source}")]
    Decode { index: usize, offset: usize, source: prost::DecodeError },
}

/// What went wrong reading a checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", file.display())]
pub struct ImageError {
    /// The image file at fault (or the directory, for a missing directory).
    pub file: PathBuf,
    pub kind: ImageErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageErrorKind {
    #[error("missing: {0}")]
    Missing(String),
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    #[error("{size} bytes, more than an image lazyfs reads may have ({max} bytes)")]
    TooLarge { size: u64, max: u64 },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Invalid(Invalid),
}

/// Entries that decode but do not fit together.
#[derive(Debug)]
pub enum Invalid {
    NoEntries,
    MoreThanOneEntry(usize),
    DuplicateId(u32),
    RegWithoutBody(u32),
    UnknownFileId { what: String, id: u64 },
    UnknownTaskState(u32),
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::NoEntries => write!(f, "holds no entry"),
            Invalid::MoreThanOneEntry(n) => write!(f, "holds {n} entries where one is expected"),
            Invalid::DuplicateId(id) => write!(f, "file id {id} appears twice"),
            Invalid::RegWithoutBody(id) => {
                write!(f, "file id {id} has type REG but no regular-file record")
            }
            Invalid::UnknownFileId { what, id } => {
                write!(f, "{what} refers to file id {id}, which no files image records")
            }
            Invalid::UnknownTaskState(state) => {
                write!(f, "task_state {state} is none CRIU restores (1 alive, 2 dead, 3 stopped, 4 or 128 helper)")
            }
        }
    }
}

impl ImageError {
    pub fn new(file: &Path, kind: impl Into<ImageErrorKind>) -> Self {
        ImageError { file: file.to_path_buf(), kind: kind.into() }
    }
}

impl From<Invalid> for ImageErrorKind {
    fn from(invalid: Invalid) -> Self {
        ImageErrorKind::Invalid(invalid)
    }
}
