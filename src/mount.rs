//! `lazyfs mount`: from the command line's request to a live FUSE mount, and
//! its life until it is unmounted.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{LayoutArg, MountArgs, PrefetchOrder, SshArg, exit};
use crate::control::{self, ControlEvent, registry};
use crate::detached::Attachment;
use crate::failover::Supervised;
use crate::failover::link::{Message, Negotiated, Restarts};
use crate::fetch::restore::{FileSpec, open_file};
use crate::fetch::{FetchConfig, FetchFile, Fetcher, Order, Phase};
use crate::fs::{Filesystem, FsConfig, Replay, ServedSpec};
use crate::fuse::FuseAdapter;
use crate::identity::{self, CacheIdentity, CheckedSource, SourceIdentity, Verdict};
use crate::images::{Checkpoint, ImageError, RecordedFile};
use crate::manifest::{self, Manifest, ManifestError};
use crate::namespace::{Counter, Ino, Layout, Namespace, NamespaceError, Numbers, ROOT_INO};
use crate::recording::{self, Recording, RecordingError};
use crate::s3::index::Index;
use crate::source::Connection;
use crate::source::{self, Source, SourceError, SourceSpec, SshOverrides, Transport};
use crate::store::Presence;
use crate::store::inodes::InodeTable;
use crate::store::journal::proto::JournalRecord;
use crate::store::journal::{self, Journal, Loaded, Owner};
use crate::store::{CacheDir, Store, StoreError};
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
    #[error(
        "--layout flat cannot show the whole directory {} (flat names have no directories): give --layout tree, \
         or --recorded-only to serve only the recorded files below it, flat",
        .0.display()
    )]
    FlatWholeDir(PathBuf),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("{0}")]
    Journal(journal::Damage),
}

impl MountError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Images(_)
            | MountError::Namespace(_)
            | MountError::Mountpoint { .. }
            | MountError::NoCacheDir
            | MountError::FlatWholeDir(_)
            | MountError::Manifest(_)
            | MountError::Recording(_)
            | MountError::Identity(_) => exit::BAD_INPUT,
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
    /// Drop the local changes earlier mounts made (and start afresh where
    /// the cache dir's files are not this mount's).
    pub discard_local_changes: bool,
    /// Mount with the records before the damage of a damaged journal.
    pub recover_journal: bool,
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
        // The whole directory is a tree; the flat names are for the recorded files only.
        if let (LayoutArg::Flat, Some(subtree), false) = (&args.layout, &args.subtree, args.recorded_only) {
            return Err(MountError::FlatWholeDir(subtree.clone()));
        }
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
            None => default_cache_dir(&args.imgdir, &source::spelling(&source, &args.source_root))?,
        };
        // A first mount needs its source: a missing SOURCE or key is said
        // before anything is made. A remount may not (every file is in the
        // cache dir: the old host may be gone); it is checked when opened.
        if CacheDir::open_existing_cache(&cache_dir).is_err() {
            source.check_local()?;
        }
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
            discard_local_changes: args.discard_local_changes,
            recover_journal: args.recover_journal,
            recorded_only: args.recorded_only,
        })
    }
}

/// `$XDG_CACHE_HOME/lazyfs/ID` (root: `/var/cache/lazyfs/ID`; without a
/// cache home, `$XDG_RUNTIME_DIR/lazyfs-cache/ID`, never a shared directory),
/// where ID names the images and the source (`spelling`: SOURCE and
/// --source-root normalized, see `source::spelling`), so mounting them again
/// resumes whatever the normalization makes equal (not two host names of one
/// host: those are told apart only by the host-key check of a given cache dir).
pub fn default_cache_dir(imgdir: &Path, spelling: &str) -> Result<PathBuf, MountError> {
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
    for part in [imgdir.as_os_str().as_bytes(), spelling.as_bytes()] {
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
    /// The source, and what is known of it (journaled at unmount).
    source: Arc<CheckedSource>,
    /// What the journal says of the files this mount does not serve (outside
    /// its --subtree): kept for the mounts that do.
    outside: Vec<JournalRecord>,
    /// What the person mounting should know (the mount works regardless).
    pub warnings: Vec<String>,
    /// The mountpoint is this process's until it exits (its supervisor's, when supervised).
    _claim: Option<registry::Claim>,
    /// Files of the tree the recording names that the mount has not found
    /// yet: their directories are listed before the walk lists the rest.
    recorded_later: Vec<Vec<u8>>,
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
    prepare_inner(request, open_source, None)
}

/// [`prepare`] for a process its supervisor started: the supervisor holds the
/// mountpoint's claim. A successor touches nothing below the mountpoint (it
/// is the one to answer for it) and connects to the source only when a read
/// needs it: the old host may be gone by now.
pub fn prepare_supervised(request: MountRequest, supervised: &Supervised) -> Result<Prepared, MountError> {
    let (spec, root) = (request.source.clone(), request.source_root.clone());
    let takeover = Takeover { held_open: supervised.open_counts(), resuming: supervised.resume.is_some() };
    prepare_inner(request, move || Ok(source::open(&spec, &root)?.into()), Some(takeover))
}

/// What a supervised serving process brings to [`prepare_inner`].
struct Takeover {
    /// Open handles per inode the kernel holds (a predecessor's).
    held_open: std::collections::HashMap<Ino, u32>,
    /// A successor on a live connection.
    resuming: bool,
}

fn prepare_inner(
    request: MountRequest,
    open_source: impl FnOnce() -> Result<Arc<dyn source::Source>, SourceError>,
    takeover: Option<Takeover>,
) -> Result<Prepared, MountError> {
    let resuming = takeover.as_ref().is_some_and(|t| t.resuming);
    // Where each attempt starts, in a log that keeps earlier ones.
    log::info!(
        "==== lazyfs {} (pid {}): mounting {} at {} from {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        request.imgdir.display(),
        request.mountpoint.display(),
        request.source_arg
    );
    let claim = match takeover {
        None => Some(claim_mountpoint(&request.mountpoint)?),
        Some(_) => None,
    };
    let checkpoint = Checkpoint::load(&request.imgdir)?;
    let subtree = request.subtree.as_deref().unwrap_or(Path::new("/"));
    let served: Vec<&RecordedFile> = checkpoint
        .servable()
        .filter(|f| f.path.strip_prefix(subtree).is_ok_and(|p| !p.as_os_str().is_empty()))
        .collect();
    let paths: Vec<&Path> = served.iter().map(|f| f.path.as_path()).collect();
    let manifest = request.manifest.as_deref().map(Manifest::load).transpose()?.map(Arc::new);
    let tree_root = request.tree_root();
    if let (SourceSpec::S3(url), Some(root)) = (&request.source, tree_root) {
        return Err(SourceError::Config(format!(
            "--subtree {}: {url} holds the recorded files only (`lazyfs push` does not send the whole directory \
             yet): add --recorded-only",
            root.display()
        ))
        .into());
    }
    // Supervised, numbers a successor can give again (the cache dir's inode
    // table: a successor's, a fresh mount's kept once the cache dir is open).
    let numbers: Box<dyn Numbers> = match (&takeover, resuming) {
        (_, true) => Box::new(InodeTable::load(&CacheDir::open_cache(&request.cache_dir)?)?),
        (Some(_), false) => Box::new(InodeTable::fresh()),
        (None, _) => Box::new(Counter::default()),
    };
    let mut numbers = numbers;
    if let Some(max) = manifest.as_deref().and_then(Manifest::max_ino).filter(|_| tree_root.is_some()) {
        // Every number the manifest gives (the tree's too) stays free for its node.
        numbers.reserve_up_to(max);
    }
    let mut ns = match tree_root {
        Some(root) => Namespace::build_tree(&paths, root, &manifest_inos(manifest.as_deref(), root, &paths), numbers)?,
        None if served.is_empty() => return Err(NamespaceError::EmptySubtree(subtree.to_path_buf()).into()),
        None => Namespace::build_numbered(&paths, request.layout, Some(subtree), numbers)?,
    };
    if request.layout == Layout::Tree {
        ns.add_recorded_dirs(&recorded_dirs(&checkpoint), subtree);
    }
    // What is local is checked before the source is asked anything.
    if !resuming {
        check_mountpoint(&request.mountpoint)?;
    }
    registry::check()?;
    let subtree_warning = if resuming { None } else { subtree_warning(&request, &paths) };
    let mut warnings: Vec<String> = checkpoint.warning().into_iter().chain(subtree_warning).collect();
    // Only a mount that shows the old host's owners (the tree's) opens
    // itself to other users by itself: the recorded files alone show the
    // mounting user as owner, so a restored process of another user could
    // not open a 0600 file, and every other user could read the 0644 ones
    // (and through directories lazyfs makes 0755).
    let other_users = needs_allow_other(&checkpoint);
    let allow_other = request.allow_other || (other_users && tree_root.is_some());
    if other_users && !allow_other {
        warnings.push(
            "the images record processes running as another user than you: without --subtree lazyfs does not \
             know the files' owners (they show as yours), so it does not open the mount to other users; give \
             --subtree DIR to serve the old host's owners and modes, or --allow-other to let every local user \
             do what the images' modes allow"
                .to_string(),
        );
    }
    let given_recording = match &request.order {
        PrefetchOrder::Recorded(Some(file)) => Some(recording::load(file)?),
        _ => None,
    };
    let store = Arc::new(Store::open(&request.cache_dir)?);
    if takeover.is_some() && !resuming {
        ns.numbers_mut().keep_in(store.dir())?;
    }
    let (spelling, shown) = source::identify(&request.source, &request.source_root);
    let (wanted, legacy) = wanted_identity(&request, spelling.clone(), shown)?;
    let (loaded, verdict) = match load_journal(&store, &request, &mut warnings)? {
        Some(loaded) => {
            let cache = store.dir().path();
            let verdict = identity::judge(cache, &loaded, (&wanted, &legacy), request.discard_local_changes)?;
            (loaded, verdict)
        }
        None => (Loaded::default(), Verdict::Afresh("its damaged journal was set aside".into())),
    };
    // What a mount that was killed recorded is this cache dir's recording now
    // (once the journal let the mount go on: a refused mount changes nothing).
    let recovered = recording::recover(store.dir())?;
    let local = crate::store::local::LocalFiles::open(store.dir())?;
    let (mut records, mut local_changes) = (loaded.records, loaded.local);
    let mut created_ns = loaded.owner.created_ns;
    match &verdict {
        Verdict::Use => {}
        Verdict::Afresh(reason) => {
            warnings.push(format!("{}: {reason}: starting afresh", store.dir().path().display()));
            records.clear();
            local_changes.clear();
            created_ns = 0;
        }
        Verdict::Discard => {
            let modified = records.values().filter(|r| r.modified).count();
            warnings.push(format!(
                "{}: dropping {} local change(s) to names and attributes and the local writes to {modified} file(s) \
                 (--discard-local-changes)",
                store.dir().path().display(),
                local_changes.len()
            ));
            records.retain(|_, r| !r.modified);
            local_changes.clear();
        }
    }
    if created_ns == 0 {
        created_ns = nanos_now();
    }
    let identity = identity::merged(loaded.owner.identity.as_ref(), &verdict, wanted);
    if verdict != Verdict::Use {
        // The journal stops claiming what is dropped before it goes: a crash
        // in between must not leave records of bytes no longer there. With
        // no room for a copy, what it knew of fetched bytes goes too (they
        // are fetched again); so it does when nothing is kept.
        let kept: Vec<JournalRecord> =
            records.iter().flat_map(|(path, record)| journal::file_records(path, record)).collect();
        let owner = Owner { identity: Some(identity.clone()), created_ns, legacy: Vec::new() };
        match kept.is_empty() {
            true => journal::remove(store.dir())?,
            false => match journal::rewrite(store.dir(), &owner, &kept) {
                Err(e) if e.is_no_space() => journal::remove(store.dir())?,
                other => other?,
            },
        }
        if matches!(verdict, Verdict::Afresh(_)) {
            store.clear_spills()?;
            recording::forget(store.dir())?;
        }
        local.clear()?;
    }
    if !identity::knows(&identity, &spelling) {
        log::info!("{spelling}: a spelling of the source this cache dir does not know yet: checked once connected");
    }
    let known = identity.source.clone().unwrap_or_default();
    for warning in &warnings {
        log::warn!("{warning}");
    }

    let mut source = SourceNeeded { open: Some(open_source), spelling, known, source: None, connection: None };
    // An object store's index (read as it is opened) says what its files are.
    let store_source = match request.source {
        SourceSpec::S3(_) => Some(source.open()?),
        _ => None,
    };
    let pushed = store_source.as_deref().and_then(|s| s.pushed());
    if let (Some(pushed), Some(store_source)) = (pushed, &store_source) {
        check_pushed_images(&request, pushed, &store_source.describe())?;
    }
    // What the last restore read first: replayed once the source is up
    // (unless --no-replay), and with `--prefetch-order recorded` the order of prefetch.
    let recorded_order = matches!(request.order, PrefetchOrder::Recorded(_));
    let recording = match given_recording {
        Some(given) => Some(given),
        None if recorded_order || request.replay => {
            let shipped = pushed.and_then(|p| p.recording.as_ref());
            let shipped = shipped.or(manifest.as_deref().and_then(|m| m.recording.as_ref()));
            let (found, warning) = find_recording(&store, shipped, recorded_order);
            if let Some(warning) = &warning {
                log::warn!("{warning}");
            }
            warnings.extend(warning);
            found
        }
        None => None,
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
        // What a store holds is checked against its own index.
        let expected = match pushed {
            Some(pushed) => pushed.get(&file.source_path).map(|entry| entry.hashes.clone()),
            None => manifest.as_deref().and_then(|m| m.get(&file.path)).cloned(),
        };
        // CRIU records no size for some files (O_APPEND opens): ask the
        // manifest, what arrived of it whole before, or the source.
        let verified = record.filter(|r| r.verified.is_some()).map(|r| r.size);
        let size = match file.size.or(expected.as_ref().map(|e| e.size)).or(verified) {
            Some(size) => size,
            None => match source.connection().and_then(|c| c.stat(&file.source_path)) {
                Ok(stat) => stat.size,
                Err(
                    e @ (SourceError::NotFound { .. } | SourceError::Changed { .. } | SourceError::NotTheSource(_)),
                ) => {
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
    // What this mount does not serve (outside --subtree) stays known.
    let served_paths: std::collections::HashSet<&[u8]> = files.iter().map(|f| f.path.as_os_str().as_bytes()).collect();
    let mut kept: Vec<JournalRecord> = records
        .iter()
        .filter(|(path, _)| !served_paths.contains(path.as_slice()))
        .flat_map(|(path, record)| journal::file_records(path, record))
        .collect();
    let outside = kept.clone();
    kept.extend(local_changes.iter().cloned().map(journal::local_record));

    let owner = Owner { identity: Some(identity), created_ns, legacy: Vec::new() };
    let mut tree = match tree_root {
        Some(root) => {
            let files =
                TreeFiles { store: store.clone(), records: Mutex::new(records.clone()), manifest: manifest.clone() };
            let afresh = matches!(verdict, Verdict::Afresh(_));
            let mut tree = Tree::open(store.dir(), &owner, afresh, root, files)?;
            // The root's own attributes: the manifest's (exact), the log's, else the source's.
            if let Some(attrs) = manifest.as_deref().and_then(|m| m.attrs(root)) {
                tree.set_root(attrs)?;
            }
            Some(tree)
        }
        None => None,
    };
    let root_unknown = tree.as_ref().is_some_and(|t| t.root.is_none());
    // The mount (or a successor taking one over) comes up without waiting for
    // the source: its first connection comes up in the background (see
    // `fetch::connect`), beside `criu restore`. Unless asked to wait for it,
    // or for the tree root's attributes, shown before any read; a local
    // directory costs no round trip, and a mistake in it is said by `mount`
    // (a successor serves what is cached even when it is gone).
    let local_source = matches!(request.source, SourceSpec::Local(_));
    let need = match needs_source(&files) || root_unknown {
        true if request.wait_for_source || root_unknown || (local_source && !resuming) => Need::Now,
        true => Need::Later,
        false => Need::Not,
    };
    let (checked, mut connection) = source.finish(need, &request.source_arg, resuming, &mut warnings)?;
    if let (Some(tree), Some(root), Some(connection)) = (&mut tree, tree_root, &mut connection)
        && root_unknown
    {
        tree.set_root(connection.attrs(root)?)?;
    }
    let owner =
        Owner { identity: owner.identity.map(|i| CacheIdentity { source: Some(checked.known()), ..i }), ..owner };
    let resumable = (verdict == Verdict::Use).then_some(loaded.whole_len);
    let journal = crate::fetch::create_journal(store.dir(), &owner, &files, (kept, resumable))?;
    checked.on_confirmed(journal.source_recorder());

    let source_name = checked.describe();
    let jobs = if request.prefetch { request.jobs } else { 0 };
    let plan = recorded_plan(recording.as_ref(), &files);
    let order = match &request.order {
        PrefetchOrder::SmallestFirst => Order::SmallestFirst,
        PrefetchOrder::LargestFirst => Order::LargestFirst,
        PrefetchOrder::Image => Order::Image,
        PrefetchOrder::Recorded(_) => Order::Recorded(plan.clone()),
    };
    let later = match (&order, &recording, tree_root) {
        (Order::Recorded(_), Some(recording), Some(_)) => recorded_later(recording, &files),
        _ => Default::default(),
    };
    let recorded_later = later.keys().cloned().collect();
    let replay = if request.replay { plan } else { Arc::new([]) };
    let fetcher = Fetcher::start(
        checked.clone(),
        connection,
        files,
        journal,
        FetchConfig { jobs, order, replay, reconnect_timeout: request.reconnect_timeout },
    );
    fetcher
        .record_in(store.dir().try_clone().map_err(|e| StoreError::Io { path: request.cache_dir.clone(), source: e })?);
    // A successor goes on with what the process it took over from recorded:
    // the restore's first reads, from before the crash, stay first.
    if let Some(earlier) = recovered.filter(|_| resuming) {
        let index: HashMap<Vec<u8>, usize> =
            fetcher.files().iter().enumerate().map(|(i, f)| (f.path.as_os_str().as_bytes().to_vec(), i)).collect();
        for touch in &earlier.touches {
            if let Some(&file) = index.get(&touch.path) {
                fetcher.note_recorded(file, touch.first..touch.end, touch.at_us);
            }
        }
    }
    fetcher.expect_recorded(later);
    let config = FsConfig {
        read_only: request.read_only,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        created: from_nanos(created_ns),
        shared: allow_other,
    };
    let specs = served.iter().map(|f| ServedSpec { path: f.path.clone(), mode: f.mode.unwrap_or(0o100644) }).collect();
    // The tree as built: from now on each number a successor must give again is kept as it is given.
    ns.numbers_mut().settle();
    let held_open = takeover.map(|t| t.held_open).unwrap_or_default();
    let replay = Replay { changes: &local_changes, held_open: &held_open };
    let fs = Filesystem::new(ns, specs, fetcher, local, replay, config, tree)?;
    if resuming {
        fs.relist_kept();
    }
    let mut request = request;
    request.allow_other = allow_other;
    Ok(Prepared {
        request,
        fs: Arc::new(fs),
        store,
        source_name,
        owner,
        source: checked,
        outside,
        warnings,
        _claim: claim,
        recorded_later,
    })
}

/// The inode numbers a manifest made on the old host gives the recorded
/// files below `root` and the directories on their way (those on `root`'s
/// own filesystem: two filesystems' numbers may collide).
fn manifest_inos<'a>(manifest: Option<&Manifest>, root: &Path, paths: &[&'a Path]) -> HashMap<&'a Path, u64> {
    let Some(manifest) = manifest else { return HashMap::new() };
    let Some((root_dev, _)) = manifest.attrs(root).and_then(|a| a.dev_ino) else { return HashMap::new() };
    paths
        .iter()
        .flat_map(|&path| path.ancestors().take_while(|p| p.starts_with(root) && *p != root))
        .filter_map(|path| {
            let (dev, ino) = manifest.attrs(path)?.dev_ino?;
            (dev == root_dev).then_some((path, crate::namespace::kept_ino(ino)?))
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
pub fn claim_mountpoint(mountpoint: &Path) -> Result<registry::Claim, MountError> {
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

/// Whether a mount of `files`, as the cache dir holds them, needs the
/// source: once every file is verified or changed locally, the cache is the
/// source and the old host may be gone.
fn needs_source(files: &[Arc<FetchFile>]) -> bool {
    files.iter().any(|f| matches!(f.phase(), Phase::Pending | Phase::Fetching | Phase::Present))
}

/// What this mount asks its cache dir's files to be (see `identity`), and
/// what a journal older than identities would say of it.
fn wanted_identity(
    request: &MountRequest,
    spelling: String,
    shown: Option<source::Shown>,
) -> Result<(CacheIdentity, Vec<u8>), MountError> {
    let (images, legacy) = identity::images_hash(&request.imgdir, &request.source_arg, &request.source_root)
        .map_err(|(path, source)| MountError::Store(StoreError::Io { path, source }))?;
    let identity = CacheIdentity {
        images,
        imgdir: request.imgdir.display().to_string(),
        layout: match request.subtree.is_some() && request.recorded_only && request.layout == Layout::Tree {
            // Local changes made over the whole directory may name files the images do not.
            true => "tree --recorded-only".into(),
            false => identity::layout_name(request.layout).into(),
        },
        subtree: identity::subtree_name(request.subtree.as_deref().unwrap_or(Path::new("/"))),
        source: Some(SourceIdentity {
            spellings: vec![spelling],
            kind: shown.as_ref().map_or("", |s| s.kind).into(),
            host_keys: shown.as_ref().map(|s| s.host_keys.clone()).unwrap_or_default(),
            root: shown.map(|s| s.root.into_os_string().into_vec()).unwrap_or_default(),
        }),
    };
    Ok((identity, legacy))
}

/// The cache dir's journal. A damaged one refuses the mount, unless
/// `--recover-journal` (keep what comes before the damage) or
/// `--discard-local-changes` (set it aside: `None`, start afresh) says what to do.
fn load_journal(
    store: &Store,
    request: &MountRequest,
    warnings: &mut Vec<String>,
) -> Result<Option<Loaded>, MountError> {
    let damage = match journal::load(store.dir())? {
        Ok(loaded) => return Ok(Some(loaded)),
        Err(damage) => damage,
    };
    if request.recover_journal {
        let kept = journal::keep_intact(store.dir(), &damage)?;
        warnings.push(format!(
            "{}: kept the {} record(s) before the damage at byte {}; the damaged journal is kept as {}",
            damage.path.display(),
            damage.intact,
            damage.at,
            kept.display()
        ));
        return journal::load(store.dir())?.map(Some).map_err(MountError::Journal);
    }
    if request.discard_local_changes {
        let aside = journal::set_aside(store.dir(), "discarded")?;
        warnings.push(format!(
            "{}: {} (--discard-local-changes: set aside as {}, starting afresh)",
            damage.path.display(),
            damage.reason,
            aside.unwrap_or_default().display()
        ));
        return Ok(None);
    }
    Err(MountError::Journal(damage))
}

fn nanos_now() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_nanos()).unwrap_or(i64::MAX)
}

fn from_nanos(ns: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

/// The source, and the connection made to it at mount time, if any.
type Reached = (Arc<CheckedSource>, Option<Box<dyn Connection>>);

/// When a mount needs its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// To mount (a connection is made, or the mount fails).
    Now,
    /// Soon, not to mount: its first connection comes up in the background.
    Later,
    /// Not at all: every file is in the cache dir.
    Not,
}

/// The source, opened (checked on every connection: [`CheckedSource`]) and
/// connected only if the mount needs it.
struct SourceNeeded<F> {
    open: Option<F>,
    spelling: String,
    known: SourceIdentity,
    source: Option<Arc<CheckedSource>>,
    connection: Option<Box<dyn Connection>>,
}

impl<F: FnOnce() -> Result<Arc<dyn Source>, SourceError>> SourceNeeded<F> {
    fn open(&mut self) -> Result<Arc<CheckedSource>, SourceError> {
        if let Some(source) = &self.source {
            return Ok(source.clone());
        }
        let inner = (self.open.take().expect("opened once"))()?;
        let source = Arc::new(CheckedSource::new(inner, self.spelling.clone(), self.known.clone()));
        self.source = Some(source.clone());
        Ok(source)
    }

    /// A connection, made at the first call.
    fn connection(&mut self) -> Result<&mut dyn Connection, SourceError> {
        if self.connection.is_none() {
            self.connection = Some(self.open()?.connect()?);
        }
        Ok(self.connection.as_mut().expect("connected above").as_mut())
    }

    /// The source, and a connection to it if the mount needs it now (an
    /// unreachable source then fails the mount). One that is not the source
    /// the cache dir was filled from is not fetched from: the files that need
    /// it fail, saying why, and nothing held is dropped. Not needed, the
    /// source is not contacted, and need not be there at all.
    fn finish(
        mut self,
        need: Need,
        name: &str,
        resuming: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Reached, SourceError> {
        if need == Need::Later {
            return match self.open() {
                Ok(source) => Ok((source, self.connection)),
                // A mistake in SOURCE or its ssh config needs no network to be
                // found: a first mount says it, as it did when it connected first.
                Err(e @ SourceError::Config(_)) if !resuming => Err(e),
                // A successor must take the mount over whatever became of the
                // source: what is cached is served, what is not fails saying why.
                Err(e) => Ok((self.unopened(name, &e), self.connection)),
            };
        }
        if need == Need::Now {
            return match self.connection() {
                Ok(_) => Ok((self.open()?, self.connection)),
                Err(SourceError::NotTheSource(message)) => {
                    log::warn!("{message}");
                    warnings.push(message);
                    Ok((self.open()?, None))
                }
                Err(e) => Err(e),
            };
        }
        warnings.push(format!(
            "every file is in the cache dir: {name} is not contacted (the cache is the source: the old host is no \
             longer needed)"
        ));
        Ok((self.open_or_unopened(name), self.connection))
    }

    /// The source, or one whose every connection fails saying why it could
    /// not be opened (a local SOURCE or `-i` file gone since the first mount).
    fn open_or_unopened(&mut self, name: &str) -> Arc<CheckedSource> {
        self.open().unwrap_or_else(|e| self.unopened(name, &e))
    }

    /// A source whose every connection fails saying `why` it could not be opened.
    fn unopened(&self, name: &str, why: &SourceError) -> Arc<CheckedSource> {
        let unopened = identity::Unopened { name: name.to_string(), reason: why.to_string() };
        Arc::new(CheckedSource::new(Arc::new(unopened), self.spelling.clone(), self.known.clone()))
    }
}

/// `--prefetch-order recorded` without a file: the cache dir's recording (the
/// last restore of these images from this source, here), else the one
/// `shipped` with the images (by the manifest, or the push's index); for
/// the prefetch order, a warning when there is none (prefetch goes smallest-first).
fn find_recording(store: &Store, shipped: Option<&Recording>, for_order: bool) -> (Option<Recording>, Option<String>) {
    let (cached, damaged) = match recording::load_cached(store.dir()) {
        Ok(cached) => (cached, None),
        Err(e) => (None, Some(format!("{e}: ignored"))),
    };
    let found = cached.or_else(|| shipped.cloned());
    let none = (found.is_none() && for_order).then(|| {
        "--prefetch-order recorded: neither the cache dir nor the manifest holds a recording: prefetching \
         smallest-first (`lazyfs manifest --recording` ships one with the images, `lazyfs push --recording` \
         with the index)"
            .to_string()
    });
    (found, damaged.into_iter().chain(none).reduce(|a, b| format!("{a}; {b}")))
}

/// An object store's index is of the images it was pushed with: other
/// images would be served another checkpoint's files (verified, but not
/// theirs); and it is one their `lazyfs.pushed` names (`s3::pin`).
fn check_pushed_images(request: &MountRequest, pushed: &Index, source: &str) -> Result<(), MountError> {
    let mut hasher = blake3::Hasher::new();
    crate::images::hash_files(&request.imgdir, &mut hasher)
        .map_err(|(path, source)| MountError::Store(StoreError::Io { path, source }))?;
    if hasher.finalize().as_bytes() == &pushed.images {
        // The same images' hash is easily copied into a forged index: the images name the index itself.
        return crate::s3::pin::check(&request.imgdir, &pushed.id, source)
            .map_err(|reason| SourceError::Config(reason).into());
    }
    Err(SourceError::Config(format!(
        "{source} holds the files of other images (pushed from {}), not of {}: mount with those images, or \
         `lazyfs push {}` there first",
        pushed.origin,
        request.imgdir.display(),
        request.imgdir.display()
    ))
    .into())
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

/// The recording's runs on files this mount does not show yet (see
/// [`recording::later`]).
fn recorded_later(recording: &Recording, files: &[Arc<FetchFile>]) -> recording::Later {
    let shown: std::collections::HashSet<&[u8]> = files.iter().map(|f| f.path.as_os_str().as_bytes()).collect();
    recording::later(recording, |path| shown.contains(path))
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
    /// From the supervisor; `None` once it is gone.
    Supervisor(Option<Message>),
}

/// Mounts (or, for a successor, takes the live connection over), calls
/// `on_ready` once the mount answers, and serves until unmounted (by `lazyfs
/// umount`, a signal, or `umount`).
pub fn serve(
    prepared: Prepared,
    supervised: Option<Supervised>,
    on_ready: impl FnOnce(&Path),
) -> Result<(), MountError> {
    let request = &prepared.request;
    let mountpoint = request.mountpoint.clone();
    let mount_err = |source| MountError::Mount { path: mountpoint.clone(), source };
    let mut supervised = supervised;
    let resume = supervised.as_mut().and_then(|s| s.resume.take());
    if resume.is_none() {
        check_mountpoint(&mountpoint)?;
    }

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
    // A cloned descriptor is its process's: the requests read through it die
    // with it. Supervised, every thread reads the descriptor the supervisor
    // holds too, so a successor can have them sent again.
    config.clone_fd = supervised.is_none();
    let passthrough = Arc::new(AtomicBool::new(resume.as_ref().map_or(request.passthrough, |r| r.1.passthrough)));
    let mut adapter = FuseAdapter::new(prepared.fs.clone(), passthrough.clone());
    let mut link = None;
    let mut restarts = Restarts::default();
    if let Some(supervised) = supervised {
        let connection = resume.as_ref().map(|(fd, _)| fd.try_clone()).transpose().map_err(mount_err)?;
        adapter = adapter.supervised(supervised.connection, supervised.table, &supervised.held, connection);
        link = Some(supervised.link);
        restarts = supervised.restarts;
    }
    let resumed = resume.is_some();
    let (session, attachment) = match resume {
        None => {
            let session = fuser::Session::new(adapter, &mountpoint, &config).map_err(mount_err)?;
            let attachment = Attachment::of(&mountpoint).map_err(mount_err)?;
            if let (Some(link), Some(version)) = (&link, session.proto_version()) {
                let (device, mount_id) = attachment.numbers();
                let negotiated = Negotiated {
                    major: version.0,
                    minor: version.1,
                    passthrough: passthrough.load(Ordering::Relaxed),
                    device,
                    mount_id,
                };
                link.send(&Message::Mounted { negotiated }, &[session.as_fd()]).map_err(mount_err)?;
            }
            (session, Some(attachment))
        }
        Some((fd, negotiated)) => {
            let version = fuser::Version(negotiated.major, negotiated.minor);
            let attachment =
                (negotiated.device != 0).then(|| Attachment::known(negotiated.device, negotiated.mount_id));
            (fuser::Session::resume(adapter, fd, config.acl, config.clone(), version), attachment)
        }
    };
    // The kernel keeps pages across opens: a file fetched again must drop them.
    let notifier = session.notifier();
    if resumed {
        // What the predecessor read but never answered comes again, to us.
        // Before any thread of ours reads: the kernel resends every request
        // read and not answered, and one of ours would be made twice.
        match session.notifier().resend() {
            Ok(()) => log::info!("took over the mount; the kernel resends what was in flight"),
            Err(e) => log::warn!(
                "the kernel cannot resend the requests in flight (FUSE_NOTIFY_RESEND, Linux 6.9): {e}; \
                 their callers wait until the mount ends"
            ),
        }
    }
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
    // A detached mount (`umount -l`) a predecessor served is served on, for
    // the files still open under it: its path shows something else now.
    let detached = attachment.as_ref().is_some_and(Attachment::is_detached);
    let answered = detached
        || nix::sys::statfs::statfs(&mountpoint).map(|s| s.filesystem_type().0 == FUSE_SUPER_MAGIC).unwrap_or(false);
    if !answered {
        if !resumed {
            let _ = detach(&mountpoint);
        }
        return Err(mount_err(std::io::Error::other("the mount did not answer")));
    }
    if detached {
        log::info!("the mount was detached: serving the files still open under it");
    }
    let attachment = Arc::new(match attachment {
        Some(attachment) => attachment,
        None => Attachment::of(&mountpoint).map_err(mount_err)?,
    });
    let started = Instant::now();
    let meter = Arc::new(crate::status::Meter::new());
    sample_rate(&prepared.fs, &meter);
    // 0 once the supervisor is gone: nothing restarts the mount then.
    let supervisor_pid = Arc::new(AtomicU32::new(restarts.supervisor_pid));
    let status = {
        let fs = prepared.fs.clone();
        let request = request.clone();
        let source_name = prepared.source_name.clone();
        let meter = meter.clone();
        let attachment = attachment.clone();
        let restarts = restarts.clone();
        let supervisor_pid = supervisor_pid.clone();
        let binary = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        Arc::new(move |per_file| {
            let context = crate::status::Context { request: &request, source: &source_name, started, meter: &meter };
            let mut status = crate::status::snapshot(&fs, &context, per_file);
            if attachment.is_detached() {
                status.detached = true;
                status.holders = attachment.holders();
            }
            status.supervisor_pid = supervisor_pid.load(Ordering::Relaxed);
            status.restarts = restarts.count;
            status.last_restart_reason = restarts.last_reason.clone();
            status.version = env!("CARGO_PKG_VERSION").into();
            status.binary = binary.clone();
            status
        })
    };
    // What the last restore read of the tree is found (listed) before the
    // walk lists the rest, so it takes its recorded place in the queue.
    match (request.tree_root(), prepared.recorded_later.is_empty()) {
        (Some(root), false) => {
            let (fs, roots, paths) = (prepared.fs.clone(), vec![root.to_path_buf()], prepared.recorded_later.clone());
            std::thread::spawn(move || {
                locate(&fs, &roots, &paths);
                fs.walk_tree();
            });
        }
        _ => prepared.fs.walk_tree(),
    }
    let prefetch: control::PrefetchHook = {
        let (fs, jobs) = (prepared.fs.clone(), request.jobs);
        Arc::new(move |paths| start_prefetch(&fs, paths, jobs))
    };
    let locate: control::LocateHook = {
        let fs = prepared.fs.clone();
        let roots: Vec<PathBuf> =
            request.tree_root().map(|root| vec![request.mountpoint.clone(), root.to_path_buf()]).unwrap_or_default();
        Arc::new(move |paths| locate(&fs, &roots, paths))
    };
    let (control_tx, control_rx) = mpsc::channel();
    let server = control::Server::start(prepared.store.dir(), "control.sock", status, prefetch, locate, control_tx)
        .map_err(mount_err)?;
    let forward = events_tx.clone();
    std::thread::spawn(move || {
        for event in control_rx {
            let _ = forward.send(Event::Control(event));
        }
    });
    let mut entry = registry::Entry {
        mountpoint: mountpoint.clone(),
        socket: server.socket(),
        pid: std::process::id(),
        supervisor: restarts.supervisor_pid,
    };
    registry::register(&entry)?;
    if let Some(link) = &link {
        let reader = link.try_clone().map_err(mount_err)?;
        let forward = events_tx.clone();
        std::thread::spawn(move || {
            loop {
                let message = reader.recv().ok().flatten().map(|(message, _)| message);
                let gone = message.is_none();
                if forward.send(Event::Supervisor(message)).is_err() || gone {
                    return;
                }
            }
        });
    }

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
        "{} {} files of {} at {} from {}",
        if resumed { "serving" } else { "mounted" },
        prepared.fs.fetcher().files().len(),
        request.imgdir.display(),
        mountpoint.display(),
        prepared.source_name
    );
    // The supervisor first: once `lazyfs mount` has returned, a crash is one to recover from.
    if let Some(link) = &link
        && let Err(e) = link.send(&Message::Serving, &[])
    {
        log::warn!("telling the supervisor: {e}");
    }
    on_ready(&mountpoint);

    let mut umount_clients = Vec::new();
    let mut upgrade_clients = Vec::new();
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
                if attachment.is_detached() {
                    // Asked again, or detached by someone else (`umount -l`): a
                    // holder may never close, or wait on a request that never
                    // ends. Exiting closes /dev/fuse: the kernel then fails those
                    // requests and the files still open answer ENOTCONN.
                    log::warn!("signal {signal}: already detached: ending now");
                    break;
                }
                log::info!("signal {signal}: unmounting");
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
            Event::Control(ControlEvent::Upgrade(mut stream, binary)) => {
                let Some(link) = &link else {
                    let refused = match restarts.supervisor_pid {
                        0 => "this mount has no supervisor (mounted with -f): it cannot be handed over",
                        _ => {
                            "this mount's supervisor is gone (killed?): it cannot be handed over; \
                              `lazyfs umount` it and mount again"
                        }
                    };
                    control::upgrade_answer(&mut stream, Some(refused.into()));
                    continue;
                };
                // What arrived so far is kept: the successor need not fetch it again.
                if let Err(e) = prepared.fs.fetcher().journal().flush() {
                    log::warn!("flushing the journal before the upgrade: {e}");
                }
                match link.send(&Message::Upgrade { binary }, &[]) {
                    Ok(()) => upgrade_clients.push(stream),
                    Err(e) => control::upgrade_answer(&mut stream, Some(format!("asking the supervisor: {e}"))),
                }
            }
            Event::Supervisor(Some(Message::UpgradeAnswer { refused })) => {
                for mut stream in upgrade_clients.drain(..) {
                    control::upgrade_answer(&mut stream, refused.clone());
                }
                if refused.is_none()
                    && let Some(link) = &link
                    && let Err(e) = link.send(&Message::Release, &[])
                {
                    log::warn!("telling the supervisor: {e}");
                }
            }
            Event::Supervisor(Some(other)) => log::warn!("unexpected message from the supervisor: {other:?}"),
            Event::Supervisor(None) => {
                log::warn!("the supervisor is gone: this process serves on, but nothing restarts it if it dies");
                link = None;
                supervisor_pid.store(0, Ordering::Relaxed);
                entry.supervisor = 0;
                if let Err(e) = registry::register(&entry) {
                    log::warn!("{e}");
                }
            }
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
    // The mountpoint's claim and the cache dir's lock go before `lazyfs umount`
    // returns: a mount right after it finds both free.
    drop(prepared);
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
        self.fs.sync_listings();
        let mut snapshot = fetcher.snapshot();
        snapshot.extend(self.outside.iter().cloned());
        // The local layer as it is, not every change that led there: a
        // replay takes as long as what is there, not as the mount's history.
        let (local_changes, gone_files) = self.fs.compacted_local_changes();
        snapshot.extend(local_changes.into_iter().map(journal::local_record));
        let identity = self.owner.identity.clone().map(|i| CacheIdentity { source: Some(self.source.known()), ..i });
        let owner = Owner { identity, ..self.owner.clone() };
        match Journal::create(self.store.dir(), &owner, snapshot, Vec::new()) {
            // Named by no record any more (a crash before this keeps them as lost+found).
            Ok(_) => gone_files.into_iter().for_each(|id| self.fs.remove_local_file(id)),
            Err(e) => log::error!("compacting the journal: {e}"),
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

/// Looks each path up through the namespace, name by name, so that every
/// directory on its way is listed (a lookup waits for its directory's
/// listing): a file of the tree nothing has listed yet then has an owner in
/// the fetcher. A path is taken below each of `roots` (the mountpoint, then
/// the tree's root on the source); one below none of them is left alone.
fn locate(fs: &Filesystem, roots: &[PathBuf], paths: &[Vec<u8>]) {
    for path in paths {
        let path = Path::new(std::ffi::OsStr::from_bytes(path));
        for below in roots.iter().filter_map(|root| path.strip_prefix(root).ok()) {
            let _ = below.iter().try_fold(ROOT_INO, |dir, name| fs.lookup(dir, name).map(|a| a.ino));
        }
    }
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
