//! The pause an application sees when the process serving its mount dies.
//!
//! `cargo bench --bench failover` mounts a small checkpoint (a local source:
//! a takeover never asks the old host anything), lets an application append
//! to a checkpoint file with fsync and save small new files (write, rename),
//! every operation through lazyfs, and times each one: first with nothing
//! happening (the ceiling: what an operation costs at all), then across
//! `kill -9` of the serving process, once every 11 s (a process that served
//! for 10 s restarts with no backoff). Reported: each crash's pause (the
//! longest operation around it), p99 and max of all operations, and the
//! pause as a multiple of the quiet p99. `LAZYFS_BENCH_CRASHES=N` (default 6);
//! `LAZYFS_BENCH_SAVES=0`: appends only (every save adds two changes to the
//! journal a successor replays, so saves make each pause longer than the last).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyfs::images::write::{DumpFile, write_dump};

const CRASH_EVERY: Duration = Duration::from_secs(11);
const QUIET: Duration = Duration::from_secs(5);

struct Bench {
    dir: tempfile::TempDir,
    lazyfs: PathBuf,
}

impl Bench {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn lazyfs(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(&self.lazyfs)
            .args(args)
            .env("HOME", self.path("home"))
            .env("LAZYFS_RUNTIME_DIR", self.path("runtime"))
            .output()
            .unwrap();
        assert!(out.status.success(), "lazyfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn status(&self) -> serde_json::Value {
        self.lazyfs(&["status", self.path("mnt").to_str().unwrap(), "--json"])
    }
}

/// Each operation: when it started (since the run began) and how long it took.
type Samples = Arc<Mutex<Vec<(Duration, Duration)>>>;

/// The application: appends with fsync, and small files saved atomically.
fn application(
    root: &Path,
    saves: bool,
    stop: Arc<AtomicBool>,
    samples: Samples,
    began: Instant,
) -> std::thread::JoinHandle<()> {
    let mut log = std::fs::OpenOptions::new().append(true).open(root.join("app/app.log")).unwrap();
    let dir = root.join("app/saved");
    std::fs::create_dir_all(&dir).unwrap();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            if !saves || n.is_multiple_of(2) {
                log.write_all(format!("line {n}\n").as_bytes()).unwrap();
                log.sync_data().unwrap();
            } else {
                let tmp = dir.join(format!(".s{n}"));
                let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).unwrap();
                file.write_all(&n.to_le_bytes()).unwrap();
                drop(file);
                std::fs::rename(&tmp, dir.join(format!("s{}", n % 64))).unwrap();
            }
            samples.lock().unwrap().push((started - began, started.elapsed()));
            n += 1;
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: a
    // benchmark is not a test, so it only says how to run it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("failover: a benchmark; run it with `cargo bench --bench failover`");
        return;
    }
    let crashes: usize = std::env::var("LAZYFS_BENCH_CRASHES").ok().and_then(|n| n.parse().ok()).unwrap_or(6);
    let bench = Bench {
        dir: tempfile::Builder::new().prefix("lazyfs-failover-bench").tempdir().unwrap(),
        lazyfs: PathBuf::from(env!("CARGO_BIN_EXE_lazyfs")),
    };
    for dir in ["home", "runtime", "mnt", "source/app", "images"] {
        std::fs::create_dir_all(bench.path(dir)).unwrap();
    }
    std::fs::write(bench.path("source/app/app.log"), b"first line\n").unwrap();
    std::fs::write(bench.path("source/app/model"), vec![7u8; 4 << 20]).unwrap();
    write_dump(&bench.path("images"), &[DumpFile::new("/app/app.log", 11), DumpFile::new("/app/model", 4 << 20)])
        .unwrap();
    let (mnt, images, source, cache) =
        (bench.path("mnt"), bench.path("images"), bench.path("source"), bench.path("cache"));
    let args = [mnt.to_str().unwrap(), images.to_str().unwrap(), source.to_str().unwrap()];
    bench.lazyfs(&["mount", args[0], args[1], args[2], "--prefetch", "--cache-dir", cache.to_str().unwrap()]);
    bench.lazyfs(&["wait", args[0], "--timeout", "60"]);

    let samples: Samples = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let saves = std::env::var("LAZYFS_BENCH_SAVES").map_or(true, |v| v != "0");
    let app = application(&mnt, saves, stop.clone(), samples.clone(), began);
    std::thread::sleep(QUIET);
    let quiet_until = began.elapsed();
    let mut kills = Vec::new();
    for _ in 0..crashes {
        let pid = bench.status()["pid"].as_i64().unwrap();
        kills.push(began.elapsed());
        // SAFETY: kill(2) of the serving process of the mount this bench made.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        std::thread::sleep(CRASH_EVERY);
    }
    stop.store(true, Ordering::Relaxed);
    app.join().unwrap();
    let status = bench.status();
    bench.lazyfs(&["umount", args[0]]);

    let samples = samples.lock().unwrap().clone();
    let mut quiet: Vec<Duration> = samples.iter().filter(|(at, _)| *at < quiet_until).map(|s| s.1).collect();
    let mut crashed: Vec<Duration> = samples.iter().filter(|(at, _)| *at >= quiet_until).map(|s| s.1).collect();
    quiet.sort();
    crashed.sort();
    let pauses: Vec<Duration> = kills
        .iter()
        .map(|&kill| {
            let window = kill.saturating_sub(Duration::from_millis(100))..kill + CRASH_EVERY;
            samples.iter().filter(|(at, _)| window.contains(at)).map(|s| s.1).max().unwrap_or_default()
        })
        .collect();
    let quiet_p99 = percentile(&quiet, 0.99);
    let worst = *pauses.iter().max().unwrap();
    println!(
        "failover: {} crashes (kill -9 of the serving process), restarts in status: {}",
        crashes, status["restarts"]
    );
    println!(
        "  quiet (ceiling): {} operations, p99 {}, max {}",
        quiet.len(),
        ms(quiet_p99),
        ms(*quiet.last().unwrap())
    );
    println!(
        "  across crashes:  {} operations, p99 {}, max {}",
        crashed.len(),
        ms(percentile(&crashed, 0.99)),
        ms(*crashed.last().unwrap())
    );
    println!("  pause per crash: {}", pauses.iter().map(|&p| ms(p)).collect::<Vec<_>>().join(", "));
    println!(
        "  pause: max {}, median {}; max / quiet p99 = {:.0}x",
        ms(worst),
        ms({
            let mut sorted = pauses.clone();
            sorted.sort();
            sorted[sorted.len() / 2]
        }),
        worst.as_secs_f64() / quiet_p99.as_secs_f64()
    );
}
