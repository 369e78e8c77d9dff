//! `lazyfs push` and the `s3://` source, against ceilings measured in the
//! same run: `cargo bench --bench s3 [-- --quick]`.
//!
//! Two network namespaces made for the benchmark, joined by a veth pair:
//! `old` (the old host: its sshd, and `lazyfs push`) and `new` (the store, a
//! single Garage node, and the new hosts' mounts). Every byte the old host
//! sends crosses the pair and is counted there (the veth's `tx_bytes` in
//! `old`). Addresses are from the benchmarking range 198.18.0.0/15 and exist
//! only inside these namespaces. The data set: one large file, 1 MiB files and
//! 8 KiB files.
//!
//!   a. push throughput: `lazyfs push` to an empty bucket beside a plain
//!      upload of the same bytes (as 4 MiB objects, 8 in flight, through the
//!      same client, no hashing, no index); a second push of the same files
//!      (everything already stored); and push with other object sizes;
//!   b. per object size: the first 4 KiB read in the middle of the large file
//!      through a fresh lazy mount (and the bytes it fetched), and the time
//!      until a `--prefetch` mount is complete;
//!   c. 4 mounts of one prefix (pushed once; the mounts start as soon as the
//!      index is stored) beside 4 mounts over SSH from one old host: the bytes
//!      the old host sends, the time until all four are complete.
//!
//! Writes a markdown table to stdout and `target/bench/s3.{md,json}`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../../tests/common/garage.rs"]
mod garage;
#[path = "../../tests/common/sshd.rs"]
mod sshd;
use common::Row;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use garage::Garage;
use lazyfs::images::write::{DumpFile, write_dump};
use serde_json::{Value, json};
use sshd::Sshd;

const MIB: u64 = 1 << 20;
const NEW_ADDR: &str = "198.18.2.1";
const OLD_ADDR: &str = "198.18.2.2";
/// Mounts of one checkpoint at once, in (c).
const MOUNTS: usize = 4;

/// The two namespaces and the pair between them; removed when dropped.
struct Net {
    old: String,
    new: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip (iproute2)");
    assert!(status.success(), "ip {args:?}");
}

impl Net {
    fn start() -> Net {
        let id = std::process::id();
        let net = Net { old: format!("lzs3-old{id}"), new: format!("lzs3-new{id}") };
        for ns in [&net.old, &net.new] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &net.old, "link", "add", "lzs3", "type", "veth", "peer", "name", "lzs3", "netns", &net.new]);
        for (ns, addr) in [(&net.old, OLD_ADDR), (&net.new, NEW_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "lzs3"]);
            ip(&["-n", ns, "link", "set", "lzs3", "up"]);
        }
        net
    }

    /// `program` in namespace `ns`, in the machine's mount namespace (FUSE
    /// mounts stay visible to the benchmark).
    fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
        command
    }

    /// Bytes the old host has sent so far.
    fn old_sent(&self) -> u64 {
        let stats = "/sys/class/net/lzs3/statistics/tx_bytes";
        let out = run(Command::new("ip").args(["netns", "exec", &self.old, "cat", stats]));
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// Limits what the old host sends to `rate` (tc's units, `200mbit`), or lifts the limit.
    fn shape(&self, rate: Option<&str>) {
        match rate {
            Some(rate) => ip_tc(&[
                "-n", &self.old, "qdisc", "replace", "dev", "lzs3", "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "100ms",
            ]),
            // Nothing to lift is fine too.
            None => {
                let del = ["-n", &self.old, "qdisc", "del", "dev", "lzs3", "root"];
                let _ = Command::new("tc").args(del).stderr(Stdio::null()).status();
            }
        }
    }

    /// Runs `f` on a thread inside namespace `ns`.
    fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = ns.to_string();
        std::thread::spawn(move || {
            let netns = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.old, &self.new] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip_tc(args: &[&str]) {
    let status = Command::new("tc").args(args).status().expect("tc (iproute2)");
    assert!(status.success(), "tc {args:?}");
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Deterministic pseudo-random bytes, fast to make.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

struct Bench {
    // Dropped in order: the servers before the namespaces they live in.
    sshd: Sshd,
    garage: Garage,
    net: Net,
    work: tempfile::TempDir,
    runs: usize,
    rows: Vec<Row>,
    images: PathBuf,
    bytes: u64,
    big: (String, u64),
    /// Distinct prefixes (and object prefixes), so every push starts from nothing.
    fresh: usize,
}

impl Bench {
    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    fn env(&self) -> Vec<(String, String)> {
        self.garage.env()
    }

    /// lazyfs in namespace `ns`.
    fn lazyfs(&self, ns: &str) -> Command {
        let mut command = Net::command(ns, env!("CARGO_BIN_EXE_lazyfs"));
        command
            .env("HOME", self.path("home"))
            .env("LAZYFS_RUNTIME_DIR", self.path("runtime"))
            .env_remove("SSH_AUTH_SOCK")
            .envs(self.env());
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
        eprintln!("  {:<60} {:>10.4} {unit}", row.what, row.median());
        self.rows.push(row);
    }

    fn make_data(work: &Path, quick: bool) -> (PathBuf, u64, (String, u64)) {
        let source = work.join("source");
        let (big_mib, medium, small) = if quick { (24, 16, 100) } else { (192, 64, 1000) };
        let mut records = Vec::new();
        let mut buf = vec![0u8; MIB as usize];
        let big = source.join("data/big.bin");
        std::fs::create_dir_all(big.parent().unwrap()).unwrap();
        let out = std::fs::File::create(&big).unwrap();
        for i in 0..big_mib {
            fill(i + 1, &mut buf);
            out.write_all_at(&buf, i * MIB).unwrap();
        }
        records.push(DumpFile::new("/data/big.bin", big_mib * MIB));
        for i in 0..medium {
            fill(1000 + i, &mut buf);
            std::fs::write(source.join(format!("data/m{i:03}")), &buf).unwrap();
            records.push(DumpFile::new(format!("/data/m{i:03}"), MIB));
        }
        std::fs::create_dir_all(source.join("data/small")).unwrap();
        for i in 0..small {
            fill(5000 + i, &mut buf[..8192]);
            std::fs::write(source.join(format!("data/small/s{i:04}")), &buf[..8192]).unwrap();
            records.push(DumpFile::new(format!("/data/small/s{i:04}"), 8192));
        }
        let images = work.join("images");
        write_dump(&images, &records).unwrap();
        let bytes = records.iter().map(|r| r.size.unwrap()).sum();
        (images, bytes, ("/data/big.bin".to_string(), big_mib * MIB))
    }

    /// `lazyfs push` from the old host to a fresh prefix; its seconds and summary.
    fn push(&mut self, object_size: &str, prefix: &str, objects: &str) -> (f64, Value) {
        let started = Instant::now();
        let out = run(self
            .lazyfs(&self.net.old)
            .arg("push")
            .arg(&self.images)
            .arg(self.garage.url(prefix))
            .arg("--source-root")
            .arg(self.path("source"))
            .args(["--object-size", object_size, "--objects", objects, "--json"]));
        let seconds = started.elapsed().as_secs_f64();
        let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
        (seconds, serde_json::from_str(&last).unwrap())
    }

    fn fresh(&mut self) -> (String, String) {
        self.fresh += 1;
        (format!("p{}", self.fresh), format!("objects{}/", self.fresh))
    }

    /// (a) push throughput against a plain upload of the same bytes.
    fn push_throughput(&mut self) {
        eprintln!("a. push throughput ({} MiB)", self.bytes / MIB);
        let mb = self.bytes as f64 / MIB as f64;
        let mut plain = Vec::new();
        for _ in 0..self.runs {
            let (prefix, _) = self.fresh();
            plain.push(mb / self.plain_upload(&prefix));
        }
        self.record("a", "plain upload: PUT the same bytes as 4 MiB objects, 8 in flight", "MiB/s", plain, None);
        let ceiling = "plain upload: PUT the same bytes as 4 MiB objects, 8 in flight";
        for size in ["4M", "1M", "256K", "16M"] {
            let mut times = Vec::new();
            let mut again = Vec::new();
            for _ in 0..self.runs {
                let (prefix, objects) = self.fresh();
                times.push(mb / self.push(size, &prefix, &objects).0);
                if size == "4M" {
                    let (seconds, summary) = self.push(size, &prefix, &objects);
                    assert_eq!(summary["objects_sent"], 0, "{summary}");
                    again.push(seconds);
                }
            }
            self.record("a", format!("lazyfs push, {size} objects, to an empty bucket"), "MiB/s", times, Some(ceiling));
            if !again.is_empty() {
                self.record("a", "lazyfs push again, nothing changed (no object sent)", "s", again, None);
            }
        }
    }

    /// Every file cut into 4 MiB objects, PUT from the old host, 8 at a
    /// time, with lazyfs's own client: what the store and the link take.
    fn plain_upload(&self, prefix: &str) -> f64 {
        let url = lazyfs::s3::S3Url::parse(&self.garage.url(prefix)).unwrap();
        let vars = self.env().into_iter().collect();
        let images = self.images.clone();
        let source = self.path("source");
        Net::in_ns(&self.net.old, move || {
            let bucket = lazyfs::s3::Bucket::open_with(&url, &vars).unwrap();
            let checkpoint = lazyfs::images::Checkpoint::load(&images).unwrap();
            let mut pieces = Vec::new();
            for file in checkpoint.servable() {
                let size = file.size.unwrap();
                let mut offset = 0;
                while offset < size.max(1) {
                    pieces.push((file.path.clone(), offset, (size - offset).min(4 * MIB)));
                    offset += 4 * MIB;
                }
            }
            let started = Instant::now();
            bucket.block_on(async {
                use futures::StreamExt;
                let mut puts = futures::stream::iter(pieces.into_iter().enumerate())
                    .map(|(i, (path, offset, len))| {
                        let (bucket, source, url) = (&bucket, &source, &url);
                        async move {
                            let mut buf = vec![0u8; len as usize];
                            let file = std::fs::File::open(source.join(path.strip_prefix("/").unwrap())).unwrap();
                            file.read_exact_at(&mut buf, offset).unwrap();
                            bucket.put(&url.key(&format!("plain/{i}")), buf.into()).await.unwrap();
                        }
                    })
                    .buffer_unordered(8);
                while puts.next().await.is_some() {}
            });
            started.elapsed().as_secs_f64()
        })
    }

    /// A fresh mount (new cache dir) in the new hosts' namespace; its mountpoint.
    fn mount(&self, tag: &str, source: &[&std::ffi::OsStr], extra: &[&str]) -> PathBuf {
        let mountpoint = self.path(&format!("mnt-{tag}"));
        let _ = std::fs::remove_dir_all(self.cache(&mountpoint));
        std::fs::create_dir_all(&mountpoint).unwrap();
        run(self
            .lazyfs(&self.net.new)
            .arg("mount")
            .arg(&mountpoint)
            .arg(&self.images)
            .args(source)
            .arg("--cache-dir")
            .arg(self.cache(&mountpoint))
            .args(extra));
        mountpoint
    }

    fn cache(&self, mountpoint: &Path) -> PathBuf {
        mountpoint.with_extension("cache")
    }

    /// Unmounts, and drops the cache (the disk is not the subject here).
    fn umount(&self, mountpoint: &Path) {
        run(self.lazyfs(&self.net.new).arg("umount").arg(mountpoint));
        let _ = std::fs::remove_dir_all(self.cache(mountpoint));
    }

    fn wait(&self, mountpoint: &Path) {
        run(self.lazyfs(&self.net.new).arg("wait").arg(mountpoint));
    }

    /// Seconds from `started` until every mount of `mounts` is complete.
    fn wait_all(&self, mounts: &[PathBuf], started: Instant) -> f64 {
        mounts.iter().for_each(|m| self.wait(m));
        started.elapsed().as_secs_f64()
    }

    fn status(&self, mountpoint: &Path) -> Value {
        let out = run(self.lazyfs(&self.net.new).arg("status").arg(mountpoint).arg("--json"));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// (b) per object size: a lazy reader's first 4 KiB, and a prefetch to the end.
    fn reads(&mut self) {
        eprintln!("b. reads per object size");
        let mb = self.bytes as f64 / MIB as f64;
        let (big, big_size) = self.big.clone();
        for size in ["256K", "1M", "4M", "16M"] {
            let (prefix, objects) = self.fresh();
            self.push(size, &prefix, &objects);
            let url = self.garage.url(&prefix);
            let (mut first, mut fetched, mut bulk, mut plain) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 0..self.runs {
                plain.push(self.plain_download(&prefix));
                let mountpoint = self.mount(&format!("lazy{run}"), &[url.as_ref()], &[]);
                let file = std::fs::File::open(mountpoint.join(big.trim_start_matches('/'))).unwrap();
                let mut buf = vec![0u8; 4096];
                let started = Instant::now();
                file.read_exact_at(&mut buf, big_size / 2 + 12_345).unwrap();
                first.push(started.elapsed().as_secs_f64() * 1000.0);
                drop(file);
                let status = self.status(&mountpoint);
                let entry = status["files"].as_array().unwrap().iter().find(|f| f["path"] == big.as_str()).unwrap();
                fetched.push(entry["bytes_present"].as_f64().unwrap() / 1024.0);
                self.umount(&mountpoint);

                let started = Instant::now();
                let mountpoint = self.mount(&format!("bulk{run}"), &[url.as_ref()], &["--prefetch"]);
                self.wait(&mountpoint);
                bulk.push(mb / started.elapsed().as_secs_f64());
                self.umount(&mountpoint);
            }
            self.record("b", format!("{size} objects: first 4 KiB read, fresh lazy mount"), "ms", first, None);
            self.record("b", format!("{size} objects: bytes that read fetched"), "KiB", fetched, None);
            let ceiling = format!("{size} objects: plain GET of every object, 8 in flight");
            self.record("b", ceiling.clone(), "MiB/s", plain, None);
            self.record("b", format!("{size} objects: mount --prefetch until complete"), "MiB/s", bulk, Some(&ceiling));
        }
    }

    /// MiB/s of GETs of every object a push at `prefix` stored, whole, 8 at a
    /// time, from the new hosts' namespace, with lazyfs's own client: what the
    /// store and the client give, with nothing checked or kept.
    fn plain_download(&self, prefix: &str) -> f64 {
        let url = lazyfs::s3::S3Url::parse(&self.garage.url(prefix)).unwrap();
        let vars = self.env().into_iter().collect();
        Net::in_ns(&self.net.new, move || {
            let bucket = lazyfs::s3::Bucket::open_with(&url, &vars).unwrap();
            let limits = lazyfs::source::Limits { deadline: None, stall: std::time::Duration::from_secs(30) };
            let index = bucket.block_on(bucket.get(&url.key(lazyfs::s3::index::INDEX), None, 1 << 30, limits)).unwrap();
            let index = lazyfs::s3::index::Index::decode(&index).unwrap();
            let keys: std::collections::BTreeSet<String> =
                index.entries().flat_map(|e| &e.objects).map(|name| index.object_key(name)).collect();
            let started = Instant::now();
            let bytes: usize = bucket.block_on(async {
                use futures::StreamExt;
                futures::stream::iter(keys.iter())
                    .map(|key| async { bucket.get(key, None, 64 << 20, limits).await.unwrap().len() })
                    .buffer_unordered(8)
                    .fold(0, |sum, n| async move { sum + n })
                    .await
            });
            bytes as f64 / MIB as f64 / started.elapsed().as_secs_f64()
        })
    }

    /// (c) 4 mounts of one checkpoint: over SSH from the old host, and from
    /// one push; the old host's uplink at `rate` if given (tc's units).
    fn many_mounts(&mut self, rate: Option<&str>) {
        eprintln!("c. {MOUNTS} mounts, the old host sending at {}", rate.unwrap_or("any rate"));
        self.net.shape(rate);
        let link = rate.map(|r| format!(", old host's uplink {r}")).unwrap_or_default();
        let host = format!("{}:{}", self.sshd.target().rsplit_once(':').unwrap().0, self.sshd.port);
        let key = self.sshd.user_key();
        let known = self.sshd.known_hosts();
        let source = self.path("source");
        let (mut ssh_time, mut ssh_bytes, mut s3_time, mut s3_bytes, mut push_time) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let sent = self.net.old_sent();
            let started = Instant::now();
            let ssh_args: Vec<&std::ffi::OsStr> = vec![
                host.as_ref(),
                "-i".as_ref(),
                key.as_os_str(),
                "--known-hosts".as_ref(),
                known.as_os_str(),
                "--source-root".as_ref(),
                source.as_os_str(),
            ];
            let mounts: Vec<PathBuf> =
                (0..MOUNTS).map(|i| self.mount(&format!("ssh{i}"), &ssh_args, &["--prefetch"])).collect();
            ssh_time.push(self.wait_all(&mounts, started));
            ssh_bytes.push((self.net.old_sent() - sent) as f64 / MIB as f64);
            mounts.iter().for_each(|m| self.umount(m));

            let (prefix, objects) = self.fresh();
            let url = self.garage.url(&prefix);
            let sent = self.net.old_sent();
            let started = Instant::now();
            let mut push = self
                .lazyfs(&self.net.old)
                .arg("push")
                .arg(&self.images)
                .arg(&url)
                .arg("--source-root")
                .arg(&source)
                .args(["--objects", &objects, "--json"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(push.stdout.take().unwrap()).lines();
            // The mounts start once the index is stored.
            while let Some(Ok(line)) = lines.next() {
                let line: Value = serde_json::from_str(&line).unwrap();
                if line["index_stored"] == true {
                    break;
                }
            }
            let mounts: Vec<PathBuf> =
                (0..MOUNTS).map(|i| self.mount(&format!("s3-{i}"), &[url.as_ref()], &["--prefetch"])).collect();
            for _ in lines.by_ref() {}
            assert!(push.wait().unwrap().success());
            push_time.push(started.elapsed().as_secs_f64());
            s3_time.push(self.wait_all(&mounts, started));
            s3_bytes.push((self.net.old_sent() - sent) as f64 / MIB as f64);
            mounts.iter().for_each(|m| self.umount(m));
        }
        self.net.shape(None);
        let ssh = format!("{MOUNTS} mounts --prefetch over SSH from the old host{link}");
        self.record("c", format!("{ssh}: time until all complete"), "s", ssh_time, None);
        self.record("c", format!("{ssh}: bytes the old host sent"), "MiB", ssh_bytes, None);
        let s3 = format!("push, {MOUNTS} mounts --prefetch of the prefix (started once the index is up){link}");
        let against = format!("{ssh}: time until all complete");
        self.record("c", format!("{s3}: time until all complete"), "s", s3_time, Some(&against));
        self.record("c", format!("{s3}: the push alone"), "s", push_time, None);
        let against = format!("{ssh}: bytes the old host sent");
        self.record("c", format!("{s3}: bytes the old host sent"), "MiB", s3_bytes, Some(&against));
    }

    fn report(&self) -> (String, Value) {
        let mut md = String::from("| | measurement | median | min – max | ratio |\n| --- | --- | --- | --- | --- |\n");
        let mut rows = Vec::new();
        for row in &self.rows {
            let (min, max) = row.runs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let against = row.against.as_ref().and_then(|name| self.rows.iter().find(|r| &r.what == name));
            let ratio = against.map(|base| row.median() / base.median());
            let ratio_text = ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
            md.push_str(&format!(
                "| {} | {} | {:.2} {} | {:.2} – {:.2} | {ratio_text} |\n",
                row.group,
                row.what,
                row.median(),
                row.unit,
                min,
                max
            ));
            rows.push(json!({
                "group": row.group, "measurement": row.what, "unit": row.unit, "runs": row.runs,
                "median": row.median(), "ratio": ratio, "against": row.against,
            }));
        }
        (md, Value::Array(rows))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this binary without `--bench`: a
    // benchmark is not a test, so it only says how to run it.
    if !args.iter().any(|a| a == "--bench") {
        println!("s3: a benchmark; run it with `cargo bench --bench s3`");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 3 };
    let net = Net::start();
    let work = tempfile::Builder::new().prefix("lazyfs-bench-s3").tempdir().unwrap();
    std::fs::create_dir_all(work.path().join("home")).unwrap();
    let (images, bytes, big) = Bench::make_data(work.path(), quick);
    let mut bench = Bench {
        sshd: Sshd::start_at(OLD_ADDR, Some(&net.old)),
        garage: Garage::start_at(1, NEW_ADDR, Some(&net.new)),
        net,
        work,
        runs,
        rows: Vec::new(),
        images,
        bytes,
        big,
        fresh: 0,
    };
    bench.push_throughput();
    bench.reads();
    bench.many_mounts(None);
    // A cloud instance's sustained egress, roughly: what the old host can send is the limit.
    bench.many_mounts(Some("200mbit"));
    let (table, json) = bench.report();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let header = format!(
        "Measured on {cores} cores, one Garage 2.5 node, a veth pair between the old host's namespace and the \
         store's; {} MiB in {} files; {runs} run(s) each; `cargo bench --bench s3{}`.\n\n",
        bytes / MIB,
        lazyfs::images::Checkpoint::load(&bench.images).unwrap().files.len(),
        if quick { " -- --quick" } else { "" }
    );
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("s3.md"), format!("{header}{table}")).unwrap();
    std::fs::write(
        out_dir.join("s3.json"),
        serde_json::to_vec_pretty(&json!({"runs": runs, "results": json})).unwrap(),
    )
    .unwrap();
    println!("{header}{table}");
}
