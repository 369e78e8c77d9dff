//! The names a mount shows: each served file's original path (`tree`) or the
//! Go prototype's flat name (`flat`), below an optional `--subtree`, with an
//! inode number for every file and synthesised directory; then whatever the
//! local layer changed (files, directories, links made, renamed, removed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;
/// The largest inode number a manifest may give a node: lazyfs numbers its
/// own nodes after the manifest's largest, and must never run out (a
/// manifest is untrusted; `u64::MAX` would overflow).
pub const MAX_KEPT_INO: Ino = u64::MAX / 2;

/// `ino` if a node may keep it (the old host's number, from a manifest).
pub fn kept_ino(ino: Ino) -> Option<Ino> {
    (ROOT_INO < ino && ino <= MAX_KEPT_INO).then_some(ino)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `/srv/app/db` at `MOUNTPOINT/srv/app/db`.
    Tree,
    /// `/srv/app/db` at `MOUNTPOINT/srv.app.db`.
    Flat,
}

#[derive(Debug)]
pub struct Node {
    /// Where it appears: (directory, name). A directory has one; a file one
    /// per hard link, none once unlinked while still open.
    pub links: Vec<(Ino, OsString)>,
    pub kind: NodeKind,
    pub meta: Meta,
    pub origin: Origin,
}

/// Where a node comes from: what a remount, or a process taking over the
/// mount, finds it again by (the namespace is rebuilt the same way from the
/// images, the persisted listings and the journal).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A file of the images or of the tree: the fetcher's file its
    /// [`NodeKind::File`] names (whose path says where).
    File,
    /// The root, or a directory, symlink or FIFO of the images or the source:
    /// its path below the mount's root where it first appeared (empty for
    /// the root).
    Source(Box<Path>),
    /// Made through the mount by the local change with this number (counted
    /// from 0 in the order the journal keeps them).
    Local(u64),
}

#[derive(Debug)]
pub enum NodeKind {
    Dir(BTreeMap<OsString, Ino>),
    /// Index into the list of files the namespace was built from.
    File(usize),
    /// A file made through the mount: its bytes are in local data file `id`.
    Local(u64),
    Symlink(OsString),
    Fifo,
}

/// The attributes a node keeps (its size is its bytes').
#[derive(Debug, Clone)]
pub struct Meta {
    /// Permission bits only.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
    /// A directory's size as the source reports it.
    pub dir_size: u64,
    /// The attributes changed through the mount (chmod, chown, utimens): a
    /// listing of its directory leaves those as they are, and gives the others.
    pub changed_locally: LocalAttrs,
}

/// Which attributes of a node were changed through the mount.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LocalAttrs {
    pub perm: bool,
    pub uid: bool,
    pub gid: bool,
    pub atime: bool,
    pub mtime: bool,
}

impl Default for Meta {
    fn default() -> Self {
        let t = SystemTime::UNIX_EPOCH;
        Meta {
            perm: 0o755,
            uid: 0,
            gid: 0,
            atime: t,
            mtime: t,
            ctime: t,
            xattrs: BTreeMap::new(),
            dir_size: 0,
            changed_locally: LocalAttrs::default(),
        }
    }
}

/// Where a namespace's inode numbers come from. A number is never given
/// twice; a node whose origin had a number gets it again.
pub trait Numbers: std::fmt::Debug + Send + Sync {
    /// The number for a new node known by `key` (none: it has no stable key).
    fn number(&mut self, key: Option<&[u8]>) -> Ino;
    /// Numbers up to `max` are not to be given (a manifest gives them).
    fn reserve_up_to(&mut self, max: Ino);
    /// The namespace is built: from now on each number is kept where a
    /// successor finds it as it is given (until now, in one go).
    fn settle(&mut self) {}
    /// Keeps the numbers in cache dir `dir` from now on (a fresh mount's).
    fn keep_in(&mut self, _dir: &crate::store::CacheDir) -> Result<(), crate::store::StoreError> {
        Ok(())
    }
}

/// Numbers in order, for a mount nobody takes over (`mount -f`, tests).
#[derive(Debug)]
pub struct Counter(Ino);

impl Default for Counter {
    fn default() -> Self {
        Counter(ROOT_INO + 1)
    }
}

impl Numbers for Counter {
    fn number(&mut self, _key: Option<&[u8]>) -> Ino {
        self.0 += 1;
        self.0 - 1
    }

    fn reserve_up_to(&mut self, max: Ino) {
        self.0 = self.0.max(max.saturating_add(1));
    }
}

#[derive(Debug)]
pub struct Namespace {
    nodes: HashMap<Ino, Node>,
    numbers: Box<dyn Numbers>,
    /// Inode of each file, by index; `None` for files outside the subtree.
    file_inos: Vec<Option<Ino>>,
    /// Directories of the source whose entries are not listed yet (with
    /// `--subtree`, every directory at first): the images' names in them
    /// are served at once, any other name waits for the listing.
    unlisted: HashSet<Ino>,
    /// Directories whose mode the images record (a process's working
    /// directory or root, one opened `O_DIRECTORY` or `O_PATH`): CRIU checks
    /// it, so a listing keeps it.
    pinned: HashSet<Ino>,
    /// Directories of the source that could not be listed for good (gone,
    /// no longer a directory, refused), and why: they show only what the
    /// images and the local layer put in them.
    failed: HashMap<Ino, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("--layout flat gives {} and {} the same name {:?}: mount them with --layout tree", first.display(), second.display(), name)]
    FlatCollision { first: PathBuf, second: PathBuf, name: OsString },
    #[error("{} is recorded as a file and as a directory of {}: the images contradict themselves", file.display(), other.display())]
    TreeConflict { file: PathBuf, other: PathBuf },
    #[error("--subtree {}: must be an absolute path", .0.display())]
    SubtreeNotAbsolute(PathBuf),
    #[error("no servable file is recorded below --subtree {} (`lazyfs ls IMGDIR` lists them)", .0.display())]
    EmptySubtree(PathBuf),
}

impl Namespace {
    /// `paths` are the original absolute paths of the files to serve, each once.
    pub fn build(paths: &[&Path], layout: Layout, subtree: Option<&Path>) -> Result<Namespace, NamespaceError> {
        Self::build_numbered(paths, layout, subtree, Box::new(Counter::default()))
    }

    /// [`Namespace::build`], each node numbered by `numbers`.
    pub fn build_numbered(
        paths: &[&Path],
        layout: Layout,
        subtree: Option<&Path>,
        numbers: Box<dyn Numbers>,
    ) -> Result<Namespace, NamespaceError> {
        let ns = Self::build_files(paths, layout, subtree, &HashMap::new(), numbers)?;
        if ns.file_inos.iter().all(Option::is_none) && !paths.is_empty() {
            return Err(NamespaceError::EmptySubtree(subtree.unwrap_or(Path::new("/")).to_path_buf()));
        }
        Ok(ns)
    }

    /// The names of `--subtree` (tree layout): the recorded files below it,
    /// in directories not listed yet, the root and every directory made for
    /// them included. `inos` are inode numbers to give files and those
    /// directories by original path (those a manifest made on the old host
    /// records); a subtree with no recorded file is a valid mount.
    pub fn build_tree(
        paths: &[&Path],
        subtree: &Path,
        inos: &HashMap<&Path, Ino>,
        numbers: Box<dyn Numbers>,
    ) -> Result<Namespace, NamespaceError> {
        let mut ns = Self::build_files(paths, Layout::Tree, Some(subtree), inos, numbers)?;
        ns.unlisted = ns.nodes.iter().filter(|(_, n)| matches!(n.kind, NodeKind::Dir(_))).map(|(&i, _)| i).collect();
        Ok(ns)
    }

    fn build_files(
        paths: &[&Path],
        layout: Layout,
        subtree: Option<&Path>,
        inos: &HashMap<&Path, Ino>,
        mut numbers: Box<dyn Numbers>,
    ) -> Result<Namespace, NamespaceError> {
        let subtree = subtree.unwrap_or(Path::new("/"));
        if !subtree.is_absolute() {
            return Err(NamespaceError::SubtreeNotAbsolute(subtree.to_path_buf()));
        }
        let root = Node {
            links: Vec::new(),
            kind: NodeKind::Dir(BTreeMap::new()),
            meta: Meta::default(),
            origin: Origin::Source(Path::new("").into()),
        };
        // Inode numbers the manifest gives stay free for their files.
        numbers.reserve_up_to(inos.values().max().map_or(ROOT_INO, |&max| max.max(ROOT_INO)));
        let mut ns = Namespace {
            nodes: HashMap::from([(ROOT_INO, root)]),
            numbers,
            file_inos: vec![None; paths.len()],
            unlisted: HashSet::new(),
            pinned: HashSet::new(),
            failed: HashMap::new(),
        };
        // Which original path owns each name, for error messages.
        let mut owners: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
        for (index, path) in paths.iter().enumerate() {
            let Some(below) = path.strip_prefix(subtree).ok().filter(|p| !p.as_os_str().is_empty()) else {
                continue;
            };
            let components: Vec<OsString> = match layout {
                Layout::Tree => below.iter().map(OsStr::to_os_string).collect(),
                Layout::Flat => vec![flat_name(below)],
            };
            let mount_path: PathBuf = components.iter().collect();
            if let Some(first) = owners.get(&mount_path) {
                return Err(match layout {
                    Layout::Flat => NamespaceError::FlatCollision {
                        first: first.clone(),
                        second: path.to_path_buf(),
                        name: components[0].clone(),
                    },
                    Layout::Tree => NamespaceError::TreeConflict { file: first.clone(), other: path.to_path_buf() },
                });
            }
            owners.insert(mount_path, path.to_path_buf());
            ns.file_inos[index] = Some(ns.insert(&components, index, (subtree, inos), path, &owners)?);
        }
        Ok(ns)
    }

    /// Makes the directories the images record below `subtree` (those
    /// missing), each with the mode recorded: CRIU checks it at restore.
    pub fn add_recorded_dirs(&mut self, dirs: &[(&Path, u32)], subtree: &Path) {
        for &(path, perm) in dirs {
            let Ok(below) = path.strip_prefix(subtree) else { continue };
            let mut dir = ROOT_INO;
            let mut walked = PathBuf::new();
            for name in below.iter() {
                walked.push(name);
                dir = match self.lookup(dir, name) {
                    Some(child) if matches!(self.nodes[&child].kind, NodeKind::Dir(_)) => child,
                    // A recorded file has that name: the images contradict themselves; the file stays.
                    Some(_) => break,
                    None => {
                        let origin = Origin::Source(walked.clone().into_boxed_path());
                        let child = self.add(dir, name, NodeKind::Dir(BTreeMap::new()), Meta::default(), origin);
                        if self.unlisted.contains(&dir) {
                            self.unlisted.insert(child);
                        }
                        child
                    }
                };
            }
            if walked == below
                && let Some(node) = self.nodes.get_mut(&dir)
            {
                node.meta.perm = perm & 0o7777;
                self.pinned.insert(dir);
            }
        }
    }

    /// Puts the file `path` (original) at `components` below the root, with
    /// the directories on the way; each takes its number in `inos` (by
    /// original path, below `subtree`) if it has one.
    fn insert(
        &mut self,
        components: &[OsString],
        index: usize,
        (subtree, inos): (&Path, &HashMap<&Path, Ino>),
        path: &Path,
        owners: &BTreeMap<PathBuf, PathBuf>,
    ) -> Result<Ino, NamespaceError> {
        let (file_name, dirs) = components.split_last().expect("a path below the root has a name");
        let mut dir = ROOT_INO;
        let mut walked = PathBuf::new();
        for name in dirs {
            walked.push(name);
            let child = match self.lookup(dir, name) {
                Some(child) => child,
                None => {
                    let origin = Origin::Source(walked.clone().into_boxed_path());
                    let ino = inos.get(subtree.join(&walked).as_path()).copied();
                    self.add_as(ino, dir, name, NodeKind::Dir(BTreeMap::new()), Meta::default(), origin)
                }
            };
            if matches!(self.nodes[&child].kind, NodeKind::File(_)) {
                let file = owners.get(&walked).cloned().unwrap_or_else(|| walked.clone());
                return Err(NamespaceError::TreeConflict { file, other: path.to_path_buf() });
            }
            dir = child;
        }
        match self.lookup(dir, file_name) {
            None => {
                let ino = inos.get(path).copied();
                Ok(self.add_as(ino, dir, file_name, NodeKind::File(index), Meta::default(), Origin::File))
            }
            Some(_) => {
                // A directory synthesised for deeper files already has this name.
                let dir = walked.join(file_name);
                let other = owners
                    .iter()
                    .find(|(mount_path, _)| mount_path.starts_with(&dir) && **mount_path != dir)
                    .map_or(dir.clone(), |(_, original)| original.clone());
                Err(NamespaceError::TreeConflict { file: path.to_path_buf(), other })
            }
        }
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn node_mut(&mut self, ino: Ino) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn nodes_mut(&mut self) -> impl Iterator<Item = &mut Node> {
        self.nodes.values_mut()
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        match &self.node(parent)?.kind {
            NodeKind::Dir(children) => children.get(name).copied(),
            _ => None,
        }
    }

    /// The inode at `path` (relative to the root), if any.
    pub fn resolve(&self, path: &Path) -> Option<Ino> {
        path.iter().try_fold(ROOT_INO, |dir, name| self.lookup(dir, name))
    }

    /// A new node named `name` in directory `parent` (which must not hold the name yet).
    pub fn add(&mut self, parent: Ino, name: &OsStr, kind: NodeKind, meta: Meta, origin: Origin) -> Ino {
        self.add_as(None, parent, name, kind, meta, origin)
    }

    /// [`Namespace::add`], with inode number `wanted` if it is free (the
    /// number the old host gave it, from a manifest).
    pub fn add_as(
        &mut self,
        wanted: Option<Ino>,
        parent: Ino,
        name: &OsStr,
        kind: NodeKind,
        meta: Meta,
        origin: Origin,
    ) -> Ino {
        let ino = match wanted.filter(|&i| i > ROOT_INO && !self.nodes.contains_key(&i)) {
            Some(ino) => ino,
            None => {
                let key = self.origin_key(&origin, parent, name);
                match self.numbers.number(key.as_deref()) {
                    // Its origin's number, still taken (a node of that origin unlinked but open).
                    ino if ino <= ROOT_INO || self.nodes.contains_key(&ino) => self.numbers.number(None),
                    ino => ino,
                }
            }
        };
        self.nodes.insert(ino, Node { links: Vec::new(), kind, meta, origin });
        self.link(ino, parent, name);
        ino
    }

    /// Where the numbers are kept; see [`Numbers`].
    pub fn numbers_mut(&mut self) -> &mut dyn Numbers {
        self.numbers.as_mut()
    }

    /// What a node of `origin` named `name` in `parent` is known by, in
    /// every process serving the mount: a file by the path it first appears
    /// at, a node of the source by its path, a local one by its change.
    fn origin_key(&self, origin: &Origin, parent: Ino, name: &OsStr) -> Option<Vec<u8>> {
        let key = |tag: &[u8], bytes: &[u8]| [tag, bytes].concat();
        match origin {
            Origin::File => Some(key(b"file\0", self.mount_path(parent).join(name).as_os_str().as_bytes())),
            Origin::Source(path) => Some(key(b"source\0", path.as_os_str().as_bytes())),
            Origin::Local(change) => Some(key(b"local\0", &change.to_le_bytes())),
        }
    }

    /// File `index` (of the fetcher's) is node `ino`.
    pub fn set_file_ino(&mut self, index: usize, ino: Ino) {
        if self.file_inos.len() <= index {
            self.file_inos.resize(index + 1, None);
        }
        self.file_inos[index] = Some(ino);
    }

    /// Whether directory `ino` is still to be listed.
    pub fn is_unlisted(&self, ino: Ino) -> bool {
        self.unlisted.contains(&ino)
    }

    /// Directory `ino` is a directory of the source not listed yet (or no longer to be listed).
    pub fn set_unlisted(&mut self, ino: Ino, unlisted: bool) {
        if unlisted {
            self.unlisted.insert(ino);
        } else {
            self.unlisted.remove(&ino);
        }
    }

    /// Directories still to be listed.
    pub fn unlisted(&self) -> impl Iterator<Item = Ino> + '_ {
        self.unlisted.iter().copied()
    }

    pub fn unlisted_count(&self) -> usize {
        self.unlisted.len()
    }

    /// Directory `ino` could not be listed, for good: `why`.
    pub fn set_failed(&mut self, ino: Ino, why: String) {
        self.failed.insert(ino, why);
    }

    /// Directories that could not be listed, and why.
    pub fn failed(&self) -> impl Iterator<Item = (Ino, &str)> + '_ {
        self.failed.iter().map(|(&ino, why)| (ino, why.as_str()))
    }

    /// Whether the images record directory `ino`'s mode.
    pub fn is_pinned(&self, ino: Ino) -> bool {
        self.pinned.contains(&ino)
    }

    /// Where the source has directory (or symlink, FIFO) `ino`, below the mount's root.
    pub fn source_path(&self, ino: Ino) -> Option<&Path> {
        match &self.node(ino)?.origin {
            Origin::Source(path) => Some(path),
            _ => None,
        }
    }

    /// Names `ino` `name` in directory `parent` too (which must not hold the name yet).
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(NodeKind::Dir(children)) = self.nodes.get_mut(&parent).map(|n| &mut n.kind) {
            children.insert(name.to_os_string(), ino);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links.push((parent, name.to_os_string()));
        }
    }

    /// Takes `name` out of directory `parent`; returns the inode it named.
    /// The node stays (with one link fewer) until [`Namespace::remove`].
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Option<Ino> {
        let Some(NodeKind::Dir(children)) = self.nodes.get_mut(&parent).map(|n| &mut n.kind) else { return None };
        let ino = children.remove(name)?;
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links.retain(|(dir, n)| !(*dir == parent && n == name));
        }
        Some(ino)
    }

    /// Takes node `ino` away for good: a directory removed is no longer one
    /// to list.
    pub fn remove(&mut self, ino: Ino) -> Option<Node> {
        self.unlisted.remove(&ino);
        self.pinned.remove(&ino);
        self.failed.remove(&ino);
        self.nodes.remove(&ino)
    }

    /// Whether `ino` is `dir` or below it.
    pub fn is_within(&self, mut ino: Ino, dir: Ino) -> bool {
        loop {
            if ino == dir {
                return true;
            }
            match self.node(ino).and_then(|n| n.links.first()) {
                Some(&(parent, _)) if ino != ROOT_INO => ino = parent,
                _ => return false,
            }
        }
    }

    /// The inode of file `index`, if the subtree holds it.
    pub fn file_ino(&self, index: usize) -> Option<Ino> {
        self.file_inos.get(index).copied().flatten()
    }

    /// Where inode `ino` appears, relative to the mount's root.
    pub fn mount_path(&self, ino: Ino) -> PathBuf {
        let mut names = Vec::new();
        let mut at = ino;
        while at != ROOT_INO {
            let Some((parent, name)) = self.node(at).and_then(|n| n.links.first()) else { break };
            names.push(name.as_os_str());
            at = *parent;
        }
        names.iter().rev().collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }
}

/// The Go prototype's name: the path without its leading `/`, every other `/` as `.`.
pub fn flat_name(relative: &Path) -> OsString {
    let bytes = relative.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    OsString::from_vec(bytes.iter().map(|&b| if b == b'/' { b'.' } else { b }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(paths: &[&str], layout: Layout, subtree: Option<&str>) -> Result<Namespace, NamespaceError> {
        let paths: Vec<&Path> = paths.iter().map(Path::new).collect();
        Namespace::build(&paths, layout, subtree.map(Path::new))
    }

    #[test]
    fn tree_synthesises_parents() {
        let ns = build(&["/srv/app/db", "/srv/app/log", "/etc/x"], Layout::Tree, None).unwrap();
        let srv = ns.lookup(ROOT_INO, OsStr::new("srv")).unwrap();
        let app = ns.lookup(srv, OsStr::new("app")).unwrap();
        let db = ns.lookup(app, OsStr::new("db")).unwrap();
        assert!(matches!(ns.node(db).unwrap().kind, NodeKind::File(0)));
        assert_eq!(ns.file_ino(1).map(|i| ns.mount_path(i)), Some(PathBuf::from("srv/app/log")));
        assert_eq!(ns.mount_path(ROOT_INO), PathBuf::new());
        assert_eq!(ns.len(), 7);
    }

    #[test]
    fn flat_names_and_collisions() {
        let ns = build(&["/srv/app/db", "/top"], Layout::Flat, None).unwrap();
        assert!(ns.lookup(ROOT_INO, OsStr::new("srv.app.db")).is_some());
        assert!(ns.lookup(ROOT_INO, OsStr::new("top")).is_some());
        let err = build(&["/a.b/c", "/a/b.c"], Layout::Flat, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--layout flat gives /a.b/c and /a/b.c the same name \"a.b.c\": mount them with --layout tree"
        );
    }

    #[test]
    fn subtree_is_the_root() {
        let ns =
            build(&["/srv/app/db", "/srv/app/x/y", "/etc/z", "/srv/apple"], Layout::Tree, Some("/srv/app")).unwrap();
        assert!(ns.lookup(ROOT_INO, OsStr::new("db")).is_some());
        assert!(ns.file_ino(2).is_none() && ns.file_ino(3).is_none());
        let flat = build(&["/srv/app/x/y"], Layout::Flat, Some("/srv/app")).unwrap();
        assert!(flat.lookup(ROOT_INO, OsStr::new("x.y")).is_some());
        assert!(matches!(build(&["/etc/z"], Layout::Tree, Some("/srv")), Err(NamespaceError::EmptySubtree(_))));
        assert!(matches!(build(&["/etc/z"], Layout::Tree, Some("srv")), Err(NamespaceError::SubtreeNotAbsolute(_))));
    }

    #[test]
    fn a_file_cannot_also_be_a_directory() {
        for paths in [["/a/b", "/a/b/c"], ["/a/b/c", "/a/b"]] {
            let err = build(&paths, Layout::Tree, None).unwrap_err();
            assert!(matches!(err, NamespaceError::TreeConflict { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains("/a/b ") && text.contains("/a/b/c"), "{text}");
        }
    }

    #[test]
    fn odd_names_are_kept_as_they_are() {
        let name = "/d/new\nline $(x);`y` 'q\"";
        let ns = build(&[name], Layout::Tree, None).unwrap();
        let d = ns.lookup(ROOT_INO, OsStr::new("d")).unwrap();
        assert!(ns.lookup(d, OsStr::new("new\nline $(x);`y` 'q\"")).is_some());
    }
}
