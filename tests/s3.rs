//! `lazyfs push` and the `s3://` source against a real S3 server: Garage on
//! 127.0.0.1 (one node, or three with replication 3), started and stopped by
//! each test (`tests/common/garage.rs`).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::garage::Garage;
use common::mount::{Mount, Source, TestEnv, content, dataset, is_mounted};
use serde_json::Value;

/// `lazyfs push IMGDIR URL --source-root ROOT EXTRA... --json` against `garage`.
fn push_command(env: &TestEnv, garage: &Garage, images: &str, root: &str, url: &str, extra: &[&str]) -> Command {
    let mut command = env.lazyfs();
    command
        .envs(garage.env())
        .arg("push")
        .arg(env.path(images))
        .arg(url)
        .arg("--source-root")
        .arg(env.path(root))
        .args(extra)
        .arg("--json");
    command
}

/// [`push_command`], run: the output and its last JSON line.
fn push(env: &TestEnv, garage: &Garage, images: &str, root: &str, url: &str, extra: &[&str]) -> (Output, Value) {
    let out = push_command(env, garage, images, root, url, extra).output().unwrap();
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
    // The store counts three more objects and the new index's
    // `lazyfs.done.BLAKE3` (the index replaced in place).
    assert_eq!(garage.objects(), stored + 3 + 1);

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
    let mut child = push_command(&env, &garage, "images", "source", &url, &["--object-size", "64K", "-j", "1"])
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
    // Every object stored so far, and the index (no `lazyfs.done.BLAKE3`).
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

// What a hostile or damaged store, and pushes that meet, can do to a mount
// (the review of issue 26). Each test names the behaviour it expects.

/// The store's index of `url`, as its protobuf.
fn stored_index(bucket: &lazyfs::s3::Bucket, url: &str) -> lazyfs::s3::index::IndexProto {
    use prost::Message;
    let key = lazyfs::s3::S3Url::parse(url).unwrap().key(lazyfs::s3::index::INDEX);
    let bytes = bucket.block_on(bucket.get(&key, None, 1 << 30, limits())).unwrap();
    lazyfs::s3::index::IndexProto::decode(bytes.strip_prefix(b"lazyfs-index\n".as_slice()).unwrap()).unwrap()
}

/// Replaces the index of `url` with `proto`, and says the push of it is complete.
fn replace_index(bucket: &lazyfs::s3::Bucket, url: &str, proto: lazyfs::s3::index::IndexProto) {
    let url = lazyfs::s3::S3Url::parse(url).unwrap();
    let bytes = lazyfs::s3::index::Index::encode(proto);
    let id = blake3::hash(&bytes).to_hex().to_string();
    bucket.block_on(bucket.put(&url.key(lazyfs::s3::index::INDEX), bytes.into())).unwrap();
    bucket.block_on(bucket.put(&url.key(&lazyfs::s3::index::done_name(&id)), id.into_bytes().into())).unwrap();
}

/// Replaces object `key` with `change` of its bytes.
fn rewrite_object(bucket: &lazyfs::s3::Bucket, key: &str, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = bucket.block_on(bucket.get(key, None, 64 << 20, limits())).unwrap().to_vec();
    change(&mut bytes);
    bucket.block_on(bucket.put(key, bytes.into())).unwrap();
}

/// `try_mount`, kept mounted (and unmounted when dropped) if it mounted.
fn mount_if_it_does(env: &TestEnv, name: &str, source: &Source, extra: &[&str]) -> (Output, Option<Mount>) {
    let out = env.try_mount(name, &env.path("images"), source, extra);
    let mount = out.status.success().then(|| Mount {
        mountpoint: env.path("mnt").join(name),
        cache: env.path("cache").join(name),
        env_home: env.tmp.path().into(),
    });
    (out, mount)
}

#[test]
fn a_forged_index_in_the_store_never_makes_a_mount_serve_other_bytes() {
    let env = TestEnv::new();
    let garage = Garage::start();
    let files = [("/f/config", 40_000), ("/f/other", 20_000)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let url = garage.url("forged");
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);

    // Whoever can write the prefix (not the old host, not the images) gives
    // /f/config other bytes: stored under their own name, hashed into the
    // index, the images' hash copied from the index that was there.
    let bucket = bucket(&garage, &url);
    let mut proto = stored_index(&bucket, &url);
    let forged = content("forged", 40_000);
    let (hashes, objects) = lazyfs::s3::index::hash_file(40_000, proto.object_size, |offset, buf| {
        buf.copy_from_slice(&forged[offset as usize..offset as usize + buf.len()]);
        Ok(())
    })
    .unwrap();
    let key = lazyfs::s3::index::object_key(&proto.objects, &objects[0]);
    bucket.block_on(bucket.put(&key, forged.clone().into())).unwrap();
    let file = proto.files.iter_mut().find(|f| f.path == b"/f/config").unwrap();
    file.blake3 = hashes.whole.to_vec();
    file.chunk_blake3 = hashes.chunks.concat();
    file.objects = objects.concat();
    replace_index(&bucket, &url, proto);

    // The images are what the new host trusts (copied from the old host):
    // a mount either refuses the index or serves the old host's bytes.
    let (out, mount) = mount_if_it_does(&env, "m", &s3(&garage, &url), &[]);
    if let Some(mount) = mount {
        let served = std::fs::read(mount.at("/f/config"));
        assert!(
            served.as_ref().is_ok_and(|b| *b == content("/f/config", 40_000)) || served.is_err(),
            "a mount served bytes that only the store's index vouches for, not the images"
        );
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("not one pushed with") && stderr.contains("lazyfs.pushed"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn images_copied_without_the_pushs_lazyfs_pushed_are_refused_saying_what_to_do() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/p/a", 1000)]);
    let url = garage.url("pinned");
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    let pin = env.path("images").join("lazyfs.pushed");
    let text = std::fs::read_to_string(&pin).unwrap();
    assert!(text.ends_with(&format!(" {url}\n")), "one line per URL pushed to: {text}");
    // Copied to the new host before the push wrote it.
    std::fs::remove_file(&pin).unwrap();
    let out = env.try_mount("m", &env.path("images"), &s3(&garage, &url), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lazyfs.pushed: not there") && stderr.contains("lazyfs push"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // Pushed again, the images mount.
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    let mount = env.mount("m", &env.path("images"), &s3(&garage, &url), &[]);
    assert_eq!(std::fs::read(mount.at("/p/a")).unwrap(), content("/p/a", 1000));
}

#[test]
fn a_push_again_replaces_an_object_the_store_holds_with_other_bytes_of_its_size() {
    let env = TestEnv::new();
    let garage = Garage::start();
    let files = [("/d/db", 3 << 20)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let url = garage.url("mend");
    let (out, _) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    let bucket = bucket(&garage, &url);
    let key = object_key(&bucket, &url, "/d/db");
    // The store's ETag is the MD5 of an object's bytes: an unchanged object costs the push no GET.
    let stored = bucket.block_on(bucket.get(&key, None, 1 << 20, limits())).unwrap();
    let info = bucket.block_on(bucket.head(&key, limits())).unwrap().unwrap();
    assert_eq!(info.md5.map(|m| m.to_vec()), Some(<md5::Md5 as md5::Digest>::digest(&stored).to_vec()));
    let (listed, _) = bucket.block_on(bucket.list("lazyfs-chunks/", 100, limits())).unwrap();
    assert!(listed.iter().any(|(name, listed)| key.ends_with(name.as_str()) && *listed == info), "{listed:?}");
    rewrite_object(&bucket, &key, |bytes| bytes[100] ^= 1);

    // A mount finds it (the file fails, naming the object); the user pushes again.
    let (out, again) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    assert_eq!(again["objects_sent"], 1, "the damaged object is sent again: {again}");
    let mount = env.mount("m", &env.path("images"), &s3(&garage, &url), &["--prefetch"]);
    let out = wait(&env, &mount);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    read_everything(&mount, &files);
}

#[test]
fn an_object_shorter_than_its_index_says_fails_its_file_rather_than_the_store() {
    let env = TestEnv::new();
    let garage = Garage::start();
    let files = [("/t/big", 3 << 20), ("/t/fine", 50_000)];
    dataset(&env.path("source"), &env.path("images"), &files);
    let url = garage.url("short");
    let (out, _) = push(&env, &garage, "images", "source", &url, &["--object-size", "1M"]);
    ok(&out);
    // The object of bytes 1 MiB to 2 MiB keeps its first 100 bytes.
    let bucket = bucket(&garage, &url);
    rewrite_object(&bucket, &object_key(&bucket, &url, "/t/big"), |bytes| bytes.truncate(100));

    let mount = env.mount("m", &env.path("images"), &s3(&garage, &url), &["--reconnect-timeout", "3"]);
    // A read past the object's end: the store answers that range is not
    // there (416), as it answers bytes that do not match: not served.
    let mut buf = vec![0u8; 4096];
    let err = File::open(mount.at("/t/big")).unwrap().read_exact_at(&mut buf, (3 << 20) / 2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let status = mount.status();
    let big = file(&status, "/t/big");
    assert_eq!(big["state"], "failed", "a damaged object fails its file: {big}");
    assert_ne!(status["state"], "degraded", "the store answers: it is not lost: {}", status["degraded_reason"]);
    assert_eq!(std::fs::read(mount.at("/t/fine")).unwrap(), content("/t/fine", 50_000));
}

#[test]
fn pushing_an_unchanged_checkpoint_again_stores_the_same_index() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/u/a", 70_000), ("/u/b", 10)]);
    let url = garage.url("same");
    let bucket = bucket(&garage, &url);
    let index = lazyfs::s3::S3Url::parse(&url).unwrap().key(lazyfs::s3::index::INDEX);
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    let first = bucket.block_on(bucket.get(&index, None, 1 << 30, limits())).unwrap();
    // A mount started during the first push (interrupted, then run again)
    // holds the first index: the push again must say that one is complete
    // (`lazyfs.done.BLAKE3`) for the mount to learn it.
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    let second = bucket.block_on(bucket.get(&index, None, 1 << 30, limits())).unwrap();
    assert_eq!(first, second, "the push's own reads changed what it stores (the files' atimes)");
    let done =
        lazyfs::s3::S3Url::parse(&url).unwrap().key(&lazyfs::s3::index::done_name(&blake3::hash(&first).to_hex()));
    assert!(bucket.block_on(bucket.head(&done, limits())).unwrap().is_some(), "{done}");
}

#[test]
fn no_credentials_off_ec2_say_so_rather_than_blame_the_endpoint() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/n/a", 1000)]);
    let url = garage.url("nocreds");
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    // A host that is not an EC2 instance: nothing answers the instance
    // metadata service's address (here a closed port on 127.0.0.1).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut vars: Vec<(String, String)> = garage
        .env()
        .into_iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_EC2_METADATA_DISABLED")
        })
        .collect();
    vars.push(("AWS_METADATA_ENDPOINT".into(), format!("http://127.0.0.1:{closed}")));
    let endpoint = &garage.env()[0].1;
    let out = env.try_mount("m", &env.path("images"), &Source::S3 { url: url.clone(), env: vars.clone() }, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("credentials"), "{stderr}");
    assert!(!stderr.contains(&format!("cannot connect to {endpoint}")), "the endpoint answers: {stderr}");
    assert!(stderr.contains("set AWS_ACCESS_KEY_ID") && stderr.contains(&closed.to_string()), "what to do: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let out = env
        .lazyfs()
        .envs(vars)
        .arg("push")
        .arg(env.path("images"))
        .arg(&url)
        .arg("--source-root")
        .arg(env.path("source"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "push: {stderr}");
    assert!(stderr.contains("credentials") && stderr.contains("set AWS_ACCESS_KEY_ID"), "push: {stderr}");
}

#[test]
fn an_index_for_other_images_is_refused_in_one_line_whatever_its_origin_says() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/o/a", 1000)]);
    let url = garage.url("origin");
    let (out, _) = push(&env, &garage, "images", "source", &url, &[]);
    ok(&out);
    let bucket = bucket(&garage, &url);
    let mut proto = stored_index(&bucket, &url);
    proto.images = vec![0; 32];
    proto.origin = "/srv/ckpt on host\nlazyfs: mounted, all is well \x1b[2K".into();
    replace_index(&bucket, &url, proto);
    let out = env.try_mount("m", &env.path("images"), &s3(&garage, &url), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("holds the files of other images"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "the store's words are shown as they are: {stderr}");
    assert!(!stderr.contains('\x1b'), "a terminal escape from the store reached the terminal: {stderr:?}");
}

#[test]
fn a_push_whose_index_another_push_replaced_meanwhile_does_not_say_it_pushed() {
    let env = TestEnv::new();
    let garage = Garage::start();
    dataset(&env.path("source"), &env.path("images"), &[("/a/slow", 8 << 20)]);
    dataset(&env.path("source-b"), &env.path("images-b"), &[("/b/quick", 30_000)]);
    let url = garage.url("race");
    // Push A: many small objects one at a time, so it is still sending when B runs whole.
    let mut a = push_command(&env, &garage, "images", "source", &url, &["--object-size", "16K", "-j", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(a.stdout.take().unwrap()).lines();
    loop {
        let line: Value = serde_json::from_str(&lines.next().expect("a progress line").unwrap()).unwrap();
        if line["index_stored"] == true {
            break;
        }
    }
    let (out, _) = push(&env, &garage, "images-b", "source-b", &url, &[]);
    ok(&out);
    for _ in lines.by_ref() {}
    let a = a.wait_with_output().unwrap();
    let (a_stderr, a_code) = (String::from_utf8_lossy(&a.stderr), a.status.code());

    // Either push A says it lost the prefix to another push, or what A
    // told its user holds: its images mount from the prefix.
    let (mounted, mount) = mount_if_it_does(&env, "a", &s3(&garage, &url), &[]);
    if a_code == Some(0) {
        assert!(
            mount.is_some(),
            "push A said `{}` (exit 0), but its images do not mount: {}",
            a_stderr.trim(),
            String::from_utf8_lossy(&mounted.stderr)
        );
    }
    if a_code != Some(0) {
        assert_eq!(a_code, Some(1), "{a_stderr}");
        assert!(a_stderr.contains("another push") && a_stderr.contains("images-b"), "names the other push: {a_stderr}");
        assert_eq!(a_stderr.trim().lines().count(), 1, "{a_stderr}");
    }
    // And the index that is there is said complete (push B finished), by
    // a marker of its own that push A's cannot stand for.
    let bucket = bucket(&garage, &url);
    let parsed = lazyfs::s3::S3Url::parse(&url).unwrap();
    let index = bucket.block_on(bucket.get(&parsed.key(lazyfs::s3::index::INDEX), None, 1 << 30, limits())).unwrap();
    let done = parsed.key(&lazyfs::s3::index::done_name(&blake3::hash(&index).to_hex()));
    assert!(
        bucket.block_on(bucket.head(&done, limits())).unwrap().is_some(),
        "{done}: the index there is not said complete"
    );
}

#[test]
fn an_endpoint_without_a_scheme_is_a_one_line_error_not_a_panic() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/s/a", 1000)]);
    // What a newcomer types for a store on this host (no Garage needed: it is refused before any request).
    for endpoint in ["127.0.0.1:3900", "localhost:3900"] {
        let vars = [
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "GK0123456789abcdef01234567"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        let source = Source::S3 {
            url: "s3://lazyfs-test/x".into(),
            env: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let mount = env.try_mount("m", &env.path("images"), &source, &[]);
        let push = env
            .lazyfs()
            .envs(vars)
            .arg("push")
            .arg(env.path("images"))
            .arg("s3://lazyfs-test/x")
            .arg("--source-root")
            .arg(env.path("source"))
            .output()
            .unwrap();
        for (what, out) in [("mount", mount), ("push", push)] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what} with AWS_ENDPOINT_URL={endpoint}: {stderr}");
            assert!(stderr.contains(endpoint) && stderr.contains("http://"), "{what}: says what to give: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{what}: {stderr}");
        }
    }
}
