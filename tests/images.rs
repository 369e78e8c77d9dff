//! The image reader against real CRIU dumps, crit-encoded fixtures of both
//! file record formats, and damaged images.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use common::listing::{expected_rows, loaded_rows};
use lazyfs::images::{Checkpoint, FileRecords, Unservable, Usage};
use serde_json::Value;

#[test]
fn every_fixture_matches_criu_own_decoder() {
    let dirs = common::expected_dirs();
    assert!(dirs.len() >= 18, "fixtures missing: {dirs:?}");
    for (images, expected) in dirs {
        let checkpoint = Checkpoint::load(&images).unwrap_or_else(|e| panic!("{e}"));
        let expected: Value = serde_json::from_slice(&std::fs::read(&expected).unwrap()).unwrap();
        let (want, got) = (expected_rows(&expected), loaded_rows(&checkpoint));
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w, g, "in {}", images.display());
        }
        assert_eq!(want.len(), got.len(), "in {}", images.display());
    }
}

/// `lazyfs ls --json DIR`: exit code, stderr, the listing.
fn ls_json(dir: &std::path::Path) -> (Option<i32>, String, Value) {
    let out = common::lazyfs(&["ls".as_ref(), dir.as_os_str(), "--json".as_ref()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let list = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), stderr, list)
}

/// Every user's pid in a `--json` listing.
fn pids(list: &Value) -> Vec<Value> {
    list.as_array().unwrap().iter().flat_map(|f| f["users"].as_array().unwrap()).map(|u| u["pid"].clone()).collect()
}

#[test]
fn task_states_decide_which_images_are_read() {
    // Zombies 4051770 and 4051771 have only core-PID.img; 4051772 is stopped and has everything.
    let zombie = common::fixtures().join("real/zombie/images");
    let (code, stderr, list) = ls_json(&zombie);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "a whole dump has no warning: {stderr}");
    let checkpoint = Checkpoint::load(&zombie).unwrap();
    assert_eq!(checkpoint.pids, [4051769, 4051770, 4051771, 4051772]);
    let users_of = |checkpoint: &Checkpoint, pid: u32| -> Vec<Usage> {
        checkpoint.files.iter().flat_map(|f| &f.users).filter(|u| u.pid == Some(pid)).map(|u| u.usage).collect()
    };
    for dead in [4051770, 4051771] {
        assert!(users_of(&checkpoint, dead).is_empty());
    }
    let stopped = users_of(&checkpoint, 4051772);
    for usage in [Usage::Exe, Usage::Cwd, Usage::Root, Usage::Map] {
        assert!(stopped.contains(&usage), "{usage:?} of the stopped task");
    }
    assert!(pids(&list).iter().all(Value::is_u64));

    // The same dump with the stopped task as a helper (0x80) without mm or fs
    // images, and a zombie as a pre-3.0 helper (4) with nothing but its core.
    let helper = Checkpoint::load(&common::fixtures().join("synthetic/helper")).unwrap();
    assert!(helper.incomplete.is_none());
    let helper_users = users_of(&helper, 4051772);
    assert!(helper_users.iter().all(|u| matches!(u, Usage::Fd { .. })) && !helper_users.is_empty());
    assert!(users_of(&helper, 4051770).is_empty());
}

#[test]
fn incomplete_dirs_list_what_the_fdinfo_images_refer_to_with_one_warning() {
    let mut seen = 0;
    for entry in std::fs::read_dir(common::fixtures().join("incomplete")).unwrap() {
        let dir = entry.unwrap().path();
        let images = dir.join("images");
        let missing = std::fs::read_to_string(dir.join("expected-warning")).unwrap();
        let (code, stderr, list) = ls_json(&images);
        assert_eq!(code, Some(0), "{}: {stderr}", dir.display());
        assert_eq!(stderr.lines().count(), 1, "{}: {stderr}", dir.display());
        let warning = format!("lazyfs: warning: {}: {} is missing", images.display(), missing.trim());
        assert!(stderr.starts_with(&warning), "{}: want {warning:?}, got {stderr}", dir.display());
        assert!(stderr.contains("every regular file an fdinfo-*.img refers to"), "{stderr}");
        // Users without invented pids, and only descriptors.
        let files = list.as_array().unwrap();
        assert!(files.iter().any(|f| f["servable"] == true), "{}: nothing servable", dir.display());
        assert!(pids(&list).iter().all(Value::is_null), "{}: {list}", dir.display());
        assert!(files.iter().flat_map(|f| f["users"].as_array().unwrap()).all(|u| u["fd"].is_u64()));

        let table = common::lazyfs(&["ls".as_ref(), images.as_os_str()]);
        let text = String::from_utf8(table.stdout).unwrap();
        assert!(text.contains("?: fd "), "{text}");
        assert!(text.contains("recorded by the fdinfo images"), "{text}");
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} incomplete fixtures");
}

#[test]
fn file_record_formats_are_told_apart() {
    let load = |rel: &str| Checkpoint::load(&common::fixtures().join(rel)).unwrap();
    assert_eq!(load("synthetic/legacy").file_records, FileRecords::Legacy);
    assert_eq!(load("synthetic/legacy-old").file_records, FileRecords::Legacy);
    assert_eq!(load("real/d1-kill-legacy/images").file_records, FileRecords::Legacy);
    assert_eq!(load("synthetic/modern").file_records, FileRecords::Modern);
    assert_eq!(load("real/d1-kill/images").file_records, FileRecords::Modern);
}

#[test]
fn legacy_conversion_lists_the_same_files_as_the_original() {
    let load = |rel: &str| Checkpoint::load(&common::fixtures().join(rel)).unwrap();
    let (modern, legacy) = (load("real/d1-kill/images"), load("real/d1-kill-legacy/images"));
    assert_eq!(loaded_rows(&modern), loaded_rows(&legacy));
}

#[test]
fn hostile_names_are_refused_and_odd_ones_served() {
    let checkpoint = Checkpoint::load(&common::fixtures().join("synthetic/edge")).unwrap();
    let by_path: BTreeMap<&[u8], _> = checkpoint.files.iter().map(|f| (f.path.as_os_str().as_bytes(), f)).collect();
    for served in [
        &b"/data/with space.txt"[..],
        b"/data/quote's \"dq\".txt",
        b"/data/$HOME;rm -rf ~;`id`",
        b"/data/new\nline.txt",
        b"/tmp/$(touch /tmp/lazyfs-pwned)",
        "/data/ünïcødé.txt".as_bytes(),
        b"/data/mapped.bin",
        b"/data/append.log",
        b"/opt/app/bin/server",
    ] {
        let file = by_path.get(served).unwrap_or_else(|| panic!("{:?} missing", OsStr::from_bytes(served)));
        assert!(file.is_servable(), "{:?}: {:?}", file.path, file.unservable);
    }
    for (refused, phrase) in [
        (&b"relative/path.txt"[..], "relative"),
        (b"/data/../etc/passwd", "`..`"),
        (b"/data//double", "empty component"),
        (b"/data/trailing/", "empty component"),
        (b"/data/./dot", "`.`"),
        (b"/data/nul\0byte", "NUL"),
        (b"/data/ghost.tmp", "ghost-file-1.img"),
        (b"/data/linked.tmp", "link remap"),
        (b"/dev/zero", "character device"),
        (b"/data", "directory"),
        (b"/", "directory"),
    ] {
        let file = by_path[refused];
        let reason = file.unservable.as_ref().unwrap_or_else(|| panic!("{:?} served", file.path)).to_string();
        assert!(reason.contains(phrase), "{:?}: {reason}", file.path);
    }
    // The append-only log has no recorded size: the mount asks the source.
    assert_eq!(by_path[&b"/data/append.log"[..]].size, None);
    // A file reopened by another process is one entry with every user.
    assert_eq!(by_path[&b"/data/with space.txt"[..]].users.len(), 4);
}

#[test]
fn bind_mount_files_come_from_the_bind_source() {
    let checkpoint = Checkpoint::load(&common::fixtures().join("real/d4-mntns/images")).unwrap();
    let deep = checkpoint.files.iter().find(|f| f.path.ends_with("nested/a/b/c/deep.txt")).unwrap();
    assert_eq!(deep.source_path.to_str().unwrap(), "/tmp/criu-work/src-data/d4-mntns-bind-source/a/b/c/deep.txt");
    let on_tmpfs = checkpoint.files.iter().find(|f| f.path.ends_with("on-tmpfs.txt")).unwrap();
    assert_eq!(on_tmpfs.unservable, Some(Unservable::DumpedTmpfs));
}

#[test]
fn ls_json_has_the_documented_fields() {
    let dir = common::fixtures().join("real/single/images");
    let out = common::lazyfs(&["ls".as_ref(), dir.as_os_str(), "--json".as_ref()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = list.as_array().unwrap();
    assert_eq!(files.len(), 31);
    for file in files {
        assert!(file["path"].as_str().unwrap().starts_with('/'));
        assert!(file["size"].is_u64() || file["size"].is_null());
        assert!(file["mode"].is_u64() || file["mode"].is_null());
        assert!(file["flags"].is_u64());
        assert!(file["servable"].is_boolean());
        assert_eq!(file["reason"].is_null(), file["servable"].as_bool().unwrap());
        for user in file["users"].as_array().unwrap() {
            assert!(user["pid"].is_u64());
            let kind = user.get("kind").and_then(Value::as_str);
            assert!(user["fd"].is_u64() ^ kind.is_some(), "{user}");
            if let Some(kind) = kind {
                assert!(["map", "exe", "cwd", "root"].contains(&kind), "{kind}");
            }
        }
    }
    let b_bin = files.iter().find(|f| f["path"] == "/tmp/lazyfs-fixture/data/b.bin").unwrap();
    assert_eq!(b_bin["size"], 3_000_000);
    assert_eq!(b_bin["mode"], 0o100644);
}

#[test]
fn ls_table_lists_every_file() {
    let dir = common::fixtures().join("real/tree/images");
    let out = common::lazyfs(&["ls".as_ref(), dir.as_os_str()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("12582917"), "{text}");
    assert!(text.contains("/tmp/lazyfs-fixture/data/big.img"));
    assert!(text.contains("11946: fd 3; 11948: fd 3; 11949: fd 3"), "{text}");
}

#[test]
fn every_malformed_image_is_a_one_line_error_naming_it() {
    let mut seen = 0;
    for entry in std::fs::read_dir(common::fixtures().join("malformed")).unwrap() {
        let dir = entry.unwrap().path();
        let expected = std::fs::read_to_string(dir.join("expected-error")).unwrap();
        let mut lines = expected.lines();
        let (image, phrase) = (lines.next().unwrap(), lines.next().unwrap());

        let out = common::lazyfs(&["ls".as_ref(), dir.as_os_str()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", dir.display());
        assert_eq!(stderr.lines().count(), 1, "{}: {stderr}", dir.display());
        assert!(stderr.contains(&format!("{}/{image}", dir.display())), "{}: {stderr}", dir.display());
        assert!(stderr.contains(phrase), "{}: want {phrase:?} in {stderr}", dir.display());
        assert!(out.stdout.is_empty());
        seen += 1;
    }
    assert!(seen >= 15, "only {seen} malformed fixtures");
}

#[test]
fn a_missing_directory_is_bad_input() {
    let out = common::lazyfs(&["ls".as_ref(), "/nonexistent/lazyfs-images".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lazyfs-images: missing"));
}
