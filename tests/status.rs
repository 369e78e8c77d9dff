//! `lazyfs status`, `wait` and the JSON harnesses read, on live mounts.

mod common;

use std::time::{Duration, Instant};

use common::mount::{Source, TestEnv, dataset};
use common::sshd::Sshd;
use serde_json::Value;

fn check_fields(status: &Value) {
    for key in ["mountpoint", "source", "imgdir", "cache_dir", "layout", "state"] {
        assert!(status[key].is_string(), "{key}: {status}");
    }
    assert!(["fetching", "complete", "degraded"].contains(&status["state"].as_str().unwrap()));
    // An ETA only while prefetch runs and something is left.
    if !status["eta_s"].is_null() {
        assert!(status["prefetch"] == true && status["state"] == "fetching", "{status}");
    }
    assert!(status["pid"].is_u64() && status["prefetch"].is_boolean());
    for key in [
        "files_total",
        "files_present",
        "files_failed",
        "bytes_total",
        "bytes_present",
        "bytes_on_demand",
        "bytes_prefetched",
    ] {
        assert!(status[key].is_u64(), "{key}: {status}");
    }
    assert!(status["elapsed_s"].is_f64(), "{status}");
    // No rate until bytes have moved for a while (then no ETA either), 0 once complete.
    assert!(status["rate_bytes_per_s"].is_f64() || status["rate_bytes_per_s"].is_null(), "{status}");
    if status["rate_bytes_per_s"].is_null() {
        assert!(status["eta_s"].is_null() && status["state"] != "complete", "{status}");
    }
    assert!(status["eta_s"].is_f64() || status["eta_s"].is_null());
    assert!(status["local_files"].is_u64() && status["local_bytes"].is_u64(), "{status}");
    // The old host is needed until every file is here (a failed one is not).
    let settled_well = status["state"] == "complete" && status["files_failed"] == 0;
    assert!(status["source_needed"] == !settled_well, "{status}");
    for file in status["files"].as_array().unwrap() {
        assert!(file["path"].as_str().unwrap().starts_with('/'));
        assert!(file["mount_path"].is_string());
        assert!(file["size"].is_u64() && file["bytes_present"].is_u64() && file["reads"].is_u64());
        assert!(
            ["pending", "fetching", "present", "verified", "modified", "failed"]
                .contains(&file["state"].as_str().unwrap())
        );
        assert!(file["blake3"].is_string() || file["blake3"].is_null());
        assert!(["manifest", "received"].contains(&file["verified_against"].as_str().unwrap_or("received")));
        assert!(file["error"].is_string() || file["error"].is_null());
    }
}

#[test]
fn json_fields_hold_during_and_after_a_prefetch_and_then_the_old_host_can_go() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start();
    let files: Vec<(String, usize)> = (0..40).map(|i| (format!("/j/f{i:02}"), 700_000)).collect();
    let refs: Vec<(&str, usize)> = files.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    dataset(&env.path("source"), &env.path("images"), &refs);
    let mount = env.mount(
        "m",
        &env.path("images"),
        &Source::Ssh { sshd: &sshd, root: env.path("source") },
        &["--prefetch", "-j", "1"],
    );

    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = mount.status();
        check_fields(&status);
        let present = status["bytes_present"].as_u64().unwrap();
        assert!(present >= last, "bytes_present went down: {last} -> {present}");
        last = present;
        if status["state"] == "complete" {
            break status;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(30));
    };
    assert_eq!(status["bytes_present"], status["bytes_total"]);
    assert_eq!(status["bytes_prefetched"], 40 * 700_000);
    assert_eq!(status["files_present"], 40);
    assert_eq!(status["prefetch"], true);
    assert_eq!(status["local_files"], 0);
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("the old host is no longer needed"), "{text}");

    // The SSH sessions close; once the old host is gone the mount serves on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sshd.sessions().is_empty() {
        assert!(Instant::now() < deadline, "SSH sessions still open: {:?}", sshd.sessions());
        std::thread::sleep(Duration::from_millis(100));
    }
    sshd.stop();
    for (path, len) in &refs {
        assert_eq!(std::fs::read(mount.at(path)).unwrap(), common::mount::content(path, *len), "{path}");
    }
    std::fs::write(mount.at("/j/new"), b"after the old host").unwrap();
    assert_eq!(mount.status()["state"], "complete");

    // --watch --json: one object per line, the last one complete.
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap(), "--json", "--watch"]);
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.last().unwrap()["state"], "complete");

    // Every live mount, as an array.
    let out = env.run(&["status", "--json"]);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);

    let cache = mount.cache.clone();
    assert!(mount.umount().status.success());
    let summary: Value = serde_json::from_slice(&std::fs::read(cache.join("summary.json")).unwrap()).unwrap();
    check_fields(&summary);
    assert_eq!(summary["state"], "complete");
}

#[test]
fn wait_exit_codes() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/w/a", 100_000), ("/w/b", 200)]);
    let ssh = Source::Ssh { sshd: &sshd, root: env.path("source") };

    // A lazy mount where nothing is read never completes: timeout, 3.
    let lazy = env.mount("lazy", &env.path("images"), &ssh, &[]);
    let mp = lazy.mountpoint.to_str().unwrap().to_string();
    let out = env.run(&["wait", &mp, "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    // Reading a file whole makes it present, then verified: waiting for it alone succeeds.
    std::fs::read(lazy.at("/w/b")).unwrap();
    let out = env.run(&["wait", &mp, "/w/b", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.run(&["wait", &mp, &format!("{mp}/w/b"), "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(0));
    let out = env.run(&["wait", &mp, "/w/nope"]);
    assert_eq!(out.status.code(), Some(2));

    let full = env.mount("full", &env.path("images"), &ssh, &["--prefetch"]);
    let out = env.run(&["wait", full.mountpoint.to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // A file that fails: 4.
    std::fs::write(env.path("source/w/a"), b"short").unwrap();
    let failing = env.mount("failing", &env.path("images"), &ssh, &["--prefetch"]);
    let out = env.run(&["wait", failing.mountpoint.to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/w/a"));

    // Not a mount: 1.
    let out = env.run(&["wait", env.path("source").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bars_are_drawn_on_a_terminal_and_lines_elsewhere() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/t/a", 300_000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &["--prefetch"]);
    let out = env.run(&["wait", mount.mountpoint.to_str().unwrap(), "--timeout", "30"]);
    assert!(out.status.success());

    // Under a pseudo-terminal (util-linux `script`): the bars, drawn once, in binary units.
    let command = format!("{} status {}", env!("CARGO_BIN_EXE_lazyfs"), mount.mountpoint.display());
    let out = env.lazyfs_with("script").args(["-qfec", &command, "/dev/null"]).output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("[=============================="), "{screen}");
    assert!(screen.contains("complete: 292.97 KiB/292.97 KiB, 1/1 files present"), "{screen}");
    assert_eq!(screen.matches(mount.mountpoint.to_str().unwrap()).count(), 1, "drawn more than once: {screen:?}");
    // Once complete, no rate and no ETA.
    assert!(!screen.contains("/s") && !screen.contains("ETA"), "{screen}");

    // --watch on a terminal: redrawn in place until complete, with the same words.
    let command = format!("{} status --watch {}", env!("CARGO_BIN_EXE_lazyfs"), mount.mountpoint.display());
    let out = env.lazyfs_with("script").args(["-qfec", &command, "/dev/null"]).output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("complete: 292.97 KiB/292.97 KiB, 1/1 files present"), "{screen}");

    // Through a pipe: plain lines.
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    let line =
        "complete: 292.97 KiB/292.97 KiB, 1/1 files present; every file is here: the old host is no longer needed";
    assert_eq!(text, format!("{}: {line}\n", mount.mountpoint.display()));
}

/// The mount's rate covers the last few seconds, not the whole mount: idle
/// for longer than that, it is 0, whatever came before.
#[test]
fn the_rate_is_recent_and_the_eta_is_for_background_prefetch_only() {
    let env = TestEnv::new();
    dataset(&env.path("source"), &env.path("images"), &[("/r/a", 2_000_000), ("/r/b", 3_000_000)]);
    let mount = env.mount("m", &env.path("images"), &Source::Local(env.path("source")), &[]);
    // Nothing has moved yet: nothing to say a rate from.
    assert!(mount.status()["rate_bytes_per_s"].is_null());
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("/s"), "{}", String::from_utf8_lossy(&out.stdout));
    std::fs::read(mount.at("/r/a")).unwrap();
    let status = mount.status();
    assert_eq!(status["bytes_on_demand"], 2_000_000);
    // Reads are not background work: no ETA on a lazy mount.
    assert!(status["eta_s"].is_null(), "{status}");
    assert_eq!(status["prefetch"], false);
    std::thread::sleep(Duration::from_secs(6));
    let status = mount.status();
    assert_eq!(status["rate_bytes_per_s"], 0.0, "an idle mount fetches nothing: {status}");
    assert_eq!(status["state"], "fetching");
    let out = env.run(&["status", mount.mountpoint.to_str().unwrap()]);
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains(": lazy: fetches only what is read"), "{line}");
    assert!(line.contains("1.91 MiB/4.77 MiB, 1/2 files present, 0 B/s"), "{line}");
    assert!(!line.contains("ETA"), "{line}");
}

#[test]
fn prefetch_starts_on_a_live_lazy_mount() {
    let env = TestEnv::new();
    let sshd = Sshd::start();
    dataset(&env.path("source"), &env.path("images"), &[("/p/a", 500_000), ("/p/b", 700_000), ("/p/c", 100)]);
    let ssh = Source::Ssh { sshd: &sshd, root: env.path("source") };
    let mount = env.mount("m", &env.path("images"), &ssh, &[]);
    let mp = mount.mountpoint.to_str().unwrap();

    // Nothing is read: waiting times out, and says why and what to do.
    let out = env.run(&["wait", mp, "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("fetches only what is read: `lazyfs prefetch {mp}`")), "{text}");

    // Some files: those arrive, the others stay where they were.
    let out = env.run(&["prefetch", mp, "/p/a", &format!("{mp}/p/c")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prefetching 2 file(s)"));
    let out = env.run(&["wait", mp, "/p/a", "/p/c", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let status = mount.status();
    assert_eq!(status["prefetch"], true);
    let b = status["files"].as_array().unwrap().iter().find(|f| f["path"] == "/p/b").unwrap();
    assert_eq!(b["bytes_present"], 0, "{status}");
    assert_eq!(status["bytes_prefetched"], 500_100);

    // A path the mount does not serve: 2, nothing started.
    assert_eq!(env.run(&["prefetch", mp, "/p/nope"]).status.code(), Some(2));
    // Then everything.
    assert!(env.run(&["prefetch", mp]).status.success());
    let out = env.run(&["wait", mp, "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let status = mount.status();
    assert_eq!(status["bytes_prefetched"], 1_200_100);
    assert_eq!(status["rate_bytes_per_s"], 0.0, "complete: nothing is being fetched");
    assert!(status["eta_s"].is_null());
    assert!(std::fs::read(mount.at("/p/b")).unwrap() == common::mount::content("/p/b", 700_000));

    // Not a mount: 1.
    assert_eq!(env.run(&["prefetch", env.path("source").to_str().unwrap()]).status.code(), Some(1));
}

#[test]
fn the_readme_harness_example_runs_as_written() {
    let env = TestEnv::new();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/harness-example");
    let out = env
        .lazyfs_with(script.to_str().unwrap())
        .arg(env.path("harness"))
        .env("LAZYFS", env!("CARGO_BIN_EXE_lazyfs"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wait: exit 0"), "{stdout}");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(env.path("harness/cache/summary.json")).unwrap()).unwrap();
    check_fields(&summary);
}
