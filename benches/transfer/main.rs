//! Transfer benchmarks against the ceiling measured in the same run:
//! `cargo bench --bench transfer [-- --quick]`.
//!
//! Sets up its own sshd on loopback, the data sets (one 1 GiB file; 5,000 x
//! 4 KiB files in 50 directories; 200 x 1 MiB) and their CRIU images, then
//! measures, each at least 3 times (median, min-max):
//!   a. the first 4 KiB at the middle of the 1 GiB file through a fresh lazy
//!      mount: from `lazyfs mount` to the bytes in hand (beside a new `ssh`
//!      login and `ssh HOST cat` of the whole file), and the read alone once
//!      the mount is connected (beside one SFTP read on an open session);
//!   b. time until everything is verified with `--prefetch`, beside
//!      `ssh HOST cat` / `ssh HOST tar cf - DIR` (the OpenSSH ceiling), `scp -r`,
//!      `rsync -a` and `sshfs` + `cp -r`;
//!   c. sequential reads of a verified file through the mount beside reading
//!      its spill file directly, passthrough on and off (page cache dropped);
//!   d. the daemon's peak RSS and CPU seconds per GiB during (b);
//!   e. a checkpoint of 100,000 files (1 KiB each) under `ulimit -n 1024`:
//!      time until `lazyfs mount` returns, until all verified with
//!      `--prefetch`, and the daemon's peak RSS;
//!   f. `--subtree` over a directory of 100,000 files against one of 100:
//!      time until `lazyfs mount` returns, and the first lookup in it;
//!   p. 4 KiB reads of missing chunks during a full `--prefetch` (p50, p99)
//!      beside the same reads on an idle lazy mount;
//!   w. 1,500 random 4 KiB `pwrite`s and an `fsync` into a file made through a
//!      mount, beside the same on the cache's filesystem.
//! (b) includes the 5,000-file tree mounted with `--subtree` with nothing of it
//! recorded: listed and fetched whole, against `tar` and `rsync -a` of it.
//! `-- --wan` runs a, b and p over a 20 ms RTT, 1 Gbit/s link (see `wan.rs`);
//! `-- --only GROUPS` runs only those (e.g. `--only a,w`); `-- --many` is
//! `--only e`; `-- --tree` only the 5,000-file rows of b, and f.
//! Writes a markdown table to stdout and `target/bench/transfer[-wan].{md,json}`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../../tests/common/sshd.rs"]
mod sshd;
mod wan;
use common::{Row, lazyfs_binary, load};

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use lazyfs::images::write::{DumpFile, write_dump};
use serde_json::{Value, json};
use sshd::Sshd;

const GIB: u64 = 1 << 30;

/// lazyfs's SSH transports, each measured: `--ssh VALUE` and its label. `auto`
/// (the default) is libssh2 for what readers wait on, `ssh` for bulk.
const TRANSPORTS: [(&str, &str); 3] = [("auto", "auto"), ("openssh", "ssh"), ("libssh2", "libssh2")];

struct Dataset {
    name: &'static str,
    /// Below the source root: a file, or a directory.
    rel: &'static str,
    images: PathBuf,
    bytes: u64,
    files: usize,
    /// Added to each `lazyfs mount` of it.
    mount_args: &'static [&'static str],
}

struct Bench {
    /// Dropped before `wan`: sshd stops before its namespace goes.
    sshd: Sshd,
    wan: Option<wan::Wan>,
    work: tempfile::TempDir,
    lazyfs: PathBuf,
    runs: usize,
    rows: Vec<Row>,
}

/// Deterministic pseudo-random bytes, fast to make.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut state = seed | 1;
    for word in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

fn run(command: &mut Command) -> std::process::Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn timed(command: &mut Command) -> f64 {
    let started = Instant::now();
    run(command.stdout(Stdio::null()));
    started.elapsed().as_secs_f64()
}

/// CPU seconds of the waited-for children of this process so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds of `pid`, the children it waited for, and its live descendants.
fn tree_cpu(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11..15].iter().map(|f| f.parse::<f64>().unwrap()).sum();
    ticks / 100.0 + sshd::children_of(pid).into_iter().map(tree_cpu).sum::<f64>()
}

/// Runs `command`, returning its wall time and the CPU seconds of what it ran.
fn timed_cpu(command: &mut Command) -> (f64, f64) {
    let cpu = children_cpu();
    let wall = timed(command);
    (wall, children_cpu() - cpu)
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Bench {
    fn new(runs: usize, wan: Option<wan::Wan>) -> Bench {
        let sshd = match &wan {
            Some(wan) => Sshd::start_at(wan::SERVER_ADDR, Some(&wan.server_ns)),
            None => Sshd::start(),
        };
        let work = tempfile::Builder::new().prefix("lazyfs-bench").tempdir().unwrap();
        Bench { sshd, wan, work, lazyfs: lazyfs_binary(), runs, rows: Vec::new() }
    }

    /// A program that talks to the source: in the client's namespace under --wan.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.wan {
            Some(wan) => wan.client(program.as_ref().to_str().expect("a UTF-8 program path")),
            None => Command::new(program),
        }
    }

    /// `user@host` of the test's sshd.
    fn host(&self) -> String {
        self.sshd.target().rsplit_once(':').expect("host:port").0.to_string()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    fn source(&self) -> PathBuf {
        self.path("source")
    }

    fn ssh(&self) -> Command {
        let mut command = self.cmd("ssh");
        command
            .args(["-p", &self.sshd.port.to_string(), "-i"])
            .arg(self.sshd.user_key())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.sshd.known_hosts().display()))
            .args(["-o", "BatchMode=yes"])
            .arg(self.host());
        command
    }

    fn lazyfs(&self) -> Command {
        let mut command = self.cmd(&self.lazyfs);
        command
            .env("HOME", self.path("home"))
            .env("LAZYFS_RUNTIME_DIR", self.path("runtime"))
            .env_remove("SSH_AUTH_SOCK");
        command
    }

    fn record(
        &mut self,
        group: &'static str,
        what: impl Into<String>,
        unit: &'static str,
        runs: Vec<f64>,
        against: Option<&str>,
    ) {
        let row = Row { group, what: what.into(), unit, runs, against: against.map(String::from) };
        eprintln!("  {:<52} {:>10.4} {unit}", row.what, row.median());
        self.rows.push(row);
    }

    fn make_datasets(&self) -> Vec<Dataset> {
        let source = self.source();
        let mut buf = vec![0u8; 1 << 20];
        let big = source.join("big/file.bin");
        std::fs::create_dir_all(big.parent().unwrap()).unwrap();
        let out = std::fs::File::create(&big).unwrap();
        for i in 0..1024u64 {
            fill(i + 1, &mut buf);
            out.write_all_at(&buf, i << 20).unwrap();
        }
        let mut sets = Vec::new();
        let mut dump = |name, rel: &'static str, records: Vec<DumpFile>| {
            let images = self.path(&format!("images-{name}"));
            write_dump(&images, &records).unwrap();
            let bytes = records.iter().map(|r| r.size.unwrap()).sum();
            sets.push(Dataset { name, rel, images, bytes, files: records.len(), mount_args: &[] });
        };
        dump("1 GiB file", "big/file.bin", vec![DumpFile::new("/big/file.bin", GIB)]);
        let mut small = Vec::new();
        for i in 0..5000u64 {
            let rel = format!("small/d{:02}/f{i:04}", i % 50);
            let path = source.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            fill(i + 7, &mut buf[..4096]);
            std::fs::write(&path, &buf[..4096]).unwrap();
            small.push(DumpFile::new(format!("/{rel}"), 4096));
        }
        let tree = Dataset {
            name: "5,000-file tree, --subtree, nothing recorded",
            rel: "small",
            images: self.path("images-tree"),
            bytes: small.iter().map(|r| r.size.unwrap()).sum(),
            files: small.len(),
            mount_args: &["--subtree", "/small"],
        };
        dump("5,000 x 4 KiB", "small", small);
        // The same files as a directory the images record nothing of: listed, then fetched.
        write_dump(&tree.images, &[]).unwrap();
        let mut medium = Vec::new();
        for i in 0..200u64 {
            let rel = format!("medium/m{i:03}");
            fill(i + 9, &mut buf);
            std::fs::create_dir_all(source.join("medium")).unwrap();
            std::fs::write(source.join(&rel), &buf).unwrap();
            medium.push(DumpFile::new(format!("/{rel}"), 1 << 20));
        }
        dump("200 x 1 MiB", "medium", medium);
        sets.push(tree);
        sets
    }

    /// Mounts `set` (fresh cache), returns the mountpoint and cache dir.
    fn mount(&self, set: &Dataset, tag: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        self.mount_with(set, tag, extra, |_| {})
    }

    /// Mounts `set` (fresh cache) with `adjust` applied to the command.
    fn mount_with(
        &self,
        set: &Dataset,
        tag: &str,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> (PathBuf, PathBuf) {
        let mountpoint = self.path(&format!("mnt-{tag}"));
        let cache = self.path(&format!("cache-{tag}"));
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&mountpoint).unwrap();
        let mut command = self.lazyfs();
        adjust(&mut command);
        run(command
            .arg("mount")
            .arg(&mountpoint)
            .arg(&set.images)
            .arg(self.sshd.target())
            .arg("-i")
            .arg(self.sshd.user_key())
            .arg("--known-hosts")
            .arg(self.sshd.known_hosts())
            .arg("--source-root")
            .arg(self.source())
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra));
        (mountpoint, cache)
    }

    fn umount(&self, mountpoint: &Path) {
        run(self.lazyfs().arg("umount").arg(mountpoint));
    }

    fn daemon_pid(&self, mountpoint: &Path) -> u32 {
        let out = run(self.lazyfs().arg("status").arg(mountpoint).arg("--json"));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        status["pid"].as_u64().unwrap() as u32
    }

    /// (f) `--subtree` over a directory of 100,000 files and one of 100 (the
    /// images record none of them): time until `lazyfs mount` returns, and
    /// until the first lookup of a name in it (which lists the directory).
    fn tree_mounts(&mut self) {
        for files in [100u64, 100_000] {
            eprintln!("f. a directory of {files} files");
            let rel = format!("flat{files}");
            let dir = self.source().join(&rel);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..files {
                std::fs::write(dir.join(format!("f{i:06}")), b"x").unwrap();
            }
            let images = self.path(&format!("images-flat{files}"));
            write_dump(&images, &[]).unwrap();
            let set = Dataset { name: "", rel: "", images, bytes: files, files: files as usize, mount_args: &[] };
            let subtree = format!("/{rel}");
            let (mut mounted, mut looked) = (Vec::new(), Vec::new());
            for _ in 0..self.runs {
                let started = Instant::now();
                let (mountpoint, _) = self.mount(&set, "flat", &["--subtree", &subtree]);
                mounted.push(started.elapsed().as_secs_f64());
                let started = Instant::now();
                assert!(mountpoint.join("f000000").exists());
                looked.push(started.elapsed().as_secs_f64());
                self.umount(&mountpoint);
            }
            let what = format!("--subtree over a directory of {files} files: `lazyfs mount` returns");
            let against = (files > 100).then_some("--subtree over a directory of 100 files: `lazyfs mount` returns");
            self.record("f", what, "s", mounted, against);
            let what = format!("--subtree over a directory of {files} files: first lookup (lists it)");
            self.record("f", what, "s", looked, None);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A shell line: `ssh HOST tar cf - -C PARENT REL | tar xf - -C INTO`, then a sync of INTO's filesystem.
    fn tar_into(&self, parent: &Path, rel: &str, into: &Path) -> String {
        let mut ssh = self.ssh();
        ssh.args(["tar", "cf", "-", "-C"]).arg(parent).arg(rel);
        let words: Vec<String> = std::iter::once(ssh.get_program())
            .chain(ssh.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect();
        format!("{} | tar xf - -C '{}' && sync -f '{}'", words.join(" "), into.display(), into.display())
    }

    /// (e) 100,000 files of 1 KiB under `ulimit -n 1024`: mount time, time
    /// until all verified with --prefetch, peak RSS.
    fn many_files(&mut self) {
        const FILES: u64 = 100_000;
        eprintln!("e. {FILES} files");
        let mut records = Vec::new();
        let mut buf = [0u8; 1024];
        for i in 0..FILES {
            let rel = format!("many/d{:03}/f{i:06}", i / 1000);
            let path = self.source().join(&rel);
            if i % 1000 == 0 {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            }
            fill(i + 11, &mut buf);
            std::fs::write(&path, buf).unwrap();
            records.push(DumpFile::new(format!("/{rel}"), 1024));
        }
        let images = self.path("images-many");
        write_dump(&images, &records).unwrap();
        let set = Dataset {
            name: "100,000 x 1 KiB",
            rel: "many",
            images,
            bytes: FILES * 1024,
            files: FILES as usize,
            mount_args: &[],
        };
        // The ceiling: the same files through one `ssh tar` stream, landed and synced.
        let landed = self.path("landed-many");
        let (mut tar, mut tar_cpu) = (Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let _ = std::fs::remove_dir_all(&landed);
            std::fs::create_dir_all(&landed).unwrap();
            let (wall, cpu) =
                timed_cpu(Command::new("sh").arg("-c").arg(self.tar_into(&self.source(), "many", &landed)));
            tar.push(wall);
            tar_cpu.push(cpu);
        }
        let _ = std::fs::remove_dir_all(&landed);
        let ceiling = format!("{}: `ssh HOST tar cf - DIR | tar xf -`", set.name);
        self.record("e", ceiling.clone(), "s", tar, None);
        let (mut mounted, mut verified, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let (mut idle, mut status_growth) = (Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let started = Instant::now();
            let (mountpoint, _) = self.mount_with(&set, "many", &["--prefetch"], |command| {
                // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        let limit = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
                        match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                            0 => Ok(()),
                            _ => Err(std::io::Error::last_os_error()),
                        }
                    });
                }
            });
            mounted.push(started.elapsed().as_secs_f64());
            let pid = self.daemon_pid(&mountpoint);
            run(self.lazyfs().arg("wait").arg(&mountpoint).args(["--timeout", "900"]));
            verified.push(started.elapsed().as_secs_f64());
            rss.push(peak_rss_mib(pid));
            // What a settled mount of them holds, and what a full `status --json` adds to its peak.
            idle.push(rss_mib(pid, "VmRSS:"));
            let before = peak_rss_mib(pid);
            run(self.lazyfs().arg("status").arg(&mountpoint).arg("--json").stdout(Stdio::null()));
            status_growth.push(peak_rss_mib(pid) - before);
            self.umount(&mountpoint);
        }
        self.record("e", format!("{}, ulimit -n 1024: `lazyfs mount` returns", set.name), "s", mounted, None);
        let what = format!("{}: lazyfs --prefetch, until all verified", set.name);
        self.record("e", what, "s", verified, Some(&ceiling));
        self.record("e", format!("{}: daemon peak RSS", set.name), "MiB", rss, None);
        self.record("e", format!("{}: daemon RSS once all are verified", set.name), "MiB", idle, None);
        self.record(
            "e",
            format!("{}: a full `status --json` raises the peak by", set.name),
            "MiB",
            status_growth,
            None,
        );
    }

    /// (a) The first 4 KiB at the middle of the 1 GiB file: from the start
    /// of `lazyfs mount` (which returns before the source answers) to the
    /// bytes in hand, and the read alone on a mount connected before it
    /// returned (`--wait-for-source`): the round trips of a first read.
    fn first_byte(&mut self, big: &Dataset) {
        eprintln!("a. first byte");
        let middle = GIB / 2;
        let read = |mountpoint: &Path| {
            let file = std::fs::File::open(mountpoint.join("big/file.bin")).unwrap();
            let mut buf = [0u8; 4096];
            file.read_exact_at(&mut buf, middle).unwrap();
        };
        let mut measured = Vec::new();
        for (transport, _) in TRANSPORTS {
            let (mut returned, mut in_hand, mut alone) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..self.runs {
                let started = Instant::now();
                let (mountpoint, _) = self.mount(big, "first-byte", &["--ssh", transport]);
                returned.push(started.elapsed().as_secs_f64());
                read(&mountpoint);
                in_hand.push(started.elapsed().as_secs_f64());
                self.umount(&mountpoint);
                let (mountpoint, _) = self.mount(big, "first-byte", &["--ssh", transport, "--wait-for-source"]);
                let started = Instant::now();
                read(&mountpoint);
                alone.push(started.elapsed().as_secs_f64());
                self.umount(&mountpoint);
            }
            measured.push((returned, in_hand, alone));
        }
        let (target, key, known, home, root, runs) = (
            self.sshd.target(),
            self.sshd.user_key(),
            self.sshd.known_hosts(),
            self.path("home"),
            self.source(),
            self.runs.max(5),
        );
        let measure = move || one_sftp_read(&target, key, known, &home, &root, middle, runs);
        let one_read = match &self.wan {
            Some(wan) => wan.in_client(measure),
            None => measure(),
        };
        let file = self.source().join("big/file.bin");
        let login: Vec<f64> = (0..self.runs.max(3)).map(|_| timed(self.ssh().arg("true"))).collect();
        let cat: Vec<f64> = (0..self.runs).map(|_| timed(self.ssh().arg("cat").arg(&file))).collect();
        let (sftp_read, new_login, whole) = (
            "one SFTP read of those 4 KiB, open session",
            "`ssh HOST true` (a new login)",
            "`ssh HOST cat` of the whole 1 GiB file",
        );
        self.record("a", sftp_read, "s", one_read, None);
        self.record("a", new_login, "s", login, None);
        self.record("a", whole, "s", cat, None);
        for ((_, label), (returned, in_hand, alone)) in TRANSPORTS.iter().zip(measured) {
            self.record("a", format!("`lazyfs mount` returns, {label}"), "s", returned, Some(new_login));
            let what = format!("`lazyfs mount` started to the first 4 KiB at the middle in hand, {label}");
            self.record("a", what.clone(), "s", in_hand.clone(), Some(new_login));
            self.record("a", format!("{what} "), "s", in_hand, Some(whole));
            let what = format!("first 4 KiB at the middle of a mount connected already, {label}");
            self.record("a", what, "s", alone, Some(sftp_read));
        }
    }

    /// (b) and (d): everything verified with --prefetch, beside the peers.
    fn bulk(&mut self, set: &Dataset) {
        eprintln!("b. {}", set.name);
        let from = self.source().join(set.rel);
        let gib = set.bytes as f64 / GIB as f64;
        let landed = self.path("landed");
        let fresh = |target: &Path| {
            let _ = std::fs::remove_dir_all(target);
            let _ = std::fs::remove_file(target);
            std::fs::create_dir_all(target).unwrap();
        };
        let (ceiling, landing) = if set.rel.contains('.') {
            let runs = (0..self.runs).map(|_| timed(self.ssh().arg("cat").arg(&from))).collect();
            self.record("b", format!("{}: `ssh HOST cat > /dev/null`", set.name), "s", runs, None);
            // The bytes landed on the cache's filesystem and synced, as lazyfs lands them.
            let (mut runs, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..self.runs {
                let _ = std::fs::remove_file(&landed);
                let out = std::fs::File::create(&landed).unwrap();
                let (started, cpu_before) = (Instant::now(), children_cpu());
                run(self.ssh().arg("cat").arg(&from).stdout(out));
                std::fs::File::open(&landed).unwrap().sync_all().unwrap();
                let secs = children_cpu() - cpu_before;
                runs.push(started.elapsed().as_secs_f64());
                cpu.push(secs / gib);
            }
            let name = format!("{}: `ssh HOST cat > file`", set.name);
            self.record("b", name.clone(), "s", runs, None);
            self.record("d", format!("{name}: CPU seconds per GiB"), "s/GiB", cpu, None);
            (format!("{}: `ssh HOST cat > /dev/null`", set.name), name)
        } else {
            let parent = from.parent().unwrap().to_path_buf();
            let runs = (0..self.runs)
                .map(|_| timed(self.ssh().args(["tar", "cf", "-", "-C"]).arg(&parent).arg(set.rel)))
                .collect();
            self.record("b", format!("{}: `ssh HOST tar cf - DIR > /dev/null`", set.name), "s", runs, None);
            let (mut runs, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..self.runs {
                fresh(&landed);
                let (wall, secs) =
                    timed_cpu(Command::new("sh").arg("-c").arg(self.tar_into(&parent, set.rel, &landed)));
                runs.push(wall);
                cpu.push(secs / gib);
            }
            let name = format!("{}: `ssh HOST tar cf - DIR | tar xf -`", set.name);
            self.record("b", name.clone(), "s", runs, None);
            self.record("d", format!("{name}: CPU seconds per GiB"), "s/GiB", cpu, None);
            (format!("{}: `ssh HOST tar cf - DIR > /dev/null`", set.name), name)
        };

        // Small files also through tar, to show what it changes.
        let mut variants: Vec<(&str, String, &[&str])> =
            TRANSPORTS.iter().map(|(t, label)| (*t, label.to_string(), &[][..])).collect();
        if set.files > 1 {
            variants.push(("openssh", "ssh, --tar".into(), &["--tar"]));
        }
        for (transport, label, tar) in variants {
            let (mut times, mut rss, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..self.runs {
                let started = Instant::now();
                let args = [&["--prefetch", "--ssh", transport], tar, set.mount_args].concat();
                let (mountpoint, _) = self.mount(set, "bulk", &args);
                let pid = self.daemon_pid(&mountpoint);
                run(self.lazyfs().arg("wait").arg(&mountpoint).args(["--timeout", "900"]));
                times.push(started.elapsed().as_secs_f64());
                rss.push(peak_rss_mib(pid));
                // The daemon with its `ssh` children: they do the crypto.
                cpu.push(tree_cpu(pid as i32) / gib);
                self.umount(&mountpoint);
            }
            let what = format!("{}: lazyfs --prefetch ({label}), until all verified", set.name);
            self.record("b", what.clone(), "s", times.clone(), Some(&ceiling));
            self.record("b", format!("{what} "), "s", times, Some(&landing));
            self.record("d", format!("{}: daemon peak RSS ({label})", set.name), "MiB", rss, None);
            self.record("d", format!("{}: daemon CPU seconds per GiB ({label})", set.name), "s/GiB", cpu, None);
        }

        let target = self.path("copy");
        let key = self.sshd.user_key();
        let port = self.sshd.port.to_string();
        let known = format!("UserKnownHostsFile={}", self.sshd.known_hosts().display());
        let remote = format!("{}:{}", self.host(), from.display());
        // Over the WAN, scp and sshfs pay round trips per small file: minutes a run.
        let slow_peers = self.wan.is_some() && set.files > 1000;
        let (mut scp, mut scp_cpu) = (Vec::new(), Vec::new());
        for _ in 0..if slow_peers { 0 } else { self.runs } {
            fresh(&target);
            let (wall, secs) = timed_cpu(
                self.cmd("scp")
                    .args(["-q", "-r", "-P", &port, "-i"])
                    .arg(&key)
                    .args(["-o", &known])
                    .arg(&remote)
                    .arg(&target),
            );
            scp.push(wall);
            scp_cpu.push(secs / gib);
        }
        if !scp.is_empty() {
            self.record("b", format!("{}: `scp -r`", set.name), "s", scp, None);
            self.record("d", format!("{}: `scp -r`: CPU seconds per GiB", set.name), "s/GiB", scp_cpu, None);
        }
        if have("rsync") {
            let ssh = format!("ssh -p {port} -i {} -o {known} -o BatchMode=yes", key.display());
            let (mut runs, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..self.runs {
                fresh(&target);
                let (wall, secs) = timed_cpu(self.cmd("rsync").args(["-a", "-e", &ssh]).arg(&remote).arg(&target));
                runs.push(wall);
                cpu.push(secs / gib);
            }
            self.record("b", format!("{}: `rsync -a`", set.name), "s", runs, None);
            self.record("d", format!("{}: `rsync -a`: CPU seconds per GiB", set.name), "s/GiB", cpu, None);
        }
        if have("sshfs") && !slow_peers {
            let mnt = self.path("sshfs");
            std::fs::create_dir_all(&mnt).unwrap();
            let (mut runs, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..self.runs {
                fresh(&target);
                let started = Instant::now();
                // In the foreground, so its CPU (and its ssh's) can be read.
                let mut sshfs = self
                    .cmd("sshfs")
                    .arg("-f")
                    .arg(format!("{}:{}", self.host(), self.source().display()))
                    .arg(&mnt)
                    .args(["-p", &port, "-o"])
                    .arg(format!("IdentityFile={},{known},BatchMode=yes", key.display()))
                    .spawn()
                    .unwrap();
                while !is_mount(&mnt) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let cpu_before = children_cpu();
                run(Command::new("cp").arg("-r").arg(mnt.join(set.rel)).arg(&target));
                let elapsed = started.elapsed().as_secs_f64();
                let secs = tree_cpu(sshfs.id() as i32) + children_cpu() - cpu_before;
                run(Command::new("fusermount3").arg("-u").arg(&mnt));
                let _ = sshfs.wait();
                runs.push(elapsed);
                cpu.push(secs / gib);
            }
            self.record("b", format!("{}: `sshfs` + `cp -r`", set.name), "s", runs, None);
            self.record("d", format!("{}: `sshfs` + `cp -r`: CPU seconds per GiB", set.name), "s/GiB", cpu, None);
        }
    }

    /// (c) Sequential reads of the verified 1 GiB file.
    fn local_reads(&mut self, big: &Dataset) {
        eprintln!("c. reads of a verified file");
        let read_all = |path: &Path| -> f64 {
            drop_caches();
            let mut file = std::fs::File::open(path).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let started = Instant::now();
            while file.read(&mut buf).unwrap() > 0 {}
            (GIB as f64 / (1 << 20) as f64) / started.elapsed().as_secs_f64()
        };
        for (tag, extra) in [("passthrough on", &[][..]), ("passthrough off", &["--no-passthrough"][..])] {
            let (mountpoint, cache) = self.mount(big, "reads", &[&["--prefetch"], extra].concat());
            run(self.lazyfs().arg("wait").arg(&mountpoint).args(["--timeout", "900"]));
            let spill = lazyfs::store::spill_path(&cache, Path::new("/big/file.bin"));
            let direct: Vec<f64> = (0..self.runs).map(|_| read_all(&spill)).collect();
            let through: Vec<f64> = (0..self.runs).map(|_| read_all(&mountpoint.join("big/file.bin"))).collect();
            let direct_name = format!("read the spill file directly ({tag} run)");
            self.record("c", direct_name.clone(), "MiB/s", direct, None);
            self.record("c", format!("read through the mount, {tag}"), "MiB/s", through, Some(&direct_name));
            self.umount(&mountpoint);
        }
    }

    /// (p) Foreground reads while prefetch runs: 4 KiB reads of chunks not
    /// fetched yet (random, in the last quarter of the 1 GiB file, which a
    /// full `--prefetch` reaches last; readahead off), their p50 and p99
    /// during a full prefetch beside the same reads on an idle lazy mount.
    fn foreground(&mut self, big: &Dataset) {
        const READS: usize = 300;
        eprintln!("p. foreground reads during prefetch");
        let reads = |mountpoint: &Path, until: &dyn Fn() -> bool| -> Vec<f64> {
            let file = std::fs::File::open(mountpoint.join("big/file.bin")).unwrap();
            // SAFETY: fadvise on an open descriptor: 4 KiB reads stay 4 KiB requests.
            unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_RANDOM) };
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            let mut buf = [0u8; 4096];
            let mut times = Vec::new();
            let chunks = GIB / (16 << 10);
            // `until` (a `lazyfs status`) is asked every 10 reads, not to load the machine.
            while times.len() < READS && (times.len() % 10 != 0 || until()) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // A chunk of the last quarter, each read in a chunk of its own.
                let chunk = chunks - 1 - (state % (chunks / 4));
                let started = Instant::now();
                file.read_exact_at(&mut buf, chunk * (16 << 10)).unwrap();
                times.push(started.elapsed().as_secs_f64());
            }
            times
        };
        let quantile = |times: &[f64], q: f64| {
            let mut sorted = times.to_vec();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            sorted[((sorted.len() - 1) as f64 * q).round() as usize]
        };
        let (mut idle50, mut idle99, mut busy50, mut busy99, mut counts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let (mountpoint, _) = self.mount(big, "foreground", &["--wait-for-source"]);
            let idle = reads(&mountpoint, &|| true);
            self.umount(&mountpoint);
            let (mountpoint, _) = self.mount(big, "foreground", &["--prefetch", "--wait-for-source"]);
            // Until prefetch has most of the file: the reads stay on missing chunks.
            let status = |mountpoint: &Path| -> Value {
                let out = run(self.lazyfs().arg("status").arg(mountpoint).args(["--json"]));
                serde_json::from_slice(&out.stdout).unwrap()
            };
            // Once prefetch streams (its workers connect first).
            while status(&mountpoint)["bytes_present"].as_u64().unwrap() < 64 << 20 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let busy = reads(&mountpoint, &|| {
                let s = status(&mountpoint);
                s["bytes_present"].as_u64().unwrap() < GIB * 5 / 8
            });
            self.umount(&mountpoint);
            idle50.push(quantile(&idle, 0.5));
            idle99.push(quantile(&idle, 0.99));
            busy50.push(quantile(&busy, 0.5));
            busy99.push(quantile(&busy, 0.99));
            counts.push(busy.len() as f64);
        }
        let (i50, i99) = ("4 KiB read of a missing chunk, idle lazy mount: p50", "the same, idle: p99");
        self.record("p", i50, "s", idle50, None);
        self.record("p", i99, "s", idle99, None);
        self.record("p", "the same during a full --prefetch: p50", "s", busy50, Some(i50));
        self.record("p", "the same during a full --prefetch: p99", "s", busy99, Some(i99));
        self.record("p", "reads measured during the prefetch", "reads", counts, None);
    }

    /// (w) 1,500 random 4 KiB `pwrite`s then `fsync`, into a 64 MiB file
    /// made through a mount, beside the same on the cache's filesystem.
    fn writes(&mut self, set: &Dataset) {
        const WRITES: usize = 1500;
        const SIZE: u64 = 64 << 20;
        eprintln!("w. random writes");
        let burst = |path: &Path| -> f64 {
            let file =
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
            file.set_len(SIZE).unwrap();
            let mut block = [0u8; 4096];
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let started = Instant::now();
            for i in 0..WRITES {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                block[..8].copy_from_slice(&(i as u64).to_le_bytes());
                file.write_all_at(&block, (state % (SIZE / 4096)) * 4096).unwrap();
            }
            file.sync_all().unwrap();
            WRITES as f64 / started.elapsed().as_secs_f64()
        };
        let (mountpoint, cache) = self.mount(set, "writes", &[]);
        let (mut local, mut through) = (Vec::new(), Vec::new());
        // Alternating, several bursts a run: the machine is shared and noisy.
        for _ in 0..self.runs * 5 {
            local.push(burst(&cache.join("bench-writes")));
            through.push(burst(&mountpoint.join("bench-writes")));
        }
        self.umount(&mountpoint);
        let local_name = "1,500 random 4 KiB pwrites + fsync, on the cache's filesystem";
        self.record("w", local_name, "writes/s", local, None);
        self.record("w", "the same into a file made through the mount", "writes/s", through, Some(local_name));
    }

    fn report(&self) -> (String, Value) {
        let mut md = String::from("| | measurement | median | min – max | ratio |\n| --- | --- | --- | --- | --- |\n");
        let mut rows = Vec::new();
        for row in &self.rows {
            let (min, max) = row.runs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let against = row.against.as_ref().and_then(|name| self.rows.iter().find(|r| r.what.trim() == name.trim()));
            let ratio = against.map(|base| row.median() / base.median());
            let ratio_text = match (ratio, against) {
                (Some(r), Some(base)) => format!("{}x {}", fmt(r), base.what.trim()),
                _ => String::new(),
            };
            md.push_str(&format!(
                "| {} | {} | {} {} | {} – {} | {ratio_text} |\n",
                row.group,
                row.what.trim(),
                fmt(row.median()),
                row.unit,
                fmt(min),
                fmt(max)
            ));
            rows.push(json!({
                "group": row.group, "measurement": row.what.trim(), "unit": row.unit, "runs": row.runs,
                "median": row.median(), "min": min, "max": max, "ratio": ratio,
                "against": against.map(|b| b.what.trim().to_string()),
            }));
        }
        (md, Value::Array(rows))
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this binary without `--bench`: a
    // benchmark is not a test, so it only says how to run it.
    if !args.iter().any(|a| a == "--bench") {
        println!("transfer: a benchmark; run it with `cargo bench --bench transfer`");
        return;
    }
    let wan = args.iter().any(|a| a == "--wan");
    let runs = if args.iter().any(|a| a == "--quick") { 1 } else { 3 };
    if nix_is_root() && (!have("rsync") || !have("sshfs")) {
        let _ = Command::new("apt-get").args(["install", "-y", "-qq", "rsync", "sshfs"]).stdout(Stdio::null()).status();
    }
    // 20 ms round trip, 1 Gbit/s.
    let profile = wan.then(|| wan::Wan::start(std::time::Duration::from_millis(20), 125e6));
    let mut bench = Bench::new(runs, profile);
    std::fs::create_dir_all(bench.path("home")).unwrap();
    eprintln!("making data sets in {}", bench.work.path().display());
    // `--only GROUPS` (letters, e.g. `--only a,w`) runs those groups alone; `--many` is
    // `--only e`; `--tree` the 5,000-file rows of b, and f.
    let tree_only = args.iter().any(|a| a == "--tree");
    let only: Option<String> = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(args.get(i + 1).expect("--only GROUPS, e.g. --only a,w").clone()),
        None if tree_only => Some("bf".to_string()),
        None => args.iter().any(|a| a == "--many").then(|| "e".to_string()),
    };
    let wants = |group: char| only.as_ref().is_none_or(|groups| groups.contains(group));
    let load_before = load();
    let sets = if "abcdpw".chars().any(wants) { bench.make_datasets() } else { Vec::new() };
    if wants('a') {
        bench.first_byte(&sets[0]);
    }
    if wants('b') || wants('d') {
        // `--tree`: the 5,000 small files only (recorded, then as a tree).
        for set in sets.iter().filter(|s| !tree_only || s.rel == "small") {
            bench.bulk(set);
        }
    }
    if wants('p') {
        bench.foreground(&sets[0]);
    }
    // Reads of verified files and writes do not touch the network: loopback runs only.
    if !wan && wants('c') {
        bench.local_reads(&sets[0]);
    }
    if !wan && wants('w') {
        bench.writes(&sets[2]);
    }
    if !wan && wants('e') {
        bench.many_files();
    }
    if !wan && wants('f') {
        bench.tree_mounts();
    }
    let (table, json) = bench.report();
    let link = if wan { "WAN profile: 20 ms RTT, 1 Gbit/s through two network namespaces" } else { "loopback sshd" };
    let command = match (tree_only, &only) {
        (true, _) => " --tree".to_string(),
        (false, Some(groups)) => format!(" --only {groups}"),
        (false, None) => String::new(),
    };
    let command = match (wan, command.is_empty()) {
        (true, _) => format!(" -- --wan{command}"),
        (false, false) => format!(" --{command}"),
        (false, true) => String::new(),
    };
    let header = format!(
        "Measured on {}, {link}; {runs} run(s) each; load average {load_before} before, {} after; \
         `cargo bench --bench transfer{command}`{}.\n\n",
        machine(),
        load(),
        std::env::var("LAZYFS_BENCH_BIN").map(|bin| format!(" with LAZYFS_BENCH_BIN={bin}")).unwrap_or_default(),
    );
    let name = match (wan, tree_only, &only) {
        (true, true, _) => "transfer-wan-tree".to_string(),
        (false, true, _) => "transfer-tree".to_string(),
        (true, false, None) => "transfer-wan".to_string(),
        (false, false, None) => "transfer".to_string(),
        (true, false, Some(groups)) => format!("transfer-wan-{}", groups.replace(',', "")),
        (false, false, Some(groups)) => format!("transfer-{}", groups.replace(',', "")),
    };
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join(format!("{name}.md")), format!("{header}{table}")).unwrap();
    let files: Vec<Value> =
        sets.iter().map(|s| json!({"dataset": s.name, "files": s.files, "bytes": s.bytes})).collect();
    let json = json!({ "machine": machine(), "link": link, "runs": runs, "results": json, "datasets": files });
    std::fs::write(out_dir.join(format!("{name}.json")), serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    println!("{header}{table}");
}

/// Times one 4 KiB SFTP read at `offset` on an open session (its handle
/// opened by a read just before).
fn one_sftp_read(
    target: &str,
    key: PathBuf,
    known: PathBuf,
    home: &Path,
    root: &Path,
    offset: u64,
    runs: usize,
) -> Vec<f64> {
    let overrides =
        lazyfs::source::SshOverrides { identities: vec![key], known_hosts: Some(known), ..Default::default() };
    let spec = lazyfs::source::SourceSpec::parse(target, &overrides, Some(home)).unwrap();
    let source = lazyfs::source::open(&spec, root).unwrap();
    let mut connection = source.connect().unwrap();
    let path = Path::new("/big/file.bin");
    (0..runs)
        .map(|i| {
            let mut buf = [0u8; 4096];
            connection.read_exact_at(path, 0, 4096 * (i as u64 + 1), &mut buf).unwrap();
            let started = Instant::now();
            connection.read_exact_at(path, 0, offset, &mut buf).unwrap();
            started.elapsed().as_secs_f64()
        })
        .collect()
}

/// Whether a filesystem is mounted at `path` (from /proc/self/mountinfo).
fn is_mount(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo.lines().any(|line| line.split(' ').nth(4) == Some(&*path.to_string_lossy()))
}

/// The peak resident set of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    rss_mib(pid, "VmHWM:")
}

/// A resident-set figure (`field` of /proc/PID/status) of process `pid`, in MiB.
fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024.0
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
