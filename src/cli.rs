//! The command line, as the README describes it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes every command keeps to.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    /// Source unreachable, authentication, I/O: the run failed.
    pub const RUNTIME: u8 = 1;
    /// Bad arguments, unreadable or malformed images, a missing file or
    /// directory, a mountpoint that is not empty.
    pub const BAD_INPUT: u8 = 2;
    /// `lazyfs wait` ran out of time.
    pub const TIMEOUT: u8 = 3;
    /// A file does not match its hash.
    pub const VERIFY_FAILED: u8 = 4;
}

#[derive(Debug, Parser)]
#[command(
    name = "lazyfs",
    version,
    about = "Serve a CRIU checkpoint's files on the host it restarts on, fetched lazily over SSH",
    long_about = "lazyfs reads the images of a `criu dump` and mounts a FUSE filesystem that shows every \
regular file the checkpointed processes had open or mapped, at once, with the sizes and modes the images \
record. Contents come from the old host over SSH (or from a local directory, or from an S3-compatible \
store that `lazyfs push` filled): a read fetches only the chunks it touches, and with --prefetch everything streams in the background, smallest file first. \
Writes stay local; the source is never modified.",
    after_help = "Exit codes: 0 success · 1 runtime failure (source unreachable, authentication, host key, I/O, \
not a mount) · 2 bad usage or bad input (arguments, unreadable or malformed images, a missing file or \
directory, a mountpoint that is not empty, flat names that collide) · 3 `wait` timed out · 4 verification \
failed."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Mount(Box<MountArgs>),
    Status(StatusArgs),
    Wait(WaitArgs),
    Umount(UmountArgs),
    Upgrade(UpgradeArgs),
    Export(ExportArgs),
    Prefetch(PrefetchArgs),
    Ls(LsArgs),
    Manifest(ManifestArgs),
    Push(PushArgs),
    Verify(VerifyArgs),
    Completions(CompletionsArgs),
    Man(ManArgs),
}

/// Print a shell completion script (e.g. `lazyfs completions bash > /etc/bash_completion.d/lazyfs`).
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

/// Print a man page (roff): `lazyfs man > lazyfs.1`, `lazyfs man mount > lazyfs-mount.1`,
/// or write them all with --dir.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The subcommand whose page to print (lazyfs-COMMAND(1)); default: lazyfs(1).
    pub command: Option<String>,
    /// Write every page (lazyfs.1 and one lazyfs-COMMAND.1 per subcommand) into DIR instead.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub dir: Option<PathBuf>,
}

/// Mount the files a checkpoint records, fetching contents from SOURCE on demand.
///
/// Returns once the mount answers; the filesystem then runs in the background
/// (like sshfs) until `lazyfs umount`, unless --foreground. The connection to
/// SOURCE comes up meanwhile (beside `criu restore`): the first read of a missing
/// byte waits for it, and if it fails (unreachable, host key, authentication) such
/// reads fail at once, `lazyfs status` and `lazyfs wait` (exit 1) say why, and so
/// does the log; --wait-for-source makes `mount` wait and fail instead.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Directory of CRIU images (`criu dump -D`).
    pub imgdir: PathBuf,
    /// Where the bytes are: `[USER@]HOST[:PORT]`, `ssh://[USER@]HOST[:PORT]`, a local
    /// directory holding the old host's root (`file:///DIR`, or any path with a `/`), or
    /// `s3://BUCKET/PREFIX`, where `lazyfs push` put them (endpoint and credentials from the
    /// AWS_* variables and profile, as for `lazyfs push`).
    pub source: String,

    /// Stream every file in the background until all are present.
    #[arg(long)]
    pub prefetch: bool,
    /// Queue order for --prefetch: `smallest-first`, `largest-first`, `image` (the order the
    /// images list the files in), or `recorded[:FILE]`: the chunks the last restore of this
    /// checkpoint touched first come first, in that order, then the rest smallest-first (FILE:
    /// a recording or a cache dir; default: this cache dir's recording, else the manifest's).
    /// What a reader waits for always goes first.
    #[arg(long, value_name = "ORDER", default_value = "smallest-first", value_parser = prefetch_order)]
    pub prefetch_order: PrefetchOrder,
    /// Do not replay the recording: without this, what the last restore of this checkpoint read
    /// first (this cache dir's recording, or the manifest's; `recorded:FILE` gives another) is
    /// fetched as soon as the source answers, in that order, lazy mount or not.
    #[arg(long)]
    pub no_replay: bool,
    /// Parallel transfers (one SSH session each).
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// `tree`: /srv/app/db appears as MOUNTPOINT/srv/app/db; `flat`: as MOUNTPOINT/srv.app.db
    /// (the naming of the original Go prototype; recorded files only: with --subtree, give
    /// --recorded-only too).
    #[arg(long, value_enum, default_value_t = LayoutArg::Tree)]
    pub layout: LayoutArg,
    /// Serve the old host's whole directory DIR as the mount's root: every file, directory,
    /// symlink, hard link and FIFO below it, with the source's sizes, modes, numeric owners and
    /// times, each directory listed when something first looks in it. The files the images
    /// record are there at once (the mode and size they record); the rest arrives as it is read
    /// (or with --prefetch, after them). Mounted at DIR itself, every file is at its original
    /// path, as a stock `criu restore` needs.
    #[arg(long, value_name = "DIR")]
    pub subtree: Option<PathBuf>,
    /// With --subtree: only the files the images record below DIR (and the directories that
    /// lead to them), not the rest of DIR.
    #[arg(long, requires = "subtree")]
    pub recorded_only: bool,
    /// On the source, read file /a/b from DIR/a/b.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub source_root: PathBuf,
    /// Spill files and state; mounting again with the same dir resumes from it, local changes
    /// included, whichever way SOURCE is spelled.
    /// [default: a per-mount dir under $XDG_CACHE_HOME/lazyfs, or /var/cache/lazyfs for root]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Drop every change earlier mounts of the cache dir made (new, renamed, removed files,
    /// writes). Without it, a cache dir holding local changes to other images, or made under
    /// another --layout or --subtree, refuses the mount; and a cache dir filled from another
    /// source fetches nothing from this one. With it, such a cache dir starts afresh.
    #[arg(long)]
    pub discard_local_changes: bool,
    /// Mount a cache dir whose journal is damaged (the mount otherwise refuses, saying where)
    /// with the records before the damage; what was journaled after it is lost. The damaged
    /// journal is kept beside it as journal.damaged-SECS.
    #[arg(long)]
    pub recover_journal: bool,
    /// Source-side hashes (from `lazyfs manifest`) to verify every chunk against.
    /// [default: IMGDIR/lazyfs.manifest if it exists]
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Stay attached; on a terminal, show progress bars. Ctrl-C unmounts.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// SSH identity file (overrides ~/.ssh/config).
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Vec<PathBuf>,
    /// SSH port (overrides ~/.ssh/config).
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// known_hosts file to check the host key against.
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Accept and record a host key that known_hosts does not have yet. A changed key is
    /// always refused.
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// This ssh config file instead of ~/.ssh/config (as `ssh -F`).
    #[arg(short = 'F', value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Which SSH client carries the session: `openssh`, the system's `ssh` (the ssh config
    /// applies as it is: ProxyJump, certificates, ControlMaster, ...); `libssh2`, in process;
    /// `auto`, openssh when `ssh` is installed.
    #[arg(long, value_enum, default_value_t = SshArg::Auto)]
    pub ssh: SshArg,
    /// Read batches of small files (64 or more) through one `tar` on the old host (names on
    /// its stdin), not SFTP. Accounts that may not run commands fall back to SFTP by themselves.
    #[arg(long)]
    pub tar: bool,
    /// Return only once SOURCE answers (connected and authenticated); a source that cannot be
    /// used fails the mount (exit 1) and nothing is mounted. Without it, `mount` returns as
    /// soon as the local side is ready and the connection comes up in the background.
    #[arg(long)]
    pub wait_for_source: bool,
    /// Refuse every write.
    #[arg(long)]
    pub read_only: bool,
    /// How long a read may wait on the source (from its arrival; reconnects, with 0.1 s doubling
    /// to 5 s between tries, and a silent source included) before it answers EIO; status says
    /// `degraded` meanwhile.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = seconds)]
    pub reconnect_timeout: std::time::Duration,
    /// Let other users than the one mounting use the mount (the kernel checks each access
    /// against the files' modes and owners). On by itself when the images record a process
    /// that runs as another user than the one mounting, so the restored process can use its files.
    #[arg(long)]
    pub allow_other: bool,
    /// Serve verified files through lazyfs even where the kernel could read
    /// their cached copies directly (FUSE passthrough, Linux 6.9 and later).
    #[arg(long)]
    pub no_passthrough: bool,
    /// How often in a row the process serving the mount may die (crash, kill, OOM) and be
    /// replaced by a new one on the same mount, the application's open files kept; the first
    /// replacement starts at once, the next after 0.25 s doubling to 5 s; a process that served
    /// for 10 s resets the count. Past it the mount fails: `status` and the log say why.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub max_restarts: u32,
    /// Internal: run as the supervisor (the background process), reporting readiness on stdout.
    #[arg(long, hide = true)]
    pub daemon: bool,
    /// Internal: serve the mount for the supervisor that started this process (link on fd 3).
    #[arg(long, hide = true, conflicts_with = "daemon")]
    pub serve: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SshArg {
    Openssh,
    Libssh2,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefetchOrder {
    SmallestFirst,
    LargestFirst,
    /// The order the images list the files in.
    Image,
    /// The order a recording gives (this file, or the cache dir's or the manifest's).
    Recorded(Option<PathBuf>),
}

fn prefetch_order(text: &str) -> Result<PrefetchOrder, String> {
    Ok(match text {
        "smallest-first" => PrefetchOrder::SmallestFirst,
        "largest-first" => PrefetchOrder::LargestFirst,
        "image" => PrefetchOrder::Image,
        "recorded" => PrefetchOrder::Recorded(None),
        _ => match text.strip_prefix("recorded:") {
            Some(file) if !file.is_empty() => PrefetchOrder::Recorded(Some(file.into())),
            _ => {
                return Err(format!("{text:?}: one of smallest-first, largest-first, image, recorded, recorded:FILE"));
            }
        },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    Tree,
    Flat,
}

/// Show the progress of live mounts: bytes and files present, rate, ETA.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One mount; without it, every live lazyfs mount of this machine.
    pub mountpoint: Option<PathBuf>,
    /// JSON: one object per mount (an array when several); fields in the README.
    #[arg(long)]
    pub json: bool,
    /// Keep redrawing until everything is present (or Ctrl-C); with --json, one object per line.
    #[arg(long)]
    pub watch: bool,
}

/// Block until every file (or each PATH) is present and verified.
///
/// Exit 0 when they are, 3 on timeout, 4 if one failed verification, 1 if the mount went away
/// or failed.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// A live lazyfs mount.
    pub mountpoint: PathBuf,
    /// Files to wait for: original paths (/srv/app/db), paths in the mount (srv/app/db)
    /// or paths under MOUNTPOINT; default: all.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Give up after SECS seconds (exit 3).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub timeout: Option<std::time::Duration>,
}

/// Copy a mount's current tree (checkpoint files with their local changes, and the files made
/// through it) into a plain directory, holes kept, with the numeric owners (as root), modes and
/// times the mount shows: the next start of the application needs no lazyfs.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A live lazyfs mount.
    pub mountpoint: PathBuf,
    /// Where to copy it: a directory that does not exist yet.
    pub dir: PathBuf,
}

/// Flush state, unmount and stop the background process; the cache stays.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// A lazyfs mount (a stale one, whose process died, is cleared too).
    pub mountpoint: PathBuf,
}

/// Hand a live mount over to another lazyfs binary, without unmounting.
///
/// A new serving process (BINARY, by default this `lazyfs`) takes the mount over from the running one, which is
/// stopped; the application's open files keep working, and requests in flight are answered by
/// the new process. Run it with the newly installed binary after an upgrade. If the new process
/// does not come up, the old binary serves again and this command fails.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// A live lazyfs mount.
    pub mountpoint: PathBuf,
    /// The lazyfs binary to serve the mount from now on (default: the one running this command).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// How long to wait for the new process to serve.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = seconds)]
    pub timeout: std::time::Duration,
}

/// Start fetching files in the background on a live mount (one mounted without --prefetch
/// fetches only what is read); each PATH, or every file.
///
/// Returns at once; `lazyfs status` shows the progress, `lazyfs wait` waits for it. Files
/// someone reads still come first.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// A live lazyfs mount.
    pub mountpoint: PathBuf,
    /// Files to fetch: original paths (/srv/app/db), paths in the mount (srv/app/db) or
    /// paths under MOUNTPOINT; default: all.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// List the files the images record: path, size, mode, users, and why any cannot be served.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Directory of CRIU images.
    pub imgdir: PathBuf,
    /// JSON: an array of {path, source_path, size, mode, flags, users, servable, reason}.
    #[arg(long)]
    pub json: bool,
}

/// Hash every recorded file with blake3, whole and per chunk (run on the old host after `criu dump`).
#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Directory of CRIU images.
    pub imgdir: PathBuf,
    /// Read file /a/b from DIR/a/b.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Hash every file below DIR (the --subtree the mount will use), not only the recorded
    /// ones, and record what lstat says of each file, directory and symlink (inode number,
    /// link count, exact times): a mount reports those inode numbers and times, and serves no
    /// file of DIR whose bytes differ.
    #[arg(long, value_name = "DIR")]
    pub subtree: Option<PathBuf>,
    /// Where to write it [default: IMGDIR/lazyfs.manifest].
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Ship the access order a restore recorded with the images: a lazyfs `recording`
    /// file, or the cache dir of the mount the process ran on. A mount with
    /// `--prefetch-order recorded` fetches in that order.
    #[arg(long, value_name = "FILE|DIR")]
    pub recording: Option<PathBuf>,
}

/// Upload a checkpoint's files to an S3-compatible store (run on the old host), for any number
/// of hosts to mount with `lazyfs mount MOUNTPOINT IMGDIR s3://BUCKET/PREFIX`.
///
/// Every file a mount of the same arguments would serve goes up as content-addressed objects
/// (one the bucket already has, from this push, another file or an earlier push, is not sent
/// again: after an interruption, run it again and it sends only what is missing), with an index
/// that goes up first, so a mount can start before the push ends. The recorded access order
/// goes first. Endpoint and credentials as for the AWS tools: AWS_ENDPOINT_URL,
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE (static
/// keys from ~/.aws/credentials), AWS_ALLOW_HTTP=true for a plain-http endpoint.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Directory of CRIU images. The push writes IMGDIR/lazyfs.pushed (the blake3 of its index:
    /// a mount serves no other index); copy IMGDIR to the new hosts once the push has started.
    pub imgdir: PathBuf,
    /// Where to: s3://BUCKET/PREFIX (PREFIX holds this checkpoint's index; a later push there
    /// replaces it).
    #[arg(value_name = "s3://BUCKET/PREFIX")]
    pub url: String,
    /// Read file /a/b from DIR/a/b.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub source_root: PathBuf,
    /// Push only the recorded files below DIR (the --subtree the mounts will use).
    #[arg(long, value_name = "DIR")]
    pub subtree: Option<PathBuf>,
    /// Objects sent at once.
    #[arg(short = 'j', long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// The access order a restore recorded (a lazyfs `recording` file, or the cache dir of the
    /// mount it ran on): its objects go first, and mounts with `--prefetch-order recorded`
    /// follow it. [default: the one IMGDIR/lazyfs.manifest ships, if any]
    #[arg(long, value_name = "FILE|DIR")]
    pub recording: Option<PathBuf>,
    /// Bytes of a file per stored object (the unit of upload and of deduplication; reads are
    /// ranged GETs of 16 KiB and up, whatever this is): a multiple of 16K up to 64M.
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = object_size)]
    pub object_size: u64,
    /// Key prefix of the objects in the bucket: every push that uses the same one shares them.
    #[arg(long, value_name = "KEYPREFIX", default_value = "lazyfs-chunks/", value_parser = key_prefix)]
    pub objects: String,
    /// One JSON object per line on stdout: the progress every second, then the summary
    /// (fields in the README).
    #[arg(long)]
    pub json: bool,
}

/// `4M`, `512K`, `16384`: a multiple of 16 KiB up to 64 MiB.
fn object_size(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.strip_suffix(['K', 'k']) {
        Some(n) => (n, 1 << 10),
        None => match text.strip_suffix(['M', 'm']) {
            Some(n) => (n, 1 << 20),
            None => (text, 1),
        },
    };
    let size = number.parse::<u64>().ok().and_then(|n| n.checked_mul(unit));
    match size {
        Some(size)
            if crate::s3::index::OBJECT_SIZES.contains(&size) && size.is_multiple_of(crate::store::CHUNK_SIZE) =>
        {
            Ok(size)
        }
        _ => Err(format!("{text:?}: a multiple of 16K from 16K to 64M (e.g. 1M, 4M)")),
    }
}

/// A key prefix ending in `/`, with no empty part.
fn key_prefix(text: &str) -> Result<String, String> {
    let ok = text.ends_with('/')
        && text.trim_end_matches('/').split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if ok { Ok(text.to_string()) } else { Err(format!("{text:?}: a key prefix such as `lazyfs-chunks/`")) }
}

/// Re-hash every present file; exit 4 if one no longer matches.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["mountpoint", "cache_dir"]))]
pub struct VerifyArgs {
    /// A live lazyfs mount.
    pub mountpoint: Option<PathBuf>,
    /// A cache dir, mounted or not.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// A number of seconds: finite, not negative (fractions allowed).
fn seconds(text: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| format!("{text}: seconds must be finite and not negative"))
}
