//! `--subtree DIR` (the old host's whole DIR, lazily listed) in the core,
//! without FUSE or sshd: a local source seen through a fault-injecting one
//! whose listings can be refused or held (`tests/common/harness.rs`).

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::harness::{Core, Gate};
use lazyfs::fs::{Creator, SetAttr};
use lazyfs::namespace::ROOT_INO;

const SUBTREE: &str = "/srv/app";
const ROOT: Creator = Creator { uid: 0, gid: 0 };

/// A core over a source whose `/srv/app` holds the recorded file `rec`,
/// mounted with `--subtree /srv/app` once `prepare` has laid out the rest.
fn subtree_core(prepare: impl FnOnce(&Path)) -> Core {
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    prepare(&core.source.join("srv/app"));
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    core
}

fn names(core: &Core, dir: u64) -> Vec<String> {
    core.fs().readdir(dir).unwrap().into_iter().map(|(_, _, n)| n.to_string_lossy().into_owned()).collect()
}

fn setattr(core: &Core, ino: u64, change: SetAttr) -> Result<(), i32> {
    let (tx, rx) = mpsc::channel();
    core.fs().setattr(
        ino,
        change,
        Box::new(move |r| {
            let _ = tx.send(r.map(drop).map_err(|e| e.errno));
        }),
    );
    rx.recv_timeout(Duration::from_secs(60)).expect("setattr never answered")
}

/// Lookups waiting for a listing (a burst of them, the listing held) are
/// answered from a bounded pool of threads, not a thread each: a thread
/// that cannot be started would panic, and thousands of them are a load of
/// their own.
#[test]
fn lookups_waiting_for_a_listing_share_a_bounded_pool_of_threads() {
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    core.subtree = Some(PathBuf::from(SUBTREE));
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    core.plan.on_list(move |_| {
        held.wait();
        None
    });
    core.mount(0).unwrap();
    let (tx, answers) = mpsc::channel();
    for i in 0..300 {
        let (tx, name) = (tx.clone(), OsString::from(format!("missing{i}")));
        core.fs().then(
            move |fs| fs.lookup(ROOT_INO, &name),
            move |found| {
                let _ = tx.send(found.map(|_| ()).map_err(|e| e.errno));
            },
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let threads = core.fs().waiting_threads();
    gate.open();
    for _ in 0..300 {
        assert_eq!(answers.recv_timeout(Duration::from_secs(60)).unwrap(), Err(libc::ENOENT));
    }
    assert!(threads <= 64, "{threads} threads for 300 lookups waiting for one listing");
    assert!(core.fs().lookup(ROOT_INO, OsStr::new("rec")).is_ok());
}

/// `rmdir` of a directory of the tree nobody has listed yet must see the
/// source's entries: on the old host it is not empty (ENOTEMPTY), and its
/// files must stay on the mount.
#[test]
fn rmdir_of_a_directory_not_listed_yet_that_holds_files_on_the_source_is_refused() {
    let core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("data")).unwrap();
        std::fs::write(app.join("data/table"), b"rows").unwrap();
    });
    // Looking `data` up lists the root; `data` itself is not listed.
    let data = core.fs().lookup(ROOT_INO, OsStr::new("data")).unwrap().ino;
    let removed = core.fs().rmdir(ROOT_INO, OsStr::new("data")).map_err(|e| e.errno);
    assert_eq!(removed, Err(libc::ENOTEMPTY), "rmdir of a directory holding `table` on the source");
    assert!(core.fs().lookup(data, OsStr::new("table")).is_ok(), "the source's file is gone from the mount");
}

/// The same for a rename onto such a directory: the target is not empty.
#[test]
fn a_rename_onto_a_directory_not_listed_yet_that_holds_files_is_refused() {
    let core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("data")).unwrap();
        std::fs::write(app.join("data/table"), b"rows").unwrap();
    });
    core.fs().mkdir(ROOT_INO, OsStr::new("new"), 0o755, ROOT).unwrap();
    let renamed = core.fs().rename(ROOT_INO, OsStr::new("new"), ROOT_INO, OsStr::new("data"), 0).map_err(|e| e.errno);
    assert_eq!(renamed, Err(libc::ENOTEMPTY), "rename onto a directory holding `table` on the source");
}

/// A directory removed before anything listed it (it was empty on the
/// source) is no longer one to list: `dirs_unlisted` reaches 0 and the old
/// host is no longer needed once the files are here. Otherwise `lazyfs
/// wait` never exits 0, `source_needed` stays true for ever, and the walk
/// of a prefetch spins on the removed directory without a pause.
#[test]
fn a_directory_removed_before_it_was_listed_is_no_longer_counted_unlisted() {
    let core = subtree_core(|app| std::fs::create_dir_all(app.join("empty")).unwrap());
    core.fs().lookup(ROOT_INO, OsStr::new("empty")).unwrap();
    assert_eq!(core.fs().unlisted_dirs(), 1, "`empty` is not listed yet");
    core.fs().rmdir(ROOT_INO, OsStr::new("empty")).unwrap();
    assert_eq!(core.read("/rec", 0, 100).unwrap(), b"recorded");
    core.wait_state("/srv/app/rec", |s| s == "verified");
    assert_eq!(core.fs().unlisted_dirs(), 0, "a removed directory is still counted as one to list");
    assert!(!core.fs().fetcher().source_needed(), "every file is here and nothing is left to list");
}

/// A recorded file changed with chmod before its directory was listed
/// takes the owner the source gives it once the listing comes. Otherwise it
/// shows the mounting user as its owner for good (`Meta::changed_locally`
/// keeps every attribute, not only the mode), and a restored process
/// running as its real owner loses access to its own 0600 file.
#[test]
fn a_recorded_file_changed_with_chmod_before_the_listing_gets_its_source_owner() {
    let core = subtree_core(|app| {
        std::os::unix::fs::chown(app.join("rec"), Some(4242), Some(4343)).unwrap();
    });
    let rec = core.ino("/rec");
    // Nothing listed the root yet (the core runs no walk): a recorded name needs no listing.
    setattr(&core, rec, SetAttr { mode: Some(0o600), ..SetAttr::default() }).unwrap();
    names(&core, ROOT_INO);
    let attr = core.fs().getattr(rec).unwrap();
    assert_eq!((attr.uid, attr.gid, attr.perm), (4242, 4343, 0o600));
}

/// The same chmod made after the listing (the owner right, live) keeps the
/// source's owner across a remount: the journal replays the chmod before
/// the listing is merged again, which marks every attribute local.
#[test]
fn a_recorded_file_changed_with_chmod_keeps_its_source_owner_across_a_remount() {
    let mut core = subtree_core(|app| {
        std::os::unix::fs::chown(app.join("rec"), Some(4242), Some(4343)).unwrap();
    });
    names(&core, ROOT_INO);
    let rec = core.ino("/rec");
    setattr(&core, rec, SetAttr { mode: Some(0o600), ..SetAttr::default() }).unwrap();
    let attr = core.fs().getattr(rec).unwrap();
    assert_eq!((attr.uid, attr.gid, attr.perm), (4242, 4343, 0o600), "live");

    core.unmount();
    core.mount(0).unwrap();
    names(&core, ROOT_INO);
    let attr = core.fs().getattr(core.ino("/rec")).unwrap();
    assert_eq!((attr.uid, attr.gid, attr.perm), (4242, 4343, 0o600), "after the remount");
}

/// Two names of one file (a hard link the local source tells by its inode
/// number) in two directories: removing the first name through the mount
/// leaves the second one on the mount, with its bytes.
#[test]
fn the_other_name_of_a_hard_link_stays_when_the_first_name_is_removed() {
    let core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("a")).unwrap();
        std::fs::create_dir_all(app.join("b")).unwrap();
        std::fs::write(app.join("a/x"), b"linked bytes").unwrap();
        std::fs::hard_link(app.join("a/x"), app.join("b/y")).unwrap();
    });
    let a = core.fs().lookup(ROOT_INO, OsStr::new("a")).unwrap().ino;
    assert!(names(&core, a).contains(&"x".to_string()));
    core.fs().unlink(a, OsStr::new("x")).unwrap();
    let b = core.fs().lookup(ROOT_INO, OsStr::new("b")).unwrap().ino;
    assert!(names(&core, b).contains(&"y".to_string()), "b/y is gone: {:?}", names(&core, b));
    assert_eq!(core.read("/b/y", 0, 100).unwrap(), b"linked bytes");
}

/// Directories the source refuses to list (permission denied: e.g. an
/// unprivileged SSH user and root's `lost+found`, or 0700 directories of
/// other users) must not stop the walk: every other directory of the tree
/// is still listed and its files queued. The walk claims the 64 lowest
/// inode numbers every round, so 64 refusing directories found first hold
/// the whole rest of the tree back for ever.
#[test]
fn the_walk_lists_every_other_directory_when_many_are_refused() {
    let core = subtree_core(|app| {
        for i in 0..70 {
            std::fs::create_dir_all(app.join(format!("refused{i:02}"))).unwrap();
        }
        std::fs::create_dir_all(app.join("ok/deeper")).unwrap();
        std::fs::write(app.join("ok/deeper/wanted"), b"found by the walk").unwrap();
    });
    core.plan.on_list(|dir| {
        let refused = dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("refused"));
        refused.then(|| lazyfs::source::SourceError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        })
    });
    core.fs().fetcher().prefetch(None, 1);
    core.fs().walk_tree();
    let found = || core.fs().fetcher().files().iter().any(|f| f.path.ends_with("ok/deeper/wanted"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !found() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(found(), "the walk never reached ok/deeper: {} directories left unlisted", core.fs().unlisted_dirs());
}

/// A file created in a set-group-ID directory of the tree gets the
/// directory's group, and a directory made there the set-group-ID bit, as
/// on the old host (and every local Linux filesystem): a shared directory
/// such as `2775 root:www-data` keeps working for the group.
#[test]
fn files_made_in_a_setgid_directory_of_the_tree_get_its_group() {
    let core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("shared")).unwrap();
        std::os::unix::fs::chown(app.join("shared"), Some(0), Some(4343)).unwrap();
        std::fs::set_permissions(app.join("shared"), std::os::unix::fs::PermissionsExt::from_mode(0o2775)).unwrap();
    });
    let shared = core.fs().lookup(ROOT_INO, OsStr::new("shared")).unwrap();
    assert_eq!((shared.gid, shared.perm), (4343, 0o2775));
    let made = Creator { uid: 1000, gid: 1000 };
    let (file, _) = core.fs().create(shared.ino, OsStr::new("upload"), 0o644, made).unwrap();
    assert_eq!(file.gid, 4343, "a file made in a setgid directory");
    let dir = core.fs().mkdir(shared.ino, OsStr::new("sub"), 0o775, made).unwrap();
    assert_eq!((dir.gid, dir.perm & 0o2000), (4343, 0o2000), "a directory made in a setgid directory");
}

/// Files of the tree are listed lazily and read on demand: three files the
/// cache disk could each hold are served even though together they are
/// larger than it (sparse files, a data set larger than the new host's
/// disk): a listed file claims none of the cache disk's capacity before it
/// is read, or the later ones would be `failed` before anyone reads them.
#[test]
fn files_of_the_tree_are_served_even_when_together_they_exceed_the_cache_disk() {
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    std::fs::create_dir_all(&core.cache).unwrap();
    let capacity = {
        let stat = nix::sys::statvfs::statvfs(&core.cache).unwrap();
        stat.blocks() as u64 * stat.fragment_size() as u64
    };
    let big = core.source.join("srv/app/big");
    std::fs::create_dir_all(&big).unwrap();
    for name in ["a", "b", "c"] {
        let file = std::fs::File::create(big.join(name)).unwrap();
        file.set_len(capacity / 5 * 2).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, name.as_bytes(), 0).unwrap();
    }
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    for name in ["a", "b", "c"] {
        let read = core.read(&format!("/big/{name}"), 0, 1);
        let state = core
            .fs()
            .fetcher()
            .files()
            .iter()
            .find(|f| f.path.ends_with(format!("big/{name}")))
            .map(|f| format!("{:?}", f.phase()));
        assert_eq!(read, Ok(name.as_bytes().to_vec()), "big/{name}: {state:?}");
    }
}

/// The inode number each entry had on the old host, from a manifest made
/// there with `--subtree`: every file and directory of the tree keeps it
/// (SQLite checks its database's). The directories the mount makes for the
/// recorded files take numbers just above the recorded files' own, which
/// are often the numbers of their neighbours on the old host.
#[test]
fn every_entry_of_a_manifest_tree_keeps_its_old_inode_number() {
    let mut core = Core::new(&[]);
    let sub = core.source.join("srv/app/sub");
    std::fs::create_dir_all(&sub).unwrap();
    // Record a file whose inode number + 1 is another file's: the number the
    // mount gives `sub`, made for the recorded file. Files are made until two
    // have consecutive numbers (other tests make files meanwhile).
    let mut inos: Vec<(String, u64)> = Vec::new();
    let recorded = (0..4000)
        .find_map(|i| {
            let name = format!("f{i:04}");
            std::fs::write(sub.join(&name), format!("file {i}")).unwrap();
            let ino = std::fs::metadata(sub.join(&name)).unwrap().ino();
            let found = match inos.iter().any(|(_, other)| *other == ino + 1) {
                true => Some(name.clone()),
                false => inos.iter().find(|(_, other)| other + 1 == ino).map(|(other, _)| other.clone()),
            };
            inos.push((name, ino));
            found
        })
        .expect("this filesystem gave no two of 4,000 files consecutive inode numbers");
    let recorded = &recorded;
    let mut dump = lazyfs::images::write::DumpFile::new(format!("{SUBTREE}/sub/{recorded}"), 7);
    dump.size = Some(std::fs::metadata(sub.join(recorded)).unwrap().len());
    lazyfs::images::write::write_dump(&core.images, &[dump]).unwrap();
    let checkpoint = lazyfs::images::Checkpoint::load(&core.images).unwrap();
    let output = core.images.join(lazyfs::manifest::DEFAULT_NAME);
    lazyfs::manifest::create(&checkpoint, &core.source, Some(Path::new(SUBTREE)), None, &output).unwrap();
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();

    let sub_ino = core.ino("/sub");
    let mut wrong = Vec::new();
    for (name, _) in &inos {
        let there = std::fs::metadata(sub.join(name)).unwrap().ino();
        let here = core.fs().lookup(sub_ino, OsStr::new(name)).unwrap().ino;
        if here != there {
            wrong.push(format!("sub/{name}: {here}, the old host {there}"));
        }
    }
    assert!(wrong.is_empty(), "files with another inode number than on the old host: {wrong:?}");
    let there = std::fs::metadata(&sub).unwrap().ino();
    assert_eq!(sub_ino, there, "the directory `sub` (made for the recorded file) has another inode number");
}

/// A manifest is untrusted input (it comes with the images): an inode
/// number at the top of the range neither panics the mount (`Counter`,
/// `InodeTable::note`: `+ 1` past `u64::MAX`) nor, in a release build,
/// wraps the numbers lazyfs gives round (the inode table then gives the
/// same number to every new node, one replacing the other).
#[test]
fn a_manifest_inode_number_at_u64_max_neither_panics_nor_takes_the_root() {
    use prost::Message;
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    std::fs::create_dir_all(core.source.join("srv/app/dir")).unwrap();
    std::fs::write(core.source.join("srv/app/dir/other"), b"other").unwrap();
    let checkpoint = lazyfs::images::Checkpoint::load(&core.images).unwrap();
    let output = core.images.join(lazyfs::manifest::DEFAULT_NAME);
    lazyfs::manifest::create(&checkpoint, &core.source, Some(Path::new(SUBTREE)), None, &output).unwrap();
    let bytes = std::fs::read(&output).unwrap();
    let magic = b"lazyfs-manifest\n";
    let mut manifest = lazyfs::store::journal::proto::Manifest::decode(&bytes[magic.len()..]).unwrap();
    for file in &mut manifest.files {
        if file.path.ends_with(b"/rec") {
            file.attrs.as_mut().unwrap().ino = Some(u64::MAX);
        }
    }
    let mut patched = magic.to_vec();
    manifest.encode(&mut patched).unwrap();
    std::fs::write(&output, patched).unwrap();

    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    assert_eq!(core.read("/rec", 0, 100).unwrap(), b"recorded");
    assert_eq!(core.read("/dir/other", 0, 100).unwrap(), b"other");
    // Numbers lazyfs gives itself (new nodes) come after the manifest's largest.
    let one = core.fs().mkdir(ROOT_INO, OsStr::new("made-one"), 0o755, ROOT).unwrap().ino;
    let two = core.fs().mkdir(ROOT_INO, OsStr::new("made-two"), 0o755, ROOT).unwrap().ino;
    assert!(one != two && one > ROOT_INO && two > ROOT_INO, "numbers {one} and {two}");
    let root = core.fs().getattr(ROOT_INO).unwrap();
    assert_eq!(root.kind, lazyfs::fs::Kind::Dir);
    assert_eq!(names(&core, ROOT_INO), [".", "..", "dir", "made-one", "made-two", "rec"]);
}

/// A directory the images record (the way to a recorded file) that the old
/// host has replaced by a symlink since the dump keeps a directory's
/// attributes: the listing's entry is another kind of file, and a symlink's
/// `lrwxrwxrwx` and owner must not make the directory world-writable (with
/// `allow_other`, every local user could then create files in it).
#[test]
fn a_recorded_directory_now_a_symlink_on_the_source_does_not_take_the_symlinks_mode_or_owner() {
    let mut core = Core::new(&[("/srv/app/data/rec", b"recorded".to_vec(), true)]);
    let app = core.source.join("srv/app");
    std::fs::create_dir_all(app.join("elsewhere")).unwrap();
    std::fs::rename(app.join("data"), app.join("elsewhere/data")).unwrap();
    std::os::unix::fs::symlink("elsewhere/data", app.join("data")).unwrap();
    std::os::unix::fs::lchown(app.join("data"), Some(4242), Some(4343)).unwrap();
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    names(&core, ROOT_INO);
    let data = core.fs().getattr(core.ino("/data")).unwrap();
    assert_eq!(data.kind, lazyfs::fs::Kind::Dir);
    assert_eq!(data.perm & 0o022, 0, "the recorded directory became group/world-writable: {:o}", data.perm);
    assert_ne!(data.uid, 4242, "the recorded directory took the symlink's owner");
}

/// The listings kept in `CACHE/tree` are of one `--subtree`: a later mount
/// of the same images from the same source with another `--subtree` (the
/// default cache dir is the same: it does not depend on it) shows that
/// directory, not the listings of the first one at its root.
#[test]
fn a_remount_with_another_subtree_shows_that_directory_not_the_first_ones_listings() {
    let mut core = Core::new(&[("/srv/app/data/rec", b"recorded".to_vec(), true)]);
    let app = core.source.join("srv/app");
    std::fs::write(app.join("only-in-app"), b"app").unwrap();
    std::fs::write(app.join("data/only-in-data"), b"data").unwrap();
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    assert_eq!(names(&core, ROOT_INO), [".", "..", "data", "only-in-app"]);
    core.unmount();

    core.subtree = Some(PathBuf::from("/srv/app/data"));
    core.mount(0).unwrap();
    assert_eq!(names(&core, ROOT_INO), [".", "..", "only-in-data", "rec"]);
}

/// A recorded file and a name of the tree that is a hard link of it (the
/// local source tells it by inode number) are one file, as on the old host:
/// one inode number, and what the restored process writes through the
/// recorded name is what the other name reads.
#[test]
fn a_hard_link_of_a_recorded_file_is_the_same_file() {
    let core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("other")).unwrap();
        std::fs::hard_link(app.join("rec"), app.join("other/alias")).unwrap();
    });
    let alias = core.ino("/other/alias");
    assert_eq!(core.read("/other/alias", 0, 100).unwrap(), b"recorded");
    assert_eq!(core.write("/rec", 0, b"RECORDED"), Ok(8));
    assert_eq!(core.read("/other/alias", 0, 100).unwrap(), b"RECORDED", "the two names are two files");
    assert_eq!(alias, core.ino("/rec"), "two inode numbers for one file");
}

/// Unmounts the small filesystem a test made, even if it fails.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A file of the tree whose owner could not be made when its directory was
/// listed (the cache filesystem out of inodes or space) is still shown, as
/// `failed` with the reason: otherwise it silently does not exist on the
/// mount, nothing counts it, and `wait` exits 0 with the old host's file
/// never seen.
#[test]
fn a_file_of_the_tree_whose_spill_file_cannot_be_made_is_shown_failed_not_left_out() {
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    let many = core.source.join("srv/app/many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..200 {
        // Empty, as `__init__.py` files are: their spill file is made at once.
        std::fs::write(many.join(format!("f{i:03}")), b"").unwrap();
    }
    // The cache on a filesystem with room for 100 inodes.
    let small = core.dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m,nr_inodes=100,mode=0700"),
    )
    .unwrap();
    let _small = SmallFs(small.clone());
    core.cache = small.join("cache");
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    let dir = core.fs().lookup(ROOT_INO, OsStr::new("many")).unwrap().ino;
    let shown = names(&core, dir).len() - 2;
    let counted = core.fs().fetcher().files().len() - 1;
    core.unmount();
    assert_eq!((shown, counted), (200, 200), "files of `many` shown, and counted");
}

/// A file written through the mount has an mtime from that write, also
/// after a remount: not the old host's mtime of the bytes it no longer
/// holds (which makes `make`, `rsync`'s quick check or a backup skip a
/// file that changed). Recorded and tree files alike: a remount's listing
/// must not put the source's mtime back on either.
#[test]
fn a_file_written_through_the_mount_keeps_a_later_mtime_across_a_remount() {
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let mut core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("d")).unwrap();
        std::fs::write(app.join("d/tree-file"), b"original").unwrap();
        for file in ["rec", "d/tree-file"] {
            std::fs::File::options().write(true).open(app.join(file)).unwrap().set_modified(old).unwrap();
        }
    });
    names(&core, ROOT_INO);
    let d = core.fs().lookup(ROOT_INO, OsStr::new("d")).unwrap().ino;
    names(&core, d);
    assert_eq!(core.write("/rec", 0, b"RECORDED"), Ok(8));
    assert_eq!(core.write("/d/tree-file", 0, b"ORIGINAL"), Ok(8));
    for path in ["/rec", "/d/tree-file"] {
        assert!(core.fs().getattr(core.ino(path)).unwrap().mtime > old, "{path}: live");
    }
    core.unmount();
    core.mount(0).unwrap();
    names(&core, ROOT_INO);
    let d = core.fs().lookup(ROOT_INO, OsStr::new("d")).unwrap().ino;
    names(&core, d);
    for (path, bytes) in [("/d/tree-file", b"ORIGINAL"), ("/rec", b"RECORDED")] {
        assert_eq!(core.read(path, 0, 8).unwrap(), bytes);
        let mtime = core.fs().getattr(core.ino(path)).unwrap().mtime;
        assert!(mtime > old, "{path}: after a remount, changed bytes with the old host's mtime {mtime:?}");
    }
}

/// Two different files that a manifest gives one device and inode number
/// (and a link count above 1) are not one file: overlayfs without `xino`
/// over layers on two filesystems (container root filesystems) reports
/// such numbers, and a manifest is untrusted input. The manifest's own
/// hashes say they differ: each name serves its own bytes, never the
/// first's (which the first file's hashes would then "verify").
#[test]
fn two_files_with_one_inode_number_are_not_merged_as_hard_links() {
    use prost::Message;
    let mut core = Core::new(&[("/srv/app/rec", b"recorded".to_vec(), true)]);
    let app = core.source.join("srv/app");
    std::fs::create_dir_all(app.join("a")).unwrap();
    std::fs::create_dir_all(app.join("b")).unwrap();
    let same_time = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    for (dir, bytes) in [("a", b"layer one"), ("b", b"layer two")] {
        std::fs::write(app.join(dir).join("x"), bytes).unwrap();
        std::fs::File::options().write(true).open(app.join(dir).join("x")).unwrap().set_modified(same_time).unwrap();
        std::fs::hard_link(app.join(dir).join("x"), app.join(dir).join("x-link")).unwrap();
    }
    let checkpoint = lazyfs::images::Checkpoint::load(&core.images).unwrap();
    let output = core.images.join(lazyfs::manifest::DEFAULT_NAME);
    lazyfs::manifest::create(&checkpoint, &core.source, Some(Path::new(SUBTREE)), None, &output).unwrap();
    // As overlayfs reports them: b/x has a/x's inode number.
    let bytes = std::fs::read(&output).unwrap();
    let magic = b"lazyfs-manifest\n";
    let mut manifest = lazyfs::store::journal::proto::Manifest::decode(&bytes[magic.len()..]).unwrap();
    let ino_of = |m: &lazyfs::store::journal::proto::Manifest, path: &[u8]| {
        m.files.iter().find(|f| f.path == path).unwrap().attrs.as_ref().unwrap().ino
    };
    let a_ino = ino_of(&manifest, b"/srv/app/a/x");
    for file in &mut manifest.files {
        if file.path.starts_with(b"/srv/app/b/") {
            file.attrs.as_mut().unwrap().ino = a_ino;
        }
    }
    let mut patched = magic.to_vec();
    manifest.encode(&mut patched).unwrap();
    std::fs::write(&output, patched).unwrap();

    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    assert_eq!(core.read("/a/x", 0, 100).unwrap(), b"layer one");
    assert_eq!(core.read("/b/x", 0, 100).unwrap(), b"layer two", "b/x serves a/x's bytes");
}

/// A reader's listing (a lookup of a name the images lack: a page a
/// restored web server is asked for) does not wait behind the background
/// walk's batch of up to 64 directories on the one listing lane; here the
/// walk's listing is held (a slow link, a huge directory), and the reader's
/// directory, which the walk is not listing, must still be listed for it.
#[test]
fn a_readers_listing_does_not_wait_behind_the_walk() {
    let files: Vec<(String, Vec<u8>, bool)> =
        (0..4).map(|i| (format!("/srv/app/bg{i}/rec"), b"recorded".to_vec(), true)).collect();
    let refs: Vec<(&str, Vec<u8>, bool)> = files.iter().map(|(p, b, s)| (p.as_str(), b.clone(), *s)).collect();
    let mut core = Core::new(&refs);
    std::fs::create_dir_all(core.source.join("srv/app/fg")).unwrap();
    std::fs::write(core.source.join("srv/app/fg/page.html"), b"<html>").unwrap();
    core.subtree = Some(PathBuf::from(SUBTREE));
    // A first mount lists the root only (kept in CACHE/tree).
    core.mount(0).unwrap();
    names(&core, ROOT_INO);
    core.unmount();

    let (release, held) = mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    core.plan.on_list(move |dir| {
        if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("bg")) {
            let _ = held.lock().unwrap().recv();
        }
        None
    });
    core.mount(0).unwrap();
    core.fs().walk_tree();
    std::thread::sleep(Duration::from_millis(500));
    let fs = core.fs().clone();
    let reader = std::thread::spawn(move || {
        let fg = fs.lookup(ROOT_INO, OsStr::new("fg")).unwrap().ino;
        fs.lookup(fg, OsStr::new("page.html")).map(|a| a.size).map_err(|e| e.errno)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let finished = reader.is_finished();
    drop(release);
    let found = reader.join().unwrap();
    assert!(
        finished && found == Ok(6),
        "the reader's lookup waited behind the walk's held listing (answered within 10 s: {finished}), then got {found:?}"
    );
}

/// A hard link made of a recorded file whose directory is not listed yet
/// (`ln d/rec hard`): `link` lists the new name's directory first, but the
/// change also resolves the file's own directory, which answers "not
/// listed yet" and reaches the caller as EAGAIN. (Replaying the journal
/// lists and retries; the live call does not.)
#[test]
fn a_hard_link_of_a_recorded_file_in_an_unlisted_directory_is_made() {
    let mut core = Core::new(&[("/srv/app/d/rec", b"recorded".to_vec(), true)]);
    core.subtree = Some(PathBuf::from(SUBTREE));
    core.mount(0).unwrap();
    let rec = core.ino("/d/rec");
    let linked = core.fs().link(rec, ROOT_INO, OsStr::new("hard")).map(|a| a.ino).map_err(|e| e.errno);
    assert_eq!(linked, Ok(rec));
}

/// A directory of the tree not listed yet shows a link count that counts
/// none of its subdirectories: the kernel must not keep those attributes
/// (an hour's TTL), but ask again once the listing has come.
#[test]
fn a_directorys_attributes_are_not_kept_by_the_kernel_before_its_listing() {
    let core = subtree_core(|app| {
        std::fs::create_dir_all(app.join("sub/inner")).unwrap();
    });
    let sub = core.fs().lookup(ROOT_INO, OsStr::new("sub")).unwrap();
    assert!(sub.provisional, "sub is not listed yet, its link count {} is kept", sub.nlink);
    names(&core, sub.ino);
    let sub = core.fs().getattr(sub.ino).unwrap();
    assert!(!sub.provisional);
    assert_eq!(sub.nlink, 3, "two, and inner's ..");
}
