//! The supervisor: the background process of a mount. It claims the
//! mountpoint, starts the serving process (this binary again, `--serve`),
//! keeps the `/dev/fuse` descriptor that process mounted with, and starts a
//! successor on it when the serving process dies or `lazyfs upgrade` asks. It
//! fetches nothing and knows nothing of files: whatever a successor needs is
//! in the cache dir, the open table and the kernel's connection.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::link::{Link, Message, Negotiated, Restarts, SERVER_FD};
use super::opens::OpenTable;
use crate::cli::exit;
use crate::control::proto::{MountState, Status};
use crate::control::{self, ControlEvent, registry};
use crate::mount::{self, MountRequest};
use crate::store::CacheDir;

/// A serving process that ran this long had recovered: crashes count from
/// zero again.
const STABLE: Duration = Duration::from_secs(10);
/// The longest pause between two restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an upgraded build may take to serve before the build it
/// replaced is started again (a build that hangs would hang the mount).
const UPGRADE_START: Duration = Duration::from_secs(30);

/// How long to wait before restart number `consecutive` (1 for the first
/// crash in a row): none for the first, then 0.25 s doubling up to 5 s.
pub fn backoff(consecutive: u32) -> Duration {
    match consecutive {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(250).saturating_mul(1 << (n - 2).min(8)).min(MAX_BACKOFF),
    }
}

enum Event {
    /// A message from serving process `generation`.
    Link(u64, (Message, Vec<OwnedFd>)),
    /// The build serving process `generation` asked to upgrade to, checked.
    Checked(u64, Result<Binary, String>),
    Exited(u64, ExitStatus),
    Signal(i32),
    Control(ControlEvent),
}

struct Server {
    generation: u64,
    pid: Pid,
    link: Link,
    binary: Binary,
    started: Instant,
    /// It said it serves (after its first answer through the mount).
    serving: bool,
    /// Killed for not serving within [`UPGRADE_START`].
    given_up: bool,
}

struct Supervisor<'a> {
    request: &'a MountRequest,
    /// The serving process's arguments.
    args: Vec<OsString>,
    max_restarts: u32,
    events: Sender<Event>,
    table: OwnedFd,
    /// Names the connection in journal records: random, never 0.
    connection_id: u64,
    /// The connection, once the first serving process mounted.
    connection: Option<(OwnedFd, Negotiated)>,
    restarts: Restarts,
    /// Crashes in a row.
    consecutive: u32,
    /// The binary successors run.
    binary: Binary,
    server: Option<Server>,
    generation: u64,
    /// `lazyfs upgrade` asked this binary to take over; the server is being killed.
    upgrade: Option<Binary>,
    /// The binary to fall back to if the upgraded one does not come up.
    fallback: Option<Binary>,
    /// Some serving process said it serves: the mount is up.
    up: bool,
    /// A signal asked everything to end.
    stopping: bool,
}

/// Runs the supervisor of the mount `request` asks for; `args` are the
/// serving process's arguments. Returns the exit code.
pub fn run(request: &MountRequest, args: Vec<OsString>, max_restarts: u32) -> u8 {
    let _claim = match mount::claim_mountpoint(&request.mountpoint) {
        Ok(claim) => claim,
        Err(e) => return say_error(e.exit_code(), &e.to_string()),
    };
    let started = (|| {
        let table = OpenTable::create()?;
        let binary = Binary { path: std::env::current_exe()?, file: Arc::new(File::open("/proc/self/exe")?) };
        std::io::Result::Ok((table, binary))
    })();
    let (table, binary) = match started {
        Ok(started) => started,
        Err(e) => return say_error(exit::RUNTIME, &format!("starting the supervisor: {e}")),
    };
    let (events, receiver) = mpsc::channel();
    forward_signals(&events);
    let mut supervisor = Supervisor {
        request,
        args,
        max_restarts,
        events,
        table,
        connection_id: connection_id(),
        connection: None,
        restarts: Restarts { supervisor_pid: std::process::id(), ..Restarts::default() },
        consecutive: 0,
        binary,
        server: None,
        generation: 0,
        upgrade: None,
        fallback: None,
        up: false,
        stopping: false,
    };
    let first = Message::Start { connection: supervisor.connection_id, restarts: supervisor.restarts.clone() };
    if let Err(e) = supervisor.spawn(first) {
        return say_error(exit::RUNTIME, &format!("starting the serving process: {e}"));
    }
    supervisor.supervise(&receiver)
}

/// A number no other connection of this cache dir had (as good as).
fn connection_id() -> u64 {
    let seed = format!("{} {:?} {:?}", std::process::id(), std::time::SystemTime::now(), Instant::now());
    let hash = blake3::hash(seed.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

/// `error CODE MESSAGE` for the `lazyfs mount` waiting on stdout.
fn say_error(code: u8, message: &str) -> u8 {
    log::error!("{message}");
    println!("error {code} {}", message.replace('\n', " "));
    let _ = std::io::stdout().flush();
    code
}

fn forward_signals(events: &Sender<Event>) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP]) else {
        log::error!("cannot catch signals: SIGTERM ends the supervisor without unmounting");
        return;
    };
    let events = events.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if events.send(Event::Signal(signal)).is_err() {
                return;
            }
        }
    });
}

/// Why a serving process ended, in words.
fn describe(pid: Pid, status: ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(signal), _) => {
            let name = Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_string());
            format!("serving process {pid} killed by {name}")
        }
        (None, Some(code)) => format!("serving process {pid} exited with status {code}"),
        (None, None) => format!("serving process {pid} ended"),
    }
}

impl Supervisor<'_> {
    fn supervise(&mut self, receiver: &mpsc::Receiver<Event>) -> u8 {
        let mut restart_at: Option<Instant> = None;
        loop {
            let upgrade_due = self.upgrade_due();
            let event = match restart_at.into_iter().chain(upgrade_due).min() {
                None => receiver.recv().ok(),
                Some(at) => match receiver.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) if restart_at.is_none_or(|at| at > Instant::now()) => {
                        self.give_up_upgrade();
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        restart_at = None;
                        if let Err(e) = self.resume() {
                            restart_at = self.crashed(format!("starting a serving process: {e}"));
                            if restart_at.is_none() {
                                return self.failed(receiver);
                            }
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            let Some(event) = event else { return exit::RUNTIME };
            match event {
                Event::Link(generation, (message, fds)) if self.is_current(generation) => {
                    self.on_message(message, fds);
                }
                Event::Exited(generation, status) if self.is_current(generation) => {
                    let server = self.server.take().expect("current");
                    if let Some(code) = self.on_exit(&server, status) {
                        return code;
                    }
                    match self.upgrade.take() {
                        Some(binary) => {
                            self.restart_for(format!("upgrade to {}", binary.path.display()));
                            self.fallback = Some(std::mem::replace(&mut self.binary, binary));
                            restart_at = Some(Instant::now());
                        }
                        None => {
                            let mut reason = describe(server.pid, status);
                            if server.started.elapsed() >= STABLE && server.serving {
                                self.consecutive = 0;
                            }
                            if let Some(fallback) = self.fallback.take().filter(|_| !server.serving) {
                                reason = format!(
                                    "{reason} before serving: the upgrade to {} failed, back to {}",
                                    server.binary.path.display(),
                                    fallback.path.display()
                                );
                                self.binary = fallback;
                            }
                            restart_at = self.crashed(reason);
                            if restart_at.is_none() {
                                return self.failed(receiver);
                            }
                        }
                    }
                }
                Event::Checked(generation, checked) if self.is_current(generation) => self.on_checked(checked),
                // From a serving process that ended since: its clients went with it.
                Event::Link(..) | Event::Exited(..) | Event::Checked(..) => {}
                Event::Signal(signal) => {
                    log::info!("signal {signal}: ending the mount");
                    self.stopping = true;
                    match &self.server {
                        Some(server) => {
                            let _ = kill(server.pid, Signal::SIGTERM);
                        }
                        None => return self.abandon(),
                    }
                }
                // Only a failed mount's supervisor has a control socket.
                Event::Control(_) => {}
            }
        }
    }

    /// When the upgraded build starting now must serve by.
    fn upgrade_due(&self) -> Option<Instant> {
        self.fallback.as_ref()?;
        let server = self.server.as_ref().filter(|s| !s.serving && !s.given_up)?;
        Some(server.started + UPGRADE_START)
    }

    /// Stops an upgraded build that did not serve in time: it ends as one
    /// that failed before serving, and the build before it is started again.
    fn give_up_upgrade(&mut self) {
        if self.upgrade_due().is_none_or(|due| due > Instant::now()) {
            return;
        }
        let Some(server) = self.server.as_mut() else { return };
        log::warn!(
            "{} (pid {}) did not serve within {UPGRADE_START:?}: stopping it",
            server.binary.path.display(),
            server.pid
        );
        server.given_up = true;
        let _ = kill(server.pid, Signal::SIGKILL);
    }

    fn is_current(&self, generation: u64) -> bool {
        self.server.as_ref().is_some_and(|s| s.generation == generation)
    }

    /// What a serving process's end means; `Some(code)` when the supervisor ends too.
    fn on_exit(&mut self, server: &Server, status: ExitStatus) -> Option<u8> {
        if self.connection.is_none() {
            // It never mounted: it said why on stdout (or died before it could).
            if status.success() {
                return Some(exit::SUCCESS);
            }
            return Some(match status.code() {
                Some(code) => u8::try_from(code).unwrap_or(exit::RUNTIME),
                None => {
                    say_error(exit::RUNTIME, &format!("{} before the mount was ready", describe(server.pid, status)))
                }
            });
        }
        if status.success() {
            // Unmounted (`lazyfs umount`, a signal, `umount`): everything ends.
            log::info!("{}: unmounted; the supervisor ends", self.request.mountpoint.display());
            return Some(exit::SUCCESS);
        }
        if self.stopping {
            log::warn!("{} while unmounting: unmounting it here", describe(server.pid, status));
            return Some(self.abandon());
        }
        if !self.up {
            let message = format!("{} before the mount was ready", describe(server.pid, status));
            self.abandon();
            return Some(say_error(exit::RUNTIME, &message));
        }
        None
    }

    /// Counts a crash; when the next serving process is to start, or `None`
    /// past the limit.
    fn crashed(&mut self, reason: String) -> Option<Instant> {
        self.consecutive += 1;
        if self.consecutive > self.max_restarts {
            self.restarts.last_reason = reason;
            return None;
        }
        let pause = backoff(self.consecutive);
        log::warn!(
            "{reason}: starting another in {:.2} s (crash {} in a row of at most {})",
            pause.as_secs_f64(),
            self.consecutive,
            self.max_restarts
        );
        self.restart_for(reason);
        Some(Instant::now() + pause)
    }

    fn restart_for(&mut self, reason: String) {
        self.restarts.count += 1;
        self.restarts.last_reason = reason;
    }

    fn on_message(&mut self, message: Message, mut fds: Vec<OwnedFd>) {
        match message {
            Message::Mounted { negotiated } if self.connection.is_none() && fds.len() == 1 => {
                self.connection = Some((fds.pop().expect("one"), negotiated));
            }
            Message::Serving => {
                if let Some(server) = &mut self.server {
                    server.serving = true;
                }
                self.fallback = None;
                if !self.up {
                    self.up = true;
                    // Successors have nothing to say to `lazyfs mount`.
                    if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
                        let _ = nix::unistd::dup2_stdout(null);
                    }
                    // The cache dir is there now: the log (and stderr, which successors
                    // inherit) go into it.
                    let log = CacheDir::open_existing_cache(&self.request.cache_dir)
                        .and_then(|dir| crate::log_sink::into_cache_dir(&dir, true));
                    if let Err(e) = log {
                        log::warn!("{e}");
                    }
                }
            }
            Message::Upgrade { binary } => {
                let Some(server) = &self.server else { return };
                let (events, generation) = (self.events.clone(), server.generation);
                // Off the event loop: a crash while the build is checked is recovered at once.
                std::thread::spawn(move || {
                    let checked = File::open(&binary)
                        .map_err(|e| format!("{}: {e}", binary.display()))
                        .map(|file| Binary { path: binary, file: Arc::new(file) })
                        .and_then(|binary| check_binary(&binary).map(|()| binary));
                    let _ = events.send(Event::Checked(generation, checked));
                });
            }
            Message::Release => {
                let (Some(server), Some(binary)) = (&self.server, &self.upgrade) else { return };
                log::info!("upgrade: {} takes over from pid {}", binary.path.display(), server.pid);
                // The successor answers what it was doing (FUSE_NOTIFY_RESEND).
                let _ = kill(server.pid, Signal::SIGKILL);
            }
            other => log::warn!("unexpected message from the serving process: {other:?}"),
        }
    }

    /// Answers the serving process that asked for an upgrade to `checked`.
    fn on_checked(&mut self, checked: Result<Binary, String>) {
        let Some(server) = &self.server else { return };
        let refused = checked.as_ref().err().cloned();
        if let Err(e) = server.link.send(&Message::UpgradeAnswer { refused }, &[]) {
            log::warn!("answering the upgrade request: {e}");
        }
        if let Ok(binary) = checked
            && self.connection.is_some()
        {
            self.upgrade = Some(binary);
        }
    }

    /// Starts a serving process with `message` (and the descriptors it names).
    fn spawn(&mut self, message: Message) -> std::io::Result<()> {
        let (ours, theirs) = Link::pair()?;
        let mut command = self.binary.command();
        command.args(&self.args).stdin(Stdio::null());
        let fd = theirs.as_fd().as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; they give the child
        // its end of the link as descriptor 3, open across exec.
        unsafe {
            command.pre_exec(move || {
                let done = match fd {
                    SERVER_FD => libc::fcntl(fd, libc::F_SETFD, 0),
                    _ => libc::dup2(fd, SERVER_FD),
                };
                if done < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            });
        }
        let reader = ours.try_clone()?;
        let mut child = command.spawn()?;
        drop(theirs);
        let fds: Vec<BorrowedFd<'_>> = match &message {
            Message::Resume { .. } => {
                let (connection, _) = self.connection.as_ref().expect("resumed after a mount");
                vec![self.table.as_fd(), connection.as_fd()]
            }
            _ => vec![self.table.as_fd()],
        };
        let sent = ours.send(&message, &fds);
        self.generation += 1;
        let generation = self.generation;
        let pid = Pid::from_raw(child.id() as i32);
        // One thread per serving process: its messages, then its end, in
        // that order (the exit must not overtake the `Mounted` before it).
        let events = self.events.clone();
        std::thread::spawn(move || {
            while let Ok(Some(message)) = reader.recv() {
                if events.send(Event::Link(generation, message)).is_err() {
                    break;
                }
            }
            // The link closes when the process ends (its end is close-on-exec).
            let status = child.wait().unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            let _ = events.send(Event::Exited(generation, status));
        });
        self.server = Some(Server {
            generation,
            pid,
            link: ours,
            binary: self.binary.clone(),
            started: Instant::now(),
            serving: false,
            given_up: false,
        });
        if let Err(e) = sent {
            let _ = kill(pid, Signal::SIGKILL);
            return Err(e);
        }
        log::info!("serving process {pid} started ({})", self.binary.path.display());
        Ok(())
    }

    /// Starts a successor on the live connection.
    fn resume(&mut self) -> std::io::Result<()> {
        let negotiated = self.connection.as_ref().expect("resumed after a mount").1;
        self.spawn(Message::Resume { connection: self.connection_id, restarts: self.restarts.clone(), negotiated })
    }

    /// Unmounts what nobody serves any more (lazily: the application's files
    /// stay open, answering ENOTCONN). The exit code.
    fn abandon(&mut self) -> u8 {
        if self.connection.take().is_none() && !self.up {
            return exit::RUNTIME;
        }
        if let Err(e) = mount::detach(&self.request.mountpoint) {
            log::warn!("unmounting {}: {e}", self.request.mountpoint.display());
        }
        registry::unregister(&self.request.mountpoint);
        exit::SUCCESS
    }

    /// Past the crash limit: the connection is closed (the kernel answers
    /// ENOTCONN from now on) and the supervisor stays to say so in `lazyfs
    /// status`, until `lazyfs umount` or a signal.
    fn failed(&mut self, receiver: &mpsc::Receiver<Event>) -> u8 {
        let failure = format!(
            "the serving process crashed {} times in a row (last: {}): lazyfs gave up; `lazyfs umount {}` clears the mount, \
             and mounting again resumes from the cache",
            self.consecutive,
            self.restarts.last_reason,
            self.request.mountpoint.display()
        );
        log::error!("{}: {failure}", self.request.mountpoint.display());
        // The last descriptor of the connection: closing it aborts it.
        self.connection = None;
        let status = failed_status(self.request, &self.restarts, &failure);
        let server = CacheDir::open_cache(&self.request.cache_dir).map_err(std::io::Error::other).and_then(|dir| {
            let status = Arc::new(Mutex::new(status));
            let hook: control::StatusHook = Arc::new(move |_| status.lock().expect("status").clone());
            let refuse: control::PrefetchHook = {
                let failure = failure.clone();
                Arc::new(move |_| Err(failure.clone()))
            };
            let (tx, rx) = mpsc::channel();
            let events = self.events.clone();
            std::thread::spawn(move || {
                for event in rx {
                    let _ = events.send(Event::Control(event));
                }
            });
            control::Server::start(&dir, "control.sock", hook, refuse, Arc::new(|_| {}), tx)
        });
        match &server {
            Ok(server) => {
                let entry = registry::Entry {
                    mountpoint: self.request.mountpoint.clone(),
                    socket: server.socket(),
                    pid: std::process::id(),
                    supervisor: std::process::id(),
                };
                if let Err(e) = registry::register(&entry) {
                    log::warn!("{e}");
                }
            }
            Err(e) => log::error!("the failed mount's control socket: {e}"),
        }
        for event in receiver {
            match event {
                Event::Signal(_) => return self.abandon_failed(),
                Event::Control(ControlEvent::Umount(mut stream)) => {
                    let code = self.abandon_failed();
                    control::umount_done(&mut stream);
                    return code;
                }
                Event::Control(ControlEvent::Upgrade(mut stream, _)) => {
                    control::upgrade_answer(&mut stream, Some(failure.clone()));
                }
                _ => {}
            }
        }
        exit::RUNTIME
    }

    fn abandon_failed(&mut self) -> u8 {
        self.abandon();
        exit::RUNTIME
    }
}

/// What `lazyfs status` says of a mount that failed.
fn failed_status(request: &MountRequest, restarts: &Restarts, failure: &str) -> Status {
    let mut status = Status {
        mountpoint: request.mountpoint.display().to_string(),
        // The supervisor answers for it.
        pid: restarts.supervisor_pid,
        source: request.source_arg.clone(),
        imgdir: request.imgdir.display().to_string(),
        cache_dir: request.cache_dir.display().to_string(),
        supervisor_pid: restarts.supervisor_pid,
        restarts: restarts.count,
        last_restart_reason: restarts.last_reason.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        binary: std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
        failure: failure.to_string(),
        source_needed: true,
        ..Status::default()
    };
    status.set_state(MountState::Failed);
    status
}

/// A lazyfs build, held open from when it started the supervisor or was
/// checked for an upgrade: a successor runs that very file, even once its
/// path is removed or replaced (a package upgrade, a rebuild).
#[derive(Clone)]
struct Binary {
    path: PathBuf,
    file: Arc<File>,
}

impl Binary {
    /// A command running the held file, `argv[0]` its path.
    fn command(&self) -> Command {
        // By the supervisor's descriptor: the interpreter of a script opens it by that name too.
        let mut command = Command::new(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()));
        command.arg0(&self.path);
        command
    }
}

/// How long a build may take to answer `--version`.
const CHECK_TIME: Duration = Duration::from_secs(10);

/// Whether `binary` is a lazyfs that runs here (`--version`).
fn check_binary(binary: &Binary) -> Result<(), String> {
    let failed = |e: std::io::Error| format!("{}: {e}", binary.path.display());
    let mut child = binary
        .command()
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(failed)?;
    let deadline = Instant::now() + CHECK_TIME;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(failed)? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{}: no answer to `--version` within {CHECK_TIME:?}", binary.path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
    }
    match status.success() && text.starts_with("lazyfs ") {
        true => Ok(()),
        false => Err(format!(
            "{}: not a lazyfs binary that runs here (`--version` said {:?})",
            binary.path.display(),
            text.trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_from_none_to_five_seconds_without_overflowing() {
        let pauses: Vec<u64> = (0..8).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(pauses, [0, 0, 250, 500, 1000, 2000, 4000, 5000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
