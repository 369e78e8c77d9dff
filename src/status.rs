//! A mount's state as `lazyfs status` reports it, built from the live
//! filesystem (the control socket sends it as `control::proto::Status`).

use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Value, json};

use crate::control::proto::{FailedDir, FileStatus, MountState, RecordedRange, Status};
use crate::fetch::Phase;
use crate::fs::Filesystem;
use crate::mount::MountRequest;
use crate::namespace::Layout;

/// The span the rate is measured over: recent enough to follow a change of
/// pace, long enough to smooth out the bursts of a pipelined transfer.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// How often the mount samples its byte counters for the rate.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How long bytes must have been moving before the rate says anything: right
/// after a mount (connections still opening, transfers ramping up) a rate,
/// and an ETA from it, can be many times off.
const MEASURED_AFTER: Duration = Duration::from_secs(2);

/// The one transfer rate every form of `lazyfs status` shows: bytes fetched
/// (on demand and by prefetch) over the last [`RATE_WINDOW`], from samples
/// of the mount's counters (taken every [`SAMPLE_EVERY`] and at each snapshot).
pub struct Meter {
    samples: Mutex<Samples>,
}

#[derive(Default)]
struct Samples {
    /// (when, bytes fetched so far), oldest first.
    taken: VecDeque<(Instant, u64)>,
    /// The last sample before bytes first moved.
    moving_since: Option<Instant>,
}

impl Meter {
    pub fn new() -> Meter {
        Meter { samples: Mutex::new(Samples::default()) }
    }

    /// Records that `fetched` bytes have been fetched so far; returns the
    /// rate over the window, or `None` until bytes have been moving for
    /// [`MEASURED_AFTER`].
    pub fn sample(&self, fetched: u64) -> Option<f64> {
        self.sample_at(Instant::now(), fetched)
    }

    fn sample_at(&self, now: Instant, fetched: u64) -> Option<f64> {
        let mut samples = self.samples.lock().expect("rate samples");
        let Samples { taken, moving_since } = &mut *samples;
        if moving_since.is_none() {
            match taken.back() {
                Some(&(since, before)) if before != fetched => *moving_since = Some(since),
                // Idle so far: the latest sample is where moving will start from.
                _ => taken.clear(),
            }
        }
        taken.push_back((now, fetched));
        // Keep one sample at or past the window's edge.
        while taken.len() > 2 && now.duration_since(taken[1].0) >= RATE_WINDOW {
            taken.pop_front();
        }
        let measured = moving_since.is_some_and(|since| now.duration_since(since) >= MEASURED_AFTER);
        let (since, before) = taken[0];
        let span = now.duration_since(since).as_secs_f64();
        measured.then(|| fetched.saturating_sub(before) as f64 / span)
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes fetched from the source since the mount started.
pub fn fetched_bytes(fs: &Filesystem) -> u64 {
    fs.fetcher()
        .files()
        .iter()
        .map(|f| f.stats.bytes_on_demand.load(Ordering::Relaxed) + f.stats.bytes_prefetched.load(Ordering::Relaxed))
        .sum()
}

/// Where a live mount is and how it got there.
pub struct Context<'a> {
    pub request: &'a MountRequest,
    /// How the source is named.
    pub source: &'a str,
    pub started: Instant,
    pub meter: &'a Meter,
}

/// The mount's state; with `per_file`, also each file's (the totals alone
/// are cheap enough for `lazyfs wait` to poll often).
pub fn snapshot(fs: &Filesystem, context: &Context<'_>, per_file: bool) -> Status {
    let Context { request, source, started, meter } = *context;
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
        prefetch: fs.fetcher().prefetching(),
        elapsed_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    // Bytes background prefetch has yet to bring in: what the ETA is for.
    let mut prefetch_left = 0;
    // Counted from the same look at each file as the rest, so a snapshot
    // never says complete while listing a file that is not settled.
    let mut settled = 0;
    for (index, file) in fs.fetcher().files().iter().enumerate() {
        if file.is_removed() {
            // Removed through the mount: no longer one of its files.
            continue;
        }
        let progress = file.progress();
        let (size, present, phase) = (progress.len, progress.present_bytes, progress.phase);
        let (blake3, against) = match &phase {
            Phase::Verified { hash, against } => (blake3::Hash::from_bytes(**hash).to_hex().to_string(), *against),
            _ => (String::new(), ""),
        };
        let failed = matches!(phase, Phase::Failed(_));
        let mount_path = {
            let ns = fs.namespace();
            ns.file_ino(index).map(|ino| ns.mount_path(ino)).unwrap_or_default()
        };
        let stats = &file.stats;
        status.files_total += 1;
        status.files_present += u64::from(!failed && progress.complete);
        status.files_failed += u64::from(failed);
        settled += u64::from(phase.is_settled());
        if phase == Phase::Modified {
            // Local now: its bytes are no longer the checkpoint's.
            status.local_files += 1;
            status.local_bytes += size;
        } else {
            status.bytes_total += size;
            status.bytes_present += present;
        }
        status.bytes_on_demand += stats.bytes_on_demand.load(Ordering::Relaxed);
        status.bytes_prefetched += stats.bytes_prefetched.load(Ordering::Relaxed);
        if fs.fetcher().prefetch_wanted(index) && !phase.is_settled() {
            prefetch_left += size - present;
        }
        if !per_file {
            continue;
        }
        status.files.push(FileStatus {
            path: file.path.as_os_str().as_bytes().to_vec(),
            mount_path: mount_path.as_os_str().as_bytes().to_vec(),
            size,
            bytes_present: present,
            state: phase.state().into(),
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
    if per_file {
        status.recording = fs
            .fetcher()
            .recording()
            .touches
            .into_iter()
            .map(|t| RecordedRange { path: t.path, first_chunk: t.first, end_chunk: t.end, at_s: t.at_us as f64 / 1e6 })
            .collect();
    }
    status.source_needed = fs.fetcher().source_needed();
    status.dirs_unlisted = fs.unlisted_dirs() as u64;
    status.failed_dirs = fs
        .failed_dirs()
        .into_iter()
        .map(|(path, mount_path, error)| FailedDir {
            path: path.as_os_str().as_bytes().to_vec(),
            mount_path: mount_path.as_os_str().as_bytes().to_vec(),
            error,
        })
        .collect();
    status.dirs_failed = status.failed_dirs.len() as u64;
    let (local_files, local_bytes) = fs.local_usage();
    status.local_files += local_files;
    status.local_bytes += local_bytes;
    status.degraded_reason = fs.fetcher().degraded().unwrap_or_default();
    status.source_error = fs.fetcher().source_error().map(|e| e.to_string()).unwrap_or_default();
    let state = if !status.degraded_reason.is_empty() {
        MountState::Degraded
    } else if settled == status.files_total && status.dirs_unlisted == 0 {
        MountState::Complete
    } else {
        MountState::Fetching
    };
    status.set_state(state);
    let rate = meter.sample(status.bytes_on_demand + status.bytes_prefetched);
    // Nothing more is fetched once complete: no rate decaying towards zero.
    status.rate_bytes_per_s = if state == MountState::Complete { Some(0.0) } else { rate };
    // An ETA only for what is being fetched in the background; reads come when they come.
    status.eta_s = rate
        .filter(|&rate| state == MountState::Fetching && prefetch_left > 0 && rate > 0.0)
        .map(|rate| prefetch_left as f64 / rate);
    status
}
/// `lazyfs status --json`: the fields the README documents, written as they
/// are serialized (the files one by one: 100,000 of them are never a tree of
/// JSON values first).
pub fn to_json(status: &Status) -> StatusJson<'_> {
    StatusJson(status)
}

/// A status as JSON (see [`to_json`]).
pub struct StatusJson<'a>(&'a Status);

impl Serialize for StatusJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let status = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("mountpoint", &status.mountpoint)?;
        map.serialize_entry("source", &status.source)?;
        map.serialize_entry("imgdir", &status.imgdir)?;
        map.serialize_entry("cache_dir", &status.cache_dir)?;
        map.serialize_entry("layout", &status.layout)?;
        map.serialize_entry("pid", &status.pid)?;
        map.serialize_entry("supervisor_pid", &status.supervisor_pid)?;
        map.serialize_entry("restarts", &status.restarts)?;
        map.serialize_entry("last_restart_reason", &non_empty(&status.last_restart_reason))?;
        map.serialize_entry("version", &status.version)?;
        map.serialize_entry("binary", &status.binary)?;
        map.serialize_entry("failure", &non_empty(&status.failure))?;
        map.serialize_entry("prefetch", &status.prefetch)?;
        map.serialize_entry("state", status.state().word())?;
        map.serialize_entry("degraded_reason", &non_empty(&status.degraded_reason))?;
        map.serialize_entry("detached", &status.detached)?;
        map.serialize_entry("holders", &status.holders)?;
        map.serialize_entry("files_total", &status.files_total)?;
        map.serialize_entry("files_present", &status.files_present)?;
        map.serialize_entry("files_failed", &status.files_failed)?;
        map.serialize_entry("bytes_total", &status.bytes_total)?;
        map.serialize_entry("bytes_present", &status.bytes_present)?;
        map.serialize_entry("bytes_on_demand", &status.bytes_on_demand)?;
        map.serialize_entry("bytes_prefetched", &status.bytes_prefetched)?;
        map.serialize_entry("local_files", &status.local_files)?;
        map.serialize_entry("local_bytes", &status.local_bytes)?;
        map.serialize_entry("source_needed", &status.source_needed)?;
        map.serialize_entry("source_error", &non_empty(&status.source_error))?;
        map.serialize_entry("dirs_unlisted", &status.dirs_unlisted)?;
        map.serialize_entry("dirs_failed", &status.dirs_failed)?;
        map.serialize_entry("failed_dirs", &Each(&status.failed_dirs, failed_dir_json))?;
        map.serialize_entry("rate_bytes_per_s", &status.rate_bytes_per_s)?;
        map.serialize_entry("eta_s", &status.eta_s)?;
        map.serialize_entry("elapsed_s", &status.elapsed_s)?;
        map.serialize_entry("files", &Each(&status.files, file_json))?;
        map.serialize_entry("chunk_size", &crate::store::CHUNK_SIZE)?;
        map.serialize_entry("recording", &Each(&status.recording, range_json))?;
        map.end()
    }
}

/// A list serialized element by element, each made into JSON by the function.
struct Each<'a, T>(&'a [T], fn(&T) -> Value);

impl<T> Serialize for Each<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(self.1))
    }
}

fn failed_dir_json(d: &FailedDir) -> Value {
    json!({
        "path": String::from_utf8_lossy(&d.path),
        "mount_path": String::from_utf8_lossy(&d.mount_path),
        "error": d.error,
    })
}

fn file_json(f: &FileStatus) -> Value {
    json!({
        "path": String::from_utf8_lossy(&f.path),
        "mount_path": String::from_utf8_lossy(&f.mount_path),
        "size": f.size,
        "bytes_present": f.bytes_present,
        "state": f.state().word(),
        "blake3": non_empty(&f.blake3),
        "verified_against": non_empty(&f.verified_against),
        "reads": f.reads,
        "error": non_empty(&f.error),
        "bytes_on_demand": f.bytes_on_demand,
        "bytes_prefetched": f.bytes_prefetched,
        "first_read_s": f.first_read_s,
        "completed_s": f.completed_s,
    })
}

fn range_json(r: &RecordedRange) -> Value {
    json!({
        "path": String::from_utf8_lossy(&r.path),
        "first_chunk": r.first_chunk,
        "end_chunk": r.end_chunk,
        "at_s": r.at_s,
    })
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { Value::String(s.to_string()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Right after a mount the counters barely moved while connections
    /// opened: no rate (and so no ETA) until bytes have moved for a while,
    /// then the rate of the moving alone.
    #[test]
    fn no_rate_until_bytes_have_moved_for_a_while() {
        let meter = Meter::new();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(meter.sample_at(at(0), 0), None);
        assert_eq!(meter.sample_at(at(900), 0), None, "idle");
        assert_eq!(meter.sample_at(at(1000), 100_000), None, "just started moving");
        assert_eq!(meter.sample_at(at(2500), 10_000_000), None, "moving for 1.6 s");
        let rate = meter.sample_at(at(2900), 20_000_000).expect("moving for 2 s");
        // 20 MB since the last idle sample at 0.9 s, not since the mount started.
        assert!((rate - 10_000_000.0).abs() < 1.0, "{rate}");
        // Idle for longer than the window: measured, and 0.
        assert_eq!(meter.sample_at(at(9000), 20_000_000), Some(0.0));
    }
}
