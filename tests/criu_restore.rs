//! A real `criu dump` of a process tree, its files moved to the tests' own
//! sshd, and a stock `criu restore` over a lazyfs mount at the original
//! directory. CRIU 4.2 comes from third_party/criu/build (scripts/test
//! builds it first); if it cannot be built this test fails and says why.
//!
//! The tree is tests/criu/workload.py (threads, a zombie, a stopped child, a
//! child appending to a log, a mapped file, a file open twice, memfd, eventfd,
//! FIFO, socketpair, O_PATH, a deleted-but-mapped file), run under
//! tests/criu/reaper.py, a child subreaper: this machine's pid 1 does not reap,
//! and CRIU needs the tree's pids free again to restore them.
//!
//! `LAZYFS_KEEP_DUMP=DIR` copies the dump's images (without memory pages) to
//! DIR: that is how tests/fixtures/real/workload was made.

mod common;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::apps::{snapshot, wait_for_file};
use common::criu::{PATIENCE, PYTHON, Reaper, Tree, build_criu, criu_dir, dump, restore, start_pids_high};
use common::listing::{expected_rows, loaded_rows};
use common::mount::{Mount, TestEnv, is_mounted};
use common::sshd::Sshd;
use serde_json::Value;

/// The state letter of /proc/PID/stat.
fn state_of(pid: i64) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn report(run: &Path, n: u32) -> Value {
    let path = run.join(format!("report-{n}.json"));
    wait_for_file(&path);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Sends `WORD N` to the workload through its FIFO and returns report N.
fn ask(run: &Path, word: &str, n: u32) -> Value {
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(run.join("fifo"))
        .unwrap_or_else(|e| panic!("nobody reads the workload's FIFO ({e}): the restored tree is not running"));
    fifo.write_all(format!("{word} {n}\n").as_bytes()).unwrap();
    report(run, n)
}

/// `lazyfs ls --json` of the fresh dump: who uses what, by task state.
fn check_listing(env: &TestEnv, img: &Path, data: &Path, pids: &Value) {
    let out = env.run(&["ls", img.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "lazyfs ls: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "a whole dump has no warning: {}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = |name: &str| pids[name].as_u64().unwrap();
    let users = |rel: &str| -> Vec<(u64, String)> {
        let path = data.join(rel);
        let file = list.as_array().unwrap().iter().find(|f| f["path"] == path.to_str().unwrap());
        let file = file.unwrap_or_else(|| panic!("{} not listed", path.display()));
        assert_eq!(file["servable"], true, "{file}");
        let kind = |u: &Value| u.get("kind").and_then(Value::as_str).unwrap_or("fd").to_string();
        file["users"].as_array().unwrap().iter().map(|u| (u["pid"].as_u64().unwrap(), kind(u))).collect()
    };
    let root = pid("root");
    assert_eq!(users("data.bin"), [(root, "fd".into())]);
    assert_eq!(users("big.bin"), [(root, "fd".into())]);
    assert_eq!(users("twice.txt"), [(root, "fd".into()), (root, "fd".into())]);
    // Python's mmap keeps a duplicate of the descriptor it mapped.
    assert_eq!(users("sub/mapped.bin"), [(root, "fd".into()), (root, "map".into())]);
    assert_eq!(users("opath.txt"), [(root, "fd".into())]);
    assert_eq!(users("app.log"), [(pid("writer"), "fd".into())]);
    let all: Vec<&Value> = list.as_array().unwrap().iter().flat_map(|f| f["users"].as_array().unwrap()).collect();
    // The zombie has only its core image; the stopped child has everything.
    assert!(!all.iter().any(|u| u["pid"] == pids["zombie"]));
    assert!(all.iter().any(|u| u["pid"] == pids["stopped"] && u["kind"] == "exe"));
    let ghost = list.as_array().unwrap().iter().find(|f| f["path"].as_str().unwrap().ends_with("/data/ghost.bin"));
    assert!(ghost.is_some_and(|g| g["servable"] == false), "the deleted file is CRIU's to restore");
}

/// The fresh dump's listing equals what CRIU's own decoder finds: pycriu of
/// the very CRIU that wrote it (tests/criu/make-pycriu builds it from the
/// source build-criu built), read by tests/fixtures/tools/expected_from_pycriu.py.
fn compare_with_pycriu(env: &TestEnv, criu: &Path, img: &Path) {
    let source = criu.parent().and_then(Path::parent).expect("build-criu's binary is SRC/criu/criu");
    let python_path = env.path("pycriu");
    let made = Command::new(criu_dir().join("make-pycriu")).arg(source).arg(&python_path).output().unwrap();
    assert!(made.status.success(), "make-pycriu: {}", String::from_utf8_lossy(&made.stderr));
    let decoded = Command::new(PYTHON)
        .arg(common::fixtures().join("tools/expected_from_pycriu.py"))
        .arg(img)
        .env("PYTHONPATH", &python_path)
        .output()
        .unwrap();
    assert!(decoded.status.success(), "expected_from_pycriu.py: {}", String::from_utf8_lossy(&decoded.stderr));
    let expected: Value = serde_json::from_slice(&decoded.stdout).unwrap();
    let checkpoint = lazyfs::images::Checkpoint::load(img).unwrap();
    assert_eq!(loaded_rows(&checkpoint), expected_rows(&expected), "lazyfs and pycriu differ on {}", img.display());
}

#[test]
fn a_real_tree_restored_by_stock_criu_runs_over_a_lazy_mount() {
    let criu = build_criu();
    let env = TestEnv::new();
    let (data, run, img) = (env.path("data"), env.path("run"), env.path("img"));
    for dir in [run.clone(), img.clone()] {
        std::fs::create_dir_all(dir).unwrap();
    }
    common::write_workload_files(&data);

    // The tree, dumped: CRIU kills it once its images are written.
    start_pids_high();
    let workload = criu_dir().join("workload.py");
    let original = Reaper::start(&[PYTHON.as_ref(), workload.as_os_str(), data.as_os_str(), run.as_os_str()]);
    let mut tree = Tree { pids: vec![original.expect("pid")], script: "workload.py" };
    let before = report(&run, 0);
    wait_for_file(&run.join("ready"));
    let pids = before["pids"].clone();
    tree.pids = ["root", "zombie", "stopped", "writer"].iter().map(|k| pids[k].as_i64().unwrap() as i32).collect();
    dump(&criu, pids["root"].as_i64().unwrap() as i32, &img, None, &[]);
    assert_eq!(original.expect("exit"), 128 + libc::SIGKILL, "criu dump ends the tree");
    drop(original);
    if let Some(keep) = std::env::var_os("LAZYFS_KEEP_DUMP") {
        std::fs::create_dir_all(&keep).unwrap();
        for entry in std::fs::read_dir(&img).unwrap() {
            let name = entry.unwrap().file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".img") && !name.starts_with("pages-") && !name.starts_with("pagemap-") {
                std::fs::copy(img.join(&*name), Path::new(&keep).join(&*name)).unwrap();
            }
        }
    }
    // A core image per task and per thread (the root's two threads beside
    // its main one); the zombie has nothing else.
    let cores = std::fs::read_dir(&img)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("core-"));
    assert_eq!(cores.count(), 6, "4 processes and 2 more threads");
    for image in ["ids", "mm", "fs"] {
        assert!(!img.join(format!("{image}-{}.img", pids["zombie"])).exists());
    }
    check_listing(&env, &img, &data, &pids);
    compare_with_pycriu(&env, &criu, &img);

    // The old host: the data moves under the sshd's --source-root; the
    // original directory stays, empty, as the mountpoint.
    let source = env.path("source");
    let moved = source.join(data.strip_prefix("/").unwrap());
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&data, &moved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let on_source = snapshot(&moved);
    let sshd = Sshd::start();
    let out = env
        .lazyfs()
        .arg("mount")
        .arg("--prefetch")
        .arg(&data)
        .arg(&img)
        .arg(sshd.target())
        .arg("-i")
        .arg(sshd.user_key())
        .arg("--known-hosts")
        .arg(sshd.known_hosts())
        .arg("--source-root")
        .arg(&source)
        .arg("--subtree")
        .arg(&data)
        .arg("--cache-dir")
        .arg(env.path("cache"))
        .output()
        .unwrap();
    let mount = Mount { mountpoint: data.clone(), cache: env.path("cache"), env_home: env.path("") };
    assert!(out.status.success(), "lazyfs mount: {}", String::from_utf8_lossy(&out.stderr));

    // Stock `criu restore`, detached, under a reaper of its own.
    let mut restore = restore(&criu, &img, "restore.log", &[]);
    let restored = Tree { pids: tree.pids.clone(), script: "workload.py" };

    // The restored tree runs and reads the same bytes through its
    // descriptors and mappings as before the dump.
    let after = ask(&run, "check", 1);
    for key in
        ["pids", "data.bin", "big.bin", "twice.txt ro", "twice.txt rw", "mapped.bin", "opath.txt", "eventfd", "threads"]
    {
        assert_eq!(after[key], before[key], "{key}");
    }
    assert_eq!(after["memfd"], true);
    assert_eq!(after["ghost.bin"], true, "the deleted-but-mapped file");
    assert_eq!(after["socketpair"], "queued before the dump");
    assert_eq!(after["states"]["zombie"], "Z", "{}", after["states"]);
    assert!(["S", "R"].contains(&after["states"]["writer"].as_str().unwrap()), "{}", after["states"]);
    // CRIU stops the stopped child again as it lets the tree go, a moment
    // after the tree runs.
    let deadline = Instant::now() + PATIENCE;
    while state_of(pids["stopped"].as_i64().unwrap()) != Some('T') {
        assert!(Instant::now() < deadline, "the stopped child is {:?}", state_of(pids["stopped"].as_i64().unwrap()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = data.join("app.log");
    let log_len = std::fs::metadata(&log).unwrap().len();

    // The process serving the mount dies under the restored tree (`kill -9`):
    // another takes the mount over, and the tree, its descriptors and
    // mappings opened before, notices nothing (what follows runs on them).
    let serving = mount.status()["pid"].as_i64().unwrap();
    // SAFETY: kill(2) of the lazyfs process this test's mount started.
    unsafe { libc::kill(serving as i32, libc::SIGKILL) };
    while state_of(serving).is_some_and(|s| s != 'Z') {
        std::thread::sleep(Duration::from_millis(10));
    }
    mount.wait_for(|s| s["restarts"] == 1 && s["pid"].as_i64() != Some(serving), "no process took the mount over");

    // Its writes stay local: a write through its read-write descriptor, and
    // the appending child's lines.
    let later = ask(&run, "write", 2);
    assert_eq!(later["twice.txt ro"], "LOCAL original\n");
    // It writes SQLite in the mount: a new database, its WAL and shared memory.
    assert_eq!(later["sqlite rows"], 1);
    assert_eq!(ask(&run, "write", 3)["sqlite rows"], 2);
    let ticks = |r: &Value| r["ticks"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect::<Vec<_>>();
    assert!(ticks(&later).iter().zip(ticks(&after)).all(|(l, a)| *l > a), "threads tick after the restore");
    let deadline = Instant::now() + PATIENCE;
    while std::fs::metadata(&log).unwrap().len() <= log_len {
        assert!(Instant::now() < deadline, "the restored child does not append to app.log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let appended = std::fs::read(&log).unwrap();
    assert!(appended.starts_with(b"first line, before the dump\n"));
    assert_eq!(std::fs::read(data.join("twice.txt")).unwrap(), b"LOCAL original\n");
    assert_eq!(std::fs::read(data.join("big.bin")).unwrap(), on_source[Path::new("big.bin")]);

    let wait = env.run(&["wait", data.to_str().unwrap(), "--timeout", "300"]);
    assert_eq!(wait.status.code(), Some(0), "lazyfs wait: {}", String::from_utf8_lossy(&wait.stderr));
    assert_eq!(snapshot(&moved), on_source, "the old host's files are unchanged");
    let status = mount.status();
    let state_of = |rel: &str| {
        let path = data.join(rel);
        let file = status["files"].as_array().unwrap().iter().find(|f| f["path"] == path.to_str().unwrap()).cloned();
        file.unwrap_or_else(|| panic!("{rel} not in status"))["state"].clone()
    };
    assert_eq!(status["files_total"], common::workload_files().len(), "the data directory's files, served");
    assert_eq!(state_of("twice.txt"), "modified");
    assert_eq!(state_of("data.bin"), "verified");

    // The end: the restored tree killed by its pids, then the mount.
    drop(restored);
    assert!(restore.finish(), "the restored tree did not end");
    let umount = mount.umount();
    assert!(umount.status.success(), "lazyfs umount: {}", String::from_utf8_lossy(&umount.stderr));
    assert!(!is_mounted(&data));
    drop(tree);
}
