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
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::Limits;

const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const STAT: u8 = 17;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const ATTRS: u8 = 105;

const FX_OK: u32 = 0;
const FX_EOF: u32 = 1;
const FX_NO_SUCH_FILE: u32 = 2;
const FXF_READ: u32 = 1;

/// Bytes asked for by one READ: OpenSSH's sftp-server answers up to 256 KiB.
pub const REQUEST: u64 = 256 << 10;
/// READs in flight at once per pipeline: 4 MiB, enough for a 1 Gbit/s link at 20 ms RTT.
const DEPTH: usize = 16;
/// Files opened at once when many files are read together, and READs in
/// flight per file then.
const FILES_IN_FLIGHT: usize = 64;
const DEPTH_PER_FILE: usize = 4;
/// No SFTP reply lazyfs asks for is larger (a DATA of REQUEST bytes and its header).
const MAX_PACKET: usize = 1 << 20;

/// Why an SFTP operation failed.
#[derive(Debug)]
pub enum SftpError {
    /// The server answered with a status: `NoSuchFile`, `Eof` or another code.
    Status { code: u32, message: String },
    /// The file ended at `end` before the bytes asked for.
    Short { end: u64 },
    /// The file is longer than the bytes asked for (read whole).
    Longer,
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

/// Size and mtime, or why not.
pub type StatResult = Result<(u64, u32), SftpError>;

/// One file of a batched read: read `buf.len()` bytes from the start of `path`.
pub struct FileRead<'a> {
    pub path: &'a Path,
    pub buf: &'a mut [u8],
    pub result: Result<(), SftpError>,
}

/// An SFTP session over `C`: an SSH channel, or a scripted stream in tests.
pub struct Sftp<C = ssh2::Channel> {
    channel: C,
    /// The channel's session, whose timeout bounds each wait (none for a
    /// scripted stream).
    session: Option<ssh2::Session>,
    limits: Limits,
    /// When the current limits were set.
    since: Instant,
    next_id: u32,
    out: Vec<u8>,
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
    Attrs {
        size: Option<u64>,
        mtime: Option<u32>,
    },
}

impl Sftp {
    /// Starts the `sftp` subsystem on `channel`, a new session channel.
    pub fn start(mut channel: ssh2::Channel, session: ssh2::Session, limits: Limits) -> Result<Sftp, SftpError> {
        channel.subsystem("sftp").map_err(|e| match std::io::Error::from(e) {
            e if e.kind() == std::io::ErrorKind::TimedOut => SftpError::TimedOut,
            e => SftpError::Broken(e.to_string()),
        })?;
        Sftp::init(channel, Some(session), limits)
    }
}

impl<C: Read + Write> Sftp<C> {
    /// Says hello (INIT, VERSION) on a channel already speaking SFTP.
    fn init(channel: C, session: Option<ssh2::Session>, limits: Limits) -> Result<Sftp<C>, SftpError> {
        let mut sftp = Sftp { channel, session, limits, since: Instant::now(), next_id: 1, out: Vec::new() };
        // INIT carries the version where other requests carry an id.
        sftp.out.extend_from_slice(&5u32.to_be_bytes());
        sftp.out.push(INIT);
        sftp.out.extend_from_slice(&3u32.to_be_bytes());
        sftp.flush()?;
        let (kind, len) = sftp.header()?;
        if kind != VERSION || len < 4 {
            return Err(SftpError::Broken(format!("unexpected reply {kind} to INIT")));
        }
        sftp.skip(len)?;
        Ok(sftp)
    }

    /// Bounds the requests from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.since = Instant::now();
        self.arm().ok();
    }

    /// How long the requests under the current limits have taken.
    pub fn waited(&self) -> Duration {
        self.since.elapsed()
    }

    /// Bounds the next wait on the server by what the limits leave.
    fn arm(&self) -> Result<(), SftpError> {
        let wait = self.limits.next_wait();
        if wait.is_zero() {
            return Err(SftpError::TimedOut);
        }
        if let Some(session) = &self.session {
            session.set_timeout(u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1));
        }
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
        let (kind, len) = self.header()?;
        if len < 4 {
            return Err(SftpError::Broken("a packet too short for an id".into()));
        }
        let id = self.read_u32()?;
        let rest = len - 4;
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
                Reply::Attrs { size: attrs_size(&body), mtime: attrs_mtime(&body) }
            }
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

    fn stat_request(&mut self, path: &Path) -> u32 {
        let name = Self::string(path.as_os_str().as_bytes());
        self.request(STAT, &[&name])
    }

    fn stat_reply(reply: Reply) -> StatResult {
        match reply {
            Reply::Attrs { size, mtime } => Ok((size.unwrap_or(0), mtime.unwrap_or(0))),
            Reply::Status { code, message } => Err(SftpError::Status { code, message }),
            _ => Err(SftpError::Broken("unexpected reply to STAT".into())),
        }
    }

    fn open_reply(reply: Reply) -> Result<Vec<u8>, SftpError> {
        match reply {
            Reply::Handle(handle) => Ok(handle),
            Reply::Status { code, message } => Err(SftpError::Status { code, message }),
            _ => Err(SftpError::Broken("unexpected reply to OPEN".into())),
        }
    }

    /// Size and mtime of `path`.
    pub fn stat(&mut self, path: &Path) -> Result<(u64, u32), SftpError> {
        let id = self.stat_request(path);
        Self::stat_reply(self.call(id)?)
    }

    /// STAT then OPEN of `path` in one round trip (the server answers them
    /// in order): the size and mtime are the file's as of before the open.
    pub fn stat_open(&mut self, path: &Path) -> Result<(StatResult, Result<Vec<u8>, SftpError>), SftpError> {
        let stat_id = self.stat_request(path);
        let open_id = self.open_request(path);
        self.flush()?;
        let (mut stat, mut open) = (None, None);
        while stat.is_none() || open.is_none() {
            match self.reply(|_| None)? {
                (id, reply) if id == stat_id && stat.is_none() => stat = Some(Self::stat_reply(reply)),
                (id, reply) if id == open_id && open.is_none() => open = Some(Self::open_reply(reply)),
                (id, _) => return Err(SftpError::Broken(format!("a reply to unknown request {id}"))),
            }
        }
        Ok((stat.expect("answered"), open.expect("answered")))
    }

    /// Size and mtime of each of `paths`, the STATs pipelined.
    pub fn stat_many(&mut self, paths: &[&Path]) -> Result<Vec<StatResult>, SftpError> {
        let mut results: Vec<Option<StatResult>> = paths.iter().map(|_| None).collect();
        let mut in_flight: HashMap<u32, usize> = HashMap::new();
        let mut next = 0;
        while next < paths.len() || !in_flight.is_empty() {
            while in_flight.len() < FILES_IN_FLIGHT && next < paths.len() {
                let id = self.stat_request(paths[next]);
                in_flight.insert(id, next);
                next += 1;
            }
            self.flush()?;
            let (id, reply) = self.reply(|_| None)?;
            let index =
                in_flight.remove(&id).ok_or_else(|| SftpError::Broken(format!("a reply to unknown request {id}")))?;
            results[index] = Some(Self::stat_reply(reply));
        }
        Ok(results.into_iter().map(|r| r.expect("every request answered")).collect())
    }

    pub fn open(&mut self, path: &Path) -> Result<Vec<u8>, SftpError> {
        let id = self.open_request(path);
        Self::open_reply(self.call(id)?)
    }

    pub fn close(&mut self, handle: &[u8]) -> Result<(), SftpError> {
        let id = self.close_request(handle);
        match self.call(id)? {
            Reply::Status { code: FX_OK, .. } => Ok(()),
            Reply::Status { code, message } => Err(SftpError::Status { code, message }),
            _ => Err(SftpError::Broken("unexpected reply to CLOSE".into())),
        }
    }

    /// Fills `buf` from `offset` of the open file `handle`, with up to DEPTH
    /// requests of REQUEST bytes in flight.
    pub fn read_exact_at(&mut self, handle: &[u8], offset: u64, buf: &mut [u8]) -> Result<(), SftpError> {
        let total = buf.len() as u64;
        // Request id -> (start within buf, bytes asked).
        let mut in_flight: HashMap<u32, (u64, u64)> = HashMap::new();
        let mut next = 0u64;
        let mut failure: Option<SftpError> = None;
        loop {
            while failure.is_none() && in_flight.len() < DEPTH && next < total {
                let len = REQUEST.min(total - next);
                let id = self.read_request(handle, offset + next, len);
                in_flight.insert(id, (next, len));
                next += len;
            }
            if in_flight.is_empty() {
                break;
            }
            self.flush()?;
            let (id, reply) = self.reply(|id| {
                in_flight.get(&id).map(|&(start, len)| {
                    let start = start as usize;
                    &mut buf[start..start + len as usize]
                })
            })?;
            let Some((start, len)) = in_flight.remove(&id) else {
                return Err(SftpError::Broken(format!("a reply to unknown request {id}")));
            };
            match reply {
                Reply::Data(got) if got as u64 > len => {
                    return Err(SftpError::Broken(format!("a DATA reply of {got} bytes to a READ of {len}")));
                }
                Reply::Data(got) if got as u64 == len => {}
                // A short answer: ask again for the rest.
                Reply::Data(got) if got > 0 && failure.is_none() => {
                    let (rest, left) = (start + got as u64, len - got as u64);
                    let id = self.read_request(handle, offset + rest, left);
                    in_flight.insert(id, (rest, left));
                }
                Reply::Data(_) => {}
                Reply::Status { code: FX_EOF, .. } => {
                    let end = offset + start;
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
        }
        failure.map_or(Ok(()), Err)
    }

    /// Reads many whole files at once: the OPEN of the next files, the READs
    /// of those open (several per file), and the CLOSEs of those done all
    /// overlap. Each file is read one byte past its expected size, so a file
    /// that grew says so in the same replies, without a STAT.
    pub fn read_files(&mut self, files: &mut [FileRead<'_>]) -> Result<(), SftpError> {
        enum Step {
            Opening(usize),
            /// File, start, bytes asked.
            Reading(usize, u64, u64),
            Closing,
        }
        struct Progress {
            handle: Option<Vec<u8>>,
            /// Bytes asked for so far (up to size + 1).
            asked: u64,
            reads: usize,
        }
        let mut steps: HashMap<u32, Step> = HashMap::new();
        let mut progress: Vec<Progress> = files.iter().map(|_| Progress { handle: None, asked: 0, reads: 0 }).collect();
        let mut next_file = 0;
        let mut open_files = 0;
        loop {
            while open_files < FILES_IN_FLIGHT && next_file < files.len() {
                let id = self.open_request(files[next_file].path);
                steps.insert(id, Step::Opening(next_file));
                next_file += 1;
                open_files += 1;
            }
            if steps.is_empty() {
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
                            Step::Opening(i) | Step::Reading(i, ..) => Some((id, i)),
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
                Step::Opening(i) => {
                    match reply {
                        Reply::Handle(handle) => progress[i].handle = Some(handle),
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
            let finished = progress[file].reads == 0 && (files[file].result.is_err() || progress[file].asked > size);
            if finished && progress[file].handle.is_some() {
                let handle = progress[file].handle.take().expect("open");
                let id = self.close_request(&handle);
                steps.insert(id, Step::Closing);
            }
        }
    }
}

fn attrs_size(body: &[u8]) -> Option<u64> {
    let flags = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    if flags & 1 == 0 {
        return None;
    }
    Some(u64::from_be_bytes(body.get(4..12)?.try_into().ok()?))
}

fn attrs_mtime(body: &[u8]) -> Option<u32> {
    let flags = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let mut at = 4;
    if flags & 1 != 0 {
        at += 8;
    }
    if flags & 2 != 0 {
        at += 8;
    }
    if flags & 4 != 0 {
        at += 4;
    }
    if flags & 8 == 0 {
        return None;
    }
    Some(u32::from_be_bytes(body.get(at + 4..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that says what it is told to: its replies are scripted, what
    /// it is sent is ignored.
    struct Scripted(std::io::Cursor<Vec<u8>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
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

    fn session(replies: &[Vec<u8>]) -> Sftp<Scripted> {
        let mut script = packet(VERSION, &3u32.to_be_bytes());
        replies.iter().for_each(|r| script.extend_from_slice(r));
        let limits = Limits { deadline: None, stall: Duration::from_secs(5) };
        Sftp::init(Scripted(std::io::Cursor::new(script)), None, limits).unwrap()
    }

    /// Finding 7: a DATA reply longer than the READ asked for is a broken
    /// session, not an arithmetic overflow (a panic in a lane).
    #[test]
    fn a_data_reply_longer_than_asked_is_a_broken_session() {
        // Requests are numbered from 2 (INIT carries no id).
        let mut sftp = session(&[data(2, &[7; 20])]);
        let mut buf = [0u8; 10];
        let err = sftp.read_exact_at(b"h", 0, &mut buf).unwrap_err();
        assert!(matches!(&err, SftpError::Broken(m) if m.contains("20 bytes")), "{err:?}");
    }

    #[test]
    fn a_longer_reply_in_a_batch_is_a_broken_session_too() {
        let mut handle = 2u32.to_be_bytes().to_vec();
        handle.extend_from_slice(&1u32.to_be_bytes());
        handle.push(b'h');
        // OPEN is request 2, the first READ (11 bytes: one past the size) request 3.
        let mut sftp = session(&[packet(HANDLE, &handle), data(3, &[7; 64])]);
        let mut buf = [0u8; 10];
        let mut files = [FileRead { path: Path::new("/f"), buf: &mut buf, result: Ok(()) }];
        let err = sftp.read_files(&mut files).unwrap_err();
        assert!(matches!(&err, SftpError::Broken(m) if m.contains("64 bytes")), "{err:?}");
    }

    #[test]
    fn short_replies_are_asked_again() {
        let mut sftp = session(&[data(2, b"abcd"), data(3, b"efghij")]);
        let mut buf = [0u8; 10];
        sftp.read_exact_at(b"h", 0, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefghij");
    }
}
