//! A small SFTP (version 3) client over an SSH channel, written for lazyfs's
//! access pattern: exact byte ranges with many requests in flight, and many
//! small files read in one pipeline (open, read, close of each overlapping).
//!
//! libssh2's own SFTP reads ahead four times the caller's buffer and throws
//! the surplus away on the next seek: a 64 KiB ranged read cost about 4x a
//! 4 KiB one, and small files paid a round trip per step. Here each request
//! asks for exactly what is wanted, and the pipeline depth is lazyfs's choice.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Limits, Sink};

const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const LSTAT: u8 = 7;
const FSTAT: u8 = 8;
const OPENDIR: u8 = 11;
const READDIR: u8 = 12;
const REALPATH: u8 = 16;
const READLINK: u8 = 19;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const NAME: u8 = 104;
const ATTRS: u8 = 105;

const FX_EOF: u32 = 1;
const FX_NO_SUCH_FILE: u32 = 2;
const FXF_READ: u32 = 1;

/// Bytes asked for by one READ: OpenSSH's sftp-server answers up to 256 KiB.
pub const REQUEST: u64 = 256 << 10;
/// Bytes a pipeline of ranged reads keeps in flight at most (8 MiB: more
/// than a 1 Gbit/s link carries in a 20 ms round trip, also when the ranges
/// are small, a recording's runs), and READs at most.
const IN_FLIGHT: u64 = 8 << 20;
const DEPTH: usize = 64;
/// Files opened at once when many files are read together (a tree of small
/// files in a few round trips), and READs in flight per file then.
const FILES_IN_FLIGHT: usize = 256;
const DEPTH_PER_FILE: usize = 4;
/// No SFTP reply lazyfs asks for is larger (a DATA of REQUEST bytes and its
/// header; OpenSSH keeps a READDIR answer under 256 KiB too).
const MAX_PACKET: usize = 1 << 20;
/// Directories listed at once, READDIRs in flight per directory, and
/// requests in flight in all when many directories are listed together.
const DIRS_IN_FLIGHT: usize = 32;
const READDIRS_PER_DIR: usize = 2;
const LISTING_REQUESTS: usize = 128;

/// Why an SFTP operation failed.
#[derive(Debug)]
pub enum SftpError {
    /// The server answered with a status: `NoSuchFile`, `Eof` or another code.
    Status { code: u32, message: String },
    /// The file ended at `end` before the bytes asked for.
    Short { end: u64 },
    /// The file is longer than the bytes asked for (read whole).
    Longer,
    /// The path is not the regular file it was: a symlink on the way, another
    /// kind of file, or a file swapped while it was opened.
    Changed(String),
    /// The channel or the protocol broke: the connection is unusable.
    Broken(String),
    /// The server did not answer within the limits: the connection is unusable.
    TimedOut,
}

impl SftpError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, SftpError::Status { code: FX_NO_SUCH_FILE | 10, .. })
    }
}

impl From<std::io::Error> for SftpError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::TimedOut => SftpError::TimedOut,
            _ => SftpError::Broken(e.to_string()),
        }
    }
}

/// What the server says of a file (SFTP v3 ATTRS), as far as it says it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `st_mode`, file type bits included (OpenSSH sends them).
    pub mode: Option<u32>,
    pub mtime: Option<u32>,
    pub atime: Option<u32>,
}

/// A big-endian u32 at `at` of `body`.
fn word(body: &[u8], at: usize) -> Option<u32> {
    body.get(at..at.checked_add(4)?).map(|w| u32::from_be_bytes(w.try_into().expect("4")))
}

/// The SFTP string at `at` of `body`, and where what follows it starts.
fn string(body: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = word(body, at)? as usize;
    let start = at + 4;
    let end = start.checked_add(len)?;
    Some((body.get(start..end)?, end))
}

impl Attrs {
    fn parse(body: &[u8]) -> Option<Attrs> {
        Self::parse_at(body, 0).map(|(attrs, _)| attrs)
    }

    /// The ATTRS at `at` of `body`, and where what follows them starts.
    fn parse_at(body: &[u8], mut at: usize) -> Option<(Attrs, usize)> {
        let flags = word(body, at)?;
        let mut attrs = Attrs::default();
        at += 4;
        if flags & 1 != 0 {
            attrs.size = Some(u64::from_be_bytes(body.get(at..at + 8)?.try_into().ok()?));
            at += 8;
        }
        if flags & 2 != 0 {
            (attrs.uid, attrs.gid) = (Some(word(body, at)?), Some(word(body, at + 4)?));
            at += 8;
        }
        if flags & 4 != 0 {
            attrs.mode = Some(word(body, at)?);
            at += 4;
        }
        if flags & 8 != 0 {
            (attrs.atime, attrs.mtime) = (Some(word(body, at)?), Some(word(body, at + 4)?));
            at += 8;
        }
        if flags & 0x8000_0000 != 0 {
            let count = word(body, at)?;
            at += 4;
            for _ in 0..count {
                at = string(body, at)?.1;
                at = string(body, at)?.1;
            }
        }
        Some((attrs, at))
    }

    /// What kind of file this is, if it is not a regular file.
    fn irregular(&self) -> Option<&'static str> {
        match self.mode.map(|m| m & libc::S_IFMT) {
            Some(libc::S_IFREG) => None,
            Some(libc::S_IFLNK) => Some("a symbolic link"),
            Some(libc::S_IFDIR) => Some("a directory"),
            Some(libc::S_IFIFO) => Some("a FIFO"),
            Some(libc::S_IFSOCK) => Some("a socket"),
            Some(libc::S_IFCHR | libc::S_IFBLK) => Some("a device"),
            Some(_) => Some("not a regular file"),
            None => Some("of a kind the server does not tell"),
        }
    }
}

/// Checks what LSTAT and REALPATH said of `path`: it must be a regular file
/// reached without a symlink (REALPATH gives back `path` itself).
fn check_lookup(path: &Path, real: &[u8], lstat: &Attrs) -> Result<(), SftpError> {
    if let Some(kind) = lstat.irregular() {
        return Err(SftpError::Changed(format!("now {kind}")));
    }
    if real != path.as_os_str().as_bytes() {
        return Err(SftpError::Changed(format!(
            "reached through a symbolic link (it resolves to {})",
            String::from_utf8_lossy(real)
        )));
    }
    Ok(())
}

/// Checks what LSTAT and REALPATH said of a directory about to be listed: a
/// directory reached without a symlink.
fn check_dir_lookup(path: &Path, real: &[u8], lstat: &Attrs) -> Result<(), SftpError> {
    match lstat.irregular() {
        Some("a directory") => {}
        None => return Err(SftpError::Changed("now a regular file".into())),
        Some(kind) => return Err(SftpError::Changed(format!("now {kind}"))),
    }
    if real != path.as_os_str().as_bytes() {
        return Err(SftpError::Changed(format!(
            "reached through a symbolic link (it resolves to {})",
            String::from_utf8_lossy(real)
        )));
    }
    Ok(())
}

/// Checks FSTAT of the opened handle against LSTAT of the path before the
/// OPEN: a file swapped in between (a symlink there only while it was
/// opened) shows as another owner, mode, size or modification time. Not the
/// access time: a read of the file meanwhile (another session of this mount)
/// moves it.
fn check_opened(lstat: &Attrs, fstat: &Attrs) -> Result<(), SftpError> {
    let same = Attrs { atime: lstat.atime, ..*fstat } == *lstat;
    if fstat.irregular().is_some() || !same {
        return Err(SftpError::Changed("replaced while it was being opened".into()));
    }
    Ok(())
}

/// One file of a batched read: read `buf.len()` bytes from the start of `path`.
pub struct FileRead<'a> {
    pub path: &'a Path,
    pub buf: &'a mut [u8],
    /// The size and mtime it was listed with: LSTAT must agree.
    pub listed: Option<super::SourceStat>,
    pub result: Result<(), SftpError>,
}

/// The byte stream the client speaks over, whose waits it bounds.
pub trait Wire: Read + Write {
    /// Bounds each wait on the other end from now on: a read or write that
    /// waits longer fails with [`std::io::ErrorKind::TimedOut`].
    fn bound(&mut self, wait: Duration);
    /// Shuts the transport down after a timeout, so nothing waits on it again
    /// (not even its close when it is dropped).
    fn cut(&self);
}

impl<W: Wire + ?Sized> Wire for Box<W> {
    fn bound(&mut self, wait: Duration) {
        (**self).bound(wait);
    }

    fn cut(&self) {
        (**self).cut();
    }
}

/// The client over any byte stream that carries the `sftp` subsystem: an
/// ssh2 channel, the pipes of an `ssh -s HOST sftp` child, or a scripted
/// stream in tests.
pub struct Sftp<C> {
    channel: C,
    limits: Limits,
    /// When the current limits were set.
    since: Instant,
    next_id: u32,
    out: Vec<u8>,
    /// A READ's destination each, reused from one read to the next.
    buffers: Vec<Vec<u8>>,
    /// INIT was sent (or is queued), its VERSION not read yet.
    version_pending: bool,
    /// CLOSEs sent without waiting, not answered yet.
    closing: Vec<u32>,
}

/// What the server said in reply to one request.
enum Reply {
    Status {
        code: u32,
        message: String,
    },
    Handle(Vec<u8>),
    /// DATA: how many bytes were placed in the request's destination.
    Data(usize),
    Attrs(Attrs),
    /// NAME: its body (a count, then each name with its long form and attributes).
    Name(Vec<u8>),
}

/// One name of a READDIR answer, with its attributes.
pub struct Listed {
    pub name: Vec<u8>,
    pub attrs: Attrs,
    /// A symlink's target (READLINK).
    pub target: Option<Vec<u8>>,
}

impl Reply {
    fn attrs(self, what: &str) -> Result<Attrs, SftpError> {
        match self {
            Reply::Attrs(attrs) => Ok(attrs),
            Reply::Status { code, message } => Err(SftpError::Status { code, message }),
            _ => Err(SftpError::Broken(format!("unexpected reply to {what}"))),
        }
    }

    /// The first name (REALPATH and READLINK answer with one).
    fn name(self) -> Result<Vec<u8>, SftpError> {
        match self {
            Reply::Name(body) => match word(&body, 0).filter(|&n| n > 0).and_then(|_| string(&body, 4)) {
                Some((name, _)) => Ok(name.to_vec()),
                None => Err(SftpError::Broken("a NAME without a name".into())),
            },
            Reply::Status { code, message } => Err(SftpError::Status { code, message }),
            _ => Err(SftpError::Broken("unexpected reply to REALPATH".into())),
        }
    }

    /// Every name of a READDIR answer, with its attributes.
    fn names(self) -> Result<Vec<Listed>, SftpError> {
        let Reply::Name(body) = self else {
            return Err(match self {
                Reply::Status { code, message } => SftpError::Status { code, message },
                _ => SftpError::Broken("unexpected reply to READDIR".into()),
            });
        };
        let broken = || SftpError::Broken("a malformed READDIR answer".into());
        let count = word(&body, 0).ok_or_else(broken)?;
        let mut at = 4;
        // Each name takes at least 12 bytes: a count past that is a lie.
        let mut names = Vec::with_capacity((count as usize).min(body.len() / 12));
        for _ in 0..count {
            let (name, next) = string(&body, at).ok_or_else(broken)?;
            let (_, next) = string(&body, next).ok_or_else(broken)?;
            let (attrs, next) = Attrs::parse_at(&body, next).ok_or_else(broken)?;
            names.push(Listed { name: name.to_vec(), attrs, target: None });
            at = next;
        }
        Ok(names)
    }
}

impl<C: Wire> Sftp<C> {
    /// Speaks SFTP on `channel`, a stream the `sftp` subsystem answers on,
    /// each wait bounded by `limits`. INIT goes out with the first request and
    /// the server's VERSION is read before the first reply: the handshake
    /// costs no round trip of its own (a server refusing it says so then).
    pub fn start(channel: C, limits: Limits) -> Sftp<C> {
        let mut sftp = Sftp {
            channel,
            limits,
            since: Instant::now(),
            next_id: 1,
            out: Vec::new(),
            buffers: Vec::new(),
            version_pending: true,
            closing: Vec::new(),
        };
        // INIT carries the version where other requests carry an id.
        sftp.out.extend_from_slice(&5u32.to_be_bytes());
        sftp.out.push(INIT);
        sftp.out.extend_from_slice(&3u32.to_be_bytes());
        sftp
    }

    /// The server's VERSION, the answer to INIT.
    fn version(&mut self) -> Result<(), SftpError> {
        self.version_pending = false;
        let (kind, len) = self.header()?;
        if kind != VERSION || len < 4 {
            return Err(SftpError::Broken(format!("unexpected reply {kind} to INIT")));
        }
        self.skip(len)
    }

    /// Bounds the requests from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.since = Instant::now();
        self.arm().ok();
    }

    /// How long the next wait on the server may last.
    pub fn next_wait(&self) -> Duration {
        self.limits.next_wait()
    }

    /// How long the requests under the current limits have taken.
    pub fn waited(&self) -> Duration {
        self.since.elapsed()
    }

    /// Shuts the channel down after a timeout: nothing waits on it again.
    pub fn cut(&self) {
        self.channel.cut();
    }

    /// Bounds the next wait on the server by what the limits leave.
    fn arm(&mut self) -> Result<(), SftpError> {
        let wait = self.limits.next_wait();
        if wait.is_zero() {
            return Err(SftpError::TimedOut);
        }
        self.channel.bound(wait);
        Ok(())
    }

    fn id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// Queues a request (type, id, body); sent by `flush`.
    fn request(&mut self, kind: u8, body: &[&[u8]]) -> u32 {
        let id = self.id();
        let len = 1 + 4 + body.iter().map(|b| b.len()).sum::<usize>();
        self.out.extend_from_slice(&(len as u32).to_be_bytes());
        self.out.push(kind);
        self.out.extend_from_slice(&id.to_be_bytes());
        for part in body {
            self.out.extend_from_slice(part);
        }
        id
    }

    fn flush(&mut self) -> Result<(), SftpError> {
        if !self.out.is_empty() {
            self.arm()?;
            self.channel.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    fn string(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn open_request(&mut self, path: &Path) -> u32 {
        let name = Self::string(path.as_os_str().as_bytes());
        self.request(OPEN, &[&name, &FXF_READ.to_be_bytes(), &0u32.to_be_bytes()])
    }

    fn read_request(&mut self, handle: &[u8], offset: u64, len: u64) -> u32 {
        let handle = Self::string(handle);
        self.request(READ, &[&handle, &offset.to_be_bytes(), &(len as u32).to_be_bytes()])
    }

    fn close_request(&mut self, handle: &[u8]) -> u32 {
        let handle = Self::string(handle);
        self.request(CLOSE, &[&handle])
    }

    /// The next packet's type and the length of what follows the type byte.
    fn header(&mut self) -> Result<(u8, usize), SftpError> {
        let mut head = [0u8; 5];
        self.arm()?;
        self.channel.read_exact(&mut head)?;
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(SftpError::Broken(format!("a packet of {len} bytes")));
        }
        Ok((head[4], len - 1))
    }

    fn skip(&mut self, mut len: usize) -> Result<(), SftpError> {
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let n = len.min(scratch.len());
            self.channel.read_exact(&mut scratch[..n])?;
            len -= n;
        }
        Ok(())
    }

    fn read_u32(&mut self) -> Result<u32, SftpError> {
        let mut word = [0u8; 4];
        self.channel.read_exact(&mut word)?;
        Ok(u32::from_be_bytes(word))
    }

    fn read_body(&mut self, len: usize) -> Result<Vec<u8>, SftpError> {
        let mut body = vec![0u8; len];
        self.channel.read_exact(&mut body)?;
        Ok(body)
    }

    /// Reads one reply. A DATA reply's bytes go straight into what `dest`
    /// gives for its request id (or are skipped when it gives nothing).
    fn reply<'b>(&mut self, dest: impl FnOnce(u32) -> Option<&'b mut [u8]>) -> Result<(u32, Reply), SftpError> {
        if self.version_pending {
            self.version()?;
        }
        loop {
            let (id, reply) = self.any_reply()?;
            match self.closing.iter().position(|&closing| closing == id) {
                // The answer to a CLOSE sent without waiting: nothing to do.
                Some(at) => {
                    self.closing.swap_remove(at);
                    self.skip(reply.1)?;
                }
                None => return self.reply_body(id, reply, dest),
            }
        }
    }

    /// The next reply's id, and its type and body length.
    fn any_reply(&mut self) -> Result<(u32, (u8, usize)), SftpError> {
        let (kind, len) = self.header()?;
        if len < 4 {
            return Err(SftpError::Broken("a packet too short for an id".into()));
        }
        Ok((self.read_u32()?, (kind, len - 4)))
    }

    /// The rest of reply `id`, of `kind` with `rest` bytes to come. A DATA
    /// reply's bytes go straight into what `dest` gives for it (or are
    /// skipped when it gives nothing).
    fn reply_body<'b>(
        &mut self,
        id: u32,
        (kind, rest): (u8, usize),
        dest: impl FnOnce(u32) -> Option<&'b mut [u8]>,
    ) -> Result<(u32, Reply), SftpError> {
        let reply = match kind {
            DATA => {
                let data_len = self.read_u32()? as usize;
                if data_len + 4 != rest {
                    return Err(SftpError::Broken("a DATA packet of inconsistent length".into()));
                }
                match dest(id) {
                    Some(target) if target.len() >= data_len => {
                        self.channel.read_exact(&mut target[..data_len])?;
                    }
                    _ => self.skip(data_len)?,
                }
                Reply::Data(data_len)
            }
            STATUS => {
                let body = self.read_body(rest)?;
                let code = body.get(..4).map_or(4, |c| u32::from_be_bytes(c.try_into().expect("4")));
                let message = body
                    .get(4..8)
                    .map(|l| u32::from_be_bytes(l.try_into().expect("4")) as usize)
                    .and_then(|l| body.get(8..8 + l))
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default();
                Reply::Status { code, message }
            }
            HANDLE => {
                let body = self.read_body(rest)?;
                let handle = body.get(4..).ok_or_else(|| SftpError::Broken("an empty HANDLE".into()))?;
                Reply::Handle(handle.to_vec())
            }
            ATTRS => {
                let body = self.read_body(rest)?;
                Reply::Attrs(Attrs::parse(&body).ok_or_else(|| SftpError::Broken("truncated ATTRS".into()))?)
            }
            NAME => Reply::Name(self.read_body(rest)?),
            other => {
                self.skip(rest)?;
                return Err(SftpError::Broken(format!("unexpected packet type {other}")));
            }
        };
        Ok((id, reply))
    }

    /// One request and its reply, nothing else in flight.
    fn call(&mut self, id: u32) -> Result<Reply, SftpError> {
        self.flush()?;
        let (got, reply) = self.reply(|_| None)?;
        if got != id {
            return Err(SftpError::Broken(format!("reply {got} to request {id}")));
        }
        Ok(reply)
    }

    fn path_request(&mut self, kind: u8, path: &Path) -> u32 {
        let name = Self::string(path.as_os_str().as_bytes());
        self.request(kind, &[&name])
    }

    /// LSTAT and REALPATH of each of `paths`, pipelined: the attributes of
    /// each, or why it is not the regular file it was (see [`check_lookup`]).
    pub fn lookup_many(&mut self, paths: &[&Path]) -> Result<Vec<Result<Attrs, SftpError>>, SftpError> {
        type Half = Option<Result<Reply, SftpError>>;
        let mut replies: Vec<(Half, Half)> = paths.iter().map(|_| (None, None)).collect();
        // Request id -> (path index, whether it is the REALPATH).
        let mut in_flight: HashMap<u32, (usize, bool)> = HashMap::new();
        let mut next = 0;
        while next < paths.len() || !in_flight.is_empty() {
            while in_flight.len() < 2 * FILES_IN_FLIGHT && next < paths.len() {
                in_flight.insert(self.path_request(LSTAT, paths[next]), (next, false));
                in_flight.insert(self.path_request(REALPATH, paths[next]), (next, true));
                next += 1;
            }
            self.flush()?;
            let (id, reply) = self.reply(|_| None)?;
            let (index, real) =
                in_flight.remove(&id).ok_or_else(|| SftpError::Broken(format!("a reply to unknown request {id}")))?;
            let slot = if real { &mut replies[index].1 } else { &mut replies[index].0 };
            *slot = Some(Ok(reply));
        }
        Ok(paths
            .iter()
            .zip(replies)
            .map(|(path, (lstat, real))| {
                let lstat = lstat.expect("answered")?.attrs("LSTAT")?;
                check_lookup(path, &real.expect("answered")?.name()?, &lstat)?;
                Ok(lstat)
            })
            .collect())
    }

    /// LSTAT of `path`, which must be reached without a symlink (REALPATH, in
    /// the same round trip, gives back `path` itself).
    pub fn lstat_checked(&mut self, path: &Path) -> Result<Attrs, SftpError> {
        let lstat = self.path_request(LSTAT, path);
        let real = self.path_request(REALPATH, path);
        self.flush()?;
        let (mut looked, mut resolved) = (None, None);
        while looked.is_none() || resolved.is_none() {
            let (id, reply) = self.reply(|_| None)?;
            match id {
                _ if id == lstat => looked = Some(reply),
                _ if id == real => resolved = Some(reply),
                _ => return Err(SftpError::Broken(format!("a reply to unknown request {id}"))),
            }
        }
        let attrs = looked.expect("answered").attrs("LSTAT")?;
        let real = resolved.expect("answered").name()?;
        if real != path.as_os_str().as_bytes() {
            let reason = format!("reached through a symbolic link (it resolves to {})", String::from_utf8_lossy(&real));
            return Err(SftpError::Changed(reason));
        }
        Ok(attrs)
    }

    /// Lists many directories in one pipeline: for each, LSTAT and REALPATH
    /// (it must still be a directory reached without a symlink) with
    /// OPENDIR, then READDIRs (a few in flight per handle) until EOF, a
    /// READLINK for each symlink among the names, and CLOSE; several
    /// directories at once. `.`, `..` and names that could escape the mount
    /// are left out. The error returned means the session failed.
    #[allow(clippy::type_complexity)]
    pub fn list_dirs(&mut self, dirs: &[&Path]) -> Result<Vec<Result<Vec<Listed>, SftpError>>, SftpError> {
        enum Step {
            Lstat(usize),
            Real(usize),
            Opendir(usize),
            Readdir(usize),
            /// Directory, index of the name.
            Readlink(usize, usize),
            Close(usize),
        }
        #[derive(Default)]
        struct Dir {
            lstat: Option<Result<Attrs, SftpError>>,
            real: Option<Result<Vec<u8>, SftpError>>,
            handle: Option<Vec<u8>>,
            reading: usize,
            done_reading: bool,
            names: Vec<Listed>,
            error: Option<SftpError>,
            /// Requests for it not answered yet.
            outstanding: usize,
        }
        let mut state: Vec<Dir> = dirs.iter().map(|_| Dir::default()).collect();
        let mut steps: HashMap<u32, Step> = HashMap::new();
        let (mut next, mut active) = (0, 0);
        loop {
            while active < DIRS_IN_FLIGHT && next < dirs.len() && steps.len() + 3 <= LISTING_REQUESTS {
                steps.insert(self.path_request(LSTAT, dirs[next]), Step::Lstat(next));
                steps.insert(self.path_request(REALPATH, dirs[next]), Step::Real(next));
                steps.insert(self.path_request(OPENDIR, dirs[next]), Step::Opendir(next));
                state[next].outstanding = 3;
                next += 1;
                active += 1;
            }
            if steps.is_empty() {
                break;
            }
            self.flush()?;
            let (id, reply) = self.reply(|_| None)?;
            let step =
                steps.remove(&id).ok_or_else(|| SftpError::Broken(format!("a reply to unknown request {id}")))?;
            let at = match step {
                Step::Lstat(i) => {
                    state[i].lstat = Some(reply.attrs("LSTAT"));
                    i
                }
                Step::Real(i) => {
                    state[i].real = Some(reply.name());
                    i
                }
                Step::Opendir(i) => {
                    match reply {
                        Reply::Handle(handle) => state[i].handle = Some(handle),
                        Reply::Status { code, message } => {
                            state[i].error.get_or_insert(SftpError::Status { code, message });
                            state[i].done_reading = true;
                        }
                        _ => return Err(SftpError::Broken("unexpected reply to OPENDIR".into())),
                    }
                    i
                }
                Step::Readdir(i) => {
                    state[i].reading -= 1;
                    match reply {
                        Reply::Status { code: FX_EOF, .. } => state[i].done_reading = true,
                        Reply::Status { code, message } => {
                            state[i].error.get_or_insert(SftpError::Status { code, message });
                            state[i].done_reading = true;
                        }
                        reply => {
                            for listed in reply.names()? {
                                if listed.name == b"." || listed.name == b".." {
                                    continue;
                                }
                                if !super::is_safe_name(&listed.name) {
                                    log::warn!(
                                        "{}: an entry named {:?} is left out",
                                        dirs[i].display(),
                                        String::from_utf8_lossy(&listed.name)
                                    );
                                    continue;
                                }
                                let dir = &mut state[i];
                                if listed.attrs.mode.map(|m| m & libc::S_IFMT) == Some(libc::S_IFLNK) {
                                    let mut link = dirs[i].as_os_str().as_bytes().to_vec();
                                    link.push(b'/');
                                    link.extend_from_slice(&listed.name);
                                    let id = self.request(READLINK, &[&Self::string(&link)]);
                                    steps.insert(id, Step::Readlink(i, dir.names.len()));
                                    dir.outstanding += 1;
                                }
                                dir.names.push(listed);
                            }
                        }
                    }
                    i
                }
                Step::Readlink(i, k) => {
                    // A link gone meanwhile keeps no target and is left out.
                    state[i].names[k].target = reply.name().ok();
                    i
                }
                Step::Close(i) => i,
            };
            let dir = &mut state[at];
            dir.outstanding -= 1;
            if let Some(handle) = dir.handle.clone() {
                while !dir.done_reading && dir.reading < READDIRS_PER_DIR {
                    let id = self.request(READDIR, &[&Self::string(&handle)]);
                    steps.insert(id, Step::Readdir(at));
                    dir.reading += 1;
                    dir.outstanding += 1;
                }
                if dir.done_reading && dir.reading == 0 {
                    let id = self.close_request(&handle);
                    steps.insert(id, Step::Close(at));
                    dir.handle = None;
                    dir.outstanding += 1;
                }
            }
            if dir.outstanding == 0 {
                active -= 1;
            }
        }
        Ok(dirs
            .iter()
            .zip(state)
            .map(|(path, dir)| {
                let lstat = dir.lstat.expect("answered")?;
                check_dir_lookup(path, &dir.real.expect("answered")?, &lstat)?;
                if let Some(error) = dir.error {
                    return Err(error);
                }
                let is_link = |l: &Listed| l.attrs.mode.map(|m| m & libc::S_IFMT) == Some(libc::S_IFLNK);
                Ok(dir.names.into_iter().filter(|l| !is_link(l) || l.target.is_some()).collect())
            })
            .collect())
    }

    /// The path the server resolves `path` to (no symlink on the way).
    pub fn realpath(&mut self, path: &Path) -> Result<PathBuf, SftpError> {
        let id = self.path_request(REALPATH, path);
        Ok(PathBuf::from(std::ffi::OsString::from_vec(self.call(id)?.name()?)))
    }

    /// Opens `path` for reading once LSTAT and REALPATH say it is the regular
    /// file it was (a FIFO is never opened: the server would block on it).
    /// Returns the handle and the attributes to check FSTAT against.
    pub fn open_checked(&mut self, path: &Path) -> Result<(Vec<u8>, Attrs), SftpError> {
        let lstat = self.lookup_many(&[path])?.pop().expect("one path")?;
        let id = self.open_request(path);
        match self.call(id)? {
            Reply::Handle(handle) => Ok((handle, lstat)),
            Reply::Status { code, message } => Err(SftpError::Status { code, message }),
            _ => Err(SftpError::Broken("unexpected reply to OPEN".into())),
        }
    }

    /// Closes `handle` without waiting: the CLOSE goes out with the next
    /// request, and its reply is read (and dropped) when it comes. A handle
    /// lazyfs only read from has nothing to lose on a failed close.
    pub fn close(&mut self, handle: &[u8]) {
        let id = self.close_request(handle);
        self.closing.push(id);
    }

    /// Reads `ranges` of the open file `handle` with up to DEPTH requests of
    /// REQUEST bytes in flight, each range cut into requests from its start,
    /// as long as the sink lets more go out ([`Sink::may_request`]).
    /// [`Sink::land`] gets each request's bytes as soon as all of them
    /// arrived (so whole chunks, when the ranges start on chunk boundaries),
    /// through buffers the client keeps and reuses; a sink that answers
    /// false stops the reading (what is in flight is read and dropped). With
    /// `check`, the LSTAT of a handle just opened, FSTAT goes along with the
    /// first READs and must agree with it ([`check_opened`]); nothing is
    /// landed before it did.
    pub fn read_ranges(
        &mut self,
        handle: &[u8],
        ranges: &[Range<u64>],
        check: Option<&Attrs>,
        sink: &mut dyn Sink,
    ) -> Result<(), SftpError> {
        let mut buffers = std::mem::take(&mut self.buffers);
        let read = self.read_pieces(handle, ranges, check, sink, &mut buffers);
        self.buffers = buffers;
        read
    }

    fn read_pieces(
        &mut self,
        handle: &[u8],
        ranges: &[Range<u64>],
        check: Option<&Attrs>,
        sink: &mut dyn Sink,
        buffers: &mut Vec<Vec<u8>>,
    ) -> Result<(), SftpError> {
        /// A request of a piece: its buffer, where the piece starts, its length,
        /// and how much of it arrived before this request (a short reply asks again).
        struct Piece {
            buffer: usize,
            start: u64,
            len: u64,
            filled: u64,
        }
        let mut pieces = ranges
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(REQUEST as usize).map(move |at| at..(at + REQUEST).min(r.end)))
            .peekable();
        let mut free: Vec<usize> = (0..buffers.len()).collect();
        let mut in_flight_bytes = 0;
        let mut in_flight: HashMap<u32, Piece> = HashMap::new();
        // Landed only once FSTAT agreed: held back until then.
        let mut held: Vec<Piece> = Vec::new();
        let mut stopped = false;
        let mut failure: Option<SftpError> = None;
        let fstat = check.map(|_| {
            let handle = Self::string(handle);
            self.request(FSTAT, &[&handle])
        });
        let mut checked = fstat.is_none();
        loop {
            while let Some(next) = pieces.peek() {
                let len = next.end - next.start;
                let room = in_flight.len() < DEPTH && (in_flight.is_empty() || in_flight_bytes + len <= IN_FLIGHT);
                if stopped || failure.is_some() || !room || !sink.may_request(in_flight.is_empty()) {
                    break;
                }
                let piece = pieces.next().expect("peeked");
                let buffer = free.pop().unwrap_or_else(|| {
                    buffers.push(Vec::new());
                    buffers.len() - 1
                });
                buffers[buffer].resize(len as usize, 0);
                in_flight_bytes += len;
                in_flight.insert(
                    self.read_request(handle, piece.start, len),
                    Piece { buffer, start: piece.start, len, filled: 0 },
                );
            }
            if in_flight.is_empty() && checked {
                break;
            }
            self.flush()?;
            let (id, reply) =
                self.reply(|id| in_flight.get(&id).map(|p| &mut buffers[p.buffer][p.filled as usize..p.len as usize]))?;
            if let (Some(lstat), true) = (check, Some(id) == fstat) {
                checked = true;
                if let Err(e) = reply.attrs("FSTAT").and_then(|fstat| check_opened(lstat, &fstat)) {
                    failure.get_or_insert(e);
                }
                for piece in held.drain(..) {
                    if failure.is_none() && !stopped {
                        stopped = !sink.land(piece.start, &buffers[piece.buffer][..piece.len as usize]);
                    }
                    free.push(piece.buffer);
                }
                continue;
            }
            let Some(mut piece) = in_flight.remove(&id) else {
                return Err(SftpError::Broken(format!("a reply to unknown request {id}")));
            };
            in_flight_bytes -= piece.len;
            let asked = piece.len - piece.filled;
            match reply {
                Reply::Data(got) if got as u64 > asked => {
                    return Err(SftpError::Broken(format!("a DATA reply of {got} bytes to a READ of {asked}")));
                }
                Reply::Data(got) if got as u64 == asked => {
                    piece.filled = piece.len;
                    if !checked {
                        held.push(piece);
                    } else if stopped || failure.is_some() {
                        free.push(piece.buffer);
                    } else {
                        stopped = !sink.land(piece.start, &buffers[piece.buffer][..piece.len as usize]);
                        free.push(piece.buffer);
                    }
                    continue;
                }
                // A short answer: ask again for the rest.
                Reply::Data(got) if got > 0 && failure.is_none() && !stopped => {
                    piece.filled += got as u64;
                    let id = self.read_request(handle, piece.start + piece.filled, piece.len - piece.filled);
                    in_flight_bytes += piece.len;
                    in_flight.insert(id, piece);
                    continue;
                }
                Reply::Data(_) => {}
                Reply::Status { code: FX_EOF, .. } => {
                    let end = piece.start + piece.filled;
                    match &mut failure {
                        Some(SftpError::Short { end: first }) => *first = (*first).min(end),
                        None => failure = Some(SftpError::Short { end }),
                        Some(_) => {}
                    }
                }
                Reply::Status { code, message } => {
                    failure.get_or_insert(SftpError::Status { code, message });
                }
                _ => return Err(SftpError::Broken("unexpected reply to READ".into())),
            }
            free.push(piece.buffer);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Reads many whole files at once: the LSTAT and REALPATH, OPEN, FSTAT
    /// of the next files (checked as in [`Sftp::open_checked`] and
    /// [`Sftp::read_ranges`]), the READs of those open (several per file),
    /// and the CLOSEs of those done all overlap. Each file is read one byte
    /// past its expected size, so a file that grew says so in the same
    /// replies, without a STAT.
    pub fn read_files(&mut self, files: &mut [FileRead<'_>]) -> Result<(), SftpError> {
        enum Step {
            /// File, and whether this is its REALPATH (else its LSTAT).
            Looking(usize, bool),
            Opening(usize),
            Fstat(usize),
            /// File, start, bytes asked.
            Reading(usize, u64, u64),
            Closing,
        }
        #[derive(Default)]
        struct Progress {
            lstat: Option<Reply>,
            real: Option<Reply>,
            /// What LSTAT said, for FSTAT to agree with.
            looked: Attrs,
            checking: bool,
            handle: Option<Vec<u8>>,
            /// Bytes asked for so far (up to size + 1).
            asked: u64,
            reads: usize,
        }
        let mut steps: HashMap<u32, Step> = HashMap::new();
        let mut progress: Vec<Progress> = files.iter().map(|_| Progress::default()).collect();
        let mut next_file = 0;
        // Files open (OPEN sent, not yet closed); files being looked at, and
        // those that passed, waiting for an open slot: the looks of the next
        // files overlap the reads of those open, so they add no round trip.
        let mut open_files = 0;
        let mut looking = 0;
        let mut ready: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
        loop {
            while open_files < FILES_IN_FLIGHT
                && let Some(i) = ready.pop_front()
            {
                steps.insert(self.open_request(files[i].path), Step::Opening(i));
                open_files += 1;
            }
            while looking + ready.len() < FILES_IN_FLIGHT && next_file < files.len() {
                steps.insert(self.path_request(LSTAT, files[next_file].path), Step::Looking(next_file, false));
                steps.insert(self.path_request(REALPATH, files[next_file].path), Step::Looking(next_file, true));
                next_file += 1;
                looking += 1;
            }
            if steps.is_empty() {
                // A file is never taken as read unless every byte was asked for.
                for (file, progress) in files.iter_mut().zip(&progress) {
                    if file.result.is_ok() && progress.asked <= file.buf.len() as u64 {
                        file.result = Err(SftpError::Broken("the pipeline ended before the file was read".into()));
                    }
                }
                return Ok(());
            }
            let answered = self.flush().and_then(|()| {
                self.reply(|id| match steps.get(&id) {
                    Some(&Step::Reading(i, start, len)) => {
                        let buf = &mut *files[i].buf;
                        let end = (start + len).min(buf.len() as u64) as usize;
                        Some(&mut buf[start as usize..end])
                    }
                    _ => None,
                })
            });
            let (id, reply) = match answered {
                Ok(answer) => answer,
                Err(SftpError::TimedOut) => {
                    // The server answers in order: the file of the oldest
                    // request unanswered is the one it is stuck on.
                    let stuck = steps
                        .iter()
                        .filter_map(|(&id, step)| match *step {
                            Step::Looking(i, _) | Step::Opening(i) | Step::Fstat(i) | Step::Reading(i, ..) => {
                                Some((id, i))
                            }
                            Step::Closing => None,
                        })
                        .min();
                    if let Some((_, i)) = stuck {
                        files[i].result = Err(SftpError::TimedOut);
                    }
                    return Err(SftpError::TimedOut);
                }
                Err(e) => return Err(e),
            };
            let step =
                steps.remove(&id).ok_or_else(|| SftpError::Broken(format!("a reply to unknown request {id}")))?;
            let file = match step {
                Step::Closing => {
                    open_files -= 1;
                    continue;
                }
                Step::Looking(i, real) => {
                    let p = &mut progress[i];
                    *(if real { &mut p.real } else { &mut p.lstat }) = Some(reply);
                    let looked = match (p.lstat.take(), p.real.take()) {
                        (Some(lstat), Some(real)) => lstat.attrs("LSTAT").and_then(|lstat| {
                            check_lookup(files[i].path, &real.name()?, &lstat)?;
                            Ok(lstat)
                        }),
                        // The other half is still to come.
                        (lstat, real) => {
                            (p.lstat, p.real) = (lstat, real);
                            continue;
                        }
                    };
                    looking -= 1;
                    let looked = looked.and_then(|lstat| {
                        let now = super::SourceStat {
                            size: lstat.size.unwrap_or(0),
                            mtime: i64::from(lstat.mtime.unwrap_or(0)),
                        };
                        match super::changed_since_listed(files[i].listed, now) {
                            Some(reason) => Err(SftpError::Changed(reason)),
                            None => Ok(lstat),
                        }
                    });
                    match looked {
                        Ok(lstat) => {
                            p.looked = lstat;
                            ready.push_back(i);
                        }
                        Err(e) => files[i].result = Err(e),
                    }
                    continue;
                }
                Step::Fstat(i) => {
                    progress[i].checking = false;
                    if let Err(e) = reply.attrs("FSTAT").and_then(|fstat| check_opened(&progress[i].looked, &fstat)) {
                        files[i].result = Err(e);
                    }
                    i
                }
                Step::Opening(i) => {
                    match reply {
                        Reply::Handle(handle) => {
                            let id = self.request(FSTAT, &[&Self::string(&handle)]);
                            steps.insert(id, Step::Fstat(i));
                            progress[i].checking = true;
                            progress[i].handle = Some(handle);
                        }
                        Reply::Status { code, message } => {
                            files[i].result = Err(SftpError::Status { code, message });
                            open_files -= 1;
                            continue;
                        }
                        _ => return Err(SftpError::Broken("unexpected reply to OPEN".into())),
                    }
                    i
                }
                Step::Reading(i, start, len) => {
                    progress[i].reads -= 1;
                    let size = files[i].buf.len() as u64;
                    match reply {
                        Reply::Data(got) if got as u64 > len => {
                            return Err(SftpError::Broken(format!("a DATA reply of {got} bytes to a READ of {len}")));
                        }
                        // Past the expected end: the file grew.
                        Reply::Data(got) if start + got as u64 > size => files[i].result = Err(SftpError::Longer),
                        Reply::Data(got) if (got as u64) < len && start + (got as u64) < size && got > 0 => {
                            // A short answer inside the file: ask for the rest.
                            let (rest, left) = (start + got as u64, len - got as u64);
                            let handle = progress[i].handle.clone().expect("open");
                            let id = self.read_request(&handle, rest, left);
                            steps.insert(id, Step::Reading(i, rest, left));
                            progress[i].reads += 1;
                        }
                        Reply::Data(got) if start + (got as u64) < size && (got as u64) < len => {
                            files[i].result = Err(SftpError::Short { end: start + got as u64 });
                        }
                        Reply::Data(_) => {}
                        Reply::Status { code: FX_EOF, .. } if start >= size => {}
                        Reply::Status { code: FX_EOF, .. } => files[i].result = Err(SftpError::Short { end: start }),
                        Reply::Status { code, message } => files[i].result = Err(SftpError::Status { code, message }),
                        _ => return Err(SftpError::Broken("unexpected reply to READ".into())),
                    }
                    i
                }
            };
            // Keep up to DEPTH_PER_FILE reads in flight for this file, then close it.
            let size = files[file].buf.len() as u64;
            let handle = progress[file].handle.clone().expect("open");
            while files[file].result.is_ok() && progress[file].reads < DEPTH_PER_FILE && progress[file].asked < size + 1
            {
                let start = progress[file].asked;
                let len = REQUEST.min(size + 1 - start);
                let id = self.read_request(&handle, start, len);
                steps.insert(id, Step::Reading(file, start, len));
                progress[file].asked += len;
                progress[file].reads += 1;
            }
            let finished = progress[file].reads == 0
                && !progress[file].checking
                && (files[file].result.is_err() || progress[file].asked > size);
            if finished && progress[file].handle.is_some() {
                let handle = progress[file].handle.take().expect("open");
                let id = self.close_request(&handle);
                steps.insert(id, Step::Closing);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that says what it is told to: its replies are scripted, what
    /// it is sent is ignored. At the end of its script it says nothing more:
    /// the wait runs out.
    struct Scripted(std::io::Cursor<Vec<u8>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 if !buf.is_empty() => Err(std::io::ErrorKind::TimedOut.into()),
                n => Ok(n),
            }
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// It answers at once: nothing to bound.
    impl Wire for Scripted {
        fn bound(&mut self, _wait: Duration) {}
        fn cut(&self) {}
    }

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    fn data(id: u32, bytes: &[u8]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        body.extend_from_slice(bytes);
        packet(DATA, &body)
    }

    /// ATTRS of a file of `mode` (type bits included), 10 bytes, owned by root.
    fn attrs(id: u32, mode: u32) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&15u32.to_be_bytes());
        body.extend_from_slice(&10u64.to_be_bytes());
        body.extend_from_slice(&[0; 8]);
        body.extend_from_slice(&mode.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
        packet(ATTRS, &body)
    }

    /// A NAME reply with one name (what REALPATH answers).
    fn name(id: u32, name: &str) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&1u32.to_be_bytes());
        for part in [name, ""] {
            body.extend_from_slice(&(part.len() as u32).to_be_bytes());
            body.extend_from_slice(part.as_bytes());
        }
        body.extend_from_slice(&0u32.to_be_bytes());
        packet(NAME, &body)
    }

    fn handle(id: u32) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&1u32.to_be_bytes());
        body.push(b'h');
        packet(HANDLE, &body)
    }

    const REGULAR: u32 = 0o100644;

    /// Reads `buf.len()` bytes from the start of `handle` into `buf`.
    fn read_into(
        sftp: &mut Sftp<Scripted>,
        handle: &[u8],
        buf: &mut [u8],
        check: Option<&Attrs>,
    ) -> Result<(), SftpError> {
        let range = 0..buf.len() as u64;
        sftp.read_ranges(handle, &[range], check, &mut crate::source::Copy { offset: 0, buf })
    }

    fn session(replies: &[Vec<u8>]) -> Sftp<Scripted> {
        let mut script = packet(VERSION, &3u32.to_be_bytes());
        replies.iter().for_each(|r| script.extend_from_slice(r));
        let limits = Limits { deadline: None, stall: Duration::from_secs(5) };
        Sftp::start(Scripted(std::io::Cursor::new(script)), limits)
    }

    /// Finding 7: a DATA reply longer than the READ asked for is a broken
    /// session, not an arithmetic overflow (a panic in a lane).
    #[test]
    fn a_data_reply_longer_than_asked_is_a_broken_session() {
        // Requests are numbered from 2 (INIT carries no id).
        let mut sftp = session(&[data(2, &[7; 20])]);
        let mut buf = [0u8; 10];
        let err = read_into(&mut sftp, b"h", &mut buf, None).unwrap_err();
        assert!(matches!(&err, SftpError::Broken(m) if m.contains("20 bytes")), "{err:?}");
    }

    #[test]
    fn a_longer_reply_in_a_batch_is_a_broken_session_too() {
        // LSTAT 2, REALPATH 3, OPEN 4, FSTAT 5, the first READ (11 bytes: one past the size) 6.
        let (lstat, real, open, fstat) = (attrs(2, REGULAR), name(3, "/f"), handle(4), attrs(5, REGULAR));
        let mut sftp = session(&[lstat, real, open, fstat, data(6, &[7; 64])]);
        let mut buf = [0u8; 10];
        let mut files = [FileRead { path: Path::new("/f"), buf: &mut buf, listed: None, result: Ok(()) }];
        let err = sftp.read_files(&mut files).unwrap_err();
        assert!(matches!(&err, SftpError::Broken(m) if m.contains("64 bytes")), "{err:?}");
    }

    /// A batch the server stops answering names the file of its oldest
    /// unanswered request, and only that one.
    #[test]
    fn a_stalled_batch_names_the_file_it_is_stuck_on() {
        // LSTAT and REALPATH of /f (2, 3) and of /g (4, 5) go out first; /f's
        // are answered, then nothing: /g's LSTAT is the oldest unanswered.
        let mut sftp = session(&[attrs(2, REGULAR), name(3, "/f")]);
        let (mut f, mut g) = ([0u8; 10], [0u8; 10]);
        let mut files = [
            FileRead { path: Path::new("/f"), buf: &mut f, listed: None, result: Ok(()) },
            FileRead { path: Path::new("/g"), buf: &mut g, listed: None, result: Ok(()) },
        ];
        assert!(matches!(sftp.read_files(&mut files), Err(SftpError::TimedOut)));
        assert!(files[0].result.is_ok(), "{:?}", files[0].result);
        assert!(matches!(files[1].result, Err(SftpError::TimedOut)), "{:?}", files[1].result);
    }

    /// A CLOSE costs no round trip: it goes out with the next request, and
    /// its answer is dropped when it comes, ahead of that request's.
    #[test]
    fn a_close_is_answered_on_the_way() {
        let mut status = 2u32.to_be_bytes().to_vec();
        status.extend_from_slice(&[0; 12]);
        let mut sftp = session(&[packet(STATUS, &status), name(3, "/x")]);
        sftp.close(b"h");
        assert_eq!(sftp.realpath(Path::new("/x")).unwrap(), Path::new("/x"));
        assert!(sftp.closing.is_empty());
    }

    #[test]
    fn short_replies_are_asked_again() {
        let mut sftp = session(&[data(2, b"abcd"), data(3, b"efghij")]);
        let mut buf = [0u8; 10];
        read_into(&mut sftp, b"h", &mut buf, None).unwrap();
        assert_eq!(&buf, b"abcdefghij");
    }

    /// What LSTAT and REALPATH say fails a file before any OPEN is sent
    /// (the script has no answer to one: an OPEN would end the session).
    #[test]
    fn a_symlink_or_a_fifo_is_never_opened() {
        for (lstat, real, reason) in [
            (0o120777, "/f", "now a symbolic link"),
            (0o010644, "/f", "now a FIFO"),
            (REGULAR, "/elsewhere/f", "reached through a symbolic link (it resolves to /elsewhere/f)"),
        ] {
            let mut sftp = session(&[attrs(2, lstat), name(3, real)]);
            let err = sftp.open_checked(Path::new("/f")).unwrap_err();
            assert!(matches!(&err, SftpError::Changed(m) if m == reason), "{err:?}");
            let mut sftp = session(&[attrs(2, lstat), name(3, real)]);
            let mut buf = [0u8; 10];
            let mut files = [FileRead { path: Path::new("/f"), buf: &mut buf, listed: None, result: Ok(()) }];
            sftp.read_files(&mut files).unwrap();
            assert!(matches!(&files[0].result, Err(SftpError::Changed(m)) if m == reason), "{:?}", files[0].result);
        }
    }

    /// A file swapped between the LSTAT and the OPEN: FSTAT disagrees.
    #[test]
    fn a_file_swapped_while_opened_is_refused() {
        let (lstat, real, open) = (attrs(2, REGULAR), name(3, "/f"), handle(4));
        let mut sftp = session(&[lstat, real, open, attrs(5, 0o100600), data(6, &[7; 10])]);
        let (handle, looked) = sftp.open_checked(Path::new("/f")).unwrap();
        let mut buf = [0u8; 10];
        let err = read_into(&mut sftp, &handle, &mut buf, Some(&looked)).unwrap_err();
        assert!(matches!(&err, SftpError::Changed(m) if m.contains("replaced")), "{err:?}");
    }

    /// A read by another lane between the look and the open moves the
    /// access time only: the same file (a 64 MiB prefetch failed on it).
    #[test]
    fn a_file_read_meanwhile_is_the_same_file() {
        let looked = Attrs { size: Some(10), mode: Some(REGULAR), mtime: Some(5), atime: Some(5), ..Attrs::default() };
        assert!(check_opened(&looked, &Attrs { atime: Some(9), ..looked }).is_ok());
        assert!(check_opened(&looked, &Attrs { mtime: Some(9), ..looked }).is_err());
    }
}
