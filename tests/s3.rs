//! `lazyfs push` and the `s3://` source against a real S3 server: Garage on
//! 127.0.0.1 (one node, or three with replication 3), started and stopped by
//! each test (`tests/common/garage.rs`).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::garage::Garage;
use common::mount::{Mount, Source, TestEnv, content, dataset, is_mounted};
use serde_json::Value;

/// `lazyfs push IMGDIR URL --source-root ROOT EXTRA... --json` against `garage`;
/// the output and its last JSON line.
fn push(env: &TestEnv, garage: &Garage, images: &str, root: &str, url: &str, extra: &[&str]) -> (Output, Value) {
    let out = env
        .lazyfs()
        .envs(garage.env())
        .arg("push")
        .arg(env.path(images))
        .arg(url)
        .arg("--source-root")
        .arg(env.path(root))
        .args(extra)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().map(|l| serde_json::from_str(l).unwrap()).unwrap_or(Value::Null);
    (out, last)
}

fn ok(out: &Output) {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
}

fn s3(garage: &Garage, url: &str) -> Source<'static> {
    Source::S3 { url: url.to_string(), env: garage.env() }
}

fn file<'a>(status: &'a Value, path: &str) -> &'a Value {
    status["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap_or_else(|| panic!("{path}"))
}

fn wait(env: &TestEnv, mount: &Mount) -> Output {
    env.lazyfs().arg("wait").arg(&mount.mountpoint).args(["--timeout", "120"]).output().unwrap()
}

/// Reads every file whole and at random places, comparing with `content`.
fn read_everything(mount: &Mount, files: &[(&str, usize)]) {
    for &(path, len) in files {
        let want = content(path, len);
        assert_eq!(std::fs::read(mount.at(path)).unwrap(), want, "{path}");
        let handle = File::open(mount.at(path)).unwrap();
        for i in 0..8u64 {
            let offset = (i * 7919 * 1021) % (len as u64 + 1);
            let mut buf = vec![0u8; 5000.min(len - offset as usize)];
            handle.read_exact_at(&mut buf, offset).unwrap();
            assert_eq!(buf, want[offset as usize..offset as usize + buf.len()], "{path} at {offset}");
        }
    }
}

const FILES: [(&str, usize); 7] = [
    ("/app/empty", 0),
    ("/app/one", 1),
    ("/app/chunk", 16_384),
    ("/app/small", 100_000),
    ("/app/objects", (5 << 20) + 3),
    ("/app/big", 12 << 20),
    ("/app/odd name $(x) ;'\"", 7777),
];

#[test]
fn push_then_the_source_goes_and_several_mounts_of_the_prefix_read_every_byte() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &FILES);
    let url = garage.url("apps/one");
    let (out, summary) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    assert_eq!(summary["phase"], "done", "{summary}");
    assert_eq!(summary["files"], FILES.len(), "{summary}");
    assert_eq!(summary["objects_sent"], summary["objects_total"], "a fresh bucket has none: {summary}");
    assert_eq!(summary["objects_present"], 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pushed 7 files"), "{stderr}");
    assert!(!stderr.contains(&garage.env()[2].1), "the secret is never shown: {stderr}");
    // The old host is gone.
    std::fs::remove_dir_all(env.path("source")).unwrap();

    // A lazy mount: a small read fetches only what it covers.
    let lazy = env.mount("lazy", &env.path("images"), &s3(&garage, &url), &[]);
    let mut buf = vec![0u8; 4096];
    File::open(lazy.at("/app/big")).unwrap().read_exact_at(&mut buf, 5 << 20).unwrap();
    assert_eq!(buf, content("/app/big", 12 << 20)[5 << 20..(5 << 20) + 4096]);
    let status = lazy.status();
    assert_eq!(status["source"], url);
    let big = file(&status, "/app/big");
    assert!(big["bytes_present"].as_u64().unwrap() <= 32_768, "a 4 KiB read fetched {big}");

    // Three more mounts of the same prefix, prefetching.
    let mounts: Vec<Mount> =
        (0..3).map(|i| env.mount(&format!("m{i}"), &env.path("images"), &s3(&garage, &url), &["--prefetch"])).collect();
    for mount in &mounts {
        ok(&wait(&env, mount));
        let status = mount.status();
        for (path, len) in FILES {
            let f = file(&status, path);
            assert_eq!(f["state"], "verified", "{f}");
            assert_eq!(f["verified_against"], "manifest", "checked against the index: {f}");
            assert_eq!(f["blake3"], blake3::hash(&content(path, len)).to_hex().as_str());
        }
        assert_eq!(status["source_needed"], false);
        read_everything(mount, &FILES);
    }
    read_everything(&lazy, &FILES);
}

#[test]
fn a_second_push_of_a_changed_checkpoint_sends_only_the_changed_objects() {
    let env = TestEnv::new();
    let garage = Garage::start();
    let first = [("/d/db", 8 << 20), ("/d/log", 3 << 20), ("/d/conf", 900), ("/d/copy", 900), ("/d/zeros", 3 << 20)];
    dataset(&env.path("source"), &env.path("images"), &first);
    // Two files with the same bytes, and a file of three equal objects: each object goes up once.
    std::fs::copy(env.path("source/d/conf"), env.path("source/d/copy")).unwrap();
    std::fs::write(env.path("source/d/zeros"), vec![0u8; 3 << 20]).unwrap();
    let url = garage.url("db");
    let (out, one) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    // 8 + 3 objects, one for the two equal small files, one for the zeros.
    assert_eq!((one["objects_total"].as_u64(), one["objects_sent"].as_u64()), (Some(13), Some(13)), "{one}");
    let stored = garage.objects();

    // The next checkpoint: one page of the database changed, the log grew, a
    // new file; the images record the new sizes.
    let db = env.path("source/d/db");
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[(5 << 20) + 100] ^= 0xff;
    std::fs::write(&db, &bytes).unwrap();
    let log = env.path("source/d/log");
    let mut grown = std::fs::read(&log).unwrap();
    grown.extend_from_slice(b"one more line\n");
    std::fs::write(&log, &grown).unwrap();
    std::fs::write(env.path("source/d/new"), content("/d/new", 70_000)).unwrap();
    let records = [
        lazyfs::images::write::DumpFile::new("/d/db", 8 << 20),
        lazyfs::images::write::DumpFile::new("/d/log", grown.len() as u64),
        lazyfs::images::write::DumpFile::new("/d/conf", 900),
        lazyfs::images::write::DumpFile::new("/d/copy", 900),
        lazyfs::images::write::DumpFile::new("/d/zeros", 3 << 20),
        lazyfs::images::write::DumpFile::new("/d/new", 70_000),
    ];
    lazyfs::images::write::write_dump(&env.path("images2"), &records).unwrap();
    let (out, two) = push(&env, &garage, "images2", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    // Sent: the changed object of the database, the log's last object (4
    // objects now, the fourth new), the new file. Everything else was there.
    assert_eq!(two["objects_sent"], 3, "{two}");
    assert_eq!(two["objects_present"], two["objects_total"].as_u64().unwrap() - 3, "{two}");
    assert_eq!(two["bytes_sent"], (1 << 20) + 14 + 70_000, "{two}");
    // The store counts three more objects (the index replaced in place).
    assert_eq!(garage.objects(), stored + 3);

    // The new checkpoint mounts and reads its new bytes; the old images are refused.
    let mount = env.mount("new", &env.path("images2"), &s3(&garage, &url), &["--prefetch"]);
    ok(&wait(&env, &mount));
    assert_eq!(std::fs::read(mount.at("/d/db")).unwrap(), bytes);
    assert_eq!(std::fs::read(mount.at("/d/log")).unwrap(), grown);
    let out = env.try_mount("old", &env.path("images"), &s3(&garage, &url), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds the files of other images"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn a_store_too_large_to_list_cheaply_is_asked_object_by_object() {
    let env = TestEnv::new();
    let garage = Garage::start();
    // 2,500 objects in the bucket; a push of 11 files lists at most 2,000 keys.
    let many: Vec<(String, usize)> = (0..2500).map(|i| (format!("/many/f{i:04}"), 16)).collect();
    let refs: Vec<(&str, usize)> = many.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let (out, first) = push(&env, &garage, "images", "source", &garage.url("many"), &["-j", "32"]);
    ok(&out);
    assert_eq!(first["objects_sent"], 2500, "{first}");
    // A listing comes in key order: the 10 objects named last are not among
    // the 2,000 keys listed, so only a HEAD finds them.
    let mut last = refs.clone();
    last.sort_by_key(|(path, len)| std::cmp::Reverse(blake3::hash(&content(path, *len)).to_hex().to_string()));
    let mut few = last[..10].to_vec();
    few.push(("/many/new", 16));
    dataset(&env.path("source"), &env.path("images2"), &few);
    let (out, second) = push(&env, &garage, "images2", "source", &garage.url("few"), &[]);
    ok(&out);
    assert_eq!((second["objects_present"].as_u64(), second["objects_sent"].as_u64()), (Some(10), Some(1)), "{second}");
    let mount = env.mount("few", &env.path("images2"), &s3(&garage, &garage.url("few")), &["--prefetch"]);
    ok(&wait(&env, &mount));
    read_everything(&mount, &few);
}

#[test]
fn an_interrupted_push_is_resumed_and_a_mount_started_before_it_ends_completes() {
    let env = TestEnv::new();
    let garage = Garage::start();
    let files: Vec<(String, usize)> = (0..6).map(|i| (format!("/r/f{i}"), 4 << 20)).collect();
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let url = garage.url("resume");

    // Small objects one at a time (a few hundred requests), killed (-9) once some went up.
    let mut child = env
        .lazyfs()
        .envs(garage.env())
        .arg("push")
        .arg(env.path("images"))
        .arg(&url)
        .arg("--source-root")
        .arg(env.path("source"))
        .args(["--object-size", "64K", "-j", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let total = loop {
        let line: Value = serde_json::from_str(&lines.next().expect("a progress line").unwrap()).unwrap();
        if line["objects_done"].as_u64().unwrap() >= 1 {
            break line["objects_total"].as_u64().unwrap();
        }
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    // A request the server had whole when the client died may still land.
    std::thread::sleep(Duration::from_secs(1));
    // Every object stored so far, and the index (no `lazyfs.done`).
    let stored = garage.objects() - 1;
    assert!(stored >= 1 && stored < total, "{stored} of {total}");

    // A mount can start now; it waits for what is not stored yet.
    let mount = env.mount("early", &env.path("images"), &s3(&garage, &url), &["--prefetch"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(mount.status()["state"], "complete");

    let (out, resumed) = push(&env, &garage, "images", "source", &url, &["--object-size", "64K"]);
    ok(&out);
    assert_eq!(resumed["objects_present"], stored, "{resumed}");
    assert_eq!(resumed["objects_sent"], total - stored, "{resumed}");
    ok(&wait(&env, &mount));
    read_everything(&mount, &refs);
}

#[test]
fn three_nodes_with_replication_3_serve_mounts_with_one_node_stopped() {
    let env = TestEnv::new();
    let mut garage = Garage::start_cluster(3);
    let files: Vec<(String, usize)> = (0..12).map(|i| (format!("/c/f{i}"), 300_000 * (i + 1))).collect();
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let url = garage.url("cluster");
    let (out, _) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    std::fs::remove_dir_all(env.path("source")).unwrap();

    let lazy = env.mount("lazy", &env.path("images"), &s3(&garage, &url), &[]);
    read_everything(&lazy, &refs[..3]);
    // A node goes while the mounts read: the other two still make a quorum.
    garage.stop_node(2);
    let prefetching = env.mount("prefetch", &env.path("images"), &s3(&garage, &url), &["--prefetch"]);
    read_everything(&lazy, &refs);
    ok(&wait(&env, &prefetching));
    read_everything(&prefetching, &refs);
}

#[test]
fn a_tampered_object_is_never_served() {
    let env = TestEnv::new();
    let garage = Garage::start();
    let files = [("/t/whole", 40_000), ("/t/ranged", 3 << 20), ("/t/fine", 50_000)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let url = garage.url("tamper");
    let (out, _) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);

    // Replace two objects with other bytes under their names: a small file's
    // (same length) and the second object of a large one.
    let bucket = bucket(&garage, &url);
    for path in ["/t/whole", "/t/ranged"] {
        let key = object_key(&bucket, &url, path);
        let original = bucket.block_on(bucket.get(&key, None, 64 << 20, limits())).unwrap();
        let mut bad = original.to_vec();
        bad[0] ^= 1;
        bucket.block_on(bucket.put(&key, bad.into())).unwrap();
    }

    // Read lazily: a 4 KiB ranged read checked against the index's chunk hash.
    let lazy = env.mount("lazy", &env.path("images"), &s3(&garage, &url), &[]);
    let mut buf = vec![0u8; 4096];
    // What lies before the bad object is fine, and served (until the file fails).
    File::open(lazy.at("/t/ranged")).unwrap().read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, content("/t/ranged", 3 << 20)[..4096]);
    let err = File::open(lazy.at("/t/ranged")).unwrap().read_exact_at(&mut buf, 1 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = std::fs::read(lazy.at("/t/whole")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read(lazy.at("/t/fine")).unwrap(), content("/t/fine", 50_000));

    // Prefetched: whole objects checked against their names.
    let prefetch = env.mount("prefetch", &env.path("images"), &s3(&garage, &url), &["--prefetch"]);
    let out = wait(&env, &prefetch);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    // `wait` answers at the first failure; the other file may still be on its way to failing.
    let status = prefetch.wait_complete();
    for path in ["/t/whole", "/t/ranged"] {
        let f = file(&status, path);
        assert_eq!(f["state"], "failed", "{f}");
        let error = f["error"].as_str().unwrap();
        assert!(error.contains("not served"), "{error}");
    }
    assert_eq!(file(&status, "/t/fine")["state"], "verified");
    // Bad bytes never land in a cache.
    let (whole, ranged) = (content("/t/whole", 40_000), content("/t/ranged", 3 << 20));
    for cache in [&lazy.cache, &prefetch.cache] {
        let spill = |path: &str| std::fs::read(lazyfs::store::spill_path(cache, std::path::Path::new(path)));
        if let Ok(data) = spill("/t/whole") {
            assert_ne!(data.first(), Some(&(whole[0] ^ 1)), "the tampered first byte landed in {}", cache.display());
        }
        if let Ok(data) = spill("/t/ranged") {
            assert_ne!(
                data.get(1 << 20),
                Some(&(ranged[1 << 20] ^ 1)),
                "the tampered byte landed in {}",
                cache.display()
            );
        }
    }
}

fn limits() -> lazyfs::source::Limits {
    lazyfs::source::Limits { deadline: None, stall: Duration::from_secs(10) }
}

/// The test's bucket through lazyfs's own client (as the test key).
fn bucket(garage: &Garage, url: &str) -> lazyfs::s3::Bucket {
    let url = lazyfs::s3::S3Url::parse(url).unwrap();
    lazyfs::s3::Bucket::open_with(&url, &garage.env().into_iter().collect()).unwrap()
}

/// The key of the object holding bytes 1 MiB on of `path` (or its only one).
fn object_key(bucket: &lazyfs::s3::Bucket, url: &str, path: &str) -> String {
    let key = lazyfs::s3::S3Url::parse(url).unwrap().key(lazyfs::s3::index::INDEX);
    let bytes = bucket.block_on(bucket.get(&key, None, 1 << 30, limits())).unwrap();
    let index = lazyfs::s3::index::Index::decode(&bytes).unwrap();
    let entry = index.get(std::path::Path::new(path)).unwrap();
    index.object_key(entry.objects.get(1).unwrap_or(&entry.objects[0]))
}

#[test]
fn wrong_credentials_bucket_prefix_or_endpoint_fail_in_one_line_before_anything_is_mounted() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/e/a", 1000)]);
    let url = garage.url("errors");
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    std::fs::create_dir_all(env.path("source-only")).unwrap();
    // Objects below a prefix, but no index.
    let (out, _) = push(&env, &garage, "images", "source", &garage.url("other"), &["--objects", "other/chunks/"]);
    ok(&out);

    let with = |changes: &[(&str, &str)]| {
        let mut vars = garage.env();
        for (key, value) in changes {
            vars.retain(|(k, _)| k != key);
            if !value.is_empty() {
                vars.push((key.to_string(), value.to_string()));
            }
        }
        vars
    };
    let refused_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = format!("http://127.0.0.1:{refused_port}");
    let case = |what, url: &str, vars, code, says| Case { what, url: url.to_string(), vars, code, says };
    let cases = [
        case("bad secret", &url, with(&[("AWS_SECRET_ACCESS_KEY", "0000")]), 1, "refused the credentials"),
        case(
            "unknown key",
            &url,
            with(&[("AWS_ACCESS_KEY_ID", "GK000000000000000000000000")]),
            1,
            "refused the credentials",
        ),
        case("no bucket", "s3://no-such-bucket/x", garage.env(), 2, "bucket no-such-bucket does not exist"),
        case("no prefix", &garage.url("nothing/here"), garage.env(), 2, "nothing is there"),
        case("no index", &garage.url("other/chunks"), garage.env(), 2, "no lazyfs.index there"),
        case("unreachable", &url, with(&[("AWS_ENDPOINT_URL", &unreachable)]), 1, "cannot connect to"),
        case("plain http", &url, with(&[("AWS_ALLOW_HTTP", "")]), 2, "AWS_ALLOW_HTTP=true"),
        case(
            "no credentials",
            &url,
            with(&[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")]),
            2,
            "no AWS credentials",
        ),
        case("bad url", "s3://Bad_Bucket/x", garage.env(), 2, "not a bucket name"),
    ];
    for Case { what, url: source, vars, code, says } in &cases {
        let started = Instant::now();
        let source = Source::S3 { url: source.clone(), env: vars.clone() };
        let out = env.try_mount(what, &env.path("images"), &source, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{what}: {stderr}");
        assert!(stderr.contains(says), "{what}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{what}: {stderr}");
        assert!(!stderr.contains(&garage.env()[2].1), "{what}: the secret is never shown");
        assert!(!is_mounted(&env.path("mnt").join(what)), "{what}: mounted");
        assert!(started.elapsed() < Duration::from_secs(60), "{what}: took {:?}", started.elapsed());
        // Push says the same of the store (but of a prefix it fills, which need not exist).
        if !matches!(*what, "no prefix" | "no index") {
            let out = env
                .lazyfs()
                .envs(vars.iter().map(|(k, v)| (k, v)))
                .args(["push", env.path("images").to_str().unwrap()])
                .arg(source_url(&source))
                .arg("--source-root")
                .arg(env.path("source"))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(*code), "push, {what}: {stderr}");
            assert!(stderr.contains(says), "push, {what}: {stderr}");
        }
    }
    // --source-root belongs to push.
    let out = env.try_mount("root", &env.path("images"), &s3(&garage, &url), &["--source-root", "/srv"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // The whole directory is not in the store: --subtree serves the recorded files below it.
    let out = env.try_mount("subtree", &env.path("images"), &s3(&garage, &url), &["--subtree", "/e"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --recorded-only"));
    let recorded =
        env.mount("recorded", &env.path("images"), &s3(&garage, &url), &["--subtree", "/e", "--recorded-only"]);
    assert_eq!(std::fs::read(recorded.mountpoint.join("a")).unwrap(), content("/e/a", 1000));
}

/// A wrong setting, and what `mount` and `push` answer to it.
struct Case {
    what: &'static str,
    url: String,
    vars: Vec<(String, String)>,
    code: i32,
    says: &'static str,
}

fn source_url(source: &Source) -> String {
    match source {
        Source::S3 { url, .. } => url.clone(),
        _ => unreachable!(),
    }
}

#[test]
fn a_silent_store_answers_readers_eio_in_bounded_time_then_serves_again() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/s/a", 2 << 20)]);
    let url = garage.url("silent");
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    let mount = env.mount("m", &env.path("images"), &s3(&garage, &url), &["--reconnect-timeout", "3"]);

    let pid = garage.pid(0);
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let resume = Resume(pid);
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = File::open(mount.at("/s/a")).unwrap().read_exact_at(&mut buf, 1 << 20).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(waited < Duration::from_secs(20), "a silent store held a reader {waited:?}");
    assert_eq!(mount.status()["state"], "degraded");
    drop(resume);
    File::open(mount.at("/s/a")).unwrap().read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, content("/s/a", 2 << 20)[1 << 20..(1 << 20) + 4096]);
}

/// Sends SIGCONT to a stopped process however the test ends.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn push_help_and_bad_arguments() {
    let env = TestEnv::new();
    let out = env.run(&["push", "--help"]);
    ok(&out);
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["s3://BUCKET/PREFIX", "AWS_ENDPOINT_URL", "--object-size", "--recording", "--json"] {
        assert!(help.contains(word), "{word}: {help}");
    }
    for (args, says) in [
        (vec!["push", "/nonexistent", "s3://b-b-b/x", "--object-size", "3K"], "a multiple of 16K"),
        (vec!["push", "/nonexistent", "s3://b-b-b/x", "--objects", "/abs"], "a key prefix"),
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{args:?}");
    }
}
