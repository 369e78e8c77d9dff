//! A model-based test of the local layer in the core (no FUSE): random
//! creates, mkdirs, symlinks, hard links, unlinks, rmdirs, renames (plain,
//! RENAME_NOREPLACE, RENAME_EXCHANGE), writes, remounts and kills, against an
//! in-memory tree. After every step the core's whole tree (names, kinds,
//! bytes, link targets) must be the model's, and each change must succeed
//! exactly when the model says it can.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;

use common::harness::Core;
use common::mount::content;
use lazyfs::fs::{Creator, Kind, RENAME_EXCHANGE, RENAME_NOREPLACE};
use lazyfs::namespace::ROOT_INO;
use proptest::prelude::*;

const RECORDED: [(&str, usize); 2] = [("/m/x", 100), ("/m/y", 40_000)];
const NAMES: [&str; 3] = ["a", "b", "c"];
const BY: Creator = Creator { uid: 0, gid: 0 };

#[derive(Debug, Clone)]
enum Op {
    Create { dir: usize, name: usize },
    Mkdir { dir: usize, name: usize },
    Symlink { dir: usize, name: usize },
    Link { from: usize, dir: usize, name: usize },
    Unlink { target: usize },
    Rmdir { target: usize },
    Rename { from: usize, dir: usize, name: usize, flags: u32 },
    Write { target: usize, len: usize, byte: u8 },
    Remount,
    Kill,
}

fn op() -> impl Strategy<Value = Op> {
    let (i, n) = (any::<usize>(), 0..NAMES.len());
    prop_oneof![
        3 => (i, n.clone()).prop_map(|(dir, name)| Op::Create { dir, name }),
        2 => (i, n.clone()).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        1 => (i, n.clone()).prop_map(|(dir, name)| Op::Symlink { dir, name }),
        1 => (i, i, n.clone()).prop_map(|(from, dir, name)| Op::Link { from, dir, name }),
        2 => i.prop_map(|target| Op::Unlink { target }),
        1 => i.prop_map(|target| Op::Rmdir { target }),
        3 => (i, i, n, prop_oneof![Just(0), Just(RENAME_NOREPLACE), Just(RENAME_EXCHANGE)])
            .prop_map(|(from, dir, name, flags)| Op::Rename { from, dir, name, flags }),
        2 => (i, 1..3000usize, any::<u8>()).prop_map(|(target, len, byte)| Op::Write { target, len, byte }),
        1 => Just(Op::Remount),
        1 => Just(Op::Kill),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Dir,
    /// A file: its node (hard links share one).
    File(usize),
    Symlink(String),
}

#[derive(Default)]
struct Model {
    /// By path below the root ("" is the root).
    entries: BTreeMap<String, Entry>,
    bytes: Vec<Vec<u8>>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

fn within(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{dir}/"))
}

impl Model {
    fn pick(&self, i: usize, keep: impl Fn(&Entry) -> bool) -> Option<String> {
        let all: Vec<&String> = self.entries.iter().filter(|(p, e)| !p.is_empty() && keep(e)).map(|(p, _)| p).collect();
        (!all.is_empty()).then(|| all[i % all.len()].clone())
    }

    fn dir(&self, i: usize) -> String {
        let dirs: Vec<&String> = self.entries.iter().filter(|(_, e)| **e == Entry::Dir).map(|(p, _)| p).collect();
        dirs[i % dirs.len()].clone()
    }

    fn children(&self, dir: &str) -> usize {
        self.entries.keys().filter(|p| !p.is_empty() && parent(p) == dir && p.as_str() != dir).count()
    }

    fn add(&mut self, path: String, entry: Entry) -> bool {
        if self.entries.contains_key(&path) {
            return false;
        }
        self.entries.insert(path, entry);
        true
    }

    /// Moves `from` (and all below it) to `to`.
    fn carry(&mut self, from: &str, to: &str) -> Vec<(String, Entry)> {
        let moved: Vec<(String, Entry)> =
            self.entries.iter().filter(|(p, _)| within(p, from)).map(|(p, e)| (p.clone(), e.clone())).collect();
        for (p, _) in &moved {
            self.entries.remove(p);
        }
        moved.into_iter().map(|(p, e)| (format!("{to}{}", &p[from.len()..]), e)).collect()
    }

    fn rename(&mut self, from: &str, to: &str, flags: u32) -> bool {
        let src = self.entries[from].clone();
        let target = self.entries.get(to).cloned();
        let same_file = matches!((&src, &target), (Entry::File(a), Some(Entry::File(b))) if a == b);
        if from == to || same_file {
            return flags != RENAME_NOREPLACE;
        }
        if src == Entry::Dir && within(to, from) {
            return false;
        }
        if flags == RENAME_EXCHANGE {
            let Some(target) = target else { return false };
            if target == Entry::Dir && within(from, to) {
                return false;
            }
            let (a, b) = (self.carry(from, "\0a"), self.carry(to, "\0b"));
            let fix = |v: Vec<(String, Entry)>, prefix: &str, to: &str| -> Vec<(String, Entry)> {
                v.into_iter().map(|(p, e)| (format!("{to}{}", &p[prefix.len()..]), e)).collect()
            };
            for (p, e) in fix(a, "\0a", to).into_iter().chain(fix(b, "\0b", from)) {
                self.entries.insert(p, e);
            }
            return true;
        }
        if let Some(target) = target {
            if flags == RENAME_NOREPLACE {
                return false;
            }
            match (&src, &target) {
                (Entry::Dir, Entry::Dir) if self.children(to) > 0 => return false,
                (Entry::Dir, Entry::Dir) => {}
                (Entry::Dir, _) | (_, Entry::Dir) => return false,
                _ => {}
            }
            self.entries.remove(to);
        }
        for (p, e) in self.carry(from, to) {
            self.entries.insert(p, e);
        }
        true
    }
}

fn ino(core: &Core, path: &str) -> u64 {
    Path::new(path).iter().fold(ROOT_INO, |at, name| core.fs().lookup(at, name).unwrap().ino)
}

/// The core's tree, as the model writes it.
fn listing(core: &Core, model: &Model) -> Result<BTreeMap<String, Entry>, TestCaseError> {
    let mut out = BTreeMap::from([(String::new(), Entry::Dir)]);
    let mut dirs = vec![(String::new(), ROOT_INO)];
    while let Some((dir, at)) = dirs.pop() {
        for (child, kind, name) in core.fs().readdir(at).unwrap().into_iter().skip(2) {
            let path = join(&dir, name.to_str().unwrap());
            let entry = match kind {
                Kind::Dir => {
                    dirs.push((path.clone(), child));
                    Entry::Dir
                }
                Kind::Symlink => Entry::Symlink(String::from_utf8(core.fs().readlink(child).unwrap()).unwrap()),
                _ => {
                    // Bytes are checked against the model's node of the same path.
                    let Some(Entry::File(node)) = model.entries.get(&path) else {
                        return Err(TestCaseError::fail(format!("{path}: a file the model does not have")));
                    };
                    let got = core.read(&format!("/{path}"), 0, 1 << 20).unwrap();
                    prop_assert!(
                        got == model.bytes[*node],
                        "{path}: {} bytes, not the model's {}",
                        got.len(),
                        model.bytes[*node].len()
                    );
                    Entry::File(*node)
                }
            };
            out.insert(path, entry);
        }
    }
    Ok(out)
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let files: Vec<(&str, Vec<u8>, bool)> = RECORDED.iter().map(|(p, n)| (*p, content(p, *n), true)).collect();
    let mut core = Core::new(&files);
    let mut model = Model::default();
    model.entries.insert(String::new(), Entry::Dir);
    model.entries.insert("m".into(), Entry::Dir);
    for (path, bytes, _) in &files {
        model.entries.insert(path[1..].to_string(), Entry::File(model.bytes.len()));
        model.bytes.push(bytes.clone());
    }
    core.mount(0).unwrap();
    for op in ops {
        let fs = core.fs().clone();
        let (got, want) = match *op {
            Op::Create { dir, name } => {
                let dir = model.dir(dir);
                let got =
                    fs.create(ino(&core, &dir), OsStr::new(NAMES[name]), 0o644, BY).map(|(a, _)| fs.release(a.ino));
                let node = model.bytes.len();
                let want = model.add(join(&dir, NAMES[name]), Entry::File(node));
                if want {
                    model.bytes.push(Vec::new());
                }
                (got.map_err(|e| e.errno), want)
            }
            Op::Mkdir { dir, name } => {
                let dir = model.dir(dir);
                let got = fs.mkdir(ino(&core, &dir), OsStr::new(NAMES[name]), 0o755, BY).map(drop);
                (got.map_err(|e| e.errno), model.add(join(&dir, NAMES[name]), Entry::Dir))
            }
            Op::Symlink { dir, name } => {
                let dir = model.dir(dir);
                let got = fs.symlink(ino(&core, &dir), OsStr::new(NAMES[name]), Path::new("../t"), BY).map(drop);
                (got.map_err(|e| e.errno), model.add(join(&dir, NAMES[name]), Entry::Symlink("../t".into())))
            }
            Op::Link { from, dir, name } => {
                let Some(from) = model.pick(from, |e| matches!(e, Entry::File(_))) else { continue };
                let dir = model.dir(dir);
                let got = fs.link(ino(&core, &from), ino(&core, &dir), OsStr::new(NAMES[name])).map(drop);
                let entry = model.entries[&from].clone();
                (got.map_err(|e| e.errno), model.add(join(&dir, NAMES[name]), entry))
            }
            Op::Unlink { target } => {
                let Some(target) = model.pick(target, |_| true) else { continue };
                let got = fs.unlink(ino(&core, parent(&target)), OsStr::new(Path::new(&target).file_name().unwrap()));
                let want = model.entries[&target] != Entry::Dir;
                if want {
                    model.entries.remove(&target);
                }
                (got.map_err(|e| e.errno), want)
            }
            Op::Rmdir { target } => {
                let Some(target) = model.pick(target, |_| true) else { continue };
                let got = fs.rmdir(ino(&core, parent(&target)), OsStr::new(Path::new(&target).file_name().unwrap()));
                let want = model.entries[&target] == Entry::Dir && model.children(&target) == 0;
                if want {
                    model.entries.remove(&target);
                }
                (got.map_err(|e| e.errno), want)
            }
            Op::Rename { from, dir, name, flags } => {
                let Some(from) = model.pick(from, |_| true) else { continue };
                let dir = model.dir(dir);
                let from_name = Path::new(&from).file_name().unwrap().to_owned();
                let got =
                    fs.rename(ino(&core, parent(&from)), &from_name, ino(&core, &dir), OsStr::new(NAMES[name]), flags);
                (got.map_err(|e| e.errno), model.rename(&from, &join(&dir, NAMES[name]), flags))
            }
            Op::Write { target, len, byte } => {
                let Some(target) = model.pick(target, |e| matches!(e, Entry::File(_))) else { continue };
                let got = core.write(&format!("/{target}"), 0, &vec![byte; len]).map(drop);
                let Entry::File(node) = model.entries[&target] else { unreachable!() };
                let bytes = &mut model.bytes[node];
                if bytes.len() < len {
                    bytes.resize(len, 0);
                }
                bytes[..len].fill(byte);
                (got, true)
            }
            Op::Remount => {
                core.unmount();
                core.mount(0).unwrap();
                (Ok(()), true)
            }
            Op::Kill => {
                core.kill();
                core.mount(0).unwrap();
                (Ok(()), true)
            }
        };
        prop_assert_eq!(got.is_ok(), want, "{:?}: {:?}", op, got);
        let tree = listing(&core, &model)?;
        prop_assert_eq!(&tree, &model.entries, "after {:?}", op);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_tree_is_the_models(ops in proptest::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}
