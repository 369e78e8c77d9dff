//! Time to resume: `cargo bench --bench restore [-- --wan] [--sizes 256M,1G,4G] [--runs N] [--quick]`.
//!
//! What a user of lazyfs buys is downtime: the time from "start moving the
//! files" to the restored process answering again. For each workload, dumped
//! by a real CRIU 4.2 (`third_party/criu/build`), and each data size,
//! this measures the time to the first correct answer of the restored process
//! after its files moved to the old host (this machine's own sshd):
//!   a. files already local (the floor): `criu restore` alone;
//!   b. `rsync -a` of the data directory, then restore;
//!   c. `scp -r`, then restore;
//!   d. `sshfs` at the original directory, then restore;
//!   e. `lazyfs mount` (lazy), then restore;
//!   f. `lazyfs mount --prefetch`, then restore;
//!   g. as f, with `--prefetch-order recorded:` the recording e left;
//!   h. as e, given e's recording (`--prefetch-order recorded:`, as a manifest
//!      made with `--recording` ships it): replayed once the source answers;
//! and the time until the old host is no longer needed (the copy done, or
//! `lazyfs wait` exits; never for sshfs and a lazy mount).
//! Workloads (benches/restore/app.py): `model`, a process that maps a model
//! file of the size and answers on a TCP socket from 64 of its pages; `tree`,
//! one holding 2,000 small files open (a Python application's modules) and a
//! database file of the size, answering from every 10th module.
//! `--wan` runs it over the 20 ms RTT, 1 Gbit/s link of benches/transfer/wan.rs.
//! Writes a table to stdout and `target/bench/restore[-wan].{md,json}`.
//! Under `cargo test` (no `--bench`), a quick mode with tiny sizes checks it works.

#[path = "../common/mod.rs"]
mod common;
#[path = "../../tests/common/criu.rs"]
mod criu;
#[path = "../../tests/common/sshd.rs"]
mod sshd;
#[allow(dead_code)]
#[path = "../transfer/wan.rs"]
mod wan;
use common::{lazyfs_binary, load, median};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criu::{PYTHON, Reaper, Tree, log_tail};
use serde_json::{Value, json};
use sshd::Sshd;

const MIB: u64 = 1 << 20;
/// The request every measured restore answers first (the recording run's too).
const SEED: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Local,
    Rsync,
    Scp,
    Sshfs,
    Lazy,
    Prefetch,
    Recorded,
    Replayed,
}

impl Method {
    const ALL: [Method; 8] = [
        Method::Local,
        Method::Rsync,
        Method::Scp,
        Method::Sshfs,
        Method::Lazy,
        Method::Prefetch,
        Method::Recorded,
        Method::Replayed,
    ];

    fn label(self) -> &'static str {
        match self {
            Method::Local => "a. files already local",
            Method::Rsync => "b. `rsync -a`, then restore",
            Method::Scp => "c. `scp -r`, then restore",
            Method::Sshfs => "d. `sshfs`, then restore",
            Method::Lazy => "e. lazyfs, lazy",
            Method::Prefetch => "f. lazyfs --prefetch",
            Method::Recorded => "g. lazyfs --prefetch, recorded order",
            Method::Replayed => "h. lazyfs, lazy, e's recording replayed",
        }
    }

    /// The program it needs beside CRIU and lazyfs.
    fn needs(self) -> Option<&'static str> {
        match self {
            Method::Rsync => Some("rsync"),
            Method::Scp => Some("scp"),
            Method::Sshfs => Some("sshfs"),
            _ => None,
        }
    }
}

/// One workload of one size, dumped.
struct Workload {
    mode: &'static str,
    size: u64,
    /// The original directory (the mountpoint or copy target when restoring).
    data: PathBuf,
    /// The same files on the old host, below the sshd's source root.
    moved: PathBuf,
    images: PathBuf,
    port: u16,
    /// The process's pid, which it has again once restored.
    pid: i32,
    expected: String,
}

struct Outcome {
    answer_s: f64,
    /// Until the old host is no longer needed; `None`: never (it serves reads).
    free_s: Option<f64>,
    /// A lazyfs mount's byte counts at the first answer, shown under its row.
    at_answer: Option<String>,
}

struct Row {
    mode: &'static str,
    size: u64,
    method: Method,
    answers: Vec<f64>,
    frees: Vec<Option<f64>>,
}

impl Row {
    fn answer(&self) -> f64 {
        median(&self.answers)
    }

    fn free(&self) -> Option<f64> {
        let frees: Option<Vec<f64>> = self.frees.iter().copied().collect();
        frees.map(|f| median(&f))
    }
}

fn run(command: &mut Command) -> std::process::Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + criu::PATIENCE;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deterministic pseudo-random bytes.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut state = seed | 1;
    for word in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

/// A file of `size` pseudo-random bytes.
fn big_file(path: &Path, size: u64, seed: u64) {
    let out = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..size.div_ceil(MIB) {
        let len = (size - i * MIB).min(MIB) as usize;
        fill(seed + i, &mut buf[..len]);
        out.write_all_at(&buf[..len], i * MIB).unwrap();
    }
}

/// The process's answer to `seed`, asked on `port`: `None` until it listens.
fn ask(port: u16, seed: u64) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(format!("{seed}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer.trim().to_string())
}

struct Bench {
    /// Dropped before `wan`: sshd stops before its namespace goes.
    sshd: Sshd,
    wan: Option<wan::Wan>,
    work: tempfile::TempDir,
    criu: PathBuf,
    lazyfs: PathBuf,
    app: PathBuf,
    modules: usize,
    runs: usize,
    under_test: bool,
    rows: Vec<Row>,
}

impl Bench {
    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    fn source_root(&self) -> PathBuf {
        self.path("old-host")
    }

    /// A program that talks to the old host: in the client's namespace under --wan.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.wan {
            Some(wan) => wan.client(program.as_ref().to_str().expect("a UTF-8 program path")),
            None => Command::new(program),
        }
    }

    fn host(&self) -> String {
        self.sshd.target().rsplit_once(':').expect("host:port").0.to_string()
    }

    /// `-o` options for OpenSSH tools to reach the sshd.
    fn ssh_options(&self) -> Vec<String> {
        vec![
            format!("IdentityFile={}", self.sshd.user_key().display()),
            format!("UserKnownHostsFile={}", self.sshd.known_hosts().display()),
            "BatchMode=yes".into(),
        ]
    }

    fn lazyfs(&self) -> Command {
        let mut command = self.cmd(&self.lazyfs);
        command
            .env("HOME", self.path("home"))
            .env("LAZYFS_RUNTIME_DIR", self.path("runtime"))
            .env_remove("SSH_AUTH_SOCK");
        command
    }

    /// Makes the workload's files, runs it, dumps it with CRIU and moves its
    /// files to the old host.
    fn dump(&self, mode: &'static str, size: u64) -> Workload {
        let tag = format!("{mode}-{}", size / MIB);
        let data = self.path(&format!("data-{tag}"));
        let run_dir = self.path(&format!("run-{tag}"));
        let images = self.path(&format!("images-{tag}"));
        for dir in [&data, &run_dir, &images] {
            std::fs::create_dir_all(dir).unwrap();
        }
        if mode == "model" {
            big_file(&data.join("model.bin"), size, 1);
        } else {
            big_file(&data.join("data.bin"), size, 2);
            let mut buf = vec![0u8; 16 << 10];
            for i in 0..self.modules {
                let dir = data.join(format!("app/pkg{:02}", i % 40));
                std::fs::create_dir_all(&dir).unwrap();
                let len = 2048 + (i * 7919) % (14 << 10);
                fill(i as u64 + 3, &mut buf[..len]);
                std::fs::write(dir.join(format!("mod{i:04}.py")), &buf[..len]).unwrap();
            }
        }
        let expected = run(Command::new(PYTHON).arg(&self.app).args(["expect", mode]).arg(&data).arg(SEED.to_string()));
        let expected = String::from_utf8(expected.stdout).unwrap().trim().to_string();

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        criu::start_pids_high();
        let app = Reaper::start(&[
            PYTHON.as_ref(),
            self.app.as_os_str(),
            "serve".as_ref(),
            mode.as_ref(),
            data.as_os_str(),
            port.to_string().as_ref(),
            run_dir.as_os_str(),
        ]);
        let pid = app.expect("pid");
        let _tree = Tree { pids: vec![pid], script: "app.py" };
        wait_for(&run_dir.join("ready"));
        assert_eq!(ask(port, SEED).as_deref(), Some(expected.as_str()), "{mode} before the dump");
        let out = Command::new(&self.criu)
            .args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(&images)
            .args(["-o", "dump.log", "-v4"])
            .output()
            .unwrap();
        assert!(out.status.success(), "criu dump failed:\n{}", log_tail(&images.join("dump.log")));
        assert_eq!(app.expect("exit"), 128 + libc::SIGKILL, "criu dump ends the process");
        drop(app);

        let moved = self.source_root().join(data.strip_prefix("/").unwrap());
        std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
        std::fs::rename(&data, &moved).unwrap();
        std::fs::create_dir(&data).unwrap();
        Workload { mode, size, data, moved, images, port, pid, expected }
    }

    fn cache_dir(&self, w: &Workload, method: Method) -> PathBuf {
        self.path(&format!("cache-{}-{}-{method:?}", w.mode, w.size / MIB))
    }

    fn recording(&self, w: &Workload) -> PathBuf {
        self.path(&format!("recording-{}-{}", w.mode, w.size / MIB))
    }

    /// Moves the files (or mounts them), restores, and times the first answer.
    fn resume(&self, w: &Workload, method: Method) -> Outcome {
        // Cold caches, as on a new host; not under `cargo test`, on a machine others share.
        if !self.under_test {
            drop_caches();
        }
        let remote = format!("{}:{}", self.host(), w.moved.display());
        let options: Vec<String> = self.ssh_options().into_iter().flat_map(|o| ["-o".to_string(), o]).collect();
        let port = self.sshd.port.to_string();
        let cache = self.cache_dir(w, method);
        let _ = std::fs::remove_dir_all(&cache);
        let started = Instant::now();
        let mut free = None;
        match method {
            Method::Local => {
                std::fs::remove_dir(&w.data).unwrap();
                std::fs::rename(&w.moved, &w.data).unwrap();
            }
            Method::Rsync => {
                let ssh = format!("ssh -p {port} {}", options.join(" "));
                run(self.cmd("rsync").args(["-a", "-e", &ssh]).arg(format!("{remote}/")).arg(&w.data));
            }
            Method::Scp => {
                std::fs::remove_dir(&w.data).unwrap();
                run(self.cmd("scp").args(["-q", "-r", "-P", &port]).args(&options).arg(&remote).arg(&w.data));
            }
            Method::Sshfs => {
                run(self.cmd("sshfs").arg(&remote).arg(&w.data).args(["-p", &port, "-o", "ro"]).args(&options));
            }
            Method::Lazy | Method::Prefetch | Method::Recorded | Method::Replayed => {
                let mut mount = self.lazyfs();
                mount.arg("mount").arg(&w.data).arg(&w.images).arg(self.sshd.target());
                mount.arg("-i").arg(self.sshd.user_key()).arg("--known-hosts").arg(self.sshd.known_hosts());
                mount.arg("--source-root").arg(self.source_root()).arg("--subtree").arg(&w.data);
                mount.arg("--cache-dir").arg(&cache);
                if matches!(method, Method::Prefetch | Method::Recorded) {
                    mount.arg("--prefetch");
                }
                // As a manifest made with `--recording` ships it (a lazy mount replays it by default).
                if matches!(method, Method::Recorded | Method::Replayed) {
                    mount.arg("--prefetch-order").arg(format!("recorded:{}", self.recording(w).display()));
                }
                run(&mut mount);
            }
        }
        if matches!(method, Method::Local | Method::Rsync | Method::Scp) {
            free = Some(started.elapsed().as_secs_f64());
        }

        let restore = Reaper::start(&[
            self.criu.as_os_str(),
            "restore".as_ref(),
            "-D".as_ref(),
            w.images.as_os_str(),
            "-d".as_ref(),
            "-o".as_ref(),
            "restore.log".as_ref(),
        ]);
        let _criu = restore.expect("pid");
        let code = restore.expect("exit");
        assert_eq!(code, 0, "{method:?}: criu restore failed:\n{}", log_tail(&w.images.join("restore.log")));
        let restored = Tree { pids: vec![w.pid], script: "app.py" };
        let answer = loop {
            if let Some(answer) = ask(w.port, SEED) {
                break answer;
            }
            assert!(started.elapsed() < criu::PATIENCE * 10, "{method:?}: the restored process does not answer");
            std::thread::sleep(Duration::from_millis(1));
        };
        let answer_s = started.elapsed().as_secs_f64();
        assert_eq!(answer, w.expected, "{method:?}: a wrong answer");
        let at_answer =
            matches!(method, Method::Lazy | Method::Prefetch | Method::Recorded | Method::Replayed).then(|| {
                let status = run(self.lazyfs().arg("status").arg(&w.data).arg("--json"));
                let status: Value = serde_json::from_slice(&status.stdout).unwrap();
                format!(
                    "at the answer: {} bytes fetched for readers, {} by prefetch",
                    status["bytes_on_demand"], status["bytes_prefetched"]
                )
            });
        if matches!(method, Method::Prefetch | Method::Recorded) {
            run(self.lazyfs().arg("wait").arg(&w.data).args(["--timeout", "3600"]));
            free = Some(started.elapsed().as_secs_f64());
        }

        drop(restored);
        let mut restore = restore;
        assert!(restore.finish(), "the restored process did not end");
        match method {
            Method::Local => {
                std::fs::rename(&w.data, &w.moved).unwrap();
                std::fs::create_dir(&w.data).unwrap();
            }
            Method::Rsync | Method::Scp => {
                std::fs::remove_dir_all(&w.data).unwrap();
                std::fs::create_dir(&w.data).unwrap();
            }
            Method::Sshfs => {
                run(Command::new("fusermount3").arg("-u").arg(&w.data));
            }
            Method::Lazy | Method::Prefetch | Method::Recorded | Method::Replayed => {
                run(self.lazyfs().arg("umount").arg(&w.data));
                if method == Method::Lazy {
                    std::fs::copy(cache.join("recording"), self.recording(w)).unwrap();
                }
                // `LAZYFS_BENCH_LOGS=DIR` keeps each mount's log (with `LAZYFS_LOG=debug`, its timeline).
                if let Some(dir) = std::env::var_os("LAZYFS_BENCH_LOGS") {
                    let name = format!("{}-{}-{method:?}.log", w.mode, w.size / MIB);
                    let _ = std::fs::copy(cache.join("lazyfs.log"), Path::new(&dir).join(name));
                }
                std::fs::remove_dir_all(&cache).unwrap();
            }
        }
        Outcome { answer_s, free_s: free, at_answer }
    }

    fn measure(&mut self, mode: &'static str, size: u64) {
        eprintln!("{mode}, {} MiB: dumping", size / MIB);
        let w = self.dump(mode, size);
        for method in Method::ALL {
            if let Some(program) = method.needs().filter(|p| !have(p)) {
                eprintln!("  {:<40} skipped: {program} not installed", method.label());
                continue;
            }
            // 2,000 files cost scp and sshfs round trips each: over the WAN,
            // `scp -r` took 204 s at 256 MiB.
            if self.wan.is_some() && mode == "tree" && matches!(method, Method::Scp | Method::Sshfs) {
                eprintln!("  {:<40} skipped: per-file round trips over the WAN, minutes a run", method.label());
                continue;
            }
            let mut row = Row { mode, size, method, answers: Vec::new(), frees: Vec::new() };
            let mut details = Vec::new();
            for _ in 0..self.runs {
                let outcome = self.resume(&w, method);
                row.answers.push(outcome.answer_s);
                row.frees.push(outcome.free_s);
                details.extend(outcome.at_answer);
            }
            eprintln!(
                "  {:<40} first answer {:>8.3} s, old host free {}",
                method.label(),
                row.answer(),
                row.free().map_or("never".into(), |f| format!("{f:.3} s"))
            );
            // Under the row they belong to.
            for detail in details {
                eprintln!("    {detail}");
            }
            self.rows.push(row);
        }
        let _ = std::fs::remove_dir_all(&w.moved);
        let _ = std::fs::remove_dir_all(&w.images);
    }

    fn report(&self) -> (String, Value) {
        let mut md = String::from(
            "| workload | size | how | first answer | vs a (floor) | vs b (rsync) | old host needed for |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        let mut rows = Vec::new();
        for row in &self.rows {
            let base = |method: Method| {
                self.rows
                    .iter()
                    .find(|r| r.mode == row.mode && r.size == row.size && r.method == method)
                    .map(Row::answer)
            };
            let ratio = |method| base(method).map(|b| row.answer() / b);
            let text = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{r:.2}x"));
            md.push_str(&format!(
                "| {} | {} | {} | {:.3} s | {} | {} | {} |\n",
                row.mode,
                size_text(row.size),
                row.method.label(),
                row.answer(),
                text(ratio(Method::Local)),
                text(ratio(Method::Rsync)),
                row.free().map_or("until unmounted".into(), |f| format!("{f:.2} s")),
            ));
            rows.push(json!({
                "workload": row.mode, "bytes": row.size, "method": row.method.label(),
                "first_answer_s": row.answers, "median_s": row.answer(),
                "vs_floor": ratio(Method::Local), "vs_rsync": ratio(Method::Rsync),
                "old_host_free_s": row.frees,
            }));
        }
        (md, Value::Array(rows))
    }
}

fn size_text(size: u64) -> String {
    if size >= 1 << 30 { format!("{} GiB", size >> 30) } else { format!("{} MiB", size / MIB) }
}

/// `256M`, `1G`, `4G`, or bytes.
fn parse_size(text: &str) -> u64 {
    let (number, unit) = match text.char_indices().last() {
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        Some((i, 'M' | 'm')) => (&text[..i], MIB),
        _ => (text, 1),
    };
    number.parse::<u64>().unwrap_or_else(|_| panic!("--sizes: {text:?} is not a size like 256M or 1G")) * unit
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    // `cargo test --all-targets` runs this binary without `--bench`: a quick
    // mode, tiny sizes on loopback, to show the benchmark still works.
    let under_test = !args.iter().any(|a| a == "--bench");
    let quick = under_test || args.iter().any(|a| a == "--quick");
    let wan = !under_test && args.iter().any(|a| a == "--wan");
    let sizes: Vec<u64> = match value("--sizes") {
        Some(list) => list.split(',').map(parse_size).collect(),
        None if quick => vec![4 * MIB],
        None => vec![256 * MIB, 1 << 30, 4 << 30],
    };
    let runs = value("--runs").map_or(1, |n| n.parse().expect("--runs N"));
    if !under_test && (!have("rsync") || !have("sshfs")) {
        let _ = Command::new("apt-get").args(["install", "-y", "-qq", "rsync", "sshfs"]).stdout(Stdio::null()).status();
    }
    let criu = criu::build_criu();
    // 20 ms round trip, 1 Gbit/s.
    let profile = wan.then(|| wan::Wan::start(Duration::from_millis(20), 125e6));
    let sshd = match &profile {
        Some(wan) => Sshd::start_at(wan::SERVER_ADDR, Some(&wan.server_ns)),
        None => Sshd::start(),
    };
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bench = Bench {
        sshd,
        wan: profile,
        work: tempfile::Builder::new().prefix("lazyfs-restore").tempdir().unwrap(),
        criu,
        lazyfs: lazyfs_binary(),
        app: manifest_dir.join("benches/restore/app.py"),
        modules: if quick { 200 } else { 2000 },
        runs,
        under_test,
        rows: Vec::new(),
    };
    std::fs::create_dir_all(bench.path("home")).unwrap();
    let load_before = load();
    for &size in &sizes {
        for mode in ["model", "tree"] {
            bench.measure(mode, size);
        }
    }
    let (table, json) = bench.report();
    let link = if wan { "WAN profile: 20 ms RTT, 1 Gbit/s through two network namespaces" } else { "loopback sshd" };
    let header = format!(
        "Measured on {} cores, Linux {}, {link}; {runs} run(s) each; load average {load_before} before, {} after; \
         `cargo bench --bench restore{}`.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        String::from_utf8_lossy(&run(Command::new("uname").arg("-r")).stdout).trim(),
        load(),
        if under_test {
            " (quick mode, under `cargo test`)"
        } else if wan {
            " -- --wan"
        } else {
            ""
        },
    );
    let name = match (under_test, wan) {
        (true, _) => "restore-quick",
        (false, true) => "restore-wan",
        (false, false) => "restore",
    };
    let out_dir = manifest_dir.join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join(format!("{name}.md")), format!("{header}{table}")).unwrap();
    let json = json!({ "link": link, "runs": runs, "load_before": load_before, "results": json });
    std::fs::write(out_dir.join(format!("{name}.json")), serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    println!("{header}{table}");
}
