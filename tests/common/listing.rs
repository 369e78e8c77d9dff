//! Listings compared as rows: lazyfs's reader against what CRIU's own
//! decoder found (tests/fixtures/tools/expected_from_pycriu.py).

use lazyfs::images::{Checkpoint, Unservable, Usage};
use serde_json::Value;

/// (path, size, mode, regular, ghost, sorted users) as expected-files.json has them.
pub type Row = (String, Option<u64>, Option<u64>, bool, bool, Vec<String>);

pub fn expected_rows(list: &Value) -> Vec<Row> {
    let mut rows: Vec<Row> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut users: Vec<String> = e["users"].as_array().unwrap().iter().map(user_key).collect();
            users.sort();
            (
                e["path"].as_str().unwrap().to_string(),
                e["size"].as_u64(),
                e["mode"].as_u64(),
                e["regular"].as_bool().unwrap(),
                e["ghost"].as_bool().unwrap(),
                users,
            )
        })
        .collect();
    rows.sort();
    rows
}

fn user_key(user: &Value) -> String {
    match user.get("fd") {
        Some(fd) => format!("{} fd {}", user["pid"], fd),
        None => format!("{} {}", user["pid"], user["kind"].as_str().unwrap()),
    }
}

pub fn loaded_rows(checkpoint: &Checkpoint) -> Vec<Row> {
    let mut rows: Vec<Row> = checkpoint
        .files
        .iter()
        .map(|f| {
            let regular = !matches!(f.unservable, Some(Unservable::NotRegular(_)));
            let mut users: Vec<String> = f
                .users
                .iter()
                .map(|u| {
                    let pid = u.pid.map_or_else(|| "null".to_string(), |pid| pid.to_string());
                    match u.usage {
                        Usage::Fd { fd, .. } => format!("{pid} fd {fd}"),
                        other => format!("{pid} {}", other.kind()),
                    }
                })
                .collect();
            users.sort();
            (
                f.path.to_string_lossy().into_owned(),
                if regular { f.size } else { None },
                f.mode.map(u64::from),
                regular,
                matches!(f.unservable, Some(Unservable::Ghost { .. })),
                users,
            )
        })
        .collect();
    rows.sort();
    rows
}
