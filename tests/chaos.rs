//! Issue 21's chaos test: for a bounded time (`LAZYFS_CHAOS_SECS`, 90 s by
//! default), rounds of random writes, creates, renames, unlinks and truncates
//! from several processes through a real FUSE mount over the tests' sshd,
//! with a cache dir on a small tmpfs, while the serving process (a successor
//! takes the mount over) or the whole mount is `kill -9`ed at random
//! moments, the cache disk fills up and empties, the connection to the
//! source is cut, and the mount is mounted again with other spellings of the
//! same source. After each round every acknowledged change is there and every
//! byte equals an in-memory model of what each process was told.
//!
//! A change answered with an error did not happen (ENOSPC, ENOENT and EEXIST
//! are checked against the model as they come); the one change a process
//! was making when the daemon died may have happened or not (either is
//! accepted, and the model follows what the mount shows).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{Mount, TestEnv, content, dataset, wait_gone};
use common::sshd::{Sshd, whoami};
use common::tmpfs::Tmpfs;

const WORKERS: usize = 3;
/// Names a worker's files take, in its own directory.
const NAMES: usize = 5;
const PAGE: u64 = 4096;
/// Files grow up to this many pages (a write is one page at most: one
/// request, never torn by the daemon's death).
const PAGES: u64 = 12;
const CHECKPOINT_LEN: usize = 48 << 10;

/// A small deterministic random number generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A change a worker makes: to file `n{i}` of its directory, or (`None`) to
/// the checkpoint's file it was given.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Create(usize),
    Write { file: Option<usize>, page: u64, len: u64, seed: u64 },
    Truncate { file: Option<usize>, len: u64 },
    Rename(usize, usize),
    Unlink(usize),
}

fn which(file: Option<usize>) -> String {
    file.map_or("c".into(), |i| i.to_string())
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Create(i) => write!(f, "create {i}"),
            Op::Write { file, page, len, seed } => write!(f, "write {} {page} {len} {seed}", which(*file)),
            Op::Truncate { file, len } => write!(f, "truncate {} {len}", which(*file)),
            Op::Rename(a, b) => write!(f, "rename {a} {b}"),
            Op::Unlink(i) => write!(f, "unlink {i}"),
        }
    }
}

impl Op {
    fn random(rng: &mut Rng) -> Op {
        let name = |rng: &mut Rng| rng.below(NAMES as u64) as usize;
        let file = |rng: &mut Rng| if rng.chance(25) { None } else { Some(rng.below(NAMES as u64) as usize) };
        match rng.below(100) {
            0..20 => Op::Create(name(rng)),
            20..60 => Op::Write { file: file(rng), page: rng.below(PAGES), len: 1 + rng.below(PAGE), seed: rng.next() },
            60..72 => Op::Truncate { file: file(rng), len: rng.below(PAGES * PAGE) },
            72..88 => Op::Rename(name(rng), name(rng)),
            _ => Op::Unlink(name(rng)),
        }
    }

    fn parse(text: &str) -> Op {
        let words: Vec<&str> = text.split(' ').collect();
        let file = |w: &str| (w != "c").then(|| w.parse().unwrap());
        let num = |i: usize| words[i].parse::<u64>().unwrap();
        match words[0] {
            "create" => Op::Create(num(1) as usize),
            "write" => Op::Write { file: file(words[1]), page: num(2), len: num(3), seed: num(4) },
            "truncate" => Op::Truncate { file: file(words[1]), len: num(2) },
            "rename" => Op::Rename(num(1) as usize, num(2) as usize),
            "unlink" => Op::Unlink(num(1) as usize),
            other => panic!("unknown op {other}"),
        }
    }

    /// Makes the change through the mount.
    fn run(&self, dir: &Path, checkpoint: &Path) -> std::io::Result<()> {
        let path = |file: &Option<usize>| file.map_or(checkpoint.to_path_buf(), |i| dir.join(format!("n{i}")));
        let open = |file: &Option<usize>| std::fs::File::options().write(true).open(path(file));
        match self {
            Op::Create(i) => std::fs::File::options().write(true).create_new(true).open(path(&Some(*i))).map(drop),
            Op::Write { file, page, len, seed } => {
                let written = open(file)?.write_at(&bytes(*seed, *len), page * PAGE)?;
                assert_eq!(written as u64, *len, "a write of one page was cut short");
                Ok(())
            }
            Op::Truncate { file, len } => open(file)?.set_len(*len),
            Op::Rename(a, b) => std::fs::rename(path(&Some(*a)), path(&Some(*b))),
            Op::Unlink(i) => std::fs::remove_file(path(&Some(*i))),
        }
    }
}

fn bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// What a worker's files are, as its acknowledged changes made them.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    files: BTreeMap<usize, Vec<u8>>,
    checkpoint: Vec<u8>,
}

impl Model {
    /// Applies `op` as a local filesystem would, or gives the errno it would answer.
    fn apply(&mut self, op: &Op) -> Result<(), i32> {
        match op {
            Op::Create(i) if self.files.contains_key(i) => return Err(libc::EEXIST),
            Op::Create(i) => {
                self.files.insert(*i, Vec::new());
            }
            Op::Write { file, page, len, seed } => {
                let data = self.file(file)?;
                let at = (page * PAGE) as usize;
                let end = at + *len as usize;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[at..end].copy_from_slice(&bytes(*seed, *len));
            }
            Op::Truncate { file, len } => self.file(file)?.resize(*len as usize, 0),
            Op::Rename(a, b) => {
                let moved = self.files.remove(a).ok_or(libc::ENOENT)?;
                self.files.insert(*b, moved);
            }
            Op::Unlink(i) => {
                self.files.remove(i).ok_or(libc::ENOENT)?;
            }
        }
        Ok(())
    }

    fn file(&mut self, file: &Option<usize>) -> Result<&mut Vec<u8>, i32> {
        match file {
            None => Ok(&mut self.checkpoint),
            Some(i) => self.files.get_mut(i).ok_or(libc::ENOENT),
        }
    }

    /// What the mount shows of a worker's files.
    fn read(dir: &Path, checkpoint: &Path) -> Model {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let i: usize = name.strip_prefix('n').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{name}?"));
            files.insert(i, std::fs::read(entry.path()).unwrap());
        }
        Model { files, checkpoint: std::fs::read(checkpoint).unwrap() }
    }

    fn differences(&self, shown: &Model) -> String {
        let mut out = Vec::new();
        let names: std::collections::BTreeSet<_> = self.files.keys().chain(shown.files.keys()).collect();
        let describe = |f: Option<&Vec<u8>>| f.map_or("missing".to_string(), |b| format!("{} bytes", b.len()));
        for i in names {
            let (want, got) = (self.files.get(i), shown.files.get(i));
            if want != got {
                out.push(format!("n{i}: model {}, mount {}{}", describe(want), describe(got), first_diff(want, got)));
            }
        }
        if self.checkpoint != shown.checkpoint {
            let (want, got) = (Some(&self.checkpoint), Some(&shown.checkpoint));
            out.push(format!("checkpoint file: {} vs {}{}", describe(want), describe(got), first_diff(want, got)));
        }
        out.join("; ")
    }
}

fn first_diff(a: Option<&Vec<u8>>, b: Option<&Vec<u8>>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => a
            .iter()
            .zip(b.iter())
            .position(|(x, y)| x != y)
            .map(|at| format!(", first differing byte {at}"))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Errors that mean the daemon went away mid-change: it may have happened.
fn maybe_made(errno: i32) -> bool {
    matches!(errno, libc::ENOTCONN | libc::ECONNABORTED | libc::EIO)
}

/// The worker process: makes random changes for a while, each announced
/// (`? OP`) and answered (`= ok`, `= ERRNO`) on stdout; stops at the first
/// change whose outcome it cannot know.
#[test]
fn chaos_worker() {
    let Some(dir) = std::env::var_os("LAZYFS_CHAOS_DIR").map(PathBuf::from) else { return };
    let checkpoint = PathBuf::from(std::env::var_os("LAZYFS_CHAOS_FILE").unwrap());
    let seed: u64 = std::env::var("LAZYFS_CHAOS_SEED").unwrap().parse().unwrap();
    let ms: u64 = std::env::var("LAZYFS_CHAOS_MS").unwrap().parse().unwrap();
    let until = Instant::now() + Duration::from_millis(ms);
    let mut rng = Rng(seed | 1);
    let mut out = std::io::stdout().lock();
    // The test harness's "test chaos_worker ... " line is still open.
    writeln!(out).unwrap();
    while Instant::now() < until {
        let op = Op::random(&mut rng);
        writeln!(out, "? {op}").unwrap();
        out.flush().unwrap();
        let result = op.run(&dir, &checkpoint);
        let errno = result.as_ref().err().map(|e| e.raw_os_error().unwrap_or(-1));
        match errno {
            None => writeln!(out, "= ok").unwrap(),
            Some(errno) => writeln!(out, "= {errno}").unwrap(),
        }
        out.flush().unwrap();
        if errno.is_some_and(maybe_made) {
            break;
        }
    }
    std::process::exit(0);
}

/// A worker as the test sees it: its model, and what it was told.
struct Worker {
    dir: String,
    checkpoint: String,
    model: Model,
    /// A change made when the daemon died: it may or may not have happened.
    maybe: Option<Op>,
}

#[derive(Default)]
struct Tally {
    rounds: u64,
    acknowledged: u64,
    refused_full: u64,
    refused_other: u64,
    maybe_made: u64,
    maybe_not: u64,
    kills: u64,
    failovers: u64,
    fills: u64,
    cuts: u64,
    bytes_checked: u64,
}

impl Worker {
    fn spawn(&self, mountpoint: &Path, seed: u64, ms: u64) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args(["chaos_worker", "--exact", "--nocapture", "--test-threads=1"])
            .env("LAZYFS_CHAOS_DIR", mountpoint.join(&self.dir))
            .env("LAZYFS_CHAOS_FILE", mountpoint.join(&self.checkpoint))
            .env("LAZYFS_CHAOS_SEED", seed.to_string())
            .env("LAZYFS_CHAOS_MS", ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Follows what the worker was told, checking each answer against the model.
    fn take(&mut self, child: Child, tally: &mut Tally) {
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let mut pending: Option<Op> = None;
        for line in text.lines() {
            if let Some(op) = line.strip_prefix("? ") {
                assert!(pending.is_none(), "{}: a change without an answer before {op}", self.dir);
                pending = Some(Op::parse(op));
            } else if let Some(answer) = line.strip_prefix("= ") {
                let op = pending.take().expect("an answer to a change");
                let errno: Option<i32> = (answer != "ok").then(|| answer.parse().unwrap());
                let mut after = self.model.clone();
                let expected = after.apply(&op);
                match errno {
                    None => {
                        assert_eq!(expected, Ok(()), "{}: `{op}` acknowledged, but the model says otherwise", self.dir);
                        self.model = after;
                        tally.acknowledged += 1;
                    }
                    Some(libc::ENOSPC) => tally.refused_full += 1,
                    Some(e) if maybe_made(e) => self.maybe = Some(op),
                    Some(e) => {
                        assert_eq!(expected, Err(e), "{}: `{op}` answered errno {e} against the model", self.dir);
                        tally.refused_other += 1;
                    }
                }
            }
        }
        assert!(pending.is_none(), "{}: a change never answered", self.dir);
    }

    /// Every acknowledged change is on the mount, and nothing else (but the
    /// change the daemon died during, either way).
    fn check(&mut self, mountpoint: &Path, tally: &mut Tally) {
        let shown = Model::read(&mountpoint.join(&self.dir), &mountpoint.join(&self.checkpoint));
        if shown != self.model {
            let Some(op) = self.maybe.take() else {
                panic!("{}: {}", self.dir, self.model.differences(&shown));
            };
            let mut made = self.model.clone();
            let _ = made.apply(&op);
            assert!(shown == made, "{}: neither without nor with `{op}`: {}", self.dir, self.model.differences(&shown));
            self.model = made;
            tally.maybe_made += 1;
        } else if self.maybe.take().is_some() {
            tally.maybe_not += 1;
        }
        tally.bytes_checked +=
            self.model.files.values().map(|f| f.len() as u64).sum::<u64>() + self.model.checkpoint.len() as u64;
    }
}

/// The chaos test. Skipped when run as a worker.
#[test]
fn every_acknowledged_change_survives_kills_full_disks_cuts_and_respellings() {
    if std::env::var_os("LAZYFS_CHAOS_DIR").is_some() {
        return;
    }
    let budget =
        Duration::from_secs(std::env::var("LAZYFS_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(90));
    let seed: u64 = std::env::var("LAZYFS_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("chaos: seed {seed} (LAZYFS_CHAOS_SEED={seed} repeats it), {} s", budget.as_secs());
    let mut rng = Rng(seed | 1);
    let started = Instant::now();

    let env = TestEnv::new();
    let sshd = Sshd::start();
    sshd.know_as("localhost");
    let checkpoints: Vec<String> = (0..WORKERS).map(|w| format!("/app/c{w}")).collect();
    let files: Vec<(&str, usize)> = checkpoints.iter().map(|p| (p.as_str(), CHECKPOINT_LEN)).collect();
    dataset(&env.path("source"), &env.path("images"), &files);
    let root = env.path("source").display().to_string();
    let spellings = [
        (format!("127.0.0.1:{}", sshd.port), root.clone()),
        (format!("ssh://{}@127.0.0.1:{}", whoami(), sshd.port), format!("{root}/")),
        (format!("{}@localhost:{}", whoami(), sshd.port), format!("{root}/./")),
    ];
    // The cache dir lives on a tmpfs of 8 MiB, filled and emptied from
    // outside (the journal grows by every change: ~3 MiB in 90 s here).
    let tmpfs = Tmpfs::mount(&env.path("cache"), "8m");
    let filler = tmpfs.0.join("filler");
    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|w| Worker {
            dir: format!("app/w{w}"),
            checkpoint: checkpoints[w].trim_start_matches('/').to_string(),
            model: Model { files: BTreeMap::new(), checkpoint: content(&checkpoints[w], CHECKPOINT_LEN) },
            maybe: None,
        })
        .collect();
    let mut tally = Tally::default();

    let mount_as = |round: u64| -> Mount {
        let (target, root) = &spellings[round as usize % spellings.len()];
        let extra = ["--prefetch", "--source-root", root, "--reconnect-timeout", "10"];
        let out = env.mount_spelled("m", &env.path("images"), &sshd, target, &extra);
        env.mounted("m", &out)
    };
    let mut mount = mount_as(0);
    mount.wait_complete();
    for worker in &workers {
        std::fs::create_dir(mount.mountpoint.join(&worker.dir)).unwrap();
    }

    while started.elapsed() < budget {
        tally.rounds += 1;
        let status = mount.status();
        let pids = ["supervisor_pid", "pid"].map(|key| status[key].as_i64().unwrap() as i32);
        let ms = 800 + rng.below(2000);
        let children: Vec<Child> = workers.iter().map(|w| w.spawn(&mount.mountpoint, rng.next(), ms)).collect();
        // What happens meanwhile, at random moments: the disk fills (and
        // maybe empties again), the connection is cut, the serving process
        // dies (its supervisor starts another on the same mount), or the
        // supervisor and it both die (the mount goes stale).
        let mut events: Vec<(u64, &str)> = Vec::new();
        if rng.chance(50) {
            let at = rng.below(ms);
            events.push((at, "fill"));
            if rng.chance(60) {
                events.push((at + rng.below(ms), "empty"));
            }
        }
        if rng.chance(40) {
            events.push((rng.below(ms), "cut"));
        }
        let (failover, kill) = (rng.chance(35), rng.chance(35));
        if failover {
            events.push((100 + rng.below(ms), "failover"));
        }
        if kill {
            events.push((200 + rng.below(ms), "kill"));
        }
        events.sort();
        let round_start = Instant::now();
        for (at, event) in events {
            let wait = Duration::from_millis(at).saturating_sub(round_start.elapsed());
            std::thread::sleep(wait);
            match event {
                "fill" => {
                    fill(&filler);
                    tally.fills += 1;
                }
                "empty" => {
                    let _ = std::fs::remove_file(&filler);
                }
                "cut" => {
                    for session in sshd.sessions() {
                        unsafe { libc::kill(session, libc::SIGKILL) };
                    }
                    tally.cuts += 1;
                }
                "failover" => {
                    if let Some(serving) = serving_pid(&mount) {
                        unsafe { libc::kill(serving, libc::SIGKILL) };
                        tally.failovers += 1;
                    }
                }
                _ => {
                    kill_all(&mount, &pids);
                    tally.kills += 1;
                }
            }
        }
        for (worker, child) in workers.iter_mut().zip(children) {
            worker.take(child, &mut tally);
        }
        if !kill && !mount.umount().status.success() {
            kill_all(&mount, &pids);
            tally.kills += 1;
        }
        drop(mount);
        let _ = std::fs::remove_file(&filler);
        mount = mount_as(tally.rounds);
        for worker in &mut workers {
            worker.check(&mount.mountpoint, &mut tally);
        }
    }
    assert!(mount.umount().status.success());
    drop(mount);
    drop(tmpfs);
    eprintln!(
        "chaos: {} rounds in {:.0} s: {} acknowledged changes checked after each round ({} bytes in all), \
         {} refused on a full disk, {} refused as a local filesystem would, {} made while the daemon died \
         (found made: {}, not made: {}); {} kills, {} serving processes killed (failover), {} disk fills, \
         {} connection cuts, {} spellings of the source",
        tally.rounds,
        started.elapsed().as_secs_f64(),
        tally.acknowledged,
        tally.bytes_checked,
        tally.refused_full,
        tally.refused_other,
        tally.maybe_made + tally.maybe_not,
        tally.maybe_made,
        tally.maybe_not,
        tally.kills,
        tally.failovers,
        tally.fills,
        tally.cuts,
        spellings.len()
    );
    assert!(tally.rounds >= 3 && tally.acknowledged > 0, "too little happened");
}

/// `kill -9` of the supervisor (first: alone, the serving process would be
/// replaced), then of every serving process there is (the one the round
/// started with, and one a failover started since).
fn kill_all(mount: &Mount, pids: &[i32; 2]) {
    let serving = serving_pid(mount);
    for pid in pids.iter().copied().chain(serving) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
    }
}

/// The mount's serving process now (a failover may have replaced the first).
fn serving_pid(mount: &Mount) -> Option<i32> {
    mount.try_status()?["pid"].as_i64().map(|pid| pid as i32)
}

/// Writes `path` until its filesystem is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![1u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    let small = [1u8; 512];
    while file.write_all(&small).is_ok() {}
}
