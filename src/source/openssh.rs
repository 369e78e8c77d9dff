//! The old host through the system's OpenSSH client, as sshfs, rsync and git
//! reach hosts: `ssh -s HOST sftp`, lazyfs's own SFTP client over its pipes.
//! Everything in the user's ssh config applies as it does for `ssh` itself
//! (ProxyJump, HostKeyAlias, certificates, Match, PKCS#11, ControlMaster); the
//! command line adds only BatchMode (never a prompt in the background), the
//! host key policy and what lazyfs's own options say. No path is ever part of
//! a command line.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sftp::{Sftp, Wire};
use super::ssh::{Remote, RemoteCommand, SESSION_TIMEOUT, SshConnection, Stream};
use super::tar::TarUse;
use super::{Connection, Limits, Source, SourceError, SshOptions};

/// What lazyfs reads from `ssh` goes through a buffer of this size: enough
/// for many small replies at once, while the bytes of a large one (a READ's
/// 256 KiB) mostly go straight where they belong, copied once.
const READ_BUFFER: usize = 16 << 10;
/// The pipe from `ssh` holds this much (the kernel's default is 64 KiB).
const PIPE_BYTES: libc::c_int = 1 << 20;
/// What `ssh` writes to stderr is kept up to this much, for messages.
const STDERR_KEPT: usize = 16 << 10;
/// `ConnectTimeout` where the user's config sets none (a connection's
/// deadline may shorten it).
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// Server alive messages where the user's config sets none: a peer silent for
/// interval * count seconds (15, like the libssh2 transport's TCP_USER_TIMEOUT)
/// ends the connection, the master's included.
const SERVER_ALIVE_INTERVAL_SECS: u32 = 5;
const SERVER_ALIVE_COUNT_MAX: u32 = 3;

pub struct OpensshSource {
    options: SshOptions,
    root: PathBuf,
    /// Options before the host: config file, policy, what the command line gave.
    args: Vec<OsString>,
    /// `user@host:port` as `ssh -G` resolves it, for messages.
    label: String,
    /// `ConnectTimeout` in seconds, as the config sets it or ours.
    connect_timeout: u64,
    tar: Arc<TarUse>,
    /// The master every connection's session rides on; None where the user's
    /// config has a ControlPath of its own (that one then serves).
    mux: Option<Arc<Mux>>,
    /// It carries background transfers only: its `ssh` runs at a lower priority.
    background: bool,
    /// Where `ssh` looks up the host's keys, and under which name: what a
    /// connection shows of the host (`ssh` checked its key against them).
    known_hosts: (Vec<PathBuf>, String),
}

/// A master `ssh` of the source's own (`-M -N`), its socket in a private
/// directory (0700): each further session costs a channel open instead of a
/// new SSH connection (process start, key exchange, authentication: 0.3-0.6 s
/// each on the loaded test machine, against 50-100 ms for libssh2). Started
/// by the first connection; a session whose master is gone connects on its own.
/// The master's own session is an idle SFTP session (the subsystem every
/// account has), so that it ends when lazyfs does.
struct Mux {
    dir: PathBuf,
    /// The master, and its stdin: when lazyfs ends however it ends, the pipe
    /// closes, the master's own SFTP session ends, and so does the master.
    master: Mutex<Option<(Child, Option<ChildStdin>)>>,
}

impl Mux {
    fn new() -> Option<Mux> {
        use std::os::unix::fs::DirBuilderExt;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.subsec_nanos();
        let dir = std::env::temp_dir().join(format!("lazyfs-ssh-{}-{stamp:x}", std::process::id()));
        remove_stale_dirs();
        // Fails if the name exists: the directory is ours alone.
        std::fs::DirBuilder::new().mode(0o700).create(&dir).ok()?;
        Some(Mux { dir, master: Mutex::new(None) })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("master")
    }

    /// The master's socket, the master started first if it is not running;
    /// None if it is not up by `deadline`. A master still connecting (one an
    /// earlier connection gave up waiting for) is waited for, not restarted.
    fn ready(&self, source: &OpensshSource, deadline: Instant) -> Option<PathBuf> {
        let socket = self.socket();
        let mut master = self.master.lock().expect("mux lock");
        let running = master.as_mut().is_some_and(|(child, _)| matches!(child.try_wait(), Ok(None)));
        if !running {
            if let Some((mut child, _)) = master.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let mut child = source
                .command(deadline)
                .args(["-M", "-o", "ControlPersist=no", "-o"])
                .arg(control_path(&socket))
                .args(["-s", "--", &source.options.alias, "sftp"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            if source.background {
                // Bulk only: readers' sessions go elsewhere, and come first.
                background_priority(child.id());
            }
            let stdin = child.stdin.take();
            *master = Some((child, stdin));
        }
        let (child, _) = master.as_mut()?;
        while !socket.exists() && matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        socket.exists().then_some(socket)
    }
}

impl Mux {
    /// Ends the master (the next connection starts another).
    fn stop(&self) {
        if let Some((mut child, _)) = self.master.lock().expect("mux lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl OpensshSource {
    pub fn new(options: SshOptions, root: &Path) -> Result<Self, SourceError> {
        if !root.is_absolute() {
            return Err(SourceError::Config(format!("--source-root {}: must be absolute", root.display())));
        }
        let mut args = base_args(&options);
        let resolved = resolve(&args, &options.alias)?;
        let get = |key: &str| resolved.get(key).map(String::as_str);
        let connect_timeout = get("connecttimeout").and_then(|t| t.parse().ok()).unwrap_or(CONNECT_TIMEOUT_SECS);
        // A lost connection must show as one, not as a read that never returns.
        if get("serveraliveinterval") == Some("0") {
            args.extend([
                "-o".into(),
                format!("ServerAliveInterval={SERVER_ALIVE_INTERVAL_SECS}").into(),
                "-o".into(),
                format!("ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}").into(),
            ]);
        }
        let label = format!(
            "{}@{}",
            get("user").unwrap_or(&options.user),
            super::known_hosts::host_name(
                get("hostname").unwrap_or(&options.host),
                get("port").and_then(|p| p.parse().ok()).unwrap_or(options.port)
            )
        );
        // `ssh -G` prints no controlpath where none is set.
        let mux = if resolved.contains_key("controlpath") { None } else { Mux::new().map(Arc::new) };
        let known_hosts = known_hosts_of(&resolved, &options);
        Ok(OpensshSource {
            options,
            root: root.to_path_buf(),
            args,
            label,
            connect_timeout,
            tar: Arc::default(),
            mux,
            background: false,
            known_hosts,
        })
    }

    /// The source for background transfers only (see [`background_priority`]).
    pub fn for_background(self) -> OpensshSource {
        OpensshSource { background: true, ..self }
    }

    /// The host's keys as the known_hosts files `ssh` checks list them.
    fn host_keys(&self) -> Vec<String> {
        let (files, name) = &self.known_hosts;
        let known = files.iter().filter_map(|file| super::known_hosts::KnownHosts::load(file).ok());
        let mut keys: Vec<String> = known.flat_map(|k| k.keys(name)).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// `ssh` with this source's options, given up connecting by `deadline`
    /// (the config's `ConnectTimeout` if that is sooner).
    fn command(&self, deadline: Instant) -> Command {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64().ceil() as u64;
        let mut command = Command::new("ssh");
        // The first value given for an option is the one ssh uses.
        command.arg("-o").arg(format!("ConnectTimeout={}", left.min(self.connect_timeout).max(1)));
        command.args(&self.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// `ssh ... -s -- HOST sftp` and an SFTP session on it, within `limits`:
    /// a session that fails says why in `ssh`'s words.
    fn start_sftp(
        &self,
        mut command: Command,
        limits: Limits,
        remote: Box<dyn Remote>,
    ) -> Result<SshConnection, SourceError> {
        command.args(["-s", "--", &self.options.alias, "sftp"]);
        let child = Piped::spawn(command, &self.label)?;
        let stderr = child.stderr.clone();
        let sftp = Sftp::start(Box::new(child) as Box<dyn Stream>, limits);
        let tar = (self.tar.clone(), self.options.tar);
        // On failure the child is dropped, so waited for: its stderr is complete.
        let shown = (self.host_keys(), self.label.clone());
        SshConnection::new(sftp, remote, tar, &self.root, shown).map_err(|e| match e {
            SourceError::Session { message, .. } => self.failure(&stderr.finish(), &message),
            e => e,
        })
    }

    /// The type and fingerprint of the key the host offers, from `ssh`'s debug
    /// output (it names them nowhere else when it refuses an unknown key).
    fn offered_key(&self) -> Option<(String, String)> {
        let mut command = self.command(Instant::now() + Duration::from_secs(self.connect_timeout));
        command.args(["-o", "LogLevel=DEBUG1", "-s", "--", &self.options.alias, "sftp"]);
        let out = command.stdin(Stdio::null()).stdout(Stdio::null()).output().ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The last key offered before the refusal: a ProxyJump host's comes earlier.
        let before = stderr.split("host key is known for").next()?;
        let offered = before.rsplit("Server host key: ").next().filter(|_| before.contains("Server host key: "))?;
        let mut fields = offered.split_whitespace();
        Some((fields.next()?.to_string(), fields.next()?.to_string()))
    }

    /// Turns what `ssh` said on failing into the error a person can act on.
    fn failure(&self, stderr: &str, fallback: &str) -> SourceError {
        log::debug!("ssh to {} failed: {stderr}", self.label);
        let line = |needle: &str| stderr.lines().find(|l| l.contains(needle)).map(str::trim);
        let known_hosts = || self.options.given.known_hosts.clone().unwrap_or_else(|| self.options.known_hosts.clone());
        if let Some(unknown) = line("host key is known for") {
            // "No ED25519 host key is known for NAME and you have requested strict checking."
            let host = unknown.split(" is known for ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or_default();
            let (key_type, fingerprint) = self.offered_key().unwrap_or_else(|| {
                let key_type = unknown.split_whitespace().nth(1).unwrap_or("?");
                (key_type.to_string(), "fingerprint unknown".into())
            });
            return SourceError::UnknownHostKey {
                host: host.to_string(),
                key_type,
                fingerprint,
                known_hosts: known_hosts(),
            };
        }
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || stderr.contains("HOST KEY HAS CHANGED") {
            // `  ssh-keygen -f "/root/.ssh/known_hosts" -R "[127.0.0.1]:2222"`
            let quoted = |after: &str| {
                let rest = stderr.split(after).nth(1)?.trim_start();
                let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
                Some(rest[1..].split(quote).next()?.to_string())
            };
            // "The fingerprint for the ED25519 key sent by the remote host is\nSHA256:..."
            let sent = "key sent by the remote host is";
            let fingerprint = stderr.split(sent).nth(1).and_then(|r| r.split_whitespace().next());
            let key_type = line(sent).and_then(|l| l.split_whitespace().nth(4));
            return SourceError::ChangedHostKey {
                host: quoted(" -R ").unwrap_or_else(|| self.label.clone()),
                key_type: key_type.unwrap_or("?").to_string(),
                fingerprint: fingerprint.unwrap_or_default().trim_end_matches('.').to_string(),
                known_hosts: quoted("ssh-keygen -f").map(PathBuf::from).unwrap_or_else(known_hosts),
            };
        }
        if let Some(denied) = line("Permission denied") {
            let mut tried: Vec<String> =
                self.options.given.identities.iter().map(|i| i.display().to_string()).collect();
            tried.push(format!("what the ssh config and ssh-agent offer ({denied})"));
            // The label is USER@HOST: the message names each once.
            let (user, host) = self.label.rsplit_once('@').unwrap_or((&self.options.user, &self.label));
            return SourceError::Auth { user: user.to_string(), host: host.to_string(), tried: tried.join(", ") };
        }
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim);
        for refused in ["Connection refused", "Could not resolve", "Connection timed out", "No route to host"] {
            if let Some(line) = line(refused) {
                return SourceError::Connect {
                    addr: self.label.clone(),
                    source: std::io::Error::other(line.to_string()),
                };
            }
        }
        SourceError::Session { host: self.label.clone(), message: last.unwrap_or(fallback).to_string() }
    }
}

impl Source for OpensshSource {
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        let started = Instant::now();
        let deadline = started + time;
        let mut base = self.command(deadline);
        if let Some(socket) = self.mux.as_ref().and_then(|mux| mux.ready(self, deadline)) {
            // Without the master's socket, ssh connects on its own.
            base.args(["-o", "ControlMaster=no", "-o"]).arg(control_path(&socket));
        }
        let limits = Limits { deadline: Some(deadline), stall: SESSION_TIMEOUT };
        let command = clone_command(&base);
        let remote =
            Exec { base, alias: self.options.alias.clone(), label: self.label.clone(), _mux: self.mux.clone() };
        let connection = self.start_sftp(command, limits, Box::new(remote))?;
        log::debug!("connected to {} through ssh in {:?}", self.label, started.elapsed());
        Ok(Box::new(connection))
    }

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn idle(&self) {
        if let Some(mux) = &self.mux {
            mux.stop();
        }
    }
}

/// The options every `ssh` of this source gets.
fn base_args(options: &SshOptions) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut option = |text: String| args.extend(["-o".into(), text.into()]);
    option("BatchMode=yes".into());
    option(format!("StrictHostKeyChecking={}", if options.accept_new_host_key { "accept-new" } else { "yes" }));
    let given = &options.given;
    // `ssh` finds its config, keys and known_hosts in the passwd entry's home;
    // lazyfs in $HOME. Where they differ, point `ssh` at $HOME's.
    let moved_home = given.ssh_dir.as_ref().filter(|dir| Some(dir.as_path()) != passwd_ssh_dir().as_deref());
    let known_hosts = given.known_hosts.clone().or_else(|| moved_home.map(|_| options.known_hosts.clone()));
    if let Some(file) = known_hosts {
        option(format!("UserKnownHostsFile={}", file.display()));
    }
    let config = given.config_file.clone().or_else(|| {
        moved_home.map(|dir| Some(dir.join("config")).filter(|c| c.exists()).unwrap_or_else(|| "none".into()))
    });
    if let Some(config) = config {
        args.extend(["-F".into(), config.into()]);
    }
    let defaults = moved_home.map(|dir| ["id_ed25519", "id_ecdsa", "id_rsa"].map(|n| dir.join(n)));
    for identity in given.identities.iter().chain(defaults.iter().flatten().filter(|p| p.exists())) {
        args.extend(["-i".into(), identity.into()]);
    }
    if let Some(port) = given.port {
        args.extend(["-p".into(), port.to_string().into()]);
    }
    if let Some(user) = &given.user {
        args.extend(["-l".into(), user.into()]);
    }
    // No terminal, no X11 or agent forwarding: a byte stream only.
    args.extend(["-T", "-x", "-a"].map(OsString::from));
    args
}

/// Lowers the priority of process or thread `id` (nice 10), one that carries
/// background transfers: readers' requests get the CPU first.
pub(crate) fn background_priority(id: u32) {
    // SAFETY: setpriority of a process (or thread) lazyfs started; no memory is involved.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, id, 10) };
}

/// Removes this process's socket directories: it is ending, and its masters
/// with it (the sources may still be held by threads that never drop them).
pub fn remove_own_socket_dirs() {
    remove_socket_dirs(|pid| pid == std::process::id().to_string());
}

/// Removes the socket directories of lazyfs processes that ended without
/// removing theirs (their masters ended with them).
fn remove_stale_dirs() {
    // A killed lazyfs nobody has reaped yet is a zombie: ended too.
    let running = |pid: &str| {
        let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).unwrap_or_default();
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z")
    };
    remove_socket_dirs(|pid| !running(pid));
}

/// Removes the socket directories of this user whose lazyfs process `pid` says they go.
fn remove_socket_dirs(remove: impl Fn(&str) -> bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("lazyfs-ssh-")).and_then(|r| r.split('-').next())
        else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::getuid().as_raw());
        if ours && remove(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The same program and arguments, stdio piped.
fn clone_command(command: &Command) -> Command {
    let mut clone = Command::new(command.get_program());
    clone.args(command.get_args()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    clone
}

fn control_path(socket: &Path) -> OsString {
    let mut option = OsString::from("ControlPath=\"");
    option.push(socket);
    option.push("\"");
    option
}

fn passwd_ssh_dir() -> Option<PathBuf> {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten()?;
    Some(user.dir.join(".ssh"))
}

/// User, host name and port of `options`' host as `ssh -G` resolves them.
pub(super) fn target(options: &SshOptions) -> Result<(String, String, u16), SourceError> {
    let resolved = resolve(&base_args(options), &options.alias)?;
    let get = |key: &str| resolved.get(key).cloned();
    Ok((
        get("user").unwrap_or_else(|| options.user.clone()),
        get("hostname").unwrap_or_else(|| options.host.clone()),
        get("port").and_then(|p| p.parse().ok()).unwrap_or(options.port),
    ))
}

/// The known_hosts files `ssh` checks the host's key against (`~` as the
/// home lazyfs uses), and the name it looks the host up by.
fn known_hosts_of(resolved: &HashMap<String, String>, options: &SshOptions) -> (Vec<PathBuf>, String) {
    let home = options.given.ssh_dir.as_deref().and_then(Path::parent);
    let files = ["userknownhostsfile", "globalknownhostsfile"]
        .iter()
        .filter_map(|key| resolved.get(*key))
        .flat_map(|list| list.split_whitespace())
        .map(|file| match (file.strip_prefix("~/"), home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(file),
        })
        .collect();
    let port = resolved.get("port").and_then(|p| p.parse().ok()).unwrap_or(options.port);
    let host = resolved.get("hostname").cloned().unwrap_or_else(|| options.host.clone());
    let name = resolved.get("hostkeyalias").cloned().unwrap_or_else(|| super::known_hosts::host_name(&host, port));
    (files, name)
}

/// What `ssh -G` said, per command line: a mount asks twice (its source's
/// spelling, then the source itself), and each run costs a process (30 ms
/// on a loaded machine).
type Resolved = HashMap<(Vec<OsString>, String), HashMap<String, String>>;
static RESOLVED: std::sync::LazyLock<Mutex<Resolved>> = std::sync::LazyLock::new(Mutex::default);

/// The host's settings as `ssh -G` resolves them from the config.
fn resolve(args: &[OsString], alias: &str) -> Result<HashMap<String, String>, SourceError> {
    let key = (args.to_vec(), alias.to_string());
    if let Some(resolved) = RESOLVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
        return Ok(resolved.clone());
    }
    let resolved = resolve_now(args, alias)?;
    RESOLVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, resolved.clone());
    Ok(resolved)
}

fn resolve_now(args: &[OsString], alias: &str) -> Result<HashMap<String, String>, SourceError> {
    let out = Command::new("ssh").args(args).args(["-G", "--", alias]).stdin(Stdio::null()).output().map_err(|e| {
        SourceError::Config(format!("cannot run ssh ({e}): install openssh-client, or give --ssh libssh2"))
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(SourceError::Config(format!("ssh -G {alias}: {}", stderr.trim().replace('\n', " "))));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Runs commands on the host, each through an `ssh` of its own.
struct Exec {
    base: Command,
    alias: String,
    label: String,
    /// The master stays while a connection may use it.
    _mux: Option<Arc<Mux>>,
}

impl Remote for Exec {
    fn exec(&mut self, command: &str, wait: Duration) -> Result<Box<dyn RemoteCommand>, String> {
        let mut ssh = clone_command(&self.base);
        ssh.args(["--", &self.alias, command]);
        let mut piped = Piped::spawn(ssh, &self.label).map_err(|e| e.to_string())?;
        piped.bound(wait);
        Ok(Box::new(piped))
    }
}

/// An `ssh` child: writes go to its stdin, reads come from its stdout, its
/// stderr is kept for messages. Dropping it ends the child.
struct Piped {
    child: Child,
    /// Non-blocking: a write that would wait is waited for in `poll`, bounded.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Stderr,
    /// How long one read or write may wait (`Wire::bound`); None: no bound.
    wait: Option<Duration>,
}

impl Piped {
    fn spawn(mut command: Command, label: &str) -> Result<Piped, SourceError> {
        let mut child = command.spawn().map_err(|e| {
            SourceError::Config(format!("cannot run ssh ({e}): install openssh-client, or give --ssh libssh2"))
        })?;
        let stdin = child.stdin.take();
        if let Some(stdin) = &stdin {
            // SAFETY: fcntl on the open pipe to the child's stdin (our end only).
            unsafe {
                let flags = libc::fcntl(stdin.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(stdin.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let stdout = child.stdout.take().expect("piped");
        // SAFETY: fcntl on the open pipe from the child's stdout (our end only).
        // A larger pipe: `ssh` waits less often for lazyfs to drain it.
        unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        let stdout = BufReader::with_capacity(READ_BUFFER, stdout);
        let stderr = Stderr::collect(child.stderr.take().expect("piped"), label);
        Ok(Piped { child, stdin, stdout, stderr, wait: None })
    }
}

/// Waits until `fd` is ready for `events` (or hung up), at most `wait`.
fn poll_fd(fd: RawFd, events: libc::c_short, wait: Option<Duration>) -> std::io::Result<()> {
    let until = wait.map(|wait| Instant::now() + wait);
    loop {
        let timeout = match until {
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                // Rounded up: a wait of under a millisecond is not "no wait".
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
            None => -1,
        };
        let mut poll = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd for a pipe this Piped owns.
        match unsafe { libc::poll(&mut poll, 1, timeout) } {
            0 => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "ssh said nothing in time")),
            n if n > 0 => return Ok(()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl Read for Piped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stdout.buffer().is_empty() {
            poll_fd(self.stdout.get_ref().as_raw_fd(), libc::POLLIN, self.wait)?;
        }
        self.stdout.read(buf)
    }
}

impl Write for Piped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(stdin) = &mut self.stdin else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        loop {
            match stdin.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    poll_fd(stdin.as_raw_fd(), libc::POLLOUT, self.wait)?;
                }
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Wire for Piped {
    fn bound(&mut self, wait: Duration) {
        self.wait = Some(wait);
    }

    /// Kills the child (this `ssh`, which it started, never another process).
    fn cut(&self) {
        // SAFETY: the child is not waited for until `drop`, so its PID is still its own.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
    }
}

impl RemoteCommand for Piped {
    fn send_all_and_close(&mut self, input: &[u8]) -> std::io::Result<()> {
        let written = self.write_all(input);
        self.stdin = None;
        written
    }

    fn exit_status(mut self: Box<Self>) -> std::io::Result<Option<i32>> {
        self.stdin = None;
        let status = self.child.wait()?;
        let stderr = self.stderr.clone().finish();
        if !status.success() {
            log::debug!("ssh {status}: {stderr}");
        }
        Ok(status.code())
    }

    fn cut(&self) {
        Wire::cut(self);
    }
}

impl Drop for Piped {
    /// Closing stdin ends the session; a child still there after a second is killed.
    fn drop(&mut self) {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.wait();
    }
}

/// `ssh`'s stderr, read by a thread of its own so it never blocks `ssh`.
#[derive(Clone)]
struct Stderr {
    text: Arc<Mutex<String>>,
    reader: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Stderr {
    fn collect(mut pipe: std::process::ChildStderr, label: &str) -> Stderr {
        let text = Arc::new(Mutex::new(String::new()));
        let kept = text.clone();
        let label = label.to_string();
        let reader = std::thread::Builder::new()
            .name("ssh-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    let chunk = String::from_utf8_lossy(&buf[..n]);
                    log::debug!("ssh {label}: {}", chunk.trim_end());
                    let mut text = kept.lock().expect("stderr lock");
                    if text.len() < STDERR_KEPT {
                        text.push_str(&chunk);
                    }
                }
            })
            .ok();
        Stderr { text, reader: Arc::new(Mutex::new(reader)) }
    }

    /// Everything `ssh` wrote, once it closed its stderr (or two seconds passed:
    /// a process it started may hold the pipe).
    fn finish(self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        if let Some(reader) = self.reader.lock().expect("stderr lock").take() {
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.text.lock().expect("stderr lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that neither reads its stdin nor writes its stdout: a silent `ssh`.
    fn silent() -> Piped {
        let mut command = Command::new("sleep");
        command.arg("60").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Piped::spawn(command, "test").unwrap()
    }

    #[test]
    fn a_bounded_read_of_a_silent_child_times_out_and_cut_ends_the_child() {
        let mut child = silent();
        child.bound(Duration::from_millis(200));
        let started = Instant::now();
        let err = child.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
        Wire::cut(&child);
        let status = child.child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    }

    #[test]
    fn a_bounded_write_to_a_child_that_reads_nothing_times_out() {
        let mut child = silent();
        child.bound(Duration::from_millis(200));
        // More than a pipe holds: the rest waits for a reader that never comes.
        let err = child.write_all(&vec![0u8; 4 << 20]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        Wire::cut(&child);
    }
}
