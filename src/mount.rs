//! `lazyfs mount`: from the command line's request to a live FUSE mount, and
//! its life until it is unmounted.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{LayoutArg, MountArgs, PrefetchOrder, SshArg, exit};
use crate::control::{self, ControlEvent, registry};
use crate::detached::Attachment;
use crate::fetch::restore::{FileSpec, open_file};
use crate::fetch::{FetchConfig, FetchFile, Fetcher, Order, Phase};
use crate::fs::{Filesystem, FsConfig, ServedSpec};
use crate::fuse::FuseAdapter;
use crate::images::{Checkpoint, ImageError, RecordedFile};
use crate::manifest::{self, Manifest, ManifestError};
use crate::namespace::{Layout, Namespace, NamespaceError};
use crate::recording::{self, Recording, RecordingError};
use crate::source::{self, SourceError, SourceSpec, SshOverrides, Transport};
use crate::store::Presence;
use crate::store::journal::{self, Journal, Owner};
use crate::store::{Store, StoreError};
use crate::tree::{Tree, TreeFiles};

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Images(#[from] ImageError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("no HOME, XDG_CACHE_HOME or XDG_RUNTIME_DIR to keep a private cache in: give --cache-dir DIR")]
    NoCacheDir,
    #[error("{}: {reason}", path.display())]
    Mountpoint { path: PathBuf, reason: String },
    #[error("mounting on {}: {source}", path.display())]
    Mount { path: PathBuf, source: std::io::Error },
    #[error("--prefetch-order recorded:{0}")]
    Recording(#[from] RecordingError),
}

impl MountError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Images(_)
            | MountError::Namespace(_)
            | MountError::Mountpoint { .. }
            | MountError::NoCacheDir
            | MountError::Manifest(_)
            | MountError::Recording(_) => exit::BAD_INPUT,
            MountError::Source(SourceError::Config(_)) | MountError::Store(StoreError::Unsafe { .. }) => {
                exit::BAD_INPUT
            }
            _ => exit::RUNTIME,
        }
    }
}

/// Everything `lazyfs mount` was asked, resolved.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub mountpoint: PathBuf,
    pub imgdir: PathBuf,
    /// SOURCE as given, for messages and status.
    pub source_arg: String,
    pub source: SourceSpec,
    pub source_root: PathBuf,
    pub layout: Layout,
    pub subtree: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub read_only: bool,
    pub allow_other: bool,
    pub prefetch: bool,
    pub passthrough: bool,
    pub reconnect_timeout: std::time::Duration,
    /// Connect to the source before mounting (else in the background).
    pub wait_for_source: bool,
    /// Fetch what a recording says the last restore read first, once the source is up.
    pub replay: bool,
    pub jobs: usize,
    pub order: PrefetchOrder,
    /// `--manifest`, or IMGDIR/lazyfs.manifest when it exists.
    pub manifest: Option<PathBuf>,
    /// `--recorded-only`: with `--subtree`, only the files the images record.
    pub recorded_only: bool,
}

impl MountRequest {
    /// With `--subtree DIR` (tree layout, not `--recorded-only`): DIR, whose
    /// whole tree on the source the mount serves.
    pub fn tree_root(&self) -> Option<&Path> {
        self.subtree.as_deref().filter(|_| !self.recorded_only && self.layout == Layout::Tree)
    }
}

impl MountRequest {
    pub fn from_args(args: &MountArgs) -> Result<MountRequest, MountError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let overrides = SshOverrides {
            identities: args.identity.clone(),
            port: args.port,
            known_hosts: args.known_hosts.clone(),
            accept_new_host_key: args.accept_new_host_key,
            config_file: args.ssh_config.clone(),
            transport: match args.ssh {
                SshArg::Openssh => Transport::Openssh,
                SshArg::Libssh2 => Transport::Libssh2,
                SshArg::Auto => Transport::Auto,
            },
            tar: args.tar,
        };
        let source = SourceSpec::parse(&args.source, &overrides, home.as_deref())?;
        let cache_dir = match &args.cache_dir {
            Some(dir) => std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
            None => default_cache_dir(&args.imgdir, &args.source, &args.source_root)?,
        };
        Ok(MountRequest {
            mountpoint: std::path::absolute(&args.mountpoint).unwrap_or_else(|_| args.mountpoint.clone()),
            imgdir: args.imgdir.clone(),
            source_arg: args.source.clone(),
            source,
            source_root: args.source_root.clone(),
            layout: match args.layout {
                LayoutArg::Tree => Layout::Tree,
                LayoutArg::Flat => Layout::Flat,
            },
            subtree: args.subtree.clone(),
            cache_dir,
            read_only: args.read_only,
            allow_other: args.allow_other,
            prefetch: args.prefetch,
            passthrough: !args.no_passthrough,
            reconnect_timeout: args.reconnect_timeout,
            wait_for_source: args.wait_for_source,
            replay: !args.no_replay,
            jobs: usize::from(args.jobs),
            order: args.prefetch_order.clone(),
            manifest: args
                .manifest
                .clone()
                .or_else(|| Some(args.imgdir.join(manifest::DEFAULT_NAME)).filter(|p| p.exists())),
            recorded_only: args.recorded_only,
        })
    }
}

/// `$XDG_CACHE_HOME/lazyfs/ID` (root: `/var/cache/lazyfs/ID`; without a
/// cache home, `$XDG_RUNTIME_DIR/lazyfs-cache/ID`, never a shared directory),
/// where ID names the images and the source, so mounting them again resumes.
pub fn default_cache_dir(imgdir: &Path, source: &str, source_root: &Path) -> Result<PathBuf, MountError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/cache/lazyfs")
    } else if let Some(base) = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache"))) {
        base.join("lazyfs")
    } else if let Some(runtime) = var("XDG_RUNTIME_DIR") {
        runtime.join("lazyfs-cache")
    } else {
        return Err(MountError::NoCacheDir);
    };
    let imgdir = std::fs::canonicalize(imgdir).unwrap_or_else(|_| imgdir.to_path_buf());
    let mut key = Vec::new();
    for part in [imgdir.as_os_str().as_bytes(), source.as_bytes(), source_root.as_os_str().as_bytes()] {
        key.extend_from_slice(part);
        key.push(0);
    }
    Ok(base.join(&blake3::hash(&key).to_hex()[..16]))
}

/// A filesystem ready to mount: images read, source reached, cache open.
pub struct Prepared {
    pub request: MountRequest,
    pub fs: Arc<Filesystem>,
    pub store: Arc<Store>,
    pub source_name: String,
    /// Whose files the cache dir holds.
    owner: Owner,
    /// What the person mounting should know (the mount works regardless).
    pub warnings: Vec<String>,
    /// The mountpoint is this process's until it exits.
    _claim: registry::Claim,
}

/// Reads the images, connects to the source and opens the cache: every
/// failure here happens before anything is mounted.
pub fn prepare(request: MountRequest) -> Result<Prepared, MountError> {
    let (spec, root) = (request.source.clone(), request.source_root.clone());
    prepare_with(request, move || Ok(source::open(&spec, &root)?.into()))
}

/// [`prepare`] with the source made by `open_source`, called once what is
/// local was checked.
pub fn prepare_with(
    request: MountRequest,
    open_source: impl FnOnce() -> Result<Arc<dyn source::Source>, SourceError>,
) -> Result<Prepared, MountError> {
    // Where each attempt starts, in a log that keeps earlier ones.
    log::info!(
        "==== lazyfs {} (pid {}): mounting {} at {} from {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        request.imgdir.display(),
        request.mountpoint.display(),
        request.source_arg
    );
    let claim = claim_mountpoint(&request.mountpoint)?;
    let checkpoint = Checkpoint::load(&request.imgdir)?;
    let subtree = request.subtree.as_deref().unwrap_or(Path::new("/"));
    let served: Vec<&RecordedFile> = checkpoint
        .servable()
        .filter(|f| f.path.strip_prefix(subtree).is_ok_and(|p| !p.as_os_str().is_empty()))
        .collect();
    let paths: Vec<&Path> = served.iter().map(|f| f.path.as_path()).collect();
    let manifest = request.manifest.as_deref().map(Manifest::load).transpose()?.map(Arc::new);
    let tree_root = request.tree_root();
    let mut ns = match tree_root {
        Some(root) => Namespace::build_tree(&paths, root, &manifest_inos(manifest.as_deref(), root, &paths))?,
        None if served.is_empty() => return Err(NamespaceError::EmptySubtree(subtree.to_path_buf()).into()),
        None => Namespace::build(&paths, request.layout, Some(subtree))?,
    };
    if let Some(max) = manifest.as_deref().and_then(Manifest::max_ino).filter(|_| tree_root.is_some()) {
        ns.reserve_inos(max);
    }
    if request.layout == Layout::Tree {
        ns.add_recorded_dirs(&recorded_dirs(&checkpoint), subtree);
    }
    // What is local is checked before the source is asked anything.
    check_mountpoint(&request.mountpoint)?;
    registry::check()?;
    let mut warnings: Vec<String> = checkpoint.warning().into_iter().chain(subtree_warning(&request, &paths)).collect();
    let allow_other = request.allow_other || needs_allow_other(&checkpoint);
    let given_recording = match &request.order {
        PrefetchOrder::Recorded(Some(file)) => Some(recording::load(file)?),
        _ => None,
    };
    let store = Arc::new(Store::open(&request.cache_dir)?);
    // What a mount that was killed recorded is this cache dir's recording now.
    recording::recover(store.dir())?;
    let (loaded, warning) = journal::load(store.dir())?;
    if let Some(warning) = warning {
        log::warn!("{warning}");
    }
    let owner = cache_owner(&request)?;
    let mut records = loaded.records;
    let mut local_changes = loaded.local;
    let afresh = loaded.owner != owner && (!records.is_empty() || !loaded.owner.id.is_empty());
    if afresh {
        let held = match loaded.owner.name.as_str() {
            "" => "files of an unknown checkpoint".to_string(),
            name => format!("the files of {name}"),
        };
        log::warn!("{}: held {held}, not of {}: starting afresh", store.dir().path().display(), owner.name);
        store.clear_spills()?;
        recording::forget(store.dir())?;
        records.clear();
        local_changes.clear();
    }
    // What the last restore read first: replayed once the source is up
    // (unless --no-replay), and with `--prefetch-order recorded` the order of prefetch.
    let recorded_order = matches!(request.order, PrefetchOrder::Recorded(_));
    let recording = match given_recording {
        Some(given) => Some(given),
        None if recorded_order || request.replay => {
            let (found, warning) = find_recording(&store, manifest.as_deref(), recorded_order);
            warnings.extend(warning);
            found
        }
        None => None,
    };
    for warning in &warnings {
        log::warn!("{warning}");
    }
    let source = open_source()?;
    // The connection comes up in the background (see `fetch::connect`),
    // unless asked for now or needed now: CRIU left a size out (O_APPEND
    // opens) that no manifest has, and a size is shown before any read.
    let sizes_unknown =
        served.iter().any(|f| f.size.is_none() && manifest.as_ref().is_none_or(|m| m.get(&f.path).is_none()));
    let mut connection = match request.wait_for_source || sizes_unknown {
        true => Some(source.connect()?),
        false => None,
    };

    let mut files = Vec::with_capacity(served.len());
    for file in &served {
        let record = records.get(file.path.as_os_str().as_bytes());
        if let Some(record) = record.filter(|r| r.modified) {
            // Changed locally: the spill file is the file, whatever the source has now.
            let spec = FileSpec {
                path: file.path.clone(),
                source_path: file.source_path.clone(),
                size: file.size.unwrap_or(record.size),
                expected: None,
                image_order: file.image_order as u64,
                listed: None,
                written: is_written(file),
            };
            files.push(Arc::new(open_file(&store, spec, Some(record))?));
            continue;
        }
        let expected = manifest.as_deref().and_then(|m| m.get(&file.path)).cloned();
        // CRIU records no size for some files (O_APPEND opens): ask the manifest, or the source.
        let size = match file.size.or(expected.as_ref().map(|e| e.size)) {
            Some(size) => size,
            None => match connection.as_mut().expect("connected: a size is unknown").stat(&file.source_path) {
                Ok(stat) => stat.size,
                Err(e @ (SourceError::NotFound { .. } | SourceError::Changed { .. })) => {
                    files.push(Arc::new(failed_file(&store, file, e.to_string())?));
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        if let Some(e) = expected.as_ref().filter(|e| e.size != size) {
            let message = format!(
                "{}: the manifest records {} bytes, the images {size}: not served",
                file.path.display(),
                e.size
            );
            files.push(Arc::new(failed_file(&store, file, message)?));
            continue;
        }
        let spec = FileSpec {
            path: file.path.clone(),
            source_path: file.source_path.clone(),
            size,
            expected,
            image_order: file.image_order as u64,
            listed: None,
            written: is_written(file),
        };
        let fetch_file = match open_file(&store, spec, record) {
            Err(e @ StoreError::TooLarge { .. }) => failed_file(&store, file, e.to_string())?,
            other => other?,
        };
        files.push(Arc::new(fetch_file));
    }
    let kept = local_changes.iter().cloned().map(journal::local_record).collect();
    let journal = crate::fetch::create_journal(store.dir(), &owner, &files, kept)?;
    let tree = match tree_root {
        Some(root) => {
            let files =
                TreeFiles { store: store.clone(), records: Mutex::new(records.clone()), manifest: manifest.clone() };
            let mut tree = Tree::open(store.dir(), &owner, afresh, root, files)?;
            // The root's own attributes: the manifest's (exact), the log's, else the source's.
            match manifest.as_deref().and_then(|m| m.attrs(root)) {
                Some(attrs) => tree.set_root(attrs)?,
                None if tree.root.is_some() => {}
                // The first mount of this tree: the root's attributes are shown before any read.
                None => {
                    let connection = match &mut connection {
                        Some(connection) => connection,
                        None => connection.insert(source.connect()?),
                    };
                    tree.set_root(connection.attrs(root)?)?
                }
            }
            Some(tree)
        }
        None => None,
    };

    let source_name = source.describe();
    let jobs = if request.prefetch { request.jobs } else { 0 };
    let plan = recorded_plan(recording.as_ref(), &files);
    let order = match &request.order {
        PrefetchOrder::SmallestFirst => Order::SmallestFirst,
        PrefetchOrder::LargestFirst => Order::LargestFirst,
        PrefetchOrder::Image => Order::Image,
        PrefetchOrder::Recorded(_) => Order::Recorded(plan.clone()),
    };
    let replay = if request.replay { plan } else { Arc::new([]) };
    let fetcher = Fetcher::start(
        source,
        connection,
        files,
        journal,
        FetchConfig { jobs, order, replay, reconnect_timeout: request.reconnect_timeout },
    );
    fetcher
        .record_in(store.dir().try_clone().map_err(|e| StoreError::Io { path: request.cache_dir.clone(), source: e })?);
    let config = FsConfig {
        read_only: request.read_only,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };
    let specs = served.iter().map(|f| ServedSpec { path: f.path.clone(), mode: f.mode.unwrap_or(0o100644) }).collect();
    let local = crate::store::local::LocalFiles::open(store.dir())?;
    let fs = Filesystem::new(ns, specs, fetcher, local, &local_changes, config, tree)?;
    let mut request = request;
    request.allow_other = allow_other;
    Ok(Prepared { request, fs: Arc::new(fs), store, source_name, owner, warnings, _claim: claim })
}

/// The inode numbers a manifest made on the old host gives the recorded
/// files below `root` (those on `root`'s own filesystem: two filesystems'
/// numbers may collide).
fn manifest_inos<'a>(manifest: Option<&Manifest>, root: &Path, paths: &[&'a Path]) -> HashMap<&'a Path, u64> {
    let Some(manifest) = manifest else { return HashMap::new() };
    let Some((root_dev, _)) = manifest.attrs(root).and_then(|a| a.dev_ino) else { return HashMap::new() };
    paths
        .iter()
        .filter_map(|&path| {
            let (dev, ino) = manifest.attrs(path)?.dev_ino?;
            (dev == root_dev).then_some((path, ino))
        })
        .collect()
}

/// The directories the images record (working directories, roots,
/// directories opened `O_DIRECTORY` or `O_PATH`), with their modes.
fn recorded_dirs(checkpoint: &Checkpoint) -> Vec<(&Path, u32)> {
    checkpoint
        .files
        .iter()
        .filter_map(|f| match (f.mode, &f.unservable) {
            (Some(mode), Some(crate::images::Unservable::NotRegular(_))) if mode & libc::S_IFMT == libc::S_IFDIR => {
                Some((f.path.as_path(), mode))
            }
            _ => None,
        })
        .collect()
}

/// Whether the images record a process that accesses files as another user
/// than the one mounting: without `allow_other` the kernel lets only the
/// mounting user into a FUSE mount, so a restored process running as
/// `postgres` could not open its own files. With it, the kernel still checks
/// every access against the files' modes and owners (`default_permissions`),
/// as on the old host: other local users can do what those modes let them.
fn needs_allow_other(checkpoint: &Checkpoint) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    checkpoint.fsuids.iter().any(|&uid| uid != me)
}

/// Claims `mountpoint` for this process before anything else is done: of
/// racing mounts of one mountpoint, the losers stop here, leaving nothing.
fn claim_mountpoint(mountpoint: &Path) -> Result<registry::Claim, MountError> {
    match registry::claim(mountpoint) {
        Ok(Ok(claim)) => Ok(claim),
        Ok(Err(pid)) => Err(MountError::Mountpoint {
            path: mountpoint.to_path_buf(),
            reason: format!(
                "another lazyfs process{} is mounting or serving it; `lazyfs umount` it first",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
        }),
        Err(e) => Err(MountError::Store(e)),
    }
}

/// Which checkpoint and source a cache dir is for: a blake3 of every image
/// file (but the memory pages, which are large and say nothing of files), the
/// source and its root.
fn cache_owner(request: &MountRequest) -> Result<Owner, MountError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MountError::Store(StoreError::Io { path, source })
    };
    let dir = &request.imgdir;
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    names.retain(|n| n.as_bytes().ends_with(b".img") && !n.as_bytes().starts_with(b"pages-"));
    names.sort();
    let mut hasher = blake3::Hasher::new();
    for name in names {
        let path = dir.join(&name);
        hasher.update(name.as_bytes()).update(&[0]);
        std::io::copy(&mut std::fs::File::open(&path).map_err(io(&path))?, &mut hasher).map_err(io(&path))?;
    }
    for part in [request.source_arg.as_bytes(), request.source_root.as_os_str().as_bytes()] {
        hasher.update(&[0]).update(part);
    }
    Ok(Owner {
        id: hasher.finalize().as_bytes().to_vec(),
        name: format!("{} from {}", dir.display(), request.source_arg),
    })
}

/// `--prefetch-order recorded` without a file: the cache dir's recording (the
/// last restore of these images from this source, here), else the one the
/// manifest ships; a warning when there is none (prefetch goes smallest-first).
fn find_recording(store: &Store, manifest: Option<&Manifest>, for_order: bool) -> (Option<Recording>, Option<String>) {
    let (cached, damaged) = match recording::load_cached(store.dir()) {
        Ok(cached) => (cached, None),
        Err(e) => (None, Some(format!("{e}: ignored"))),
    };
    let found = cached.or_else(|| manifest.and_then(|m| m.recording.clone()));
    let none = (found.is_none() && for_order).then(|| {
        "--prefetch-order recorded: neither the cache dir nor the manifest holds a recording: prefetching \
         smallest-first (`lazyfs manifest --recording` ships one with the images)"
            .to_string()
    });
    (found, damaged.into_iter().chain(none).reduce(|a, b| format!("{a}; {b}")))
}

/// The recording's runs on this mount's files, in order.
fn recorded_plan(recording: Option<&Recording>, files: &[Arc<FetchFile>]) -> Arc<[(usize, std::ops::Range<u64>)]> {
    let Some(recording) = recording else {
        return Arc::new([]);
    };
    let index: std::collections::HashMap<&[u8], usize> =
        files.iter().enumerate().map(|(i, f)| (f.path.as_os_str().as_bytes(), i)).collect();
    recording::plan(recording, |path| index.get(path).map(|&i| (i, files[i].chunk_count()))).into()
}

/// Mounted on a directory the checkpoint's files were in, without `--subtree`
/// naming it, the files show one level of that directory too deep
/// (`/srv/data/srv/data/db`), where `criu restore` does not look.
fn subtree_warning(request: &MountRequest, served: &[&Path]) -> Option<String> {
    let mountpoint = registry::canonical(&request.mountpoint);
    let subtree = request.subtree.as_deref().unwrap_or(Path::new("/"));
    if request.layout != Layout::Tree || mountpoint == subtree || mountpoint == Path::new("/") {
        return None;
    }
    let inside = served.iter().find(|p| p.starts_with(&mountpoint))?;
    let shown = mountpoint.join(inside.strip_prefix(subtree).unwrap_or(inside));
    Some(format!(
        "{mp} is a directory the checkpoint's files were in: {file} shows as {shown}, where `criu restore` \
         will not find it; mount with `--subtree {mp}` to show every file below it at its original path",
        mp = mountpoint.display(),
        file = inside.display(),
        shown = shown.display()
    ))
}

/// Makes `mountpoint` usable: clears a stale mount a killed lazyfs left there,
/// then requires an empty directory.
fn check_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    let bad = |reason: String| MountError::Mountpoint { path: mountpoint.to_path_buf(), reason };
    if is_stale(mountpoint) {
        log::warn!("{}: clearing a stale mount left by a lazyfs process that died", mountpoint.display());
        detach(mountpoint).map_err(|e| bad(format!("a stale mount is in the way and could not be cleared: {e}")))?;
    }
    match std::fs::read_dir(mountpoint).map(|mut entries| entries.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(match registry::find(mountpoint) {
            Some(entry) => bad(format!("already a lazyfs mount (pid {}); `lazyfs umount` it first", entry.pid)),
            None => bad("not empty: mount on an empty directory".into()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad("no such directory: create it first".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Whether `path` is a FUSE mount whose process died: it answers "Transport
/// endpoint is not connected" (or, while the kernel tears the connection
/// down, "Software caused connection abort"). Listed, not only stat'ed: the
/// kernel may answer a stat from its cache.
pub fn is_stale(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|_| std::fs::read_dir(path).map(drop))
        .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)))
}

/// Unmounts at once even when busy (open files keep it alive until closed).
pub fn detach(mountpoint: &Path) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
    } else {
        fusermount(mountpoint, true)
    }
}

/// How long after a successful unmount the FUSE session may take to end
/// before lazyfs stops waiting for it (it ends within milliseconds unless a
/// copy of the mount lives on in another mount namespace).
const SESSION_END_GRACE: Duration = Duration::from_secs(3);

/// Unmounts the mount `attachment` describes unless busy; why not, if not
/// (naming the processes that keep it busy).
fn unmount_attached(mountpoint: &Path, attachment: &Attachment) -> Result<(), String> {
    if attachment.is_detached() {
        return Err(crate::detached::umount_answer(mountpoint, &attachment.holders()));
    }
    unmount(mountpoint).map_err(|e| match holders(mountpoint).as_slice() {
        [] => format!("cannot unmount: {e} (close the files open under it first)"),
        held => format!("cannot unmount: {e}: used by {}; close the files open under it first", held.join(", ")),
    })
}

/// Unmounts unless busy.
fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        nix::mount::umount(mountpoint).map_err(std::io::Error::from)
    } else {
        fusermount(mountpoint, false)
    }
}

fn fusermount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    let mut command = std::process::Command::new("fusermount3");
    command.arg(if lazy { "-uz" } else { "-u" }).arg("--").arg(mountpoint);
    let output = command.output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()))
    }
}

enum Event {
    Signal(i32),
    Control(ControlEvent),
    SessionEnded,
}

/// Mounts, calls `on_ready` once the mount answers, and serves until
/// unmounted (by `lazyfs umount`, a signal, or `umount`).
pub fn serve(prepared: Prepared, on_ready: impl FnOnce(&Path)) -> Result<(), MountError> {
    let request = &prepared.request;
    let mountpoint = request.mountpoint.clone();
    check_mountpoint(&mountpoint)?;
    let mount_err = |source| MountError::Mount { path: mountpoint.clone(), source };

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("lazyfs:{}", request.source_arg)),
        fuser::MountOption::Subtype("lazyfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        if request.read_only { fuser::MountOption::RO } else { fuser::MountOption::RW },
    ];
    if request.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(4);
    config.clone_fd = true;
    let session = fuser::Session::new(FuseAdapter::new(prepared.fs.clone(), request.passthrough), &mountpoint, &config)
        .map_err(mount_err)?;
    // The kernel keeps pages across opens: a file fetched again must drop them.
    let notifier = session.notifier();
    let fs = Arc::downgrade(&prepared.fs);
    prepared.fs.fetcher().on_started_over(Box::new(move |index| {
        let ino = fs.upgrade().and_then(|fs| fs.namespace().file_ino(index));
        if let Some(ino) = ino
            && let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0)
        {
            log::debug!("invalidating inode {ino}: {e}");
        }
    }));

    let (events_tx, events) = mpsc::channel();
    let ended = events_tx.clone();
    let loop_thread = std::thread::Builder::new()
        .name("lazyfs-fuse".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                log::error!("FUSE session ended with an error: {e}");
            }
            let _ = ended.send(Event::SessionEnded);
        })
        .map_err(mount_err)?;

    let answered =
        nix::sys::statfs::statfs(&mountpoint).map(|s| s.filesystem_type().0 == FUSE_SUPER_MAGIC).unwrap_or(false);
    if !answered {
        let _ = detach(&mountpoint);
        return Err(mount_err(std::io::Error::other("the mount did not answer")));
    }

    let attachment = Arc::new(Attachment::of(&mountpoint).map_err(mount_err)?);
    let started = Instant::now();
    let meter = Arc::new(crate::status::Meter::new());
    sample_rate(&prepared.fs, &meter);
    let status = {
        let fs = prepared.fs.clone();
        let request = request.clone();
        let source_name = prepared.source_name.clone();
        let meter = meter.clone();
        let attachment = attachment.clone();
        Arc::new(move |per_file| {
            let context = crate::status::Context { request: &request, source: &source_name, started, meter: &meter };
            let mut status = crate::status::snapshot(&fs, &context, per_file);
            if attachment.is_detached() {
                status.detached = true;
                status.holders = attachment.holders();
            }
            status
        })
    };
    prepared.fs.walk_tree();
    let prefetch: control::PrefetchHook = {
        let (fs, jobs) = (prepared.fs.clone(), request.jobs);
        Arc::new(move |paths| start_prefetch(&fs, paths, jobs))
    };
    let (control_tx, control_rx) = mpsc::channel();
    let server = control::Server::start(prepared.store.dir(), "control.sock", status, prefetch, control_tx)
        .map_err(mount_err)?;
    let forward = events_tx.clone();
    std::thread::spawn(move || {
        for event in control_rx {
            let _ = forward.send(Event::Control(event));
        }
    });
    registry::register(&registry::Entry {
        mountpoint: mountpoint.clone(),
        socket: server.socket(),
        pid: std::process::id(),
    })?;

    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP]).map_err(mount_err)?;
    let signal_handle = signals.handle();
    let forward = events_tx;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if forward.send(Event::Signal(signal)).is_err() {
                return;
            }
        }
    });

    log::info!(
        "mounted {} files of {} at {} from {}",
        prepared.fs.fetcher().files().len(),
        request.imgdir.display(),
        mountpoint.display(),
        prepared.source_name
    );
    on_ready(&mountpoint);

    let mut umount_clients = Vec::new();
    // Once unmounted, the session ends unless another mount namespace copied
    // the mount (a private-propagation `unshare`): its copy keeps the
    // connection alive. Past a grace period lazyfs ends anyway; closing
    // /dev/fuse then leaves the copy answering ENOTCONN.
    let mut unmounted_at: Option<Instant> = None;
    let mut session_ended = false;
    loop {
        let event = match unmounted_at {
            None => events.recv().ok(),
            Some(at) => match events.recv_timeout(SESSION_END_GRACE.saturating_sub(at.elapsed())) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    log::warn!(
                        "{}: unmounted, but another mount namespace still holds a copy of it: ending anyway",
                        mountpoint.display()
                    );
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => None,
            },
        };
        let Some(event) = event else { break };
        match event {
            Event::SessionEnded => {
                session_ended = true;
                break;
            }
            Event::Signal(signal) => {
                log::info!("signal {signal}: unmounting");
                if attachment.is_detached() {
                    continue;
                }
                if unmount(&mountpoint).is_ok() {
                    unmounted_at.get_or_insert_with(Instant::now);
                } else {
                    // Busy: detach now; the session ends when the last file closes.
                    log::info!("busy: detaching; lazyfs ends once the files open under it are closed");
                    attachment.set_detached();
                    let _ = detach(&mountpoint);
                }
            }
            Event::Control(ControlEvent::Umount(mut stream)) => match unmount_attached(&mountpoint, &attachment) {
                Ok(()) => {
                    umount_clients.push(stream);
                    unmounted_at.get_or_insert_with(Instant::now);
                }
                Err(message) => {
                    let _ = control::write_message(
                        &mut stream,
                        &control::proto::Response { kind: Some(control::proto::response::Kind::Error(message)) },
                    );
                }
            },
        }
    }
    if session_ended {
        let _ = loop_thread.join();
    }
    signal_handle.close();
    registry::unregister(&mountpoint);
    drop(server);
    log::info!("unmounted {}", mountpoint.display());
    prepared.finish();
    write_summary(&prepared, started, &meter);
    for mut stream in umount_clients {
        control::umount_done(&mut stream);
    }
    Ok(())
}

/// The processes using files below `mountpoint` (open, mapped, or as their
/// working directory, root or executable), as `PID (COMMAND)`, the way
/// `fuser -m` finds them: from `/proc/*/{fd,maps,cwd,root,exe}`.
fn holders(mountpoint: &Path) -> Vec<String> {
    let below = |path: &Path| path.starts_with(mountpoint);
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    pids.into_iter()
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            let links = ["cwd", "root", "exe"].map(|l| dir.join(l));
            let fds = std::fs::read_dir(dir.join("fd")).into_iter().flatten().filter_map(|e| Some(e.ok()?.path()));
            let maps = std::fs::read_to_string(dir.join("maps")).unwrap_or_default();
            links.into_iter().chain(fds).any(|l| std::fs::read_link(l).is_ok_and(|t| below(&t)))
                || maps
                    .lines()
                    .filter_map(|line| line.split_once('/').map(|(_, p)| Path::new("/").join(p)))
                    .any(|p| below(&p))
        })
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} ({})", comm.trim_end())
        })
        .collect()
}

impl Prepared {
    /// After the mount is gone: stop fetching, and compact the journal to
    /// what is known now (spill files synced first).
    pub fn finish(&self) {
        let fetcher = self.fs.fetcher();
        if let Err(e) = fetcher.stop() {
            log::error!("{e}");
        }
        let mut snapshot = fetcher.snapshot();
        snapshot.extend(self.fs.local_changes().into_iter().map(journal::local_record));
        if let Err(e) = Journal::create(self.store.dir(), &self.owner, snapshot, Vec::new()) {
            log::error!("compacting the journal: {e}");
        }
        // A mount nobody read through keeps the recording of the one before.
        let recording = fetcher.recording();
        if !recording.touches.is_empty()
            && let Err(e) = recording::save(self.store.dir(), &recording)
        {
            log::error!("{e}");
        }
    }
}

/// `lazyfs prefetch`: background prefetch of the files with these original
/// paths (every file when none), with `jobs` workers unless it runs already.
fn start_prefetch(fs: &Filesystem, paths: &[Vec<u8>], jobs: usize) -> Result<u64, String> {
    let fetcher = fs.fetcher();
    if paths.is_empty() {
        return Ok(fetcher.prefetch(None, jobs) as u64);
    }
    let files = paths
        .iter()
        .map(|path| {
            fetcher
                .files()
                .iter()
                .position(|f| f.path.as_os_str().as_bytes() == path.as_slice())
                .ok_or_else(|| format!("{}: not a file of this mount", String::from_utf8_lossy(path)))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    Ok(fetcher.prefetch(Some(&files), jobs) as u64)
}

/// Samples the byte counters for the rate while the mount lives, so even the
/// first `lazyfs status` sees a recent rate.
fn sample_rate(fs: &Arc<Filesystem>, meter: &Arc<crate::status::Meter>) {
    let (fs, meter) = (Arc::downgrade(fs), Arc::downgrade(meter));
    std::thread::spawn(move || {
        while let (Some(fs), Some(meter)) = (fs.upgrade(), meter.upgrade()) {
            meter.sample(crate::status::fetched_bytes(&fs));
            drop((fs, meter));
            std::thread::sleep(crate::status::SAMPLE_EVERY);
        }
    });
}

/// Leaves a summary of the mount's life in the cache dir.
fn write_summary(prepared: &Prepared, started: Instant, meter: &crate::status::Meter) {
    let context = crate::status::Context { request: &prepared.request, source: &prepared.source_name, started, meter };
    let status = crate::status::snapshot(&prepared.fs, &context, true);
    match serde_json::to_vec_pretty(&crate::status::to_json(&status)) {
        Ok(json) => {
            if let Err(e) = prepared.store.dir().write_atomic("summary.json", &json) {
                log::error!("{e}");
            }
        }
        Err(e) => log::error!("summary.json: {e}"),
    }
}

/// A file that cannot be served at all (missing on the source, or the
/// manifest disagrees with the images): every read of it fails with `message`.
fn failed_file(store: &Store, file: &RecordedFile, message: String) -> Result<FetchFile, StoreError> {
    log::error!("{message}");
    let (spill, len) = store.open_spill(&file.path, Some(0), false)?;
    let spec = FileSpec {
        path: file.path.clone(),
        source_path: file.source_path.clone(),
        size: 0,
        expected: None,
        image_order: file.image_order as u64,
        listed: None,
        written: is_written(file),
    };
    Ok(FetchFile::new(spec, spill, len, Presence::new(0), Phase::Failed(message.into())))
}

/// Whether a process of the checkpoint had `file` open for writing (or
/// mapped it shared and writable): `criu restore` will open it for writing too.
fn is_written(file: &RecordedFile) -> bool {
    file.flags & libc::O_ACCMODE as u32 != 0
}
