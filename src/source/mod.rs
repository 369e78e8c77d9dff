//! Where file contents come from: the old host over SSH, a local directory
//! holding its root, or what `lazyfs push` put in an object store. A
//! [`Source`] opens [`Connection`]s; each lane of the fetcher owns one, so
//! on-demand reads never queue behind bulk transfers.

mod known_hosts;
mod local;
mod openssh;
mod s3;
mod sftp;
mod spec;
mod split;
mod ssh;
mod tar;

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use local::LocalSource;
use openssh::OpensshSource;
pub(crate) use openssh::background_priority;
pub use openssh::remove_own_socket_dirs;
use s3::S3Source;
pub use spec::{Given, SourceSpec, SshOptions, SshOverrides, Transport};
use split::SplitSource;
use ssh::SshSource;

/// Files up to this size are read by one request (SFTP READ), so their bytes
/// are one snapshot of the file.
pub const ONE_READ: u64 = sftp::REQUEST;

/// What a connection shows of the source, to tell it from another source
/// whatever SOURCE spelled it: a local directory or a host, the host's public
/// keys (`TYPE BASE64`, as known_hosts lists them), and where the root really is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub kind: &'static str,
    pub host_keys: Vec<String>,
    pub root: PathBuf,
}

/// What the source says of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStat {
    pub size: u64,
    /// Seconds since the epoch; lets a reader notice a file changed underneath.
    pub mtime: i64,
}

/// What the source says of a file, directory or symlink itself (a symlink is
/// not followed): what a listing gives for each name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceAttrs {
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the epoch; whole seconds where the source tells no
    /// more (SFTP v3).
    pub atime_ns: i64,
    pub mtime_ns: i64,
    /// What SFTP v3 does not tell: a local directory does.
    pub ctime_ns: Option<i64>,
    /// Device and inode number, and the link count (hard links share them).
    pub dev_ino: Option<(u64, u64)>,
    pub nlink: Option<u32>,
}

impl SourceAttrs {
    /// The size and whole-second mtime a change is told by.
    pub fn stat(&self) -> SourceStat {
        SourceStat { size: self.size, mtime: self.mtime_ns.div_euclid(1_000_000_000) }
    }

    /// The file type bits.
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// One name of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    pub attrs: SourceAttrs,
    /// A symlink's target, as it is (never followed).
    pub target: Option<OsString>,
}

/// The entries of each listed directory, or why one could not be listed.
pub type Listings = Vec<Result<Vec<DirEntry>, SourceError>>;

/// Whether a name the source gives for a directory entry is one lazyfs may
/// show: a single component (no `/`, no NUL, not `.` or `..`, not empty,
/// at most NAME_MAX bytes). Spaces, quotes, `$`, `;`, newlines are legal.
pub fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= 255 && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

pub trait Source: Send + Sync {
    /// A new, independent connection (an SSH session with its own SFTP channel).
    fn connect(&self) -> Result<Box<dyn Connection>, SourceError> {
        self.connect_within(CONNECT_TIME)
    }
    /// A new connection, given up (`TimedOut`) if it is not ready within `time`.
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError>;
    /// A connection for bulk transfers (background prefetch): where a source
    /// has a transport that streams at less cost, through it.
    fn connect_bulk_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        self.connect_within(time)
    }
    /// How to name this source to a person: `root@host:22`, `/srv/snapshot`.
    fn describe(&self) -> String;
    /// Nothing needs the source any more: close whatever is kept open for
    /// further connections (a new connection opens it again).
    fn idle(&self) {}
    /// Why nothing is fetched from this source, if a connection showed it is
    /// not the source the cache dir's files come from.
    fn refusal(&self) -> Option<String> {
        None
    }
    /// The index of what `lazyfs push` put there (an object store): it
    /// vouches for every file's hashes, like a manifest.
    fn pushed(&self) -> Option<&crate::s3::index::Index> {
        None
    }
}

/// How long a connection may take when no reader waits for it (at mount time).
const CONNECT_TIME: Duration = Duration::from_secs(30);

/// Bounds on a connection's requests: each one fails with
/// [`SourceError::TimedOut`] once `deadline` has passed, or when the source
/// has said nothing for `stall`. A timed-out connection is unusable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Option<Instant>,
    pub stall: Duration,
}

impl Limits {
    /// How long the next wait on the source may last; zero once past the deadline.
    pub fn next_wait(&self) -> Duration {
        match self.deadline {
            Some(deadline) => self.stall.min(deadline.saturating_duration_since(Instant::now())),
            None => self.stall,
        }
    }
}

/// One lane's view of the source. Paths are absolute paths on the source
/// (the source root already applied).
pub trait Connection: Send {
    /// Bounds every request from now on (a local directory has none).
    fn set_limits(&mut self, _limits: Limits) {}
    /// Which source this connection reached; `None` where it cannot tell.
    fn shows(&self) -> Option<Shown> {
        None
    }
    fn stat(&mut self, path: &Path) -> Result<SourceStat, SourceError>;
    /// Fills `buf` with the bytes at `offset`; a file too short for that is
    /// an error. `generation` is the file's generation in lazyfs: an open
    /// handle is reused only within one (the file may have been replaced since).
    fn read_exact_at(&mut self, path: &Path, generation: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Fetches `ranges` of `path` (each starting on a chunk boundary),
    /// handing `sink` each piece (whole chunks) as it arrives; with `look`,
    /// first what the source says of the file (over SSH, the look made before
    /// the OPEN: no round trip of its own). An error says why the rest did not
    /// come; what was handed over stays handed over.
    fn fetch(
        &mut self,
        path: &Path,
        generation: u64,
        ranges: &[Range<u64>],
        look: bool,
        sink: &mut dyn Sink,
    ) -> Result<(), SourceError> {
        if look && !sink.looked(self.stat(path)?) {
            return Ok(());
        }
        let mut buf = Vec::new();
        for range in ranges {
            for at in (range.start..range.end).step_by(ONE_READ as usize) {
                sink.may_request(true);
                buf.resize(((at + ONE_READ).min(range.end) - at) as usize, 0);
                self.read_exact_at(path, generation, at, &mut buf)?;
                if !sink.land(at, &buf) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Stats many files; over SSH in one pipeline. The error returned means
    /// the connection itself failed.
    fn stat_many(&mut self, paths: &[&Path]) -> Result<Vec<Result<SourceStat, SourceError>>, SourceError> {
        let mut stats = Vec::with_capacity(paths.len());
        for path in paths {
            match self.stat(path) {
                Err(e) if e.is_connection_lost() => return Err(e),
                other => stats.push(other),
            }
        }
        Ok(stats)
    }

    /// The attributes of `path` itself (a symlink is not followed).
    fn attrs(&mut self, path: &Path) -> Result<SourceAttrs, SourceError> {
        Err(SourceError::Config(format!("{}: this source cannot list directories", path.display())))
    }

    /// Lists each of `dirs`: its entries but `.` and `..`, each with its own
    /// attributes (a symlink's, not its target's) and a symlink's target.
    /// A directory that is a symlink now, or is reached through one, is
    /// [`SourceError::Changed`]; a name that could escape the mount is left
    /// out (with a warning). Over SSH, one pipeline for them all. The error
    /// returned means the connection itself failed.
    fn list_dirs(&mut self, dirs: &[&Path]) -> Result<Listings, SourceError> {
        let path = dirs.first().map_or_else(|| Path::new("/"), |p| *p);
        Err(SourceError::Config(format!("{}: this source cannot list directories", path.display())))
    }

    /// Reads many whole small files, each into its buffer, setting each
    /// one's result. Over SSH this is one pipeline instead of a round trip per
    /// step; the error returned means the connection itself failed.
    fn read_files(&mut self, files: &mut [WholeRead<'_>]) -> Result<(), SourceError> {
        for file in files.iter_mut() {
            file.result = match self.read_exact_at(file.path, 0, 0, file.buf) {
                Err(e) if e.is_connection_lost() => return Err(e),
                other => other,
            };
        }
        Ok(())
    }
}

/// What fetched bytes go to as they arrive: a file's owner, which checks and
/// lands them. Answering false stops the fetch (nothing more is asked for).
pub trait Sink {
    /// What the source says of the file, before any of its bytes.
    fn looked(&mut self, stat: SourceStat) -> bool;
    /// The bytes at `offset`: whole chunks of the ranges asked for.
    fn land(&mut self, offset: u64, bytes: &[u8]) -> bool;
    /// Whether more may be asked for now (a background transfer yields to
    /// readers). `idle`: nothing is in flight; the sink may wait, then says yes.
    fn may_request(&mut self, _idle: bool) -> bool {
        true
    }
}

/// A sink that copies what arrives into one buffer holding the bytes from `offset`.
pub(crate) struct Copy<'a> {
    pub(crate) offset: u64,
    pub(crate) buf: &'a mut [u8],
}

impl Sink for Copy<'_> {
    fn looked(&mut self, _stat: SourceStat) -> bool {
        true
    }

    fn land(&mut self, offset: u64, bytes: &[u8]) -> bool {
        let start = (offset - self.offset) as usize;
        self.buf[start..start + bytes.len()].copy_from_slice(bytes);
        true
    }
}

/// One file of [`Connection::read_files`].
pub struct WholeRead<'a> {
    pub path: &'a Path,
    pub buf: &'a mut [u8],
    /// The size and mtime it was listed with, if it was: a file that no
    /// longer has them is [`SourceError::Changed`].
    pub listed: Option<SourceStat>,
    pub result: Result<(), SourceError>,
}

/// The reason a file that no longer has the size and mtime it was listed
/// with is refused (`None` if it still has them).
pub fn changed_since_listed(listed: Option<SourceStat>, now: SourceStat) -> Option<String> {
    let listed = listed.filter(|l| *l != now)?;
    Some(format!(
        "changed since it was listed (then {} bytes, mtime {}; now {} bytes, mtime {})",
        listed.size, listed.mtime, now.size, now.mtime
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `looked` is where: the path below the source's root, on which host.
    #[error("{}: not found on the source (looked for {looked})", path.display())]
    NotFound { path: PathBuf, looked: String },
    #[error("{}: the source file ends at byte {end}, before the {wanted} bytes asked for (changed since the checkpoint?)", path.display())]
    Short { path: PathBuf, end: u64, wanted: u64 },
    #[error("{}: the source file is longer than the {size} bytes the images record: changed since the checkpoint", path.display())]
    Longer { path: PathBuf, size: u64 },
    #[error("{}: {reason} on the source: changed since the checkpoint, not served", path.display())]
    Changed { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// The session failed (network, protocol, timeout): a reconnect may help.
    #[error("SSH session to {host}: {message}")]
    Session { host: String, message: String },
    /// The source did not answer in time; `path` is the file whose request
    /// was the oldest unanswered (if a file's).
    #[error("{host} did not answer within {:.1} s{}", waited.as_secs_f64(), path.as_ref().map(|p| format!(" (reading {})", p.display())).unwrap_or_default())]
    TimedOut { host: String, waited: Duration, path: Option<PathBuf> },
    #[error(
        "the host key of {host} ({key_type} {fingerprint}) is not in {}: check the fingerprint, then mount again with --accept-new-host-key to trust it",
        known_hosts.display()
    )]
    UnknownHostKey { host: String, key_type: String, fingerprint: String, known_hosts: PathBuf },
    #[error(
        "the host key of {host} ({key_type} {fingerprint}) differs from the one in {}: refusing to connect (possible man-in-the-middle); if the host was reinstalled, remove the old key with `ssh-keygen -f '{}' -R '{host}'`",
        known_hosts.display(),
        known_hosts.display()
    )]
    ChangedHostKey { host: String, key_type: String, fingerprint: String, known_hosts: PathBuf },
    #[error("authentication as {user} on {host} failed; tried: {tried}")]
    Auth { user: String, host: String, tried: String },
    #[error("{0}")]
    Config(String),
    /// The mount's first connection to the source failed: it is not used.
    #[error("the source cannot be used: {0}")]
    Unusable(std::sync::Arc<str>),
    /// A connection reached another source than the one the cache dir's
    /// files come from: nothing is fetched from it.
    #[error("{0}")]
    NotTheSource(String),
    /// An object store's answer; `transient` if a new request may fare better.
    #[error("{message}")]
    Store { message: String, transient: bool },
}

impl SourceError {
    /// Whether retrying on a new connection could succeed.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            SourceError::Session { .. }
                | SourceError::Connect { .. }
                | SourceError::TimedOut { .. }
                | SourceError::Store { transient: true, .. }
        )
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, SourceError::TimedOut { .. })
    }

    /// The same error again (for another request it ended).
    pub fn again(&self) -> SourceError {
        use crate::store::io_again;
        match self {
            SourceError::NotFound { path, looked } => {
                SourceError::NotFound { path: path.clone(), looked: looked.clone() }
            }
            SourceError::Short { path, end, wanted } => {
                SourceError::Short { path: path.clone(), end: *end, wanted: *wanted }
            }
            SourceError::Longer { path, size } => SourceError::Longer { path: path.clone(), size: *size },
            SourceError::Changed { path, reason } => {
                SourceError::Changed { path: path.clone(), reason: reason.clone() }
            }
            SourceError::Io { path, source } => SourceError::Io { path: path.clone(), source: io_again(source) },
            SourceError::Connect { addr, source } => {
                SourceError::Connect { addr: addr.clone(), source: io_again(source) }
            }
            SourceError::Session { host, message } => {
                SourceError::Session { host: host.clone(), message: message.clone() }
            }
            SourceError::TimedOut { host, waited, path } => {
                SourceError::TimedOut { host: host.clone(), waited: *waited, path: path.clone() }
            }
            SourceError::UnknownHostKey { host, key_type, fingerprint, known_hosts } => SourceError::UnknownHostKey {
                host: host.clone(),
                key_type: key_type.clone(),
                fingerprint: fingerprint.clone(),
                known_hosts: known_hosts.clone(),
            },
            SourceError::ChangedHostKey { host, key_type, fingerprint, known_hosts } => SourceError::ChangedHostKey {
                host: host.clone(),
                key_type: key_type.clone(),
                fingerprint: fingerprint.clone(),
                known_hosts: known_hosts.clone(),
            },
            SourceError::Auth { user, host, tried } => {
                SourceError::Auth { user: user.clone(), host: host.clone(), tried: tried.clone() }
            }
            SourceError::Config(message) => SourceError::Config(message.clone()),
            SourceError::Unusable(reason) => SourceError::Unusable(reason.clone()),
            SourceError::NotTheSource(message) => SourceError::NotTheSource(message.clone()),
            SourceError::Store { message, transient } => {
                SourceError::Store { message: message.clone(), transient: *transient }
            }
        }
    }
}

/// Opens the source a SOURCE argument names.
pub fn open(spec: &SourceSpec, source_root: &Path) -> Result<Box<dyn Source>, SourceError> {
    spec.check_local()?;
    match spec {
        SourceSpec::Local(dir) => Ok(Box::new(LocalSource::new(&dir.join(relative(source_root)))?)),
        SourceSpec::S3(_) if source_root != Path::new("/") => Err(SourceError::Config(
            "--source-root is for `lazyfs push` (where it reads the old host's files); an s3:// source holds what it pushed"
                .into(),
        )),
        SourceSpec::S3(url) => Ok(Box::new(S3Source::open(url)?)),
        SourceSpec::Ssh(options) => match (options.transport, which_ssh()) {
            // Each transport where it wins, when both can reach the host.
            (Transport::Auto, true) if options.needs_openssh.is_none() => {
                Ok(Box::new(SplitSource::new((**options).clone(), source_root.to_path_buf())?))
            }
            _ if uses_openssh(options) => Ok(Box::new(OpensshSource::new((**options).clone(), source_root)?)),
            _ => {
                if let Some(setting) = &options.needs_openssh {
                    let fix = match options.transport {
                        Transport::Auto => "install openssh-client",
                        _ => "give --ssh openssh",
                    };
                    return Err(SourceError::Config(format!(
                        "the ssh config of {} sets {setting}, which only OpenSSH's ssh follows: {fix}",
                        options.alias
                    )));
                }
                Ok(Box::new(SshSource::new((**options).clone(), source_root)?))
            }
        },
    }
}

/// SOURCE and `--source-root` as one normalized name, without the network:
/// `ssh://USER@HOST:PORT/ROOT` (the name resolved as `ssh -G` resolves it
/// where OpenSSH carries the session, else as the ssh config says) or
/// `file:///DIR` (its real path, if it exists). Spellings of one source
/// that resolve alike give one name.
pub fn spelling(spec: &SourceSpec, source_root: &Path) -> String {
    identify(spec, source_root).0
}

/// [`spelling`], and what a connection would show of the source where that
/// is known without one (a local directory that exists).
pub fn identify(spec: &SourceSpec, source_root: &Path) -> (String, Option<Shown>) {
    match spec {
        SourceSpec::Local(dir) => {
            let root = dir.join(relative(source_root));
            match std::fs::canonicalize(&root) {
                Ok(real) => {
                    let spelling = format!("file://{}", real.display());
                    (spelling, Some(Shown { kind: "local", host_keys: Vec::new(), root: real }))
                }
                Err(_) => (format!("file://{}", normalized(&root).display()), None),
            }
        }
        SourceSpec::Ssh(options) => {
            let resolved = match uses_openssh(options) {
                true => openssh::target(options).ok(),
                false => None,
            };
            let (user, host, port) =
                resolved.unwrap_or_else(|| (options.user.clone(), options.host.clone(), options.port));
            let root = normalized(source_root);
            // An address one way, as `ssh -G` writes it (`[0::1]` is `::1`).
            let host = host.parse::<std::net::IpAddr>().map_or_else(|_| host.to_lowercase(), |ip| ip.to_string());
            (format!("ssh://{user}@{host}:{port}{}", root.display()), None)
        }
        // What push put there: the objects vouch for themselves (the index).
        SourceSpec::S3(url) => (url.to_string(), None),
    }
}

/// `path` made absolute, without `.`, `..` and repeated or trailing slashes
/// (as written: for paths that cannot be resolved here).
fn normalized(path: &Path) -> PathBuf {
    lexically_absolute(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// `path` below `/`, without `.`, `..` and repeated or trailing slashes, as
/// written (a path on another host, say).
pub fn lexically_absolute(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Whether OpenSSH's `ssh` carries the sessions of `options`.
fn uses_openssh(options: &SshOptions) -> bool {
    matches!((options.transport, which_ssh()), (Transport::Openssh, _) | (Transport::Auto, true))
}

/// Whether the system's `ssh` client is installed (on PATH).
fn which_ssh() -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("ssh").is_file()))
}

/// `/a/b` as `a/b`, to join below a root.
pub fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}
