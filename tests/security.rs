//! lazyfs runs as root: each attack of a hostile co-user (planting as
//! `nobody` with `runuser`) or of a changed old host, and what comes of it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::mount::{Source, TestEnv, content, dataset, is_mounted};
use common::sshd::Sshd;
use lazyfs::images::write::{DumpFile, write_dump};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Runs `args` as `nobody`.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("runuser").args(["-u", "nobody", "--"]).args(args).output().expect("runuser (util-linux)")
}

fn nobody_ok(args: &[&str]) {
    let out = as_nobody(args);
    assert!(out.status.success(), "{args:?} as nobody: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test world other users can walk through, so that only lazyfs's own
/// modes keep them out of what it makes.
fn open_env() -> TestEnv {
    let env = TestEnv::new();
    for dir in ["", "mnt", "source", "runtime"] {
        std::fs::set_permissions(env.path(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    env
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn file_status<'a>(status: &'a Value, path: &str) -> &'a Value {
    status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap_or_else(|| panic!("{path}"))
}

/// Root's files a planted symlink points at: none may change.
struct Victims {
    files: Vec<(std::path::PathBuf, Vec<u8>)>,
}

impl Victims {
    fn new(env: &TestEnv, names: &[&str]) -> Victims {
        std::fs::create_dir_all(env.path("victims")).unwrap();
        let files = names
            .iter()
            .map(|name| {
                let path = env.path("victims").join(name);
                let bytes = format!("root's {name}\n").into_bytes();
                std::fs::write(&path, &bytes).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                (path, bytes)
            })
            .collect();
        Victims { files }
    }

    fn assert_untouched(&self) {
        for (path, bytes) in &self.files {
            let meta = std::fs::metadata(path).unwrap();
            assert_eq!(std::fs::read(path).unwrap(), *bytes, "{} was written", path.display());
            assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600), "{} changed owner or mode", path.display());
        }
    }
}

#[test]
fn a_cache_dir_another_user_controls_is_refused_and_nothing_is_written_through_it() {
    let env = open_env();
    dataset(&env.path("source"), &env.path("images"), &[("/d/a", 50_000)]);
    let victims = Victims::new(&env, &["summary", "journal", "log", "spill", "lock"]);
    let victim = |name: &str| env.path("victims").join(name).to_str().unwrap().to_string();
    // nobody makes the cache dir (its names are predictable) full of symlinks to root's files.
    let cache = env.path("cache/m");
    std::fs::create_dir_all(env.path("cache")).unwrap();
    std::fs::set_permissions(env.path("cache"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let c = |name: &str| cache.join(name).to_str().unwrap().to_string();
    nobody_ok(&["mkdir", "-p", &c("spill")]);
    let spill = format!("spill/{}", lazyfs::store::spill_name(Path::new("/d/a")));
    for (link, target) in [
        ("summary.json", "summary"),
        ("journal.tmp", "journal"),
        ("journal", "journal"),
        ("lazyfs.log", "log"),
        ("lock", "lock"),
        (spill.as_str(), "spill"),
    ] {
        nobody_ok(&["ln", "-s", &victim(target), &c(link)]);
    }
    // Even with a genuine marker copied in, the directory is not root's.
    let real = lazyfs::store::CacheDir::open_cache(&env.path("real-cache")).unwrap();
    let marker = env.path("marker");
    std::fs::copy(real.join("CACHEDIR.TAG"), &marker).unwrap();
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o644)).unwrap();
    nobody_ok(&["cp", marker.to_str().unwrap(), &c("CACHEDIR.TAG")]);
    let planted_mode = mode(&cache);
    let source = Source::Local(env.path("source"));
    for extra in [&[][..], &["-f"][..]] {
        let out = env.try_mount("m", &env.path("images"), &source, extra);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("owned by uid {NOBODY}")), "{}", stderr(&out));
        assert!(!is_mounted(&env.path("mnt/m")));
        victims.assert_untouched();
    }
    assert_eq!(mode(&cache), planted_mode, "never chmodded");

    // The same directory given to root but writable by everyone: refused too, left as it is.
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    nobody_ok(&["ln", "-s", &victim("summary"), &c("summary.json")]);
    let out = env.try_mount("m", &env.path("images"), &source, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("others may write to it (mode 777)"), "{}", stderr(&out));
    assert_eq!(mode(&cache), 0o777, "never chmodded");
    victims.assert_untouched();

    // A registry (runtime) dir nobody made: refused before anything is mounted.
    let runtime = env.path("cache/nobody-runtime");
    nobody_ok(&["mkdir", "-m", "700", runtime.to_str().unwrap()]);
    let out = env
        .lazyfs()
        .env("LAZYFS_RUNTIME_DIR", &runtime)
        .args(["mount", "-f", env.path("mnt/m").to_str().unwrap(), env.path("images").to_str().unwrap()])
        .arg(env.path("source"))
        .arg("--cache-dir")
        .arg(env.path("cache/fresh"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("owned by uid {NOBODY}")), "{}", stderr(&out));
    assert!(!is_mounted(&env.path("mnt/m")));
}

#[test]
fn a_shared_cache_dir_such_as_tmp_is_refused_and_never_chmodded() {
    let env = open_env();
    dataset(&env.path("source"), &env.path("images"), &[("/d/a", 10)]);
    let sticky = env.path("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::create_dir_all(env.path("mnt/m")).unwrap();
    for dir in [Path::new("/tmp"), sticky.as_path()] {
        let before = std::fs::metadata(dir).unwrap();
        let out = env
            .lazyfs()
            .args(["mount", env.path("mnt/m").to_str().unwrap(), env.path("images").to_str().unwrap()])
            .arg(env.path("source"))
            .arg("--cache-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
        assert!(stderr(&out).contains("others may write to it (mode 1777)"), "{}", stderr(&out));
        let after = std::fs::metadata(dir).unwrap();
        assert_eq!((after.mode(), after.uid(), after.gid()), (before.mode(), before.uid(), before.gid()));
        assert!(!is_mounted(&env.path("mnt/m")));
    }
    assert_eq!(std::fs::read_dir(&sticky).unwrap().count(), 0, "nothing made in a shared dir");
}

#[test]
fn a_user_without_a_home_is_refused_rather_than_given_a_shared_path() {
    let env = open_env();
    dataset(&env.path("source"), &env.path("images"), &[("/d/a", 10)]);
    let out = as_nobody(&[
        "env",
        "-u",
        "HOME",
        "-u",
        "XDG_CACHE_HOME",
        "-u",
        "XDG_RUNTIME_DIR",
        env!("CARGO_BIN_EXE_lazyfs"),
        "mount",
        env.path("mnt").to_str().unwrap(),
        env.path("images").to_str().unwrap(),
        env.path("source").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("give --cache-dir DIR"), "{}", stderr(&out));
}

/// The old host after the dump: the recorded files replaced, each by
/// something else of the same size as the secret it would reveal.
struct ChangedSource {
    secret: Vec<u8>,
}

const LEN: usize = 20_000;
const ATTACKED: [(&str, &str); 6] = [
    ("/abs", "symbolic link"),
    ("/rel", "symbolic link"),
    ("/via/x", "symbolic link"),
    ("/nobody/a", "symbolic link"),
    ("/fifo", "now a FIFO"),
    ("/device", "now a device"),
];

fn changed_source(env: &TestEnv) -> ChangedSource {
    let root = env.path("source");
    let mut files: Vec<(&str, usize)> = ATTACKED.iter().map(|(p, _)| (*p, LEN)).collect();
    files.push(("/ok", LEN));
    dataset(&root, &env.path("images"), &files);
    // Root's secrets outside the snapshot, as long as the recorded files.
    let secret = content("secret", LEN);
    std::fs::create_dir_all(env.path("secrets/dir")).unwrap();
    for file in ["secrets/secret", "secrets/dir/x"] {
        std::fs::write(env.path(file), &secret).unwrap();
        std::fs::set_permissions(env.path(file), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let replace = |name: &str| std::fs::remove_file(root.join(name)).unwrap();
    replace("abs");
    std::os::unix::fs::symlink(env.path("secrets/secret"), root.join("abs")).unwrap();
    replace("rel");
    std::fs::write(root.join("inside"), &secret).unwrap();
    std::os::unix::fs::symlink("inside", root.join("rel")).unwrap();
    std::fs::remove_dir_all(root.join("via")).unwrap();
    std::os::unix::fs::symlink(env.path("secrets/dir"), root.join("via")).unwrap();
    replace("fifo");
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    replace("device");
    let (kind, perm) = (nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::S_IRUSR);
    nix::sys::stat::mknod(&root.join("device"), kind, perm, nix::sys::stat::makedev(1, 5)).unwrap();
    // A co-user who owns a directory of the migrated process swaps its file.
    nix::unistd::chown(&root.join("nobody"), Some(NOBODY.into()), None).unwrap();
    let planted = root.join("nobody/a");
    nobody_ok(&["rm", planted.to_str().unwrap()]);
    nobody_ok(&["ln", "-s", env.path("secrets/secret").to_str().unwrap(), planted.to_str().unwrap()]);
    ChangedSource { secret }
}

impl ChangedSource {
    /// Every changed file fails with its reason and reads EIO, never the secret;
    /// the untouched file is served.
    fn check(&self, mount: &common::mount::Mount, env: &TestEnv) {
        let mut buf = vec![0u8; LEN];
        for (path, _) in ATTACKED {
            let read = std::fs::File::open(mount.at(path)).and_then(|mut f| std::io::Read::read(&mut f, &mut buf));
            let err = read.expect_err(path);
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{path}: {err}");
        }
        assert_eq!(std::fs::read(mount.at("/ok")).unwrap(), content("/ok", LEN));
        let out = env.run(&["wait", mount.mountpoint.to_str().unwrap(), "/ok", "--timeout", "60"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let status = mount.status();
        for (path, reason) in ATTACKED {
            let file = file_status(&status, path);
            assert_eq!(file["state"], "failed", "{path}: {file}");
            let error = file["error"].as_str().unwrap();
            assert!(error.contains(reason) && error.contains("changed since the checkpoint"), "{path}: {error}");
        }
        // Nor is any of it cached.
        for (path, _) in ATTACKED {
            let spill = lazyfs::store::spill_path(&mount.cache, Path::new(path));
            // Spill files are created when first written: none at all is fine.
            let cached = std::fs::read(&spill).unwrap_or_default();
            assert!(
                !cached.windows(64).any(|w| w == &self.secret[..64]),
                "{path}: the secret is in {}",
                spill.display()
            );
        }
    }
}

fn changed_files_fail(ssh: bool) {
    let env = open_env();
    let changed = changed_source(&env);
    let sshd = ssh.then(Sshd::start);
    let source = match &sshd {
        Some(sshd) => Source::Ssh { sshd, root: env.path("source") },
        None => Source::Local(env.path("source")),
    };
    // Read on demand, and prefetched.
    let lazy = env.mount("lazy", &env.path("images"), &source, &[]);
    changed.check(&lazy, &env);
    let full = env.mount("full", &env.path("images"), &source, &["--prefetch"]);
    let out = env.run(&["wait", full.mountpoint.to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    changed.check(&full, &env);
}

#[test]
fn symlinks_fifos_and_devices_on_a_local_source_are_failed_not_served() {
    changed_files_fail(false);
}

#[test]
fn symlinks_fifos_and_devices_over_ssh_are_failed_not_served() {
    changed_files_fail(true);
}

#[test]
fn the_cache_dir_log_socket_and_registry_are_private() {
    let env = open_env();
    dataset(&env.path("source"), &env.path("images"), &[("/d/a", 50_000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--prefetch"]);
    let out = env.run(&["wait", mount.mountpoint.to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let spill = mount.cache.join("spill").join(lazyfs::store::spill_name(Path::new("/d/a")));
    for (path, expected) in [
        (mount.cache.clone(), 0o700),
        (mount.cache.join("spill"), 0o700),
        (spill.clone(), 0o600),
        (mount.cache.join("lazyfs.log"), 0o600),
        (mount.cache.join("journal"), 0o600),
        (mount.cache.join("control.sock"), 0o600),
        (env.path("runtime"), 0o700),
    ] {
        assert_eq!(mode(&path), expected, "{}", path.display());
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().uid(), 0, "{}", path.display());
    }
    let cache = |name: &str| mount.cache.join(name).to_str().unwrap().to_string();
    for args in [
        vec!["cat", &cache("lazyfs.log")],
        vec!["cat", spill.to_str().unwrap()],
        vec!["ls", mount.cache.to_str().unwrap()],
        vec!["ls", env.path("runtime").to_str().unwrap()],
    ] {
        let out = as_nobody(&args);
        assert!(!out.status.success() && stderr(&out).contains("Permission denied"), "{args:?}: {}", stderr(&out));
    }
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_lazyfs"), "status", mount.mountpoint.to_str().unwrap()])
        .env("LAZYFS_RUNTIME_DIR", env.path("runtime"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // And summary.json, written at unmount, the same way.
    assert!(mount.umount().status.success());
    assert_eq!(mode(&mount.cache.join("summary.json")), 0o600);
    assert!(!mount.cache.join("summary.json.tmp").exists());
}

#[test]
fn allow_other_still_honours_file_modes() {
    let env = open_env();
    let files = [("/m/open", 0o100644), ("/m/closed", 0o100600)];
    let records: Vec<DumpFile> = files
        .iter()
        .map(|(path, mode)| {
            let on_disk = env.path("source").join(path.trim_start_matches('/'));
            std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
            std::fs::write(&on_disk, content(path, 1000)).unwrap();
            DumpFile { mode: *mode, ..DumpFile::new(*path, 1000) }
        })
        .collect();
    write_dump(&env.path("images"), &records).unwrap();
    let source = Source::Local(env.path("source"));
    let shared = env.mount("shared", &env.path("images"), &source, &["--allow-other"]);
    let out = as_nobody(&["cat", shared.at("/m/open").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, content("/m/open", 1000));
    let out = as_nobody(&["cat", shared.at("/m/closed").to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("Permission denied"), "{}", stderr(&out));
}

#[test]
fn a_socket_another_user_serves_is_not_taken_for_a_mount() {
    let env = open_env();
    let mountpoint = env.path("mnt/fake");
    std::fs::create_dir_all(&mountpoint).unwrap();
    std::fs::create_dir_all(env.path("shared")).unwrap();
    std::fs::set_permissions(env.path("shared"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = env.path("shared/fake.sock");
    // nobody listens where a registry entry says a mount of root's answers.
    let listen = format!(
        "import socket, time; s = socket.socket(socket.AF_UNIX); s.bind({:?}); s.listen(); time.sleep(20)",
        socket.to_str().unwrap()
    );
    let mut server = Command::new("runuser").args(["-u", "nobody", "--", "python3", "-c", &listen]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "the fake server never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let name = &blake3::hash(mountpoint.as_os_str().as_encoded_bytes()).to_hex()[..16];
    let entry = serde_json::json!({ "mountpoint": mountpoint, "socket": socket, "pid": 1 });
    std::fs::write(env.path("runtime").join(name), entry.to_string()).unwrap();
    let out = env.run(&["status", mountpoint.to_str().unwrap()]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("served by uid {NOBODY}")), "{}", stderr(&out));
}
