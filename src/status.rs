//! A mount's state as `lazyfs status` reports it, built from the live
//! filesystem (the control socket sends it as `control::proto::Status`).

use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::{Value, json};

use crate::control::proto::{FileStatus, Status};
use crate::fetch::Phase;
use crate::fs::Filesystem;
use crate::mount::MountRequest;
use crate::namespace::Layout;

/// The mount's state; with `per_file`, also each file's (the totals alone
/// are cheap enough for `lazyfs wait` to poll often).
pub fn snapshot(fs: &Filesystem, request: &MountRequest, source: &str, started: Instant, per_file: bool) -> Status {
    let mut status = Status {
        mountpoint: request.mountpoint.display().to_string(),
        source: source.to_string(),
        imgdir: request.imgdir.display().to_string(),
        cache_dir: request.cache_dir.display().to_string(),
        layout: match request.layout {
            Layout::Tree => "tree".into(),
            Layout::Flat => "flat".into(),
        },
        pid: std::process::id(),
        prefetch: request.prefetch,
        elapsed_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    for (index, file) in fs.fetcher().files().iter().enumerate() {
        let served = fs.served(index);
        let size = file.spill.len();
        let present = file.spill.present_bytes().min(size);
        let phase = file.phase();
        let (blake3, against) = match &phase {
            Phase::Verified { hash, against } => (blake3::Hash::from_bytes(*hash).to_hex().to_string(), *against),
            _ => (String::new(), ""),
        };
        let failed = matches!(phase, Phase::Failed(_));
        let mount_path = fs.namespace().file_ino(index).map(|ino| fs.namespace().mount_path(ino)).unwrap_or_default();
        let stats = &file.stats;
        status.files_total += 1;
        status.files_present += u64::from(!failed && file.spill.is_complete());
        status.files_failed += u64::from(failed);
        status.bytes_total += size;
        status.bytes_present += present;
        status.bytes_on_demand += stats.bytes_on_demand.load(Ordering::Relaxed);
        status.bytes_prefetched += stats.bytes_prefetched.load(Ordering::Relaxed);
        if !per_file {
            continue;
        }
        status.files.push(FileStatus {
            path: served.path.as_os_str().as_bytes().to_vec(),
            mount_path: mount_path.as_os_str().as_bytes().to_vec(),
            size,
            bytes_present: present,
            state: phase.name().into(),
            blake3,
            verified_against: against.into(),
            reads: stats.reads.load(Ordering::Relaxed),
            error: match &phase {
                Phase::Failed(message) => message.to_string(),
                _ => String::new(),
            },
            bytes_on_demand: stats.bytes_on_demand.load(Ordering::Relaxed),
            bytes_prefetched: stats.bytes_prefetched.load(Ordering::Relaxed),
            first_read_s: stats.first_read_s(),
            completed_s: stats.completed_s(),
        });
    }
    let settled = fs.fetcher().files().iter().filter(|f| f.phase().is_settled()).count() as u64;
    status.degraded_reason = fs.fetcher().degraded().unwrap_or_default();
    status.state = if !status.degraded_reason.is_empty() {
        "degraded"
    } else if settled == status.files_total {
        "complete"
    } else {
        "fetching"
    }
    .into();
    let elapsed = status.elapsed_s.max(1e-3);
    let fetched = (status.bytes_on_demand + status.bytes_prefetched) as f64;
    status.rate_bytes_per_s = fetched / elapsed;
    let remaining = status.bytes_total.saturating_sub(status.bytes_present) as f64;
    status.eta_s = match (remaining, status.rate_bytes_per_s) {
        (0.0, _) => Some(0.0),
        (r, rate) if rate > 0.0 && fs.fetcher().prefetching() => Some(r / rate),
        _ => None,
    };
    status
}
/// `lazyfs status --json`: the fields the README documents.
pub fn to_json(status: &Status) -> Value {
    let files: Vec<Value> = status
        .files
        .iter()
        .map(|f| {
            json!({
                "path": String::from_utf8_lossy(&f.path),
                "mount_path": String::from_utf8_lossy(&f.mount_path),
                "size": f.size,
                "bytes_present": f.bytes_present,
                "state": f.state,
                "blake3": non_empty(&f.blake3),
                "verified_against": non_empty(&f.verified_against),
                "reads": f.reads,
                "error": non_empty(&f.error),
                "bytes_on_demand": f.bytes_on_demand,
                "bytes_prefetched": f.bytes_prefetched,
                "first_read_s": f.first_read_s,
                "completed_s": f.completed_s,
            })
        })
        .collect();
    json!({
        "mountpoint": status.mountpoint,
        "source": status.source,
        "imgdir": status.imgdir,
        "cache_dir": status.cache_dir,
        "layout": status.layout,
        "pid": status.pid,
        "prefetch": status.prefetch,
        "state": status.state,
        "degraded_reason": non_empty(&status.degraded_reason),
        "detached": status.detached,
        "holders": status.holders,
        "files_total": status.files_total,
        "files_present": status.files_present,
        "files_failed": status.files_failed,
        "bytes_total": status.bytes_total,
        "bytes_present": status.bytes_present,
        "bytes_on_demand": status.bytes_on_demand,
        "bytes_prefetched": status.bytes_prefetched,
        "rate_bytes_per_s": status.rate_bytes_per_s,
        "eta_s": status.eta_s,
        "elapsed_s": status.elapsed_s,
        "files": files,
    })
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { Value::String(s.to_string()) }
}
