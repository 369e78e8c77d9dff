//! The real CRIU 4.2 dumps of tests/fixtures/real, mounted over a real sshd
//! against the old hosts' files, read back byte for byte.

mod common;

use std::path::{Path, PathBuf};

use common::mount::{Mount, Source, TestEnv, content, is_mounted};
use common::sshd::Sshd;
use lazyfs::images::Checkpoint;

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The old hosts' root: the committed small files, plus the large ones the
/// fixtures leave out, made again at their recorded sizes.
fn old_root(env: &TestEnv) -> PathBuf {
    let root = env.path("source");
    for tree in ["lazyfs-fixture", "fileholder", "zombie"] {
        copy_tree(&common::fixtures().join("sources").join(tree), &root);
    }
    let data = root.join("tmp/lazyfs-fixture/data");
    std::fs::write(data.join("b.bin"), content("b.bin", 3_000_000)).unwrap();
    std::fs::write(data.join("big.img"), content("big.img", 12 * 1024 * 1024 + 5)).unwrap();
    // big-1MiB.bin as the fileholder README describes it: lines "%015x\n" of offset i*16.
    let big: String = (0..65536u64).map(|i| format!("{:015x}\n", i * 16)).collect();
    for dump in ["d1-kill", "d2-leave-running", "d3-fork", "d4-mntns"] {
        std::fs::write(root.join("tmp/criu-work/src-data").join(dump).join("big-1MiB.bin"), &big).unwrap();
    }
    // The workload dump's data directory, where tests/criu_restore.rs had it.
    let workload = Checkpoint::load(&common::fixtures().join("real/workload/images")).unwrap();
    let data_bin = workload.files.iter().find(|f| f.path.ends_with("data/data.bin")).expect("data.bin recorded");
    common::write_workload_files(&root.join(data_bin.path.parent().unwrap().strip_prefix("/").unwrap()));
    root
}

#[test]
fn every_real_dump_mounts_and_reads_back_exactly() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    let root = old_root(&env);
    let mut dumps: Vec<PathBuf> =
        std::fs::read_dir(common::fixtures().join("real")).unwrap().map(|e| e.unwrap().path()).collect();
    dumps.sort();
    let (mut compared, mut missing) = (0, 0);
    for dump in &dumps {
        let images = dump.join("images");
        let name = dump.file_name().unwrap().to_str().unwrap();
        let mount = env.mount(name, &images, &Source::Ssh { sshd: &sshd, root: root.clone() }, &[]);
        let checkpoint = Checkpoint::load(&images).unwrap();
        for file in checkpoint.servable() {
            let mounted = mount.at(file.path.to_str().unwrap());
            let on_source = root.join(file.source_path.strip_prefix("/").unwrap());
            let meta = std::fs::metadata(&mounted).unwrap();
            if let Some(size) = file.size {
                assert_eq!(meta.len(), size, "{}", mounted.display());
            }
            assert_eq!(meta.mode(), file.mode.unwrap(), "{}", mounted.display());
            match std::fs::read(&on_source) {
                Ok(expected) => {
                    assert!(std::fs::read(&mounted).unwrap() == expected, "{} differs", mounted.display());
                    compared += 1;
                }
                // System files (libc, the interpreter) are not in the fixtures:
                // lazyfs must say so, not invent bytes.
                Err(_) => {
                    let err = std::fs::read(&mounted).unwrap_err();
                    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{}", mounted.display());
                    missing += 1;
                }
            }
        }
        // What cannot be served is not shown: no ghost, no tmpfs file.
        for file in checkpoint.files.iter().filter(|f| !f.is_servable() && f.path.starts_with("/tmp")) {
            if file.unservable.as_ref().is_some_and(|r| !r.to_string().contains("directory")) {
                assert!(!mount.at(file.path.to_str().unwrap()).exists(), "{} is shown", file.path.display());
            }
        }
        assert!(mount.umount().status.success());
        assert!(!is_mounted(&mount.mountpoint));
    }
    assert!(compared >= 60, "compared only {compared} files");
    assert!(missing > 0);
}

use std::os::unix::fs::MetadataExt;

/// A directory the original prototype read (only fdinfo-*.img and files.img)
/// mounts with one warning, and serves what the fdinfo images refer to.
#[test]
fn a_prototype_style_dir_mounts_with_one_warning() {
    let env = TestEnv::new();
    let root = old_root(&env);
    let images = common::fixtures().join("incomplete/prototype-files/images");
    let data = "/tmp/criu-work/src-data/d1-kill";
    let out = env.try_mount("proto", &images, &Source::Local(root.clone()), &["--subtree", data]);
    let mount = Mount { mountpoint: env.path("mnt/proto"), cache: env.path("cache/proto"), env_home: env.path("") };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("lazyfs: warning: ") && stderr.contains("inventory.img is missing"), "{stderr}");
    let rel = "nested/a/b/c/deep.txt";
    let expected = std::fs::read(root.join(data.trim_start_matches('/')).join(rel)).unwrap();
    assert_eq!(std::fs::read(mount.mountpoint.join(rel)).unwrap(), expected);
    assert!(mount.umount().status.success());
}
