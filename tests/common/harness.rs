//! The filesystem core without FUSE: `mount::prepare_with` over a local
//! directory seen through a fault-injecting source, driven by direct calls.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lazyfs::cli::PrefetchOrder;
use lazyfs::fs::{Filesystem, SetAttr};
use lazyfs::images::write::{DumpFile, write_dump};
use lazyfs::mount::{MountError, MountRequest, Prepared, prepare_with};
use lazyfs::namespace::{Layout, ROOT_INO};
use lazyfs::source::{Connection, Listings, Source, SourceAttrs, SourceError, SourceSpec, SourceStat};

const WAIT: Duration = Duration::from_secs(60);
const BY: lazyfs::fs::Creator = lazyfs::fs::Creator { uid: 0, gid: 0 };

/// What a read of the source does instead of (or before) reading.
pub enum Fault {
    Pass,
    /// The connection drops (a reconnect may help).
    Lost,
    /// The file ends before the bytes asked for.
    Short,
    /// Bytes that are not the file's.
    Garbage,
    /// Waits until the gate opens, then reads.
    Stall(Arc<Gate>),
    Panic,
}

/// A gate a stalled read waits at.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

type Hook = Box<dyn FnMut(&Path, u64, usize) -> Fault + Send>;
type StatHook = Box<dyn FnMut(&Path) + Send>;
/// Decides a directory's listing: `Some(error)` fails it, `None` lists it.
type ListHook = Arc<dyn Fn(&Path) -> Option<SourceError> + Send + Sync>;

/// Decides what each read of the source does (and what happens before each
/// stat); counts the reads.
#[derive(Default)]
pub struct Plan {
    hook: Mutex<Option<Hook>>,
    stat_hook: Mutex<Option<StatHook>>,
    list_hook: Mutex<Option<ListHook>>,
    pub reads: AtomicUsize,
    /// Directories listed on the source.
    pub listed: AtomicUsize,
}

impl Plan {
    /// From now on `hook(path)` runs before each stat of the source.
    pub fn on_stat(&self, hook: impl FnMut(&Path) + Send + 'static) {
        *self.stat_hook.lock().unwrap() = Some(Box::new(hook));
    }

    /// From now on `hook(dir)` decides each directory's listing (a directory
    /// the source refuses, or one it stalls on).
    pub fn on_list(&self, hook: impl Fn(&Path) -> Option<SourceError> + Send + Sync + 'static) {
        *self.list_hook.lock().unwrap() = Some(Arc::new(hook));
    }

    /// From now on `hook(path, offset, len)` decides each read.
    pub fn on_read(&self, hook: impl FnMut(&Path, u64, usize) -> Fault + Send + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(hook));
    }

    pub fn clear(&self) {
        *self.hook.lock().unwrap() = None;
    }

    fn fault(&self, path: &Path, offset: u64, len: usize) -> Fault {
        self.reads.fetch_add(1, Ordering::Relaxed);
        match self.hook.lock().unwrap().as_mut() {
            Some(hook) => hook(path, offset, len),
            None => Fault::Pass,
        }
    }
}

/// A local directory whose reads go through a [`Plan`].
pub struct FaultSource {
    inner: Box<dyn Source>,
    plan: Arc<Plan>,
}

impl Source for FaultSource {
    fn connect_within(&self, time: std::time::Duration) -> Result<Box<dyn Connection>, SourceError> {
        Ok(Box::new(FaultConnection { inner: self.inner.connect_within(time)?, plan: self.plan.clone() }))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct FaultConnection {
    inner: Box<dyn Connection>,
    plan: Arc<Plan>,
}

impl Connection for FaultConnection {
    fn shows(&self) -> Option<lazyfs::source::Shown> {
        self.inner.shows()
    }

    fn stat(&mut self, path: &Path) -> Result<SourceStat, SourceError> {
        if let Some(hook) = self.plan.stat_hook.lock().unwrap().as_mut() {
            hook(path);
        }
        self.inner.stat(path)
    }

    fn attrs(&mut self, path: &Path) -> Result<SourceAttrs, SourceError> {
        self.inner.attrs(path)
    }

    fn list_dirs(&mut self, dirs: &[&Path]) -> Result<Listings, SourceError> {
        self.plan.listed.fetch_add(dirs.len(), Ordering::Relaxed);
        let mut listings = self.inner.list_dirs(dirs)?;
        // Called outside the lock: a hook holding one lane's listing holds no other's.
        let hook = self.plan.list_hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            for (dir, listing) in dirs.iter().zip(listings.iter_mut()) {
                if let Some(error) = hook(dir) {
                    *listing = Err(error);
                }
            }
        }
        Ok(listings)
    }

    fn read_exact_at(&mut self, path: &Path, generation: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        match self.plan.fault(path, offset, buf.len()) {
            Fault::Pass => {}
            Fault::Lost => return Err(SourceError::Session { host: "fault".into(), message: "dropped".into() }),
            Fault::Short => {
                let end = offset + buf.len() as u64 / 2;
                return Err(SourceError::Short { path: path.into(), end, wanted: offset + buf.len() as u64 });
            }
            Fault::Garbage => {
                buf.fill(0xee);
                return Ok(());
            }
            Fault::Stall(gate) => gate.wait(),
            Fault::Panic => panic!("a reply nobody expected"),
        }
        self.inner.read_exact_at(path, generation, offset, buf)
    }
}

/// Replaces `path` atomically by a file holding `bytes`, with an mtime 10 s
/// ahead (a new version, as a rename by an editor or a package manager makes).
pub fn replace_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("lazyfs-test-tmp");
    std::fs::write(&tmp, bytes).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(later).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A checkpoint of some files, their source, a cache dir, and the core
/// mounted over them (or not).
pub struct Core {
    pub dir: tempfile::TempDir,
    pub plan: Arc<Plan>,
    pub cache: PathBuf,
    pub images: PathBuf,
    pub source: PathBuf,
    /// `--subtree` (the whole directory of the source below it).
    pub subtree: Option<PathBuf>,
    prepared: Option<Prepared>,
}

impl Core {
    /// `files`: path, contents, whether the images record the size.
    pub fn new(files: &[(&str, Vec<u8>, bool)]) -> Core {
        let dir = tempfile::Builder::new().prefix("lazyfs-core").tempdir().unwrap();
        let (images, source, cache) = (dir.path().join("images"), dir.path().join("source"), dir.path().join("cache"));
        Core::write_checkpoint(&images, &source, files);
        // The core checks its mountpoint (empty, there), though it mounts nothing.
        std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
        Core { dir, plan: Arc::default(), cache, images, source, subtree: None, prepared: None }
    }

    /// Writes the images of `files` into `images` and their bytes below `source`.
    pub fn write_checkpoint(images: &Path, source: &Path, files: &[(&str, Vec<u8>, bool)]) {
        let mut dump = Vec::new();
        for (path, bytes, sized) in files {
            let at = source.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::fs::write(&at, bytes).unwrap();
            let mut file = DumpFile::new(*path, bytes.len() as u64);
            if !sized {
                file.size = None;
            }
            dump.push(file);
        }
        write_dump(images, &dump).unwrap();
    }

    /// Writes the manifest of the images' files as the source has them now.
    pub fn write_manifest(&self) {
        let checkpoint = lazyfs::images::Checkpoint::load(&self.images).unwrap();
        let output = self.images.join(lazyfs::manifest::DEFAULT_NAME);
        lazyfs::manifest::create(&checkpoint, &self.source, None, None, &output).unwrap();
    }

    pub fn request(&self, jobs: usize) -> MountRequest {
        let manifest = Some(self.images.join(lazyfs::manifest::DEFAULT_NAME)).filter(|p| p.exists());
        MountRequest {
            mountpoint: self.dir.path().join("mnt"),
            imgdir: self.images.clone(),
            source_arg: self.source.display().to_string(),
            source: SourceSpec::Local(self.source.clone()),
            source_root: PathBuf::from("/"),
            layout: Layout::Tree,
            subtree: self.subtree.clone(),
            cache_dir: self.cache.clone(),
            read_only: false,
            allow_other: false,
            prefetch: jobs > 0,
            passthrough: false,
            reconnect_timeout: Duration::from_secs(2),
            wait_for_source: false,
            replay: true,
            jobs,
            order: PrefetchOrder::SmallestFirst,
            manifest,
            discard_local_changes: false,
            recover_journal: false,
            recorded_only: false,
        }
    }

    /// Prepares the core over the source (prefetch with `jobs` workers, none for 0).
    pub fn mount(&mut self, jobs: usize) -> Result<(), MountError> {
        self.mount_with(jobs, |_| {})
    }

    /// [`Core::mount`] with the request changed by `edit` first.
    pub fn mount_with(&mut self, jobs: usize, edit: impl FnOnce(&mut MountRequest)) -> Result<(), MountError> {
        assert!(self.prepared.is_none(), "mounted already");
        let mut request = self.request(jobs);
        edit(&mut request);
        let prepared = self.prepare_request(request)?;
        self.prepared = Some(prepared);
        Ok(())
    }

    /// The core, prepared for `mount::serve` (a real FUSE mount).
    pub fn prepare(&self, jobs: usize) -> Result<Prepared, MountError> {
        self.prepare_request(self.request(jobs))
    }

    /// Prepares `request`, its source seen through the fault plan.
    pub fn prepare_request(&self, request: MountRequest) -> Result<Prepared, MountError> {
        let plan = self.plan.clone();
        let (spec, root) = (request.source.clone(), request.source_root.clone());
        prepare_with(request, move || {
            let inner = lazyfs::source::open(&spec, &root)?;
            Ok(Arc::new(FaultSource { inner, plan }) as Arc<dyn Source>)
        })
    }

    /// A clean unmount: the journal is compacted.
    pub fn unmount(&mut self) {
        self.prepared.take().expect("mounted").finish();
    }

    /// The process dies: nothing more is written than the journal had.
    pub fn kill(&mut self) {
        let prepared = self.prepared.take().expect("mounted");
        let _ = prepared.fs.fetcher().stop();
    }

    pub fn fs(&self) -> &std::sync::Arc<Filesystem> {
        &self.prepared.as_ref().expect("mounted").fs
    }

    pub fn ino(&self, path: &str) -> u64 {
        self.try_ino(path).unwrap_or_else(|e| panic!("{path}: errno {e}"))
    }

    /// The inode at `path` (below the mount's root), or the errno of the lookup.
    pub fn try_ino(&self, path: &str) -> Result<u64, i32> {
        let mut ino = ROOT_INO;
        for name in Path::new(path).iter().skip(1) {
            ino = self.fs().lookup(ino, name).map_err(|e| e.errno)?.ino;
        }
        Ok(ino)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.try_ino(path).is_ok()
    }

    /// The directory of `path` and its name.
    fn parent(&self, path: &str) -> Result<(u64, std::ffi::OsString), i32> {
        let path = Path::new(path);
        let dir = path.parent().and_then(Path::to_str).unwrap_or("/");
        Ok((self.try_ino(dir)?, path.file_name().expect("a name").to_os_string()))
    }

    /// Creates a file (and closes it).
    pub fn create(&self, path: &str) -> Result<u64, i32> {
        let (dir, name) = self.parent(path)?;
        let (attr, _) = self.fs().create(dir, &name, 0o644, BY).map_err(|e| e.errno)?;
        self.fs().release(attr.ino);
        Ok(attr.ino)
    }

    pub fn mkdir(&self, path: &str) -> Result<u64, i32> {
        let (dir, name) = self.parent(path)?;
        self.fs().mkdir(dir, &name, 0o755, BY).map(|a| a.ino).map_err(|e| e.errno)
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<(), i32> {
        let ((dir, name), (to_dir, to_name)) = (self.parent(from)?, self.parent(to)?);
        self.fs().rename(dir, &name, to_dir, &to_name, 0).map_err(|e| e.errno)
    }

    pub fn unlink(&self, path: &str) -> Result<(), i32> {
        let (dir, name) = self.parent(path)?;
        self.fs().unlink(dir, &name).map_err(|e| e.errno)
    }

    /// The names in directory `path`.
    pub fn list(&self, path: &str) -> Vec<String> {
        let entries = self.fs().readdir(self.ino(path)).unwrap();
        entries.into_iter().skip(2).map(|(_, _, name)| name.to_string_lossy().into_owned()).collect()
    }

    fn index(&self, path: &str) -> usize {
        self.fs().fetcher().files().iter().position(|f| f.path == Path::new(path)).unwrap()
    }

    /// The file's state, as `lazyfs status` says it.
    pub fn state(&self, path: &str) -> String {
        self.fs().fetcher().file(self.index(path)).phase().state().word().to_string()
    }

    pub fn len(&self, path: &str) -> u64 {
        self.fs().getattr(self.ino(path)).unwrap().size
    }

    pub fn read(&self, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        self.read_later(path, offset, len).recv_timeout(WAIT).expect("the read was never answered")
    }

    /// Starts a read and returns where its answer will arrive.
    pub fn read_later(&self, path: &str, offset: u64, len: u32) -> mpsc::Receiver<Result<Vec<u8>, i32>> {
        let (tx, rx) = mpsc::channel();
        self.fs().read(
            self.ino(path),
            offset,
            len,
            Box::new(move |r| {
                let _ = tx.send(r.map(|b| b.to_vec()).map_err(|e| e.errno));
            }),
        );
        rx
    }

    pub fn write(&self, path: &str, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let (tx, rx) = mpsc::channel();
        self.fs().write(
            self.ino(path),
            offset,
            data.to_vec(),
            false,
            Box::new(move |r| {
                let _ = tx.send(r.map_err(|e| e.errno));
            }),
        );
        rx.recv_timeout(WAIT).expect("the write was never answered")
    }

    pub fn truncate(&self, path: &str, size: u64) -> Result<u64, i32> {
        let (tx, rx) = mpsc::channel();
        let change = SetAttr { size: Some(size), ..SetAttr::default() };
        self.fs().setattr(
            self.ino(path),
            change,
            Box::new(move |r| {
                let _ = tx.send(r.map(|a| a.size).map_err(|e| e.errno));
            }),
        );
        rx.recv_timeout(WAIT).expect("the truncate was never answered")
    }

    /// Waits until `done` holds of the file's state.
    pub fn wait_state(&self, path: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.state(path);
            if done(&state) {
                return state;
            }
            assert!(Instant::now() < deadline, "{path}: still {state}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Why the mount is degraded, if it is.
    pub fn degraded(&self) -> Option<String> {
        self.fs().fetcher().degraded()
    }
}
