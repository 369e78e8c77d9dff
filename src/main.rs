//! The CLI edge: parses arguments, runs a command, and turns its error into a
//! one-line message and an exit code.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{CommandFactory, Parser};
use lazyfs::cli::{
    Cli, Command, ExportArgs, LsArgs, ManArgs, ManifestArgs, MountArgs, PrefetchArgs, PushArgs, StatusArgs, UmountArgs,
    UpgradeArgs, VerifyArgs, WaitArgs, exit,
};
use lazyfs::commands::ls;
use lazyfs::commands::verify::VerifyError;
use lazyfs::control::proto::{FileState, MountState};
use lazyfs::control::{self, ControlError, registry};
use lazyfs::images::{Checkpoint, ImageError};
use lazyfs::log_sink;
use lazyfs::mount::{self, MountError, MountRequest};
use lazyfs::store::{CacheDir, NewCache};

/// An error that carries its own exit code (mount failures do).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Exit {
    code: u8,
    message: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // A reader that stopped early (`lazyfs ls | head`) is not a failure.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lazyfs: {}", one_line(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The error and its causes as one line, each said once: a cause whose text
/// its effect already includes is left out. Other control characters (a
/// terminal escape in a remote's words) are shown escaped.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = lazyfs::ui::printable(&cause.to_string().replace('\n', " "));
        if !line.contains(&text) {
            if !line.is_empty() {
                line += ": ";
            }
            line += &text;
        }
    }
    line
}

/// Mounts log what they do (the background process into its cache dir's
/// lazyfs.log); other commands only warnings. `LAZYFS_LOG` overrides.
fn init_logging(command: &Command) {
    // fuser warns about its own second unmount attempt after ours, and fails
    // to answer requests the kernel dropped when a busy mount is detached: noise.
    let default = if matches!(command, Command::Mount(_)) { "info,fuser=error,fuser::reply=off" } else { "warn" };
    let mut builder = env_logger::Builder::from_env(env_logger::Env::new().filter_or("LAZYFS_LOG", default));
    builder.format_timestamp_millis();
    // The background processes, and `mount -f` drawing bars on a terminal, log
    // to the cache dir's lazyfs.log: held until the inputs are checked and the
    // cache dir is there (a mount that fails before makes none).
    if let Command::Mount(args) = command
        && (args.daemon || args.serve || args.foreground && std::io::stderr().is_terminal())
    {
        log_sink::hold();
        builder.target(env_logger::Target::Pipe(Box::new(log_sink::Writer)));
    }
    builder.init();
}

/// A mount that failed: what it logged goes into the cache dir's log if an
/// earlier mount made that cache dir; otherwise there is none to keep it in.
/// (On stderr, the error is said once, by `main`.)
fn log_failure(cache_dir: &Path, error: &MountError) {
    match log_sink::state() {
        log_sink::State::File => log::error!("{error}"),
        log_sink::State::Held => {
            if let Ok(dir) = CacheDir::open_existing_cache(cache_dir) {
                log::error!("{error}");
                let _ = log_sink::into_cache_dir(&dir, false);
            }
        }
        log_sink::State::Stderr => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Ls(args) => run_ls(&args),
        Command::Mount(args) => run_mount(&args),
        Command::Umount(args) => run_umount(&args),
        Command::Upgrade(args) => run_upgrade(&args),
        Command::Export(args) => run_export(&args),
        Command::Prefetch(args) => run_prefetch(&args),
        Command::Status(args) => run_status(&args),
        Command::Wait(args) => run_wait(&args),
        Command::Completions(args) => {
            let mut command = Cli::command();
            clap_complete::generate(args.shell, &mut command, "lazyfs", &mut std::io::stdout());
            Ok(exit::SUCCESS)
        }
        Command::Man(args) => run_man(&args),
        Command::Manifest(args) => run_manifest(&args),
        Command::Push(args) => run_push(&args),
        Command::Verify(args) => run_verify(&args),
    }
}

fn run_ls(args: &LsArgs) -> anyhow::Result<u8> {
    let checkpoint = Checkpoint::load(&args.imgdir)?;
    warn_incomplete(checkpoint.warning());
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &ls::to_json(&checkpoint))?;
        writeln!(out)?;
    } else {
        ls::write_table(&checkpoint, &mut out).context("writing the listing")?;
    }
    Ok(exit::SUCCESS)
}

fn warn_incomplete(warning: Option<String>) {
    if let Some(warning) = warning {
        eprintln!("lazyfs: warning: {warning}");
    }
}

fn mount_failed(e: MountError) -> anyhow::Error {
    Exit { code: e.exit_code(), message: e.to_string() }.into()
}

fn run_mount(args: &MountArgs) -> anyhow::Result<u8> {
    let request = MountRequest::from_args(args).map_err(mount_failed)?;
    if args.daemon {
        let code = lazyfs::failover::supervisor::run(&request, serving_args(), args.max_restarts);
        // Its mount never came up: what it said goes into an earlier mount's log, if any.
        if log_sink::state() == log_sink::State::Held
            && let Ok(dir) = CacheDir::open_existing_cache(&request.cache_dir)
        {
            let _ = log_sink::into_cache_dir(&dir, false);
        }
        return Ok(code);
    }
    if args.serve {
        return Ok(serve_supervised(request));
    }
    if !args.foreground {
        return spawn_daemon(args, &request);
    }
    let log = request.cache_dir.join("lazyfs.log");
    let cache_dir = request.cache_dir.clone();
    let new_cache = NewCache::before_mount(&cache_dir);
    let terminal = std::io::stderr().is_terminal();
    let served = mount::prepare(request).and_then(|prepared| {
        if terminal {
            log_sink::into_cache_dir(prepared.store.dir(), false)?;
        }
        for warning in &prepared.warnings {
            eprintln!("lazyfs: warning: {warning}");
        }
        mount::serve(prepared, None, |mountpoint: &Path| {
            if terminal {
                eprintln!("lazyfs: mounted at {}; Ctrl-C unmounts; log: {}", mountpoint.display(), log.display());
                show_bars(mountpoint.to_path_buf());
            } else {
                eprintln!("lazyfs: mounted at {}; Ctrl-C unmounts", mountpoint.display());
            }
        })
    });
    lazyfs::source::remove_own_socket_dirs();
    if let Err(e) = served {
        fail_mount(&cache_dir, new_cache, &e);
        return Err(mount_failed(e));
    }
    Ok(exit::SUCCESS)
}

/// A mount that failed leaves no cache dir it made, and logs into one it did not.
fn fail_mount(cache_dir: &Path, new_cache: Option<NewCache>, error: &MountError) {
    log_failure(cache_dir, error);
    if let Some(new_cache) = new_cache
        && let Err(e) = new_cache.discard()
    {
        log::warn!("removing the cache dir this failed mount made: {e}");
    }
}

/// `lazyfs mount -f` on a terminal: the bars of `lazyfs status --watch`,
/// drawn from this process's own control socket until it goes away.
fn show_bars(mountpoint: PathBuf) {
    std::thread::spawn(move || {
        let Ok(mut client) = control::Client::connect(&mountpoint) else {
            return;
        };
        if client.watch(WATCH_INTERVAL_MS).is_err() {
            return;
        }
        let mut bars = lazyfs::ui::Bars::new();
        while let Ok(status) = client.next_status() {
            bars.update(std::slice::from_ref(&status));
        }
    });
}

/// The serving process's arguments: the supervisor's own, `--daemon` (the
/// last one, which `lazyfs mount` added) turned into `--serve`.
fn serving_args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(daemon) = args.iter().rposition(|a| a == "--daemon") {
        args[daemon] = "--serve".into();
    }
    args
}

/// The process serving a mount for its supervisor: says `warning MESSAGE`
/// (images not a whole dump), then `ready` or `error CODE MESSAGE` on stdout
/// (read by the `lazyfs mount` that started the supervisor; a successor's
/// stdout is /dev/null), then serves.
fn serve_supervised(request: MountRequest) -> u8 {
    lazyfs::failover::abort_on_fuse_thread_panic();
    let ready = |_: &Path| {
        println!("ready");
        let _ = std::io::stdout().flush();
        // Let the starting process see the end of its pipe.
        if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null);
        }
    };
    let cache_dir = request.cache_dir.clone();
    let new_cache = NewCache::before_mount(&cache_dir);
    let supervised = lazyfs::failover::Supervised::from_supervisor()
        .map_err(|source| MountError::Mount { path: request.mountpoint.clone(), source });
    let served = supervised.and_then(|supervised| {
        let prepared = mount::prepare_supervised(request, &supervised)?;
        // The log is this process's stderr from now on (a panic's message too).
        log_sink::into_cache_dir(prepared.store.dir(), true)?;
        for warning in &prepared.warnings {
            println!("warning {}", warning.replace('\n', " "));
        }
        mount::serve(prepared, Some(supervised), ready)
    });
    lazyfs::source::remove_own_socket_dirs();
    match served {
        Ok(()) => exit::SUCCESS,
        Err(e) => {
            fail_mount(&cache_dir, new_cache, &e);
            println!("error {} {}", e.exit_code(), e.to_string().replace('\n', " "));
            e.exit_code()
        }
    }
}

/// Starts the background process and returns once the mount answers (0) or
/// the process gave up (its reason and exit code).
fn spawn_daemon(args: &MountArgs, request: &MountRequest) -> anyhow::Result<u8> {
    let log_path = request.cache_dir.join("lazyfs.log");
    let mut command = std::process::Command::new(std::env::current_exe().context("finding the lazyfs binary")?);
    command.args(std::env::args_os().skip(1)).arg("--daemon");
    if args.cache_dir.is_none() {
        command.arg("--cache-dir").arg(&request.cache_dir);
    }
    // Its stderr is the log once the cache dir is there; before, what a crash says comes here.
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the
    // terminal so the shell's Ctrl-C and hangup do not reach it.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let mut child = command.spawn().context("starting the background process")?;
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    loop {
        line.clear();
        stdout.read_line(&mut line).context("waiting for the background process")?;
        match line.trim_end().strip_prefix("warning ") {
            Some(warning) => eprintln!("lazyfs: warning: {warning}"),
            None => break,
        }
    }
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "ready" => Ok(exit::SUCCESS),
        Some(("error", rest)) => {
            let (code, message) = rest.split_once(' ').unwrap_or(("1", rest));
            let _ = child.wait();
            Err(Exit { code: code.parse().unwrap_or(exit::RUNTIME), message: message.to_string() }.into())
        }
        _ => {
            let status = child.wait().ok();
            let mut said = String::new();
            let _ = child.stderr.take().map(|mut stderr| std::io::Read::read_to_string(&mut stderr, &mut said));
            let said = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim();
            let see = if log_path.exists() { format!("; see {}", log_path.display()) } else { String::new() };
            Err(Exit {
                code: exit::RUNTIME,
                message: format!(
                    "the background process exited ({}) before the mount was ready{}{see}",
                    status.map_or("?".into(), |s| s.to_string()),
                    if said.is_empty() { String::new() } else { format!(": {said}") },
                ),
            }
            .into())
        }
    }
}

fn run_export(args: &ExportArgs) -> anyhow::Result<u8> {
    // A live mount: a stale or foreign one would copy nothing, or the wrong thing.
    control::Client::connect(&args.mountpoint)?;
    let done = lazyfs::commands::export::export(&args.mountpoint, &args.dir)?;
    eprintln!("lazyfs: exported {} files ({} bytes) to {}", done.files, done.bytes, args.dir.display());
    if done.owners_not_kept > 0 {
        eprintln!(
            "lazyfs: {} entries are yours, not their owners' on the mount: only root may give files away",
            done.owners_not_kept
        );
    }
    Ok(exit::SUCCESS)
}

fn run_umount(args: &UmountArgs) -> anyhow::Result<u8> {
    match control::Client::connect(&args.mountpoint) {
        Ok(mut client) => {
            let supervisor = client.supervisor();
            client.umount()?;
            // Done once nothing of the mount runs: its mountpoint is free again.
            wait_ended(supervisor);
            Ok(exit::SUCCESS)
        }
        Err(ControlError::NotAMount(path)) => {
            if mount::is_stale(&path) {
                mount::detach(&path).with_context(|| format!("clearing the stale mount at {}", path.display()))?;
                eprintln!("lazyfs: cleared a stale mount at {} (its process had died)", path.display());
                return Ok(exit::SUCCESS);
            }
            Err(ControlError::NotAMount(path).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// `lazyfs upgrade`: the mount's supervisor starts BINARY on the live mount;
/// done once the new process serves it (its pid in status, restarted for the
/// upgrade), failed if the supervisor fell back to the old binary.
fn run_upgrade(args: &UpgradeArgs) -> anyhow::Result<u8> {
    let binary = match &args.binary {
        Some(binary) => std::path::absolute(binary)?,
        None => std::env::current_exe().context("finding the lazyfs binary")?,
    };
    let mut client = control::Client::connect(&args.mountpoint)?;
    let before = client.totals()?;
    client.upgrade(&binary)?;
    let deadline = Instant::now() + args.timeout;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = control::Client::connect(&args.mountpoint).and_then(|mut c| c.totals());
        if let Ok(status) = now.as_ref()
            && status.pid != before.pid
            && status.restarts > before.restarts
        {
            if status.last_restart_reason.starts_with("upgrade to ") {
                eprintln!(
                    "lazyfs: {} is served by pid {} ({}, lazyfs {}) now",
                    args.mountpoint.display(),
                    status.pid,
                    status.binary,
                    status.version
                );
                return Ok(exit::SUCCESS);
            }
            return Err(Exit {
                code: exit::RUNTIME,
                message: format!("the upgrade did not take: {}", status.last_restart_reason),
            }
            .into());
        }
        if Instant::now() >= deadline {
            let why = now.map_or_else(|e| e.to_string(), |s| format!("pid {} still serves it", s.pid));
            return Err(Exit {
                code: exit::RUNTIME,
                message: format!(
                    "no new process served {} within {:?}: {why}",
                    args.mountpoint.display(),
                    args.timeout
                ),
            }
            .into());
        }
    }
}

/// Waits (10 s at most) until process `pid` has ended (0: none).
fn wait_ended(pid: u32) {
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid != 0 && running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How often `lazyfs status --watch` redraws.
const WATCH_INTERVAL_MS: u32 = 500;

fn run_status(args: &StatusArgs) -> anyhow::Result<u8> {
    let mountpoints: Vec<PathBuf> = match &args.mountpoint {
        Some(mp) => vec![mp.clone()],
        None => registry::list().into_iter().map(|e| e.mountpoint).collect(),
    };
    let mut clients = mountpoints.iter().map(|mp| control::Client::connect(mp)).collect::<Result<Vec<_>, _>>()?;
    let terminal = std::io::stdout().is_terminal();
    // Watching on a terminal: bars redrawn in place; once: drawn once.
    let mut bars = (terminal && !args.json && args.watch).then(lazyfs::ui::Bars::new);
    let mut out = std::io::stdout().lock();
    if clients.is_empty() {
        writeln!(out, "{}", if args.json { "[]" } else { "no lazyfs mounts" })?;
        return Ok(exit::SUCCESS);
    }
    // --watch: each mount streams a snapshot every half second.
    if args.watch {
        for client in &mut clients {
            client.watch(WATCH_INTERVAL_MS)?;
        }
    }
    loop {
        let mut statuses = Vec::with_capacity(clients.len());
        for client in &mut clients {
            let snapshot = if args.watch { client.next_status() } else { client.status() };
            match snapshot {
                Ok(status) => statuses.push(status),
                Err(e) if args.watch && args.mountpoint.is_none() => log::info!("{e}"),
                Err(e) => return Err(e.into()),
            }
        }
        let values: Vec<_> = statuses.iter().map(lazyfs::status::to_json).collect();
        match (&mut bars, args.json, args.watch) {
            (_, true, true) => {
                for value in &values {
                    serde_json::to_writer(&mut out, value)?;
                    writeln!(out)?;
                }
                out.flush()?;
            }
            (_, true, false) => {
                match (&args.mountpoint, values.as_slice()) {
                    (Some(_), [value]) => serde_json::to_writer_pretty(&mut out, value)?,
                    _ => serde_json::to_writer_pretty(&mut out, &values)?,
                }
                writeln!(out)?;
            }
            (Some(bars), false, _) => bars.update(&statuses),
            (None, false, _) => {
                for status in &statuses {
                    if terminal {
                        for line in lazyfs::ui::bars_once(status) {
                            writeln!(out, "{line}")?;
                        }
                    } else {
                        writeln!(out, "{}", lazyfs::ui::plain_line(status))?;
                    }
                }
                out.flush()?;
            }
        }
        let complete = statuses.iter().all(|s| s.state() == MountState::Complete);
        if !args.watch || complete || statuses.is_empty() {
            break;
        }
    }
    if let Some(bars) = bars {
        bars.finish();
    }
    Ok(exit::SUCCESS)
}

/// Exit 0 once every file (or each of `args.paths`) is verified (or changed
/// locally), 4 if one failed, 3 on timeout, 1 if the mount went away.
fn run_wait(args: &WaitArgs) -> anyhow::Result<u8> {
    let mut client = control::Client::connect(&args.mountpoint)?;
    let deadline = args.timeout.and_then(|timeout| Instant::now().checked_add(timeout));
    let mountpoint = std::path::absolute(&args.mountpoint)?;
    let gone = |e: ControlError| Exit {
        code: exit::RUNTIME,
        message: format!("{}: the mount went away while waiting ({e})", args.mountpoint.display()),
    };
    // The source cannot be used: what is missing never comes.
    let unusable = |source_error: &str| Exit {
        code: exit::RUNTIME,
        message: format!("{}: {source_error}", args.mountpoint.display()),
    };
    loop {
        // Waiting for everything needs only the totals, cheap enough to poll often.
        if args.paths.is_empty() {
            let totals = client.totals().map_err(gone)?;
            if !totals.source_error.is_empty() && totals.state() != MountState::Complete {
                return Err(unusable(&totals.source_error).into());
            }
            if totals.files_failed == 0 && totals.dirs_failed == 0 && totals.state() != MountState::Failed {
                if totals.state() == MountState::Complete {
                    return Ok(exit::SUCCESS);
                }
                if deadline.is_none_or(|d| Instant::now() < d) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
            // A failure (of files or of the mount) or the timeout: the per-file list says which files.
        }
        let status = status_naming(&mut client, &args.paths, &mountpoint).map_err(gone)?;
        // A failed mount lists no file: nothing would be left to wait for.
        if status.state() == MountState::Failed {
            let message = format!("{}: {}", args.mountpoint.display(), status.failure);
            return Err(Exit { code: exit::RUNTIME, message }.into());
        }
        let selected = select_files(&status, &args.paths, &mountpoint)?;
        let failed: Vec<_> = selected.iter().filter(|f| f.state() == FileState::Failed).collect();
        // Waiting for every file: those of directories that could not be listed too.
        let failed_dirs = if args.paths.is_empty() { status.failed_dirs.as_slice() } else { &[] };
        if !failed.is_empty() || !failed_dirs.is_empty() {
            for file in failed {
                eprintln!("lazyfs: {}", lazyfs::ui::failure_line(file));
            }
            for dir in failed_dirs {
                eprintln!("lazyfs: {}", lazyfs::ui::dir_failure_line(dir));
            }
            return Ok(exit::VERIFY_FAILED);
        }
        let waiting =
            selected.iter().filter(|f| !matches!(f.state(), FileState::Verified | FileState::Modified)).count();
        // Every file: those of directories not listed yet too.
        let unlisted = if args.paths.is_empty() { status.dirs_unlisted } else { 0 };
        if waiting == 0 && unlisted == 0 {
            return Ok(exit::SUCCESS);
        }
        if !status.source_error.is_empty() {
            return Err(unusable(&status.source_error).into());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let why = if !status.degraded_reason.is_empty() {
                format!("; {}", status.degraded_reason)
            } else if status.prefetch {
                String::new()
            } else {
                format!(
                    "; this mount fetches only what is read: `lazyfs prefetch {}` fetches the rest in the background",
                    args.mountpoint.display()
                )
            };
            let dirs = match unlisted {
                0 => String::new(),
                n => format!(", {n} director(ies) of the tree not listed yet"),
            };
            eprintln!("lazyfs: timed out: {waiting} of {} file(s) not verified yet{dirs}{why}", selected.len());
            return Ok(exit::TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A snapshot of the mount, per file, that holds every file `wanted` names
/// if the mount has it: a file of a directory of the tree nothing has listed
/// yet is not in the first snapshot, so the mount is asked to list the
/// directories on the way to it first.
fn status_naming(
    client: &mut control::Client,
    wanted: &[PathBuf],
    mountpoint: &Path,
) -> Result<control::proto::Status, ControlError> {
    let status = client.status()?;
    let missing: Vec<Vec<u8>> = wanted
        .iter()
        .filter(|path| find_file(&status, path, mountpoint).is_none())
        // A relative PATH is relative to the mount (as `find_file` takes it).
        .map(|path| mountpoint.join(path).into_os_string().into_vec())
        .collect();
    if missing.is_empty() {
        return Ok(status);
    }
    client.locate(missing)?;
    client.status()
}

/// The file `wanted` names: its original path, its path in the mount, or its
/// path under the mountpoint.
fn find_file<'a>(
    status: &'a control::proto::Status,
    wanted: &Path,
    mountpoint: &Path,
) -> Option<&'a control::proto::FileStatus> {
    let below = wanted.strip_prefix(mountpoint).unwrap_or(wanted);
    status.files.iter().find(|f| {
        Path::new(std::ffi::OsStr::from_bytes(&f.path)) == wanted
            || Path::new(std::ffi::OsStr::from_bytes(&f.mount_path)) == below
    })
}

/// The files `wanted` names (all when empty), as [`find_file`] finds them.
fn select_files<'a>(
    status: &'a control::proto::Status,
    wanted: &[PathBuf],
    mountpoint: &Path,
) -> anyhow::Result<Vec<&'a control::proto::FileStatus>> {
    if wanted.is_empty() {
        return Ok(status.files.iter().collect());
    }
    wanted
        .iter()
        .map(|wanted| {
            find_file(status, wanted, mountpoint).ok_or_else(|| {
                Exit { code: exit::BAD_INPUT, message: format!("{}: not a file of this mount", wanted.display()) }
                    .into()
            })
        })
        .collect()
}

/// `lazyfs prefetch`: starts background prefetch on a live mount, returns at once.
fn run_prefetch(args: &PrefetchArgs) -> anyhow::Result<u8> {
    let mut client = control::Client::connect(&args.mountpoint)?;
    let paths = if args.paths.is_empty() {
        Vec::new()
    } else {
        let mountpoint = std::path::absolute(&args.mountpoint)?;
        let status = status_naming(&mut client, &args.paths, &mountpoint)?;
        select_files(&status, &args.paths, &mountpoint)?.into_iter().map(|f| f.path.clone()).collect()
    };
    let queued = client.prefetch(paths)?;
    eprintln!(
        "lazyfs: prefetching {queued} file(s) in the background; `lazyfs status {0}` shows the progress, `lazyfs wait {0}` waits for it",
        args.mountpoint.display()
    );
    Ok(exit::SUCCESS)
}

/// `lazyfs man [COMMAND]`: lazyfs(1) or lazyfs-COMMAND(1); `--dir`: all of them.
fn run_man(args: &ManArgs) -> anyhow::Result<u8> {
    // Built, every subcommand is named lazyfs-COMMAND, as lazyfs(1) refers to it.
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let man = |page: &clap::Command| {
        clap_mangen::Man::new(page.clone()).source(concat!("lazyfs ", env!("CARGO_PKG_VERSION")))
    };
    let render = |man: &clap_mangen::Man| -> std::io::Result<Vec<u8>> {
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        Ok(code_in_bold(&String::from_utf8_lossy(&roff)).into_bytes())
    };
    if let Some(dir) = &args.dir {
        for page in std::iter::once(&command).chain(command.get_subcommands().filter(|c| !c.is_hide_set())) {
            let page = man(page);
            let path = dir.join(page.get_filename());
            render(&page)
                .and_then(|roff| std::fs::write(&path, roff))
                .with_context(|| format!("writing man page {}", path.display()))?;
        }
        return Ok(exit::SUCCESS);
    }
    let page = match &args.command {
        None => &command,
        Some(name) => match command.find_subcommand(name).filter(|c| !c.is_hide_set()) {
            Some(sub) => sub,
            None => {
                let known: Vec<&str> = command.get_subcommands().map(|c| c.get_name()).collect();
                let message = format!("no man page for {name:?}: one of {}", known.join(", "));
                return Err(Exit { code: exit::BAD_INPUT, message }.into());
            }
        },
    };
    std::io::stdout().write_all(&render(&man(page))?)?;
    Ok(exit::SUCCESS)
}

/// The help text marks commands and values as `code`, as Markdown does; a
/// man page sets them in bold instead (roff would show the backticks).
fn code_in_bold(roff: &str) -> String {
    roff.lines()
        .map(|line| {
            let mut parts = line.split('`');
            let mut out = parts.next().unwrap_or_default().to_string();
            let rest: Vec<&str> = parts.collect();
            // Pairs only: an odd backtick at the end stays as it is.
            for pair in rest.chunks(2) {
                match pair {
                    [code, after] => out += &format!("\\fB{code}\\fR{after}"),
                    [alone] => out += &format!("`{alone}"),
                    _ => {}
                }
            }
            out + "\n"
        })
        .collect()
}

fn run_manifest(args: &ManifestArgs) -> anyhow::Result<u8> {
    use lazyfs::manifest::ManifestError;
    let checkpoint = Checkpoint::load(&args.imgdir)?;
    warn_incomplete(checkpoint.warning());
    let output = args.output.clone().unwrap_or_else(|| args.imgdir.join(lazyfs::manifest::DEFAULT_NAME));
    let recording = args
        .recording
        .as_deref()
        .map(lazyfs::recording::load)
        .transpose()
        .map_err(|e| Exit { code: exit::BAD_INPUT, message: format!("--recording {e}") })?;
    let subtree = args.subtree.as_deref();
    let summary = lazyfs::manifest::create(&checkpoint, &args.root, subtree, recording, &output).map_err(|e| Exit {
        code: match e {
            ManifestError::Root { .. } | ManifestError::EmptySubtree(_) => exit::BAD_INPUT,
            _ => exit::RUNTIME,
        },
        message: e.to_string(),
    })?;
    for (path, reason) in &summary.skipped {
        eprintln!("lazyfs: left out {}: {reason}", ls::escape_path(path));
    }
    eprintln!(
        "lazyfs: hashed {} files ({} bytes) into {}{}",
        summary.hashed,
        summary.bytes,
        output.display(),
        if summary.skipped.is_empty() { String::new() } else { format!("; left out {}", summary.skipped.len()) }
    );
    Ok(exit::SUCCESS)
}

fn run_push(args: &PushArgs) -> anyhow::Result<u8> {
    use lazyfs::commands::push::{self, Show};
    let bad = |message: String| Exit { code: exit::BAD_INPUT, message };
    let url = lazyfs::s3::S3Url::parse(&args.url).map_err(|e| bad(e.to_string()))?;
    let recording = match &args.recording {
        Some(path) => Some(lazyfs::recording::load(path).map_err(|e| bad(format!("--recording {e}")))?),
        None => {
            let manifest = args.imgdir.join(lazyfs::manifest::DEFAULT_NAME);
            match manifest.exists() {
                true => lazyfs::manifest::Manifest::load(&manifest).map_err(|e| bad(e.to_string()))?.recording,
                false => None,
            }
        }
    };
    let request = lazyfs::push::PushRequest {
        imgdir: args.imgdir.clone(),
        url,
        source_root: args.source_root.clone(),
        subtree: args.subtree.clone(),
        jobs: usize::from(args.jobs),
        object_size: args.object_size,
        objects: args.objects.clone(),
        recording,
    };
    let show = match (args.json, std::io::stderr().is_terminal()) {
        (true, _) => Show::Json,
        (false, true) => Show::Bars,
        (false, false) => Show::Plain,
    };
    let summary = push::run(&request, show).map_err(|e| Exit { code: e.exit_code(), message: e.to_string() })?;
    for (path, reason) in &summary.skipped {
        eprintln!("lazyfs: left out {}: {reason}", ls::escape_path(path));
    }
    eprintln!("lazyfs: {}", push::summary_line(&request, &summary));
    Ok(exit::SUCCESS)
}

fn run_verify(args: &VerifyArgs) -> anyhow::Result<u8> {
    let cache_dir = match (&args.cache_dir, &args.mountpoint) {
        (Some(dir), _) => dir.clone(),
        (None, Some(mountpoint)) => control::Client::connect(mountpoint)?.status()?.cache_dir.into(),
        (None, None) => unreachable!("clap requires one"),
    };
    let report = lazyfs::commands::verify::verify_cache(&cache_dir).map_err(|e| match e {
        VerifyError::NotACache { .. } => Exit { code: exit::BAD_INPUT, message: e.to_string() }.into(),
        e => anyhow::Error::from(e),
    })?;
    for (path, reason) in &report.mismatched {
        println!("MISMATCH {}: {reason}", ls::escape_path(path));
    }
    println!(
        "{} verified file(s) checked in {}, {} mismatched{}",
        report.checked,
        cache_dir.display(),
        report.mismatched.len(),
        if report.mismatched.is_empty() { "" } else { ": a mount of this cache dir fetches them again" }
    );
    Ok(if report.mismatched.is_empty() { exit::SUCCESS } else { exit::VERIFY_FAILED })
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Bad input is 2; everything else that stops a command is a runtime failure.
fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(exit) = err.downcast_ref::<Exit>() {
        return exit.code;
    }
    let bad_input = |cause: &(dyn std::error::Error + 'static)| {
        cause.is::<ImageError>() || matches!(cause.downcast_ref(), Some(ControlError::NoSuchDirectory(_)))
    };
    if err.chain().any(bad_input) { exit::BAD_INPUT } else { exit::RUNTIME }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_are_bold_in_roff() {
        assert_eq!(
            code_in_bold("until `lazyfs umount`, or `a` b\nnone\n"),
            "until \\fBlazyfs umount\\fR, or \\fBa\\fR b\nnone\n"
        );
        assert_eq!(code_in_bold("one ` alone\n"), "one ` alone\n");
    }

    #[test]
    fn an_error_says_each_thing_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOTDIR);
        let err = anyhow::Error::new(io).context("/a/b: Not a directory (os error 20)").context("opening /a/b");
        assert_eq!(one_line(&err), "opening /a/b: /a/b: Not a directory (os error 20)");
        let err = anyhow::anyhow!("two\nlines").context("first");
        assert_eq!(one_line(&err), "first: two lines");
    }
}
