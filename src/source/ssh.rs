//! The old host over SSH (libssh2 through `ssh2`): host key checked against
//! known_hosts, ssh-agent then identity files, contents over SFTP ranged reads.
//! No path ever becomes part of a command line.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ssh2::{HashType, MethodType, Session};

use super::known_hosts::{self, HostKeyCheck, KnownHosts};
use super::sftp::{Attrs, FileRead, Sftp, SftpError, Wire};
use super::tar::{self, TarUse};
use super::{
    Connection, DirEntry, Limits, Listings, Sink, Source, SourceAttrs, SourceError, SourceStat, SshOptions, WholeRead,
    relative,
};

/// AES-GCM first: libssh2 decrypts it with OpenSSL (AES-NI); its chacha20-poly1305
/// is portable C and took half the daemon's CPU in a perf profile of a bulk transfer.
const CIPHERS: &str =
    "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";
/// OpenSSH's own order, so the key negotiated is the one `ssh` would have recorded.
const HOST_KEY_ALGORITHMS: [&str; 6] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest any single SSH operation may block before the session counts as
/// lost, when the caller set no shorter bound.
pub(super) const SESSION_TIMEOUT: Duration = Duration::from_secs(20);
/// SSH keepalives (sent before a request on a connection idle this long) keep
/// NAT state and the server's ClientAliveInterval satisfied.
const KEEPALIVE_SECS: u32 = 10;
/// TCP keepalive probes on an idle connection: a host that is gone (power,
/// network) is noticed after idle + interval * count seconds.
const TCP_KEEPIDLE_SECS: libc::c_int = 5;
const TCP_KEEPINTVL_SECS: libc::c_int = 2;
const TCP_KEEPCNT: libc::c_int = 3;
/// Sent bytes unacknowledged this long close the connection (TCP_USER_TIMEOUT).
const TCP_USER_TIMEOUT_MS: libc::c_int = 15_000;
/// libssh2's code for a blocking call that waited past the session timeout.
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;

/// Whether a libssh2 error is a wait that ran out of time.
fn is_timeout(e: &ssh2::Error) -> bool {
    e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT)
}

/// A duration as libssh2's timeout in milliseconds (0 would mean "forever").
fn timeout_ms(time: Duration) -> u32 {
    u32::try_from(time.as_millis()).unwrap_or(u32::MAX).max(1)
}

fn set_socket_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `fd` is an open socket; the option value is a c_int.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub struct SshSource {
    options: SshOptions,
    /// Prefixed to every path: `/a/b` is read from `root/a/b`.
    root: PathBuf,
    tar: Arc<TarUse>,
}

impl SshSource {
    pub fn new(options: SshOptions, root: &Path) -> Result<Self, SourceError> {
        if !root.is_absolute() {
            return Err(SourceError::Config(format!("--source-root {}: must be absolute", root.display())));
        }
        Ok(SshSource { options, root: root.to_path_buf(), tar: Arc::default() })
    }

    fn host_label(&self) -> String {
        known_hosts::host_name(&self.options.host, self.options.port)
    }

    /// The name known_hosts lists the host under: its `HostKeyAlias`, or `[host]:port`.
    fn known_hosts_name(&self) -> String {
        self.options.host_key_alias.clone().unwrap_or_else(|| self.host_label())
    }

    fn session_error(&self, err: impl std::fmt::Display) -> SourceError {
        SourceError::Session { host: self.host_label(), message: err.to_string() }
    }

    /// The TCP connection, tried until `deadline`.
    fn tcp(&self, deadline: Instant) -> Result<TcpStream, SourceError> {
        let addr = format!("{}:{}", self.options.host, self.options.port);
        let connect_err = |source| SourceError::Connect { addr: addr.clone(), source };
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
        for candidate in (self.options.host.as_str(), self.options.port).to_socket_addrs().map_err(connect_err)? {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&candidate, CONNECT_TIMEOUT.min(left)) {
                Ok(stream) => {
                    // Without it, small SFTP requests wait on delayed ACKs.
                    stream.set_nodelay(true).map_err(connect_err)?;
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                    set_socket_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                    set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, TCP_KEEPIDLE_SECS);
                    set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, TCP_KEEPINTVL_SECS);
                    set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, TCP_KEEPCNT);
                    set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS);
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }

    /// A libssh2 error during `what`: a timeout, or a broken session.
    fn step_error(&self, what: &str, e: ssh2::Error, time: Duration) -> SourceError {
        if is_timeout(&e) {
            SourceError::TimedOut { host: self.host_label(), waited: time, path: None }
        } else {
            self.session_error(format!("{what}: {e}"))
        }
    }

    fn verify_host_key(&self, session: &Session, known: &mut KnownHosts) -> Result<(), SourceError> {
        let (blob, _) = session.host_key().ok_or_else(|| self.session_error("the server sent no host key"))?;
        let name = self.known_hosts_name();
        let key_type = known_hosts::blob_key_type(blob).unwrap_or_else(|| "unknown".into());
        let fingerprint = session
            .host_key_hash(HashType::Sha256)
            .map(|h| format!("SHA256:{}", STANDARD_NO_PAD.encode(h)))
            .unwrap_or_default();
        match known.check(&name, blob) {
            HostKeyCheck::Match => Ok(()),
            HostKeyCheck::Mismatch | HostKeyCheck::Revoked => Err(SourceError::ChangedHostKey {
                host: name,
                key_type,
                fingerprint,
                known_hosts: known.path().to_path_buf(),
            }),
            HostKeyCheck::NotFound if self.options.accept_new_host_key => {
                known.append(&name, blob)?;
                log::warn!("added the host key of {name} ({key_type} {fingerprint}) to {}", known.path().display());
                Ok(())
            }
            HostKeyCheck::NotFound => Err(SourceError::UnknownHostKey {
                host: name,
                key_type,
                fingerprint,
                known_hosts: known.path().to_path_buf(),
            }),
        }
    }

    fn authenticate(&self, session: &Session, time: Duration) -> Result<(), SourceError> {
        let user = &self.options.user;
        let mut tried = Vec::new();
        // A server that stops answering is not a refused key.
        let timed_out = |e: &ssh2::Error| {
            is_timeout(e).then(|| SourceError::TimedOut { host: self.host_label(), waited: time, path: None })
        };
        if std::env::var_os("SSH_AUTH_SOCK").is_some() {
            match session.userauth_agent(user) {
                Ok(()) if session.authenticated() => return Ok(()),
                Ok(()) => tried.push("ssh-agent (no key accepted)".to_string()),
                Err(e) => match timed_out(&e) {
                    Some(timeout) => return Err(timeout),
                    None => tried.push(format!("ssh-agent ({})", e.message())),
                },
            }
        }
        for identity in &self.options.identities {
            if !identity.exists() {
                continue;
            }
            match session.userauth_pubkey_file(user, None, identity, None) {
                Ok(()) if session.authenticated() => return Ok(()),
                Ok(()) => tried.push(format!("{} (not accepted)", identity.display())),
                Err(e) => match timed_out(&e) {
                    Some(timeout) => return Err(timeout),
                    None => tried.push(format!("{} ({})", identity.display(), e.message())),
                },
            }
        }
        if tried.is_empty() {
            tried.push("nothing: no ssh-agent and no identity file (give one with -i)".into());
        }
        Err(SourceError::Auth { user: user.clone(), host: self.host_label(), tried: tried.join(", ") })
    }
}

impl Source for SshSource {
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        let started = Instant::now();
        let deadline = started + time;
        let mut known = KnownHosts::load(&self.options.known_hosts)?;
        let mut session = Session::new().map_err(|e| self.session_error(e))?;
        let stream = self.tcp(deadline)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        session.set_tcp_stream(stream);
        // Every step below waits at most until the deadline: a server that
        // accepts the connection and then says nothing is given up on in time.
        session.set_timeout(timeout_ms(time.min(SESSION_TIMEOUT)));
        let prefer = |method, prefs: &str| session.method_pref(method, prefs).map_err(|e| self.session_error(e));
        prefer(MethodType::CryptCs, CIPHERS)?;
        prefer(MethodType::CryptSc, CIPHERS)?;
        prefer(MethodType::HostKey, &host_key_preference(&known.key_types(&self.known_hosts_name())))?;
        session.handshake().map_err(|e| self.step_error("handshake failed", e, time))?;
        self.verify_host_key(&session, &mut known)?;
        let host_key = session
            .host_key()
            .map(|(blob, _)| known_hosts::public_key(&known_hosts::blob_key_type(blob).unwrap_or_default(), blob));
        session.set_keepalive(true, KEEPALIVE_SECS);
        let handshake = started.elapsed();
        session.set_timeout(timeout_ms(deadline.saturating_duration_since(Instant::now())));
        self.authenticate(&session, time)?;
        let authenticated = started.elapsed();
        let mut channel =
            with_quick_acks(&session, fd, deadline, || session.channel_open("session", WINDOW, PACKET, None))
                .map_err(|e| self.step_error("cannot open a channel", e, time))?;
        channel.subsystem("sftp").map_err(|e| self.step_error("cannot start SFTP", e, time))?;
        let limits = Limits { deadline: Some(deadline), stall: SESSION_TIMEOUT };
        let channel = Channel { channel, session: session.clone(), fd };
        let sftp = Sftp::start(Box::new(channel) as Box<dyn Stream>, limits);
        let tar = (self.tar.clone(), self.options.tar);
        let shown = (host_key.into_iter().collect(), self.host_label());
        let connection = SshConnection::new(sftp, Box::new(session), tar, &self.root, shown)?;
        log::debug!(
            "connected to {}: handshake {handshake:?}, authenticated at {authenticated:?}, SFTP at {:?}",
            self.host_label(),
            started.elapsed()
        );
        Ok(Box::new(connection))
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.options.user, self.host_label())
    }
}

/// Runs a libssh2 call without blocking, acknowledging what arrived each
/// time it would wait. After authentication sshd sends a small global request
/// and then holds the channel-open confirmation (Nagle) until that request is
/// acknowledged; a delayed ACK made every connection wait 40 ms here.
fn with_quick_acks<T>(
    session: &Session,
    fd: RawFd,
    deadline: Instant,
    mut op: impl FnMut() -> Result<T, ssh2::Error>,
) -> Result<T, ssh2::Error> {
    session.set_blocking(false);
    let result = loop {
        match op() {
            Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {
                if Instant::now() >= deadline {
                    break Err(ssh2::Error::new(ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT), "timed out"));
                }
                set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
                let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: `poll` is one valid pollfd for the session's open socket.
                unsafe { libc::poll(&mut poll, 1, 100) };
            }
            other => break other,
        }
    };
    session.set_blocking(true);
    result
}

/// The SFTP channel's receive window: what the server may send before we
/// acknowledge. libssh2's default (2 MiB) caps one session at 100 MB/s over a
/// 20 ms round trip; 16 MiB keeps a pipeline's 8 MiB flowing.
const WINDOW: u32 = 16 << 20;
/// Packets of up to 32 KiB, as OpenSSH sends them.
const PACKET: u32 = 32 << 10;

/// Known key types first (as OpenSSH orders them), so a host known by one key
/// type is not met with another; then the usual order.
fn host_key_preference(known_types: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    for known in known_types {
        let algorithms: &[&str] = match known.as_str() {
            "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256"],
            other => &[other],
        };
        order.extend(algorithms.iter().filter(|a| HOST_KEY_ALGORITHMS.contains(a)));
    }
    for algorithm in HOST_KEY_ALGORITHMS {
        if !order.contains(&algorithm) {
            order.push(algorithm);
        }
    }
    order.join(",")
}

/// Open SFTP handles kept per connection: reads that alternate between a few
/// files do not pay an OPEN and a CLOSE each time.
const OPEN_HANDLES: usize = 16;

/// Fewer files than this are read through SFTP: they fit in one pipeline's
/// window, so tar would save no round trip.
const TAR_MIN_FILES: usize = 64;

/// The byte stream the SFTP client speaks over: an ssh2 channel, or the pipes
/// of an `ssh` child.
pub(super) trait Stream: Wire + Send {}
impl<T: Wire + Send> Stream for T {}

/// An ssh2 channel whose waits the session's timeout bounds.
struct Channel {
    channel: ssh2::Channel,
    session: Session,
    /// The session's socket, shut down by `cut`.
    fd: RawFd,
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.channel.read(buf)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.channel.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.channel.flush()
    }
}

impl Wire for Channel {
    /// libssh2 gives up a blocking call after the session's timeout
    /// (an `io::ErrorKind::TimedOut` through the channel's `Read`/`Write`).
    fn bound(&mut self, wait: Duration) {
        self.session.set_timeout(timeout_ms(wait));
    }

    fn cut(&self) {
        // SAFETY: `fd` is the session's socket, open while the session lives.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }
}

/// Starts commands on the host (the session itself, or a way to open
/// another); holding it keeps the connection's session alive.
pub(super) trait Remote: Send {
    /// Starts `command`, each wait on it bounded by `wait`.
    fn exec(&mut self, command: &str, wait: Duration) -> Result<Box<dyn RemoteCommand>, String>;
    /// Keeps an idle connection known to be alive, where the transport
    /// does not do so itself.
    fn keepalive(&mut self) {}
}

/// A command running on the host: reading gives its stdout.
pub(super) trait RemoteCommand: Read {
    /// Writes `input` to its stdin, then closes it.
    fn send_all_and_close(&mut self, input: &[u8]) -> std::io::Result<()>;
    /// Once its stdout has ended: its exit status (None if it was killed or unknown).
    fn exit_status(self: Box<Self>) -> std::io::Result<Option<i32>>;
    /// Ends it after a wait on it ran out, so nothing waits on it again.
    fn cut(&self);
}

impl Remote for Session {
    fn exec(&mut self, command: &str, wait: Duration) -> Result<Box<dyn RemoteCommand>, String> {
        self.set_timeout(timeout_ms(wait));
        let mut channel = self.channel_session().map_err(|e| e.to_string())?;
        channel.handle_extended_data(ssh2::ExtendedData::Ignore).map_err(|e| e.to_string())?;
        channel.exec(command).map_err(|e| e.to_string())?;
        Ok(Box::new(channel))
    }

    fn keepalive(&mut self) {
        // Sent only when the connection was idle for KEEPALIVE_SECS.
        let _ = self.keepalive_send();
    }
}

impl RemoteCommand for ssh2::Channel {
    fn send_all_and_close(&mut self, input: &[u8]) -> std::io::Result<()> {
        self.write_all(input)?;
        self.send_eof().map_err(std::io::Error::other)
    }

    fn exit_status(mut self: Box<Self>) -> std::io::Result<Option<i32>> {
        self.wait_close().map_err(std::io::Error::other)?;
        ssh2::Channel::exit_status(&self).map(Some).map_err(std::io::Error::other)
    }

    /// Nothing of its own: the connection's session (its socket) is cut on
    /// the `TimedOut` this leads to.
    fn cut(&self) {}
}

/// One lane's SFTP session over either transport, with small files read
/// through `tar` where the account may run it.
pub(super) struct SshConnection {
    sftp: Sftp<Box<dyn Stream>>,
    remote: Box<dyn Remote>,
    tar: Arc<TarUse>,
    /// Whether small files go through tar (`--tar`, and if the host lets it).
    use_tar: bool,
    /// The source root as the server resolves it.
    root: PathBuf,
    host: String,
    /// The host's public keys (see [`super::Shown`]).
    host_keys: Vec<String>,
    /// Open handles with the generation they were opened for, most recently
    /// used last, each with the LSTAT its FSTAT is still to be checked
    /// against (until its first read).
    open: Vec<(PathBuf, u64, Vec<u8>, Option<Attrs>)>,
}

impl SshConnection {
    pub(super) fn new(
        sftp: Sftp<Box<dyn Stream>>,
        remote: Box<dyn Remote>,
        (tar, use_tar): (Arc<TarUse>, bool),
        root: &Path,
        (host_keys, host): (Vec<String>, String),
    ) -> Result<Self, SourceError> {
        // Paths below the root are checked against REALPATH, so the root is
        // taken as the server resolves it.
        let mut sftp = sftp;
        let root = sftp.realpath(root).map_err(|e| match e {
            SftpError::TimedOut => {
                sftp.cut();
                SourceError::TimedOut { host: host.clone(), waited: sftp.waited(), path: None }
            }
            SftpError::Broken(message) => SourceError::Session { host: host.clone(), message },
            SftpError::Status { message, .. } => {
                SourceError::Config(format!("--source-root {}: {message} on the source", root.display()))
            }
            e => SourceError::Config(format!("--source-root {}: {e:?}", root.display())),
        })?;
        Ok(SshConnection { sftp, remote, tar, use_tar, root, host, host_keys, open: Vec::new() })
    }

    fn full(&self, path: &Path) -> PathBuf {
        self.root.join(relative(path))
    }

    fn error(&self, path: &Path, err: SftpError, wanted: u64) -> SourceError {
        match err {
            e if e.is_not_found() => SourceError::NotFound {
                path: path.to_path_buf(),
                looked: format!("{}:{}", self.host, self.full(path).display()),
            },
            SftpError::Status { code, message } => SourceError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!("SFTP status {code}: {message}")),
            },
            SftpError::Short { end } => SourceError::Short { path: path.to_path_buf(), end, wanted },
            SftpError::Longer => SourceError::Longer { path: path.to_path_buf(), size: wanted },
            SftpError::Changed(reason) => SourceError::Changed { path: path.to_path_buf(), reason },
            SftpError::Broken(message) => SourceError::Session { host: self.host.clone(), message },
            SftpError::TimedOut => self.timed_out(Some(path)),
        }
    }

    /// The server did not answer in time (stuck on `path`, if known). The
    /// transport is cut ([`Wire::cut`]): nothing waits on it again, not even
    /// the channel's close when it is dropped.
    fn timed_out(&self, path: Option<&Path>) -> SourceError {
        self.sftp.cut();
        SourceError::TimedOut { host: self.host.clone(), waited: self.sftp.waited(), path: path.map(Path::to_path_buf) }
    }

    /// An error of a whole pipeline (not of one file in it).
    fn pipeline_error(&self, err: SftpError) -> SourceError {
        match err {
            SftpError::TimedOut => self.timed_out(None),
            e => self.error(Path::new("/"), e, 0),
        }
    }

    /// The handle open for `path` in `generation`, if there is one (it
    /// becomes the most recently used), and the LSTAT to check its FSTAT
    /// against if it has not been read yet.
    fn cached(&mut self, path: &Path, generation: u64) -> Option<(Vec<u8>, Option<Attrs>)> {
        let at = self.open.iter().position(|(p, g, _, _)| p == path && *g == generation)?;
        let entry = self.open.remove(at);
        let cached = (entry.2.clone(), entry.3);
        self.open.push(entry);
        Some(cached)
    }

    /// Opens `path` once it is seen to be the regular file it was
    /// ([`Sftp::open_checked`]) and keeps the handle, closing one of another
    /// generation of the same file (it may be of a file replaced since) or the
    /// least recently used. Returns the handle and what LSTAT said.
    fn open(&mut self, path: &Path, generation: u64) -> Result<(Vec<u8>, Attrs), SourceError> {
        let stale = self.open.iter().position(|(p, _, _, _)| p == path);
        if let Some(at) = stale.or((self.open.len() >= OPEN_HANDLES).then_some(0)) {
            self.close(at);
        }
        let full = self.full(path);
        let (handle, looked) = self.sftp.open_checked(&full).map_err(|e| self.error(path, e, 0))?;
        self.open.push((path.to_path_buf(), generation, handle.clone(), Some(looked)));
        Ok((handle, looked))
    }

    fn close(&mut self, at: usize) {
        let (_, _, old, _) = self.open.remove(at);
        self.sftp.close(&old);
    }

    /// Reads the files through `tar` if the host lets this account run it,
    /// then the rest (all of them where it does not) through SFTP. Gives each
    /// file's result, and the pipeline's: an error there means the connection
    /// failed (a file's result then tells if the SFTP server was stuck on it).
    fn read_whole(&mut self, reads: Vec<FileRead<'_>>) -> (Vec<Result<(), SftpError>>, Result<(), SftpError>) {
        // A file listed from the tree is checked against its listing by the
        // LSTAT before its OPEN: it goes through SFTP.
        let (mut reads, listed): (Vec<(usize, FileRead<'_>)>, Vec<_>) =
            reads.into_iter().enumerate().partition(|(_, r)| r.listed.is_none());
        let mut left = if self.use_tar && self.tar.allowed() && reads.len() >= TAR_MIN_FILES {
            let wait = self.sftp.next_wait();
            match tar::read_files(self.remote.as_mut(), wait, &self.tar, &self.host, &mut reads) {
                Ok(left) => left,
                Err(e) => {
                    reads.extend(listed);
                    reads.sort_by_key(|(i, _)| *i);
                    return (reads.into_iter().map(|(_, r)| r.result).collect(), Err(e));
                }
            }
        } else {
            reads.iter().map(|(i, _)| *i).collect()
        };
        left.extend(listed.iter().map(|(i, _)| *i));
        reads.extend(listed);
        reads.sort_by_key(|(i, _)| *i);
        let (mut rest, done): (Vec<_>, Vec<_>) = reads.into_iter().partition(|(i, _)| left.contains(i));
        let mut results: Vec<Option<Result<(), SftpError>>> = (0..rest.len() + done.len()).map(|_| None).collect();
        for (i, read) in done {
            results[i] = Some(read.result);
        }
        let indices: Vec<usize> = rest.iter().map(|(i, _)| *i).collect();
        let mut sftp_reads: Vec<FileRead<'_>> = rest.drain(..).map(|(_, r)| r).collect();
        let outcome = self.sftp.read_files(&mut sftp_reads);
        for (i, read) in indices.into_iter().zip(sftp_reads) {
            results[i] = Some(read.result);
        }
        (results.into_iter().map(|r| r.expect("every file read")).collect(), outcome)
    }
}

impl Connection for SshConnection {
    fn shows(&self) -> Option<super::Shown> {
        Some(super::Shown { kind: "ssh", host_keys: self.host_keys.clone(), root: self.root.clone() })
    }

    fn set_limits(&mut self, limits: Limits) {
        self.sftp.set_limits(limits);
        self.remote.keepalive();
    }

    fn stat(&mut self, path: &Path) -> Result<SourceStat, SourceError> {
        self.stat_many(&[path])?.pop().expect("one path")
    }

    fn attrs(&mut self, path: &Path) -> Result<SourceAttrs, SourceError> {
        let full = self.full(path);
        match self.sftp.lstat_checked(&full) {
            Ok(attrs) => Ok(source_attrs(&attrs)),
            Err(SftpError::TimedOut) => Err(self.timed_out(Some(path))),
            Err(e) => Err(self.error(path, e, 0)),
        }
    }

    fn list_dirs(&mut self, dirs: &[&Path]) -> Result<Listings, SourceError> {
        let fulls: Vec<PathBuf> = dirs.iter().map(|p| self.full(p)).collect();
        let refs: Vec<&Path> = fulls.iter().map(PathBuf::as_path).collect();
        let listed = self.sftp.list_dirs(&refs).map_err(|e| self.pipeline_error(e))?;
        Ok(dirs
            .iter()
            .zip(listed)
            .map(|(dir, listing)| {
                let names = listing.map_err(|e| self.error(dir, e, 0))?;
                Ok(names
                    .into_iter()
                    .map(|l| DirEntry {
                        name: std::ffi::OsString::from_vec(l.name),
                        attrs: source_attrs(&l.attrs),
                        target: l.target.map(std::ffi::OsString::from_vec),
                    })
                    .collect())
            })
            .collect())
    }

    fn stat_many(&mut self, paths: &[&Path]) -> Result<Vec<Result<SourceStat, SourceError>>, SourceError> {
        let fulls: Vec<PathBuf> = paths.iter().map(|p| self.full(p)).collect();
        let refs: Vec<&Path> = fulls.iter().map(PathBuf::as_path).collect();
        let stats = self.sftp.lookup_many(&refs).map_err(|e| self.pipeline_error(e))?;
        Ok(paths
            .iter()
            .zip(stats)
            .map(|(path, stat)| stat.map(source_stat).map_err(|e| self.error(path, e, 0)))
            .collect())
    }

    fn read_exact_at(&mut self, path: &Path, generation: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let range = offset..offset + buf.len() as u64;
        self.fetch(path, generation, std::slice::from_ref(&range), false, &mut super::Copy { offset, buf })
    }

    fn fetch(
        &mut self,
        path: &Path,
        generation: u64,
        ranges: &[Range<u64>],
        look: bool,
        sink: &mut dyn Sink,
    ) -> Result<(), SourceError> {
        let (handle, check) = match self.cached(path, generation) {
            Some((handle, check)) => {
                // Open already (not by a first look): the look costs a round trip of its own.
                if look && !sink.looked(self.stat(path)?) {
                    return Ok(());
                }
                (handle, check)
            }
            None => {
                // The LSTAT made before the OPEN is the first look.
                let (handle, looked) = self.open(path, generation)?;
                if look && !sink.looked(source_stat(looked)) {
                    return Ok(());
                }
                (handle, Some(looked))
            }
        };
        let wanted = ranges.last().map_or(0, |r| r.end);
        match self.sftp.read_ranges(&handle, ranges, check.as_ref(), sink) {
            Err(SftpError::Changed(reason)) => {
                // Not this file any more: never read through this handle again.
                let at = self.open.len() - 1;
                self.close(at);
                Err(self.error(path, SftpError::Changed(reason), wanted))
            }
            result => {
                self.open.last_mut().expect("just used").3 = None;
                result.map_err(|e| self.error(path, e, wanted))
            }
        }
    }

    fn read_files(&mut self, files: &mut [WholeRead<'_>]) -> Result<(), SourceError> {
        let fulls: Vec<PathBuf> = files.iter().map(|f| self.full(f.path)).collect();
        let reads: Vec<FileRead<'_>> = files
            .iter_mut()
            .zip(&fulls)
            .map(|(f, full)| FileRead { path: full, buf: &mut *f.buf, listed: f.listed, result: Ok(()) })
            .collect();
        let (results, outcome) = self.read_whole(reads);
        for (file, result) in files.iter_mut().zip(results) {
            let wanted = file.buf.len() as u64;
            file.result = result.map_err(|e| self.error(file.path, e, wanted));
        }
        outcome.map_err(|e| self.pipeline_error(e))
    }
}

/// What SFTP v3 tells of a file: no inode number, link count, ctime or
/// fraction of a second.
fn source_attrs(attrs: &Attrs) -> SourceAttrs {
    let ns = |secs: Option<u32>| i64::from(secs.unwrap_or(0)) * 1_000_000_000;
    SourceAttrs {
        mode: attrs.mode.unwrap_or(0),
        size: attrs.size.unwrap_or(0),
        uid: attrs.uid.unwrap_or(0),
        gid: attrs.gid.unwrap_or(0),
        atime_ns: ns(attrs.atime),
        mtime_ns: ns(attrs.mtime),
        ctime_ns: None,
        dev_ino: None,
        nlink: None,
    }
}

fn source_stat(attrs: Attrs) -> SourceStat {
    SourceStat { size: attrs.size.unwrap_or(0), mtime: i64::from(attrs.mtime.unwrap_or(0)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_key_types_come_first() {
        assert!(host_key_preference(&[]).starts_with("ssh-ed25519,ecdsa-sha2-nistp256"));
        let p = host_key_preference(&["ecdsa-sha2-nistp256".into()]);
        assert!(p.starts_with("ecdsa-sha2-nistp256,ssh-ed25519,"), "{p}");
        let p = host_key_preference(&["ssh-rsa".into()]);
        assert!(p.starts_with("rsa-sha2-512,rsa-sha2-256,ssh-ed25519"), "{p}");
        assert_eq!(p.matches("ssh-ed25519").count(), 1);
    }
}
