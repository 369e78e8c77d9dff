//! `lazyfs ls`: the files a checkpoint records, as a table or JSON.

use std::fmt::Write as _;
use std::io::Write;

use serde_json::{Value, json};

use crate::images::{Checkpoint, RecordedFile, Usage};

pub fn to_json(checkpoint: &Checkpoint) -> Value {
    Value::Array(checkpoint.files.iter().map(file_json).collect())
}

fn file_json(file: &RecordedFile) -> Value {
    let users: Vec<Value> = file
        .users
        .iter()
        .map(|user| match user.usage {
            Usage::Fd { fd, flags } => json!({ "pid": user.pid, "fd": fd, "flags": flags }),
            other => json!({ "pid": user.pid, "kind": other.kind() }),
        })
        .collect();
    json!({
        "path": file.path.to_string_lossy(),
        "source_path": file.source_path.to_string_lossy(),
        "size": file.size,
        "mode": file.mode,
        "flags": file.flags,
        "users": users,
        "servable": file.is_servable(),
        "reason": file.unservable.as_ref().map(|r| r.to_string()),
    })
}

pub fn write_table(checkpoint: &Checkpoint, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{:>12}  {:<10}  {:<24}  PATH", "SIZE", "MODE", "USERS")?;
    for file in &checkpoint.files {
        let size = file.size.map_or_else(|| "?".to_string(), |s| s.to_string());
        let mode = file.mode.map_or_else(|| "?".to_string(), mode_string);
        let mut line = format!("{size:>12}  {mode:<10}  {:<24}  {}", users_summary(file), escape_path(&file.path));
        if file.source_path != file.path {
            let _ = write!(line, "  (on the source: {})", escape_path(&file.source_path));
        }
        if let Some(reason) = &file.unservable {
            let _ = write!(line, "  [not served: {reason}]");
        }
        writeln!(out, "{line}")?;
    }
    let servable: Vec<_> = checkpoint.servable().collect();
    let known: u64 = servable.iter().filter_map(|f| f.size).sum();
    let by = match checkpoint.incomplete {
        Some(_) => "the fdinfo images".to_string(),
        None => format!("{} process(es)", checkpoint.pids.len()),
    };
    writeln!(
        out,
        "{} files recorded by {by}; {} servable ({} bytes known), {} not",
        checkpoint.files.len(),
        servable.len(),
        known,
        checkpoint.files.len() - servable.len()
    )
}

/// `1234: fd 3,4 map×5 exe` for each process, joined with `; ` (`?: fd 3`
/// where the images do not say which process).
fn users_summary(file: &RecordedFile) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut pids: Vec<Option<u32>> = file.users.iter().map(|u| u.pid).collect();
    pids.dedup();
    for pid in pids {
        let mine: Vec<Usage> = file.users.iter().filter(|u| u.pid == pid).map(|u| u.usage).collect();
        let fds: Vec<String> = mine
            .iter()
            .filter_map(|u| match u {
                Usage::Fd { fd, .. } => Some(fd.to_string()),
                _ => None,
            })
            .collect();
        let mut words = Vec::new();
        if !fds.is_empty() {
            words.push(format!("fd {}", fds.join(",")));
        }
        for kind in [Usage::Map, Usage::Exe, Usage::Cwd, Usage::Root] {
            match mine.iter().filter(|&&u| u == kind).count() {
                0 => {}
                1 => words.push(kind.kind().to_string()),
                n => words.push(format!("{}×{n}", kind.kind())),
            }
        }
        let pid = pid.map_or_else(|| "?".to_string(), |pid| pid.to_string());
        parts.push(format!("{pid}: {}", words.join(" ")));
    }
    parts.join("; ")
}

/// Like `ls -l`: `-rw-r--r--`.
pub fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o120000 => 'l',
        0o140000 => 's',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// A name as one printable line: control characters (a newline is legal in a
/// name) and invalid UTF-8 are shown escaped.
pub fn escape_path(path: &std::path::Path) -> String {
    crate::ui::printable(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(mode_string(0o100644), "-rw-r--r--");
        assert_eq!(mode_string(0o100755), "-rwxr-xr-x");
        assert_eq!(mode_string(0o040755), "drwxr-xr-x");
        assert_eq!(mode_string(0o020666), "crw-rw-rw-");
    }

    #[test]
    fn escapes_control_characters_only() {
        let path = std::path::Path::new("/a b/new\nline/'q\"/$x;`y`");
        assert_eq!(escape_path(path), "/a b/new\\nline/'q\"/$x;`y`");
    }
}
